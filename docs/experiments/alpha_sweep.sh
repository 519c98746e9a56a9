#!/usr/bin/env bash
# The SmolLM2 alpha sweep of docs/results.md ("the full table with alpha sweeps"): fp32, naive,
# SmoothQuant at alpha 0.3..0.9 and auto, paper and all targets (all also at alpha 0.5 with
# --smooth-fold runtime), weights channel/acts token and O1-O3. One JSON line per run in $OUT/results.jsonl; runs already there are skipped, so it resumes.
# Usage: docs/experiments/alpha_sweep.sh [OUT_DIR]  (needs ../shared and a release build)
# Table: python3 docs/experiments/alpha_table.py OUT_DIR/results.jsonl
set -u
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${1:-$ROOT/target/alpha-sweep}
mkdir -p "$OUT" && cd "$OUT"
SQ=${SQ:-$ROOT/target/release/smoothquant}
ASSETS=$ROOT/../shared/assets
GGUF=$ASSETS/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
TEST=$ASSETS/wikitext-2/wiki.test.txt
VALID=$ASSETS/wikitext-2/wiki.valid.txt
if [ ! -f act.safetensors ]; then
  $SQ calibrate --model $GGUF --calib-data $VALID --calib-samples 128 --calib-seq-len 512 --seed 0 --out act.safetensors > calib.log 2>&1
fi
run() { # tag, args...
  local tag=$1; shift
  if grep -q "\"tag\": \"$tag\"" results.jsonl 2>/dev/null; then return; fi
  local t0=$(date +%s)
  local out
  out=$($SQ --threads 2 eval --model $GGUF --data $TEST --seq-len 512 --max-windows 40 --act-scales act.safetensors --json "$@" 2>>err.log)
  local t1=$(date +%s)
  python3 -c "import json,sys; d=json.loads(sys.argv[1]); print(json.dumps({'tag': sys.argv[2], 'args': sys.argv[3], 'secs': int(sys.argv[4]), 'results': d['results']}))" "$out" "$tag" "$*" $((t1-t0)) >> results.jsonl || echo "FAILED $tag $*" >> err.log
}
preset_args() { case $1 in ct) echo "--weights channel --acts token";; *) echo "--preset $1";; esac; }
# fp32 reference, then the paper-target table (naive, 0.5, sweep, auto) row by row
run fp32 --scheme fp32
for row in o3 o2 o1 ct; do
  run naive-$row --scheme naive $(preset_args $row)
  run paper-$row-0.5 --scheme smoothquant --smooth-targets paper --alpha 0.5 $(preset_args $row)
  for a in 0.4 0.3 0.6 0.7 0.8 0.9; do
    run paper-$row-$a --scheme smoothquant --smooth-targets paper --alpha $a $(preset_args $row)
  done
done
for row in ct o1 o2 o3; do
  run paper-$row-auto --scheme smoothquant --smooth-targets paper --alpha auto --calib-data $VALID $(preset_args $row)
done
# all targets (the default): 0.5 and auto, then the sweep
for row in ct o1 o2 o3; do
  run all-$row-0.5 --scheme smoothquant --smooth-targets all --alpha 0.5 $(preset_args $row)
  run all-$row-0.5-runtime --scheme smoothquant --smooth-targets all --alpha 0.5 --smooth-fold runtime $(preset_args $row)
done
for row in o3 o2 ct o1; do
  run all-$row-auto --scheme smoothquant --smooth-targets all --alpha auto --calib-data $VALID $(preset_args $row)
done
for row in o3 o2 ct o1; do
  for a in 0.3 0.4 0.6 0.7 0.8 0.9; do
    run all-$row-$a --scheme smoothquant --smooth-targets all --alpha $a $(preset_args $row)
  done
done
echo done > sweep.done
