"""The fused training loss (gpu_kernels.lm_head_softcap_loss) against train.py's plain loss, on one GPU.

Checks the loss and the gradients of x and the lm_head weight against an fp32 reference, next to
the plain bf16 path's own error; then times forward + backward of lm_head + soft-cap +
cross-entropy at train.py's shape (h100 profile: 128 x 2048 rows, width 512, vocabulary 8192)
for the plain path compiled as train.py compiles it and for the fused one, with the memory each
adds on top of its inputs. Last, the loss kernel alone at several warp counts, with the exact and
the approximate tanh, against one read and one write of the logits (an in-place scale of the same
buffer: the memory-bound floor).

    python bench/fused_loss.py          # needs CUDA (Triton comes with torch's CUDA builds)
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernel_check import time_ms, worst_error_ratio  # noqa: E402

import gpu_kernels  # noqa: E402
from gpu_kernels import lm_head_softcap_loss, triton_kernels_available  # noqa: E402

CAP = 15.0
FAST_TANH = gpu_kernels.SOFTCAP_FAST_TANH


def plain_loss(x, weight, targets):
    """train.py's loss without the fused kernel, under bf16 autocast."""
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = (x @ weight.t()).float()
        return F.cross_entropy(CAP * torch.tanh(logits / CAP), targets, ignore_index=-1)


def fused_loss(x, weight, targets):
    return lm_head_softcap_loss(x.to(torch.bfloat16), weight.to(torch.bfloat16), targets, CAP)


def inputs(N, C, V, seed=0, weight_scale=0.05):
    """weight_scale 0.05 gives logits of about one unit; 0.5 about ten, where the soft-cap bends."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(N, C, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(V, C, device="cuda", generator=g) * weight_scale).requires_grad_()
    targets = torch.randint(0, V, (N,), device="cuda", generator=g)
    targets[::17] = -1   # some rows unscored, as ignore_index allows
    return x, weight, targets


def loss_and_grads(loss_fn, x, weight, targets):
    loss = loss_fn(x, weight, targets)
    return (loss, *torch.autograd.grad(loss, (x, weight)))


def check(weight_scale, N=8192, C=512, V=8192):
    x, weight, targets = inputs(N, C, V, weight_scale=weight_scale)
    xr, wr = x.detach().float().requires_grad_(), weight.detach().to(torch.bfloat16).float().requires_grad_()
    ref = loss_and_grads(lambda a, b, t: F.cross_entropy(CAP * torch.tanh((a @ b.t()) / CAP), t, ignore_index=-1),
                         xr, wr, targets)
    plain = loss_and_grads(plain_loss, x, weight, targets)
    fused = loss_and_grads(fused_loss, x, weight, targets)
    return worst_error_ratio(("loss", "d x", "d weight"), ref, fused, plain, ("fused", "plain bf16"))


def measure(loss_fn, x, weight, targets):
    loss_and_grads(loss_fn, x, weight, targets)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ms = time_ms(lambda: loss_and_grads(loss_fn, x, weight, targets))
    return ms, (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def kernel_alone(logits, targets, warps, fast_tanh):
    """One launch of the loss kernel over `logits` (overwritten with gradients each time)."""
    losses = torch.empty(logits.size(0), dtype=torch.float32, device=logits.device)
    inv_count = torch.ones((), device=logits.device)
    return lambda: gpu_kernels._softcap_ce(logits, targets, losses, inv_count, CAP, num_warps=warps, fast_tanh=fast_tanh)


def main():
    if not triton_kernels_available():
        raise SystemExit("needs a CUDA GPU and Triton")
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__}", flush=True)
    worst = 0.0
    for fast_tanh in (True, False):
        gpu_kernels.SOFTCAP_FAST_TANH = fast_tanh
        for weight_scale in (0.05, 0.5):
            print(f"correctness ({'approximate' if fast_tanh else 'exact'} tanh, 8192 rows, width 512, vocabulary "
                  f"8192, every 17th row unscored, weights x {weight_scale}):", flush=True)
            worst = max(worst, check(weight_scale))
    gpu_kernels.SOFTCAP_FAST_TANH = FAST_TANH
    ok = worst < 2.0
    print(f"  worst error ratio to the plain path's own error: {worst:.2f} -> {'ok' if ok else 'FAILED'}", flush=True)

    N, C, V = 128 * 2048, 512, 8192
    x, weight, targets = inputs(N, C, V)
    rows = [("plain (compiled, as train.py without the kernel)", torch.compile(plain_loss, dynamic=False)),
            ("fused (gpu_kernels.lm_head_softcap_loss)", fused_loss)]
    print(f"fwd + bwd of lm_head + soft-cap + cross-entropy, {N} rows, width {C}, vocabulary {V}:", flush=True)
    base = None
    for name, loss_fn in rows:
        ms, extra_mb = measure(loss_fn, x, weight, targets)
        base = base or ms
        print(f"  {name:50s} {ms:7.3f} ms  {base / ms:.2f}x  peak +{extra_mb:,.0f} MB", flush=True)

    logits = (x.detach() @ weight.detach().to(torch.bfloat16).t())
    gigabytes = 2 * logits.numel() * logits.element_size() / 1e9
    floor = time_ms(lambda: logits.mul_(1.0))
    print(f"the loss kernel alone, {N} x {V} bf16 logits (read once, written once: {gigabytes:.1f} GB):", flush=True)
    print(f"  {'in-place scale (memory floor)':30s} {floor:7.3f} ms  {gigabytes / floor:5.2f} TB/s", flush=True)
    for fast_tanh in (False, True):
        for warps in (4, 8, 16):
            ms = time_ms(kernel_alone(logits, targets, warps, fast_tanh))
            chosen = " (gpu_kernels' choice)" if (warps, fast_tanh) == (gpu_kernels.SOFTCAP_CE_WARPS, FAST_TANH) else ""
            name = f"{warps} warps a row, {'approximate' if fast_tanh else 'exact'} tanh"
            print(f"  {name:30s} {ms:7.3f} ms  {gigabytes / ms:5.2f} TB/s{chosen}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
