"""Rotary + QK norm as one Triton kernel each way (gpu_kernels.rotary_rms_norm) against train.py's
compiled rotate() + F.rms_norm, on one GPU.

Checks the output and the gradient against an fp32 reference, next to the compiled bf16 path's own
error; then times forward + backward over q and k at train.py's shape (h100 profile: batch 128,
sequence 2048, 4 heads of 128), both paths; last, each kernel alone at several block shapes,
against its bytes (x, and dy in the backward, read once; the result written once).

    python bench/rotary_norm.py         # needs CUDA (Triton comes with torch's CUDA builds)
"""

import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernel_check import time_ms, worst_error_ratio  # noqa: E402

import gpu_kernels  # noqa: E402
from gpu_kernels import rotary_rms_norm, triton_kernels_available  # noqa: E402


def compiled_rotary_norm(x, cos, sin):
    """train.py's rotate() then norm() (as its Attention runs them with FUSED_QK_NORM = False)."""
    half = x.size(-1) // 2
    a, b = x[..., :half], x[..., half:]
    return F.rms_norm(torch.cat((a * cos + b * sin, b * cos - a * sin), dim=-1), (x.size(-1),))


def tables(T, D, dtype):
    """train.py's rotary tables: (1, T, 1, D / 2)."""
    inv_freq = 10000 ** -(torch.arange(0, D, 2, dtype=torch.float32, device="cuda") / D)
    angles = torch.outer(torch.arange(T, dtype=torch.float32, device="cuda"), inv_freq)
    return angles.cos().to(dtype)[None, :, None, :], angles.sin().to(dtype)[None, :, None, :]


def inputs(B, T, H, D, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(B, T, H, D, device="cuda", generator=g).to(torch.bfloat16)
    dy = torch.randn(B, T, H, D, device="cuda", generator=g).to(torch.bfloat16)
    return x, dy


def output_and_grad(fn, x, cos, sin, dy):
    x = x.detach().requires_grad_()
    out = fn(x, cos, sin)
    return out, torch.autograd.grad(out, x, dy)[0]


def check(B=4, T=2048, H=4, D=128):
    x, dy = inputs(B, T, H, D)
    cos, sin = tables(T, D, torch.bfloat16)
    ref = output_and_grad(compiled_rotary_norm, x.float(), cos.float(), sin.float(), dy.float())
    compiled = output_and_grad(torch.compile(compiled_rotary_norm, dynamic=False), x, cos, sin, dy)
    fused = output_and_grad(rotary_rms_norm, x, cos, sin, dy)
    return worst_error_ratio(("out", "d x"), ref, fused, compiled, ("fused", "compiled bf16"))


def q_and_k(fn, q, k, cos, sin, dq_out, dk_out):
    """Forward and backward of the pair, as one attention layer runs it."""
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    torch.autograd.backward((fn(q, cos, sin), fn(k, cos, sin)), (dq_out, dk_out))


def main():
    if not triton_kernels_available():
        raise SystemExit("needs a CUDA GPU and Triton")
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__}", flush=True)
    print("correctness (B=4, T=2048, 4 heads of 128, bf16):", flush=True)
    worst = check()
    ok = worst < 2.0
    print(f"  worst error ratio to the compiled path's own error: {worst:.2f} -> {'ok' if ok else 'FAILED'}",
          flush=True)

    B, T, H, D = 128, 2048, 4, 128
    q, dq_out = inputs(B, T, H, D, seed=1)
    k, dk_out = inputs(B, T, H, D, seed=2)
    cos, sin = tables(T, D, torch.bfloat16)
    print(f"fwd + bwd of q and k, B={B} T={T} H={H} D={D}:", flush=True)
    base = None
    for name, fn in [("compiled (train.py with FUSED_QK_NORM = False)", torch.compile(compiled_rotary_norm, dynamic=False)),
                     ("fused (gpu_kernels.rotary_rms_norm)", rotary_rms_norm)]:
        ms = time_ms(lambda fn=fn: q_and_k(fn, q, k, cos, sin, dq_out, dk_out))
        base = base or ms
        print(f"  {name:50s} {ms:7.3f} ms  {base / ms:.2f}x", flush=True)

    out, dx = torch.empty_like(q), torch.empty_like(q)
    kernels = [("forward", gpu_kernels._rotary_rms_norm_fwd_kernel, [out], 2),
               ("backward", gpu_kernels._rotary_rms_norm_bwd_kernel, [dq_out, dx], 3)]
    for name, kernel, tensors, passes in kernels:
        gigabytes = passes * q.numel() * q.element_size() / 1e9
        print(f"the {name} kernel alone ({gigabytes:.2f} GB moved):", flush=True)
        for rows in (8, 16, 32, 64):
            for warps in (2, 4, 8):
                ms = time_ms(partial(gpu_kernels._rotary_rms_norm_launch, kernel, q, cos, sin, *tensors, rows=rows,
                                     num_warps=warps))
                chosen = " (gpu_kernels' choice)" if (rows, warps) == (gpu_kernels.ROTARY_NORM_ROWS,
                                                                         gpu_kernels.ROTARY_NORM_WARPS) else ""
                print(f"  {rows:3d} rows, {warps} warps  {ms:7.3f} ms  {gigabytes / ms:5.2f} TB/s{chosen}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
