"""cuDNN sliding-window attention (gpu_kernels.sliding_window_attention) against SDPA, on one GPU.

Checks the window kernel's output and gradients against an fp32 reference with an explicit band
mask, then times forward + backward of one attention layer at train.py's shape (h100 profile:
batch 128, 4 heads of 128, sequence 2048) for SDPA is_causal (cuDNN, what train.py used before)
and for the window kernel at half the context and at the full context.

    python bench/attention_window.py          # needs CUDA and nvidia-cudnn-frontend
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernel_check import time_ms, worst_error_ratio  # noqa: E402

from gpu_kernels import sliding_window_attention, window_attention_available  # noqa: E402


def projections(B, T, H, D, seed=0):
    """q, k, v as train.py makes them: (B, T, H, D) projections seen as (B, H, T, D)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2).requires_grad_()
            for _ in range(3)]


def band_mask(T, window):
    pos = torch.arange(T, device="cuda")
    offset = pos[:, None] - pos[None, :]
    return (offset >= 0) & (offset <= window)


def forward_backward(attention, q, k, v, grad):
    out = attention(q, k, v)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    return out, dq, dk, dv


def check(window, B=2, T=2048, H=4, D=128):
    q, k, v = projections(B, T, H, D)
    grad = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16)
    mask = band_mask(T, window)
    ref = forward_backward(lambda a, b, c: F.scaled_dot_product_attention(a.float(), b.float(), c.float(), attn_mask=mask),
                           q, k, v, grad.float())
    bf16 = forward_backward(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=mask), q, k, v, grad)
    ours = forward_backward(lambda a, b, c: sliding_window_attention(a, b, c, window), q, k, v, grad)
    return worst_error_ratio(("out", "dq", "dk", "dv"), ref, ours, bf16, ("cudnn window", "SDPA bf16 with mask"),
                             prefix=f"window {window:4d} ")


def main():
    if not torch.cuda.is_available() or not window_attention_available("cuda"):
        raise SystemExit("needs a CUDA GPU and the nvidia-cudnn-frontend package (pip install nvidia-cudnn-frontend)")
    import cudnn
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | cuDNN {cudnn.backend_version()} | "
          f"cudnn-frontend {cudnn.__version__}", flush=True)
    print("correctness (B=2, T=2048, 4 heads of 128, bf16):", flush=True)
    worst = max(check(1024), check(2047), check(100))
    ok = worst < 2.0
    print(f"  worst error ratio to SDPA's own bf16 error: {worst:.2f} -> {'ok' if ok else 'FAILED'}", flush=True)

    B, T, H, D = 128, 2048, 4, 128
    q, k, v = projections(B, T, H, D)
    grad = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16)
    causal_flops = 4 * B * H * D * T * T / 2 * 3.5   # fwd 2 matmuls + bwd 5, over half the square
    rows = [
        ("SDPA is_causal (cuDNN), full context", lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True), 1.0),
        ("cudnn window 2047 (= full context)", lambda a, b, c: sliding_window_attention(a, b, c, 2047), 1.0),
        ("cudnn window 1024 (half context)", lambda a, b, c: sliding_window_attention(a, b, c, 1024), 0.75),
    ]
    print(f"fwd + bwd of one layer, B={B} T={T} H={H} D={D}:", flush=True)
    base = None
    for name, attention, work in rows:
        ms = time_ms(lambda attention=attention: forward_backward(attention, q, k, v, grad))
        base = base or ms
        print(f"  {name:40s} {ms:7.3f} ms  ({causal_flops * work / ms / 1e9:5.0f} TFLOP/s)  {base / ms:.2f}x",
              flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
