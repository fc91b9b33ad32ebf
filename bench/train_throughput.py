"""Training throughput of train.py on one GPU, against the anchor numbers of the lent H100.

Runs the real train.py (h100 profile, real dataloader, real data from a prepared cache) as a
subprocess, the way a worker does, and reports steady-state tokens/s (compile warm-up steps
excluded), MFU, peak VRAM, startup seconds and val_bpb.

    # variants with a short budget (bench-only changes to a copy of train.py, see VARIANTS)
    python bench/train_throughput.py --cache .device/cache --budget 30 --variants as-is,batch64 --then-full
    # train.py exactly as it is, with the profile's full 300 s budget and full eval
    python bench/train_throughput.py --cache .device/cache --variants as-is --full

Needs CUDA. Logs and a JSON of the results go to --out (default $OUT, else bench/out).
"""

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PEAK_FLOPS = 989.5e12            # H100 SXM dense bf16, as in shared/notes/gpu-anchor.md
ANCHOR_FLOPS_PER_TOKEN = 2.39e8  # the anchor's count for the baseline (SSSL windows at seq 2048)
TOKENS_PER_STEP = 2 ** 19        # TOTAL_BATCH_SIZE of train.py on CUDA (no variant changes it)
UNTIMED_STEPS = 10               # train.py's compile warm-up steps on CUDA
GOAL = dict(tok_s=1_700_000, vram_mb=45_000)
ANCHORS = [  # name, tokens/s, MFU %, peak VRAM MB, startup s (shared/notes/gpu-anchor.md, synthetic tokens)
    ("anchor: FA3 via kernels (autoresearch)", 1_646_000, 39.8, 45_060, 26),
    ("anchor: SDPA is_causal, all layers", 1_560_000, 37.9, 45_059, 41),
    ("anchor: flex_attention, windowed", 1_514_000, 36.8, 45_059, 41),
]

# Bench-only variants of train.py (the model's architecture and math are the same in all): "set" overrides
# constants, "code" adds lines after train.py's prepare import, "replace" swaps exact snippets (each must
# occur once).
MODEL_COMPILE = "model = torch.compile(model, dynamic=False)"
PRINT_TRAINING_PEAK = ("model.eval()\n", "print(f'training peak MB {torch.cuda.max_memory_allocated() / 2**20:.1f}', "
                                         "flush=True)\nmodel.eval()\n")
COORDINATE_DESCENT = "import torch._inductor.config as _bench_ic; _bench_ic.coordinate_descent_tuning = True"
VARIANTS = {
    "as-is": {},                                             # train.py as it is in the working tree
    # the training loss as compiled PyTorch ops instead of gpu_kernels.lm_head_softcap_loss's Triton kernel
    "plain-loss": {"set": {"FUSED_LOSS": "False"}},
    # rotary + QK norm as compiled PyTorch ops instead of gpu_kernels.rotary_rms_norm's Triton kernels
    "plain-qk-norm": {"set": {"FUSED_QK_NORM": "False"}},
    # the loss kernel with libdevice's exact tanh instead of the GPU's approximate instruction
    "loss-exact-tanh": {"code": ["import gpu_kernels as _bench_loss; _bench_loss.SOFTCAP_FAST_TANH = False"]},
    # the loss kernel with 16 warps a row (gpu_kernels' SOFTCAP_CE_WARPS is 4; 16 measured the same end to end)
    "loss-warps16": {"code": ["import gpu_kernels as _bench_loss; _bench_loss.SOFTCAP_CE_WARPS = 16"]},
    # q, k and v from one matmul over the three weights concatenated (the parameters, and so Muon, unchanged)
    "qkv-fused": {"replace": [(
        "        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)\n"
        "        k = self.c_k(x).view(B, T, self.n_head, self.head_dim)\n"
        "        v = self.c_v(x).view(B, T, self.n_head, self.head_dim)\n",
        "        qkv = F.linear(x, torch.cat((self.c_q.weight, self.c_k.weight, self.c_v.weight)))\n"
        "        q, k, v = qkv.view(B, T, 3 * self.n_head, self.head_dim).split(self.n_head, dim=2)\n")]},
    # inductor tunes block sizes and warps of its generated (memory-bound) kernels at compile time
    "cdt": {"code": [COORDINATE_DESCENT]},
    # + the model's matmuls autotuned against inductor's Triton templates, which can take
    # elementwise epilogues (relu^2, its backward) into the matmul
    "cdt-mm": {"code": [COORDINATE_DESCENT], "replace": [
        (MODEL_COMPILE, "model = torch.compile(model, dynamic=False, options={'max_autotune_gemm': True, "
                        "'max_autotune_gemm_backends': 'ATEN,TRITON', 'coordinate_descent_tuning': True})")]},
    # prints the peak memory of training alone, before evaluation adds its own
    "peak-split": {"replace": [PRINT_TRAINING_PEAK]},
    # evaluation in half-size batches: the same rows and tokens, half the logits in memory at once
    "eval64": {"replace": [PRINT_TRAINING_PEAK,
                           ("evaluate_bpb(model, tokenizer, DEVICE_BATCH_SIZE)", "evaluate_bpb(model, tokenizer, 64)")]},
    # every layer over the full causal context (SDPA's cuDNN kernel, no sliding window)
    "no-window": {"set": {"WINDOW_PATTERN": '"L"'}},
    "batch256": {"set": {"DEVICE_BATCH_SIZE": "256"}},       # one micro-batch per step, no accumulation
    "batch64": {"set": {"DEVICE_BATCH_SIZE": "64"}},
}

PROGRESS = re.compile(r"^step (\d+) \| progress [\d.]+% \| loss ([\d.naif]+) \| lrm [\d.]+ \| dt (\d+)ms \| "
                      r"tok/s (\d+) \| mfu [\d.]+% \| remaining \d+s$")


def make_variant_source(variant, budget, eval_tokens):
    source = (REPO_ROOT / "train.py").read_text()
    for name, value in variant.get("set", {}).items():
        source, n = re.subn(rf"^{name} = .*$", f"{name} = {value}  # bench override", source, count=1, flags=re.M)
        if n != 1:
            raise SystemExit(f"train.py has no constant {name}")
    for old, new in variant.get("replace", []):
        if source.count(old) != 1:
            raise SystemExit(f"train.py holds {source.count(old)} copies of {old!r}, not 1")
        source = source.replace(old, new)
    extra = [f"{line}  # bench variant" for line in variant.get("code", [])]
    if budget is not None:
        extra.append(f"TIME_BUDGET = {budget}  # bench override")
    if eval_tokens is not None:
        extra.append(f"import prepare as _bench_prepare; _bench_prepare.EVAL_TOKENS = {eval_tokens}  # bench override")
    if extra:
        anchor = re.search(r"^from prepare import (\([^)]*\)|.*)$", source, flags=re.M)
        source = source[:anchor.end()] + "\n" + "\n".join(extra) + source[anchor.end():]
    return source


def run_variant(name, variant, args, out_dir, time_left):
    run_dir = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))   # a per-run directory, as a worker makes
    (run_dir / "train.py").write_text(make_variant_source(variant, args.budget, args.eval_tokens))
    env = dict(os.environ, AUTORESEARCH_PROFILE="h100", AUTORESEARCH_CACHE=str(Path(args.cache).resolve()),
               PYTHONPATH=os.pathsep.join(filter(None, (str(REPO_ROOT), os.environ.get("PYTHONPATH")))),
               PYTHONUNBUFFERED="1")
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / f"{name}.log"
    t0 = time.time()
    steps, summary, flops_per_token, t_warm, last_echo = [], {}, None, None, t0
    in_summary = False
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "train.py"], cwd=run_dir, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            for line in proc.stdout:
                now = time.time() - t0
                log.write(f"{now:8.2f} {line}")
                line = line.rstrip("\n")
                m = PROGRESS.match(line)
                if m:
                    step, dt_ms = int(m.group(1)), int(m.group(3))
                    steps.append((step, dt_ms, float(m.group(2))))
                    if step == UNTIMED_STEPS - 1:
                        t_warm = now
                    if time.time() - last_echo > 15:
                        print(f"  [{name}] {now:5.0f}s {line}", flush=True)
                        last_echo = time.time()
                elif line.startswith("Parameters:") and "FLOPs per token:" in line:
                    flops_per_token = float(line.rsplit(":", 1)[1])
                elif line == "---":
                    in_summary = True
                elif in_summary and ":" in line:
                    key, value = line.split(":", 1)
                    summary[key.strip()] = value.strip()
                elif line.startswith(("FAIL", "Traceback")) or "Error" in line:
                    print(f"  [{name}] {line}", flush=True)
                if time.time() - t0 > time_left:
                    print(f"  [{name}] out of time, stopping it", flush=True)
                    os.killpg(proc.pid, 9)
                    break
        finally:
            rc = proc.wait()
    timed = [(s, dt) for s, dt, _ in steps if s >= UNTIMED_STEPS]
    result = dict(variant=name, changes=variant, rc=rc, wall_s=round(time.time() - t0, 1),
                  steps=len(steps), startup_s=round(t_warm, 1) if t_warm is not None else None)
    if timed:
        tok_s = TOKENS_PER_STEP * len(timed) / (sum(dt for _, dt in timed) / 1000)
        per_step = sorted(TOKENS_PER_STEP / (dt / 1000) for _, dt in timed)
        result.update(tok_s=round(tok_s), tok_s_median=round(per_step[len(per_step) // 2]),
                      mfu_anchor_flops=round(100 * tok_s * ANCHOR_FLOPS_PER_TOKEN / PEAK_FLOPS, 2))
        if flops_per_token:
            result.update(flops_per_token=flops_per_token,
                          mfu_model_flops=round(100 * tok_s * flops_per_token / PEAK_FLOPS, 2))
    for key in ("val_bpb", "peak_vram_mb", "training_seconds", "total_seconds", "num_steps", "mfu_percent"):
        if key in summary:
            result[key] = float(summary[key])
    if steps:
        result["last_loss"] = steps[-1][2]
    return result


def gpu_description():
    try:
        import torch
        name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA"
        return f"{name}, torch {torch.__version__}"
    except Exception as e:  # the bench still runs train.py, which will say what is wrong
        return f"unknown ({e})"


def fmt(value, spec):
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", required=True, help="prepared AUTORESEARCH_CACHE (tokenizer + shards)")
    parser.add_argument("--variants", default="as-is", help=f"comma list of {list(VARIANTS)}")
    parser.add_argument("--budget", type=int, default=40, help="training seconds per variant (ignored with --full)")
    parser.add_argument("--eval-tokens", type=int, default=8 * 524288, help="eval tokens (ignored with --full)")
    parser.add_argument("--full", action="store_true", help="the profile's own budget and eval: train.py as is")
    parser.add_argument("--then-full", action="store_true",
                        help="after the variants, run the fastest one (val_bpb within 0.01 of the best) "
                             "with the profile's own budget and eval")
    parser.add_argument("--deadline", type=float, default=570, help="stop everything after this many seconds")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO_ROOT / "bench" / "out"))
    args = parser.parse_args()
    if args.full:
        args.budget = args.eval_tokens = None
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_begin = time.time()
    print(f"GPU: {gpu_description()}", flush=True)

    results = []
    for name in args.variants.split(","):
        left = args.deadline - (time.time() - t_begin)
        if left < 60:
            print(f"skipping {name}: {left:.0f}s left", flush=True)
            continue
        print(f"running {name} {VARIANTS[name]} (budget {args.budget or 'profile'}s, {left:.0f}s left)", flush=True)
        results.append(run_variant(name, VARIANTS[name], args, out_dir, left - 10))
        print("  " + json.dumps(results[-1]), flush=True)
        (out_dir / "results.json").write_text(
            json.dumps(dict(gpu=gpu_description(), results=results), indent=2))

    if args.then_full and results:
        ok = [r for r in results if r["rc"] == 0 and "tok_s" in r and "val_bpb" in r]
        if ok:
            best_bpb = min(r["val_bpb"] for r in ok)
            pick = max((r for r in ok if r["val_bpb"] <= best_bpb + 0.01), key=lambda r: r["tok_s"])
            args.budget = args.eval_tokens = None
            left = args.deadline - (time.time() - t_begin)
            print(f"full run of {pick['variant']} ({left:.0f}s left)", flush=True)
            full = run_variant(pick["variant"], VARIANTS[pick["variant"]], args, out_dir / "full", left - 5)
            (out_dir / "full" / f"{pick['variant']}.log").rename(out_dir / f"{pick['variant']}-full.log")
            full["variant"] = f"{pick['variant']} FULL"
            results.append(full)
            print("  " + json.dumps(full), flush=True)
            (out_dir / "results.json").write_text(json.dumps(dict(gpu=gpu_description(), results=results), indent=2))

    print()
    print(f"{'run':42s} {'tok/s':>10s} {'MFU%':>6s} {'MFU%*':>6s} {'VRAM MB':>9s} {'startup s':>9s} {'val_bpb':>9s}")
    for name, tok_s, mfu, vram, startup in ANCHORS:
        print(f"{name:42s} {tok_s:10d} {mfu:6.1f} {mfu:6.1f} {vram:9d} {startup:9d} {'-':>9s}")
    for r in results:
        label = f"{r['variant']} (rc {r['rc']})"
        print(f"{label:42s} {fmt(r.get('tok_s'), '10d')} {fmt(r.get('mfu_anchor_flops'), '6.1f')} "
              f"{fmt(r.get('mfu_model_flops'), '6.1f')} {fmt(r.get('peak_vram_mb'), '9.0f')} "
              f"{fmt(r.get('startup_s'), '9.1f')} {fmt(r.get('val_bpb'), '9.4f')}")
    print(f"MFU% = at the anchor's {ANCHOR_FLOPS_PER_TOKEN:.3g} FLOP/token; MFU%* = at the run's own count "
          f"(all layers full causal); peak {PEAK_FLOPS / 1e12:.1f} TFLOP/s.")
    print(f"goal: >= {GOAL['tok_s']} tok/s with peak memory <= {GOAL['vram_mb']} MB")


if __name__ == "__main__":
    main()
