#!/bin/bash
# What an idle worker costs: starts `tidegate serve --app echo --workers W` with no
# connections and prints the workers' CPU per worker-second over S seconds (from /proc).
# usage: bench/idle_worker_cpu.sh WORKERS SECONDS [serve flags...]
# (bench/results/2026-11-27-idle-worker-cpu-stall-detector.json was measured with it)
set -eu
W=$1; S=$2; shift 2
cd "$(dirname "$0")/.."
TMP=$(mktemp -d)
.venv/bin/python -m tidegate serve --app echo --host 127.0.0.1 --port 0 --workers "$W" \
    --status-file "$TMP/status.json" "$@" > "$TMP/serve.log" 2>&1 &
SUP=$!
trap 'kill -TERM $SUP 2>/dev/null; wait $SUP 2>/dev/null; rm -rf "$TMP"' EXIT
for _ in $(seq 300); do  # up to 30 s for every worker to be ready
    grep -q '"ready": true' "$TMP/status.json" 2>/dev/null && break
    sleep 0.1
done
sleep 2  # boot work (imports, gc.freeze, malloc_trim) done
pids=$(python3 -c "import json,sys; print(' '.join(map(str, json.load(open(sys.argv[1]))['workers'])))" "$TMP/status.json")
ticks() { local t=0; for p in $pids; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo $t; }
t0=$(ticks); sleep "$S"; t1=$(ticks)
python3 -c "import os,sys; d=int(sys.argv[1]); print(f'workers={sys.argv[2]} cpu={d / os.sysconf(\"SC_CLK_TCK\"):.2f}s over {sys.argv[3]}s: {d / os.sysconf(\"SC_CLK_TCK\") * 1000 / int(sys.argv[2]) / float(sys.argv[3]):.2f} ms per worker-second')" $((t1 - t0)) "$W" "$S"
