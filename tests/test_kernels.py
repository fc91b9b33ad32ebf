"""gpu_kernels.py: the GPU speed-ups train.py calls, against torch references on small tensors.

The kernels need CUDA (and Triton or the cuDNN frontend); without them their tests skip, and what
runs here is that the module imports on a CPU and says so.
"""

import sys

import pytest
import torch
import torch.nn as nn
from conftest_data import REPO_ROOT

# gpu_kernels.py sits at the project root, where train.py finds it on PYTHONPATH.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
import gpu_kernels  # noqa: E402

needs_triton = pytest.mark.skipif(not gpu_kernels.triton_kernels_available(), reason="needs CUDA and Triton")
needs_window_attention = pytest.mark.skipif(not gpu_kernels.window_attention_available("cuda"),
                                            reason="needs CUDA and nvidia-cudnn-frontend")


def test_the_kernels_say_whether_they_can_run_here():
    has_cuda = torch.cuda.is_available()
    assert gpu_kernels.window_attention_available("cpu") is False
    assert gpu_kernels.triton_kernels_available("cpu") is False
    if not has_cuda:
        assert gpu_kernels.triton_kernels_available() is False
        assert gpu_kernels.window_attention_available("cuda") is False


@needs_triton
def test_fused_loss_matches_softcapped_cross_entropy():
    cap, generator = 15.0, torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(512, 64, device="cuda", generator=generator).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(1000, 64, device="cuda", generator=generator) * 0.1).requires_grad_()
    targets = torch.randint(0, 1000, (512,), device="cuda", generator=generator)
    targets[::7] = -1
    loss = gpu_kernels.lm_head_softcap_loss(x, weight.to(torch.bfloat16), targets, cap)
    grads = torch.autograd.grad(2 * loss, (x, weight))

    x_ref, weight_ref = x.detach().float().requires_grad_(), weight.detach().to(torch.bfloat16).float().requires_grad_()
    reference = nn.functional.cross_entropy(cap * torch.tanh(x_ref @ weight_ref.t() / cap), targets, ignore_index=-1)
    reference_grads = torch.autograd.grad(2 * reference, (x_ref, weight_ref))
    assert loss.item() == pytest.approx(reference.item(), rel=1e-4)
    for grad, expected in zip(grads, reference_grads, strict=True):
        assert (grad.float() - expected).abs().max() <= 1e-2 * expected.abs().max()


@needs_triton
def test_rotary_rms_norm_matches_rotate_then_rms_norm():
    B, T, H, D, generator = 2, 100, 3, 64, torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, T, H, D, device="cuda", generator=generator).to(torch.bfloat16).requires_grad_()
    dy = torch.randn(B, T, H, D, device="cuda", generator=generator)
    angles = torch.rand(T + 5, D // 2, device="cuda", generator=generator) * 6
    cos, sin = angles.cos().to(torch.bfloat16)[None, :, None, :], angles.sin().to(torch.bfloat16)[None, :, None, :]
    out = gpu_kernels.rotary_rms_norm(x, cos, sin)
    (grad,) = torch.autograd.grad(out, x, dy.to(torch.bfloat16))

    x_ref = x.detach().float().requires_grad_()
    c, s = cos[:, :T].float(), sin[:, :T].float()
    a, b = x_ref[..., :D // 2], x_ref[..., D // 2:]
    reference = nn.functional.rms_norm(torch.cat((a * c + b * s, b * c - a * s), dim=-1), (D,))
    (reference_grad,) = torch.autograd.grad(reference, x_ref, dy.to(torch.bfloat16).float())
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    assert (out.float() - reference).abs().max() <= 1e-2 * reference.abs().max()
    assert (grad.float() - reference_grad).abs().max() <= 1e-2 * reference_grad.abs().max()


@needs_window_attention
def test_sliding_window_attention_matches_a_band_masked_softmax():
    B, T, H, D, window, generator = 2, 300, 3, 64, 100, torch.Generator(device="cuda").manual_seed(0)
    # (B, T, H, D) projections seen as (B, H, T, D), the strides train.py hands the kernel
    q, k, v = [torch.randn(B, T, H, D, device="cuda", generator=generator).to(torch.bfloat16).transpose(1, 2)
               .requires_grad_() for _ in range(3)]
    dy = torch.randn(B, H, T, D, device="cuda", generator=generator).to(torch.bfloat16)
    out = gpu_kernels.sliding_window_attention(q, k, v, window)
    grads = torch.autograd.grad(out, (q, k, v), dy)

    inputs = [t.detach().float().requires_grad_() for t in (q, k, v)]
    offset = torch.arange(T, device="cuda")[:, None] - torch.arange(T, device="cuda")[None, :]
    reference = nn.functional.scaled_dot_product_attention(*inputs, attn_mask=(offset >= 0) & (offset <= window))
    reference_grads = torch.autograd.grad(reference, inputs, dy.float())
    assert out.dtype == torch.bfloat16 and out.shape == (B, H, T, D)
    assert (out.float() - reference).abs().max() <= 1e-2 * reference.abs().max()
    for grad, expected in zip(grads, reference_grads, strict=True):
        assert (grad.float() - expected).abs().max() <= 1e-2 * expected.abs().max()


def test_fused_loss_refuses_a_cap_exp_could_overflow_with_the_fix():
    x, weight = torch.zeros(4, 8, dtype=torch.bfloat16), torch.zeros(16, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="FUSED_LOSS = False"):
        gpu_kernels.lm_head_softcap_loss(x, weight, torch.zeros(4, dtype=torch.long), 100)
