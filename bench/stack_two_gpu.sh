#!/usr/bin/env bash
# The whole stack on the device machine (every GPU it has, then one), see bench/stack_two_gpu.py.
#
# Run from the repository root on a machine with no internet, carrying two ignored folders:
#   .whl                   wheels of everything the stack imports that the image lacks (with
#                          nvidia-cudnn-frontend, for the sliding-window layers of train.py)
#   .device/stack_cache    a prepared cache (data/ shards + tokenizer/), as prepare.py builds it
# e.g. through the device tool: run(command="bash bench/stack_two_gpu.sh", carry=[".whl", ".device/stack_cache"])
#
# Environment: OUT (output folder, default ./stack_out), STACK_PROFILE (default tiny),
# STACK_EXPERIMENTS (per phase, default 6), STACK_BUDGET_S (seconds to the last result, default 480).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/stack_out}"
mkdir -p "$OUT"
exec > >(tee "$OUT/run.log") 2>&1

source bench/device_env.sh

# State and cache outside the checkout; as root, embedded Postgres runs as a system user.
export AUTORESEARCH_STATE=/tmp/stack_state AUTORESEARCH_CACHE="$PWD/.device/stack_cache"
export HEARTBEAT_INTERVAL="${HEARTBEAT_INTERVAL:-3}" KILL_TIMEOUT="${KILL_TIMEOUT:-300}"
rm -rf "$AUTORESEARCH_STATE"
ls -la "$AUTORESEARCH_CACHE/data" "$AUTORESEARCH_CACHE/tokenizer"

python3 bench/stack_two_gpu.py --out "$OUT" --profile "${STACK_PROFILE:-tiny}" \
    --experiments "${STACK_EXPERIMENTS:-6}" --budget-s "${STACK_BUDGET_S:-480}"
rc=$?
id embedded_postgres 2>/dev/null && echo "(system user embedded_postgres exists)"
echo "== exit $rc at $(date -u +%FT%TZ)"
exit $rc
