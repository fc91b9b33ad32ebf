"""GPU timing shared by the benches: CUDA events around repeated calls, after a warm-up."""

import torch


def time_ms(fn, iters=20, warmup=3):
    """Mean milliseconds of GPU time per call of `fn`."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters
