"""Shared by the GPU kernel benches: timing with CUDA events, and error against an fp32 reference."""

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


def worst_error_ratio(names, reference, candidate, baseline, labels, prefix=""):
    """Print, for each named result, the max error of `candidate` and of `baseline` against the
    fp32 `reference` (over the reference's largest entry); return the worst ratio of the two.

    labels: how the candidate and the baseline are called in the printout.
    """
    worst, width = 0.0, max(map(len, names))
    for name, ref, ours, theirs in zip(names, reference, candidate, baseline, strict=True):
        scale = ref.abs().max().item()
        err_ours = (ours.float() - ref).abs().max().item() / scale
        err_theirs = (theirs.float() - ref).abs().max().item() / scale
        worst = max(worst, err_ours / max(err_theirs, 1e-6))
        print(f"  {prefix}{name:{width}s} max error / max |ref|: {labels[0]} {err_ours:.2e}, "
              f"{labels[1]} {err_theirs:.2e}", flush=True)
    return worst
