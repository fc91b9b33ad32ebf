"""Where a training step of train.py spends GPU time: kernels grouped by kind, and the top ones.

Runs train.py's own setup (everything above its "Training loop" banner: model, optimizer,
torch.compile, real dataloader), then a few warm-up steps, then times and profiles steps of the
same loop body. Needs CUDA and a prepared cache:

    AUTORESEARCH_CACHE=.device/cache python bench/train_profile.py
"""

import os
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
WARMUP_STEPS = 12
TIMED_STEPS = 10
PROFILED_STEPS = 3
KINDS = [  # (kind, substrings of kernel names), first match wins
    ("attention", ("cudnn", "flash", "fmha", "sdpa")),
    ("matmul", ("nvjet", "gemm", "cutlass", "xmma", "gemv")),
    ("triton: softcap + cross-entropy", ("softmax", "nll_loss")),
    ("triton: relu^2 (MLP)", ("relu",)),
    ("triton: rms_norm, rotary, residual", ("rms_norm",)),
    ("triton: other", ("triton",)),
    ("memcpy/memset", ("memcpy", "memset")),
]


def kind_of(name):
    lowered = name.lower()
    for kind, keys in KINDS:
        if any(k in lowered for k in keys):
            return kind
    return "other"


def main():
    import torch

    os.environ.setdefault("AUTORESEARCH_PROFILE", "h100")
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sys.path.insert(0, str(REPO_ROOT))
    train_py = REPO_ROOT / "train.py"
    setup = train_py.read_text().split("# Training loop")[0]
    ns = {"__name__": "__train_profile__", "__file__": str(train_py)}
    exec(compile(setup, str(train_py), "exec"), ns)
    model, optimizer, loader = ns["model"], ns["optimizer"], ns["train_loader"]
    accum, autocast_ctx = ns["grad_accum_steps"], ns["autocast_ctx"]
    tokens_per_step = ns["TOTAL_BATCH_SIZE"]
    batch = [ns["x"], ns["y"]]

    def step():
        for _ in range(accum):
            with autocast_ctx:
                loss = model(batch[0], batch[1])
            (loss / accum).backward()
            batch[0], batch[1], _ = next(loader)
        optimizer.step()
        model.zero_grad(set_to_none=True)
        return loss.item()

    t0 = time.time()
    for _ in range(WARMUP_STEPS):
        step()
    sync()
    print(f"warm-up ({WARMUP_STEPS} steps, compile included): {time.time() - t0:.1f}s", flush=True)

    t0 = time.time()
    for _ in range(TIMED_STEPS):
        step()
    sync()
    dt = (time.time() - t0) / TIMED_STEPS
    print(f"step: {dt * 1000:.1f} ms, {tokens_per_step / dt:,.0f} tok/s", flush=True)

    # The optimizer alone, on the gradients of one more backward.
    with autocast_ctx:
        loss = model(batch[0], batch[1])
    loss.backward()
    sync()
    t0 = time.time()
    for _ in range(5):
        optimizer.step()
    sync()
    print(f"optimizer.step alone: {(time.time() - t0) / 5 * 1000:.1f} ms", flush=True)
    model.zero_grad(set_to_none=True)

    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(PROFILED_STEPS):
            step()
        sync()
    by_kind, kernels = defaultdict(float), []
    for evt in prof.key_averages():
        us = getattr(evt, "self_device_time_total", 0) or 0
        if us <= 0 or evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        by_kind[kind_of(evt.key)] += us
        kernels.append((us, evt.count, evt.key))
    total = sum(by_kind.values())
    print(f"\nGPU time per step by kind ({PROFILED_STEPS} profiled steps; {total / PROFILED_STEPS / 1000:.1f} ms busy "
          f"of {dt * 1000:.1f} ms wall):")
    for kind, us in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:40s} {us / PROFILED_STEPS / 1000:8.1f} ms  {100 * us / total:5.1f}%")
    print("\ntop kernels (ms per step, calls per step, name):")
    for us, count, name in sorted(kernels, reverse=True)[:30]:
        print(f"  {us / PROFILED_STEPS / 1000:8.2f} {count // PROFILED_STEPS:5d}  {name[:110]}")
    out = os.environ.get("OUT")
    if out:
        prof.export_chrome_trace(os.path.join(out, "train_trace.json"))
    loader.close()


if __name__ == "__main__":
    main()
