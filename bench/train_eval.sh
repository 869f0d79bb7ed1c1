#!/bin/bash
# Float-vs-int8 measurements for docs/TRAINING.md (run from the repo root):
#   bench/train_eval.sh NAME DATA [yugami-train args...]
# Writes runs/NAME (bundle), runs/NAME.float.tflite, runs/NAME.json; appends a line to runs/exp_summary.txt.
set -euo pipefail
export TF_CPP_MIN_LOG_LEVEL=2
mkdir -p runs
W=../shared/weights/mobilenet_v2_1.0_224_no_top.h5
name=$1 data=$2; shift 2
t0=$(date +%s)
.venv/bin/yugami-train $data --out runs/$name --weights $W --quiet --min-int8-cosine 0.0 \
    --save-float runs/$name.float.tflite "$@" > runs/$name.train.log 2>&1
t1=$(date +%s)
.venv/bin/yugami-eval runs/$name $data --json runs/$name.json --float-model runs/$name.float.tflite \
    --quiet > runs/$name.eval.log 2>&1
t2=$(date +%s)
.venv/bin/python - "$name" $((t1-t0)) $((t2-t1)) "$*" >> runs/exp_summary.txt <<'PY'
import json, sys
name, ts, te, args = sys.argv[1:]
r = json.load(open(f"runs/{name}.json")); m = json.load(open(f"runs/{name}/manifest.json"))
print(f"{name} int8={r['image_auroc']:.3f} float={r['float']['image_auroc']:.3f} "
      f"cos={m['int8_vs_float']['mean_cosine']:.3f} train_s={ts} eval_s={te} "
      f"fit_s={m['training']['train_seconds']} hist={[round(h['accuracy'],3) for h in m['training']['history']]} args=[{args}]")
PY
