#!/usr/bin/env bash
# A stack benchmark on the device machine, in one call or spread over several: the verdicts
# (bench/stack_verdicts.py), or the driver DRIVER names (bench/stack_timed_share.py, say).
#
# Run from the repository root, carrying the ignored folders .whl and .device/stack_cache (see
# bench/stack_two_gpu.sh), e.g. through the device tool:
#   run(timeout_s=590, carry=[".whl", ".device/stack_cache"], command="bash bench/stack_verdicts.sh start")
#   run(timeout_s=590, command="bash bench/stack_verdicts.sh wait")    # only if the first call ended first
#
#   start [driver arguments]   installs the wheels, copies the tree to $WORK/repo (so that a later call's
#                              copy of the tree cannot touch the running stack), starts the driver in a
#                              session of its own (setsid: it outlives this call), then waits for it
#   wait                       waits for the driver started earlier on this machine
# Either waits until the driver ends or WAIT_S seconds (default 560) have passed, then copies what the
# driver has written so far (results.json after every verdict) and the log to $OUT. A `wait` call must
# come while the machine is still warm, i.e. at once after the call before it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/verdicts_out}"
WORK="${WORK:-/tmp/verdicts}"
WAIT_S="${WAIT_S:-560}"
DRIVER="${DRIVER:-bench/stack_verdicts.py}"
mkdir -p "$OUT"
began=$(date +%s)
action="${1:-start}"
shift || true

case "$action" in
start)
    source bench/device_env.sh
    rm -rf "$WORK"
    mkdir -p "$WORK/out"
    mkdir -p "$WORK/repo" && tar -c --exclude=./.git --exclude=./.whl . | tar -x -C "$WORK/repo" || exit 1
    # State and cache outside the checkout; as root, embedded Postgres runs as a system user.
    export AUTORESEARCH_STATE="$WORK/state" AUTORESEARCH_CACHE="$WORK/repo/.device/stack_cache"
    export HEARTBEAT_INTERVAL="${HEARTBEAT_INTERVAL:-3}" KILL_TIMEOUT="${KILL_TIMEOUT:-600}"
    ls -la "$AUTORESEARCH_CACHE/data" "$AUTORESEARCH_CACHE/tokenizer"
    (cd "$WORK/repo" && setsid bash -c 'echo $$ >"$0/pid"; python3 "$1" --out "$0/out" "${@:2}"
                                        echo $? >"$0/rc"' "$WORK" "$DRIVER" "$@" >"$WORK/out/driver.log" 2>&1 </dev/null &)
    for _ in 1 2 3 4 5 6 7 8 9 10; do [ -s "$WORK/pid" ] && break; sleep 0.5; done
    echo "driver started, pid $(cat "$WORK/pid"): python3 $DRIVER $*"
    ;;
wait)
    [ -f "$WORK/pid" ] || { echo "no driver was started on this machine ($WORK/pid is missing)"; exit 2; }
    ;;
*)
    echo "usage: bash bench/stack_verdicts.sh start [driver arguments] | wait"; exit 2 ;;
esac

pid=$(cat "$WORK/pid")
shown=0
while kill -0 "$pid" 2>/dev/null && [ $(( $(date +%s) - began )) -lt "$WAIT_S" ]; do
    sleep 5
    lines=$(wc -l <"$WORK/out/driver.log")
    if [ "$lines" -gt "$shown" ]; then sed -n "$((shown + 1)),${lines}p" "$WORK/out/driver.log"; shown=$lines; fi
done
sed -n "$((shown + 1)),\$p" "$WORK/out/driver.log"
cp "$WORK/out"/* "$OUT"/ 2>/dev/null
nvidia-smi --query-gpu=name,temperature.gpu,clocks.sm,power.draw --format=csv,noheader 2>/dev/null
if kill -0 "$pid" 2>/dev/null; then
    echo "== driver still running after ${WAIT_S}s at $(date -u +%FT%TZ): call again with 'wait'"
    exit 3
fi
echo "== driver ended at $(date -u +%FT%TZ), exit $(cat "$WORK/rc" 2>/dev/null)"
exit "$(cat "$WORK/rc" 2>/dev/null || echo 1)"
