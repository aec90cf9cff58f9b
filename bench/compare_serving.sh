#!/usr/bin/env bash
# A/B of the serving path on one machine: this checkout against another copy of the repository
# (BASELINE_DIR), on the FAKE backend (no model: what is compared is the serving path around the
# batch), lone requests with the stage trace, the two alternated ROUNDS times so that both see the
# same machine; then the PNG encoder of both (python -m bench.png --baseline) with 6 and 14 stripes.
#
#   git archive b30ed2a | (mkdir -p base && tar -x -C base)   # inside the repository: the GPU machines get
#   OUT=/tmp/ab bench/compare_serving.sh base 3               # the working tree only, without .git
#
# LONE_REPEATS (15) lone requests per round, PNG_REPEATS (21) repeats of each PNG timing.
# Writes $OUT/fake-{old,new}-ROUND.json (python -m bench.gpu service) and $OUT/png-STRIPES.json,
# and prints each round's median latency, the worker's median batch and the serving path, then
# each side's median milliseconds per hop over all its rounds (python -m bench.trace_stages).
set -u
baseline=$(cd "${1:?usage: compare_serving.sh BASELINE_DIR [ROUNDS] [SIZE]}" && pwd)
rounds=${2:-3}
size=${3:-512}
out=${OUT:?set OUT to the folder for the results}
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
lone_repeats=${LONE_REPEATS:-15}
png_repeats=${PNG_REPEATS:-21}
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
mkdir -p "$out"

summarize() {  # a bench.gpu service result -> one line
  "$python" - "$1" "$2" <<'PY'
import json, sys
from statistics import median
rows = json.load(open(sys.argv[1]))["service"]["rows"]
print(f"{sys.argv[2]}: lone {median(r['latency_p50_s'] for r in rows) * 1e3:.2f} ms, worker's batch "
      f"{median(r['median_ms']['generation'] for r in rows):.2f} ms, serving path "
      f"{median(r['stages']['serving_ms'] for r in rows):.3f} ms")
PY
}

bench_gpu() {  # the tree's own GPU benchmark: bench/gpu.py, or scripts/bench_gpu.py in a tree older than bench/
  if [ -f "$1/bench/gpu.py" ]; then echo "-m bench.gpu"; else echo "scripts/bench_gpu.py"; fi
}

for round in $(seq 1 "$rounds"); do
  for side in old new; do
    tree=$here
    [ "$side" = old ] && tree=$baseline
    (cd "$tree" && PYTHONPATH="$tree:${PYTHONPATH:-}" timeout 300 "$python" $(bench_gpu "$tree") service \
      --model fake:delay=0.19,cell=1 --size "$size" --steps 25 --service-runs lone --lone-repeats "$lone_repeats" --trace \
      --log-dir "$logs/$side-$round" --out "$out/fake-$side-$round.json" > "$logs/$side-$round.out" 2>&1) \
      || { tail -n 5 "$logs/$side-$round.out"; continue; }
    summarize "$out/fake-$side-$round.json" "$side-$round"
  done
done
for side in old new; do
  cat "$logs"/"$side"-*/stage-trace.log > "$logs/trace-$side.log"
  echo "$side:"
  (cd "$here" && "$python" -m bench.trace_stages "$logs/trace-$side.log")
done
for stripes in 6 14; do
  (cd "$here" && "$python" -m bench.png --sizes 512,1024 --repeats "$png_repeats" --stripes "$stripes" \
    --baseline "$baseline/gpu_worker/model/png.py" --out "$out/png-$stripes.json" > /dev/null 2>&1)
  "$python" - "$out/png-$stripes.json" <<'PY'
import json, sys
for row in json.load(open(sys.argv[1]))["rows"]:
    print(row["size"], row["image"], {name: timing["ms"] for name, timing in row["encoders"].items()})
PY
done
