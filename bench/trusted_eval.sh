#!/usr/bin/env bash
# Trusted scoring on the device machine (issue 14), in one call, from the repository root, carrying
# the ignored folders .whl (bench/device_env.sh) and .device/stack_cache (a prepared cache with the
# validation split):
#   run(timeout_s=590, carry=[".whl", ".device/stack_cache"], command="bash bench/trusted_eval.sh")
# 1. bench/trusted_eval.py on the h100 profile: an untrained model, in-process evaluation against
#    export + the evaluator process (the overhead a worker's run pays), on the full EVAL_TOKENS.
# 2. A trained baseline: train.py on h100-short with an export path, so that it both prints its own
#    val_bpb (the cache has the validation split) and exports; then the evaluator scores the export.
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT="${OUT:-$PWD/trusted_out}"
mkdir -p "$OUT"
source bench/device_env.sh
export AUTORESEARCH_CACHE="$PWD/.device/stack_cache"

echo "== untrained model, h100 profile"
AUTORESEARCH_PROFILE=h100 python3 bench/trusted_eval.py 2>&1 | tee "$OUT/untrained_h100.txt"

echo "== trained baseline, h100-short profile"
artifact=/tmp/trusted-eval/model.pt
rm -rf /tmp/trusted-eval && mkdir -p /tmp/trusted-eval
began=$SECONDS
AUTORESEARCH_PROFILE=h100-short AUTORESEARCH_EXPORT_PATH="$artifact" python3 train.py >"$OUT/train_h100short.log" 2>&1
echo "train.py exit $? after $((SECONDS - began)) s"
grep -A12 '^---' "$OUT/train_h100short.log"
AUTORESEARCH_PROFILE=h100-short python3 - "$artifact" <<'PY' 2>&1 | tee "$OUT/trained_h100short.txt"
import os, re, sys, time
from pathlib import Path
from workers import evaluator
started = time.perf_counter()
evaluation = evaluator.score(Path(sys.argv[1]), profile="h100-short", cache_dir=Path(os.environ["AUTORESEARCH_CACHE"]),
                             visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES", "0"))
log = Path(os.environ["OUT"], "train_h100short.log").read_text()
printed = float(re.search(r"^val_bpb:\s+([0-9.]+)", log, re.M).group(1))
print(f"evaluator process {time.perf_counter() - started:.2f} s: val_bpb {evaluation.val_bpb} error {evaluation.error}")
print(f"details {evaluation.details}")
if evaluation.val_bpb is not None:
    print(f"printed by train.py {printed:.6f} | trusted {evaluation.val_bpb:.6f} | difference "
          f"{evaluation.val_bpb - printed:+.2e} | mismatch flag {evaluator.mismatch(printed, evaluation.val_bpb)}")
PY
nvidia-smi --query-gpu=name,temperature.gpu,clocks.sm,power.draw --format=csv,noheader
