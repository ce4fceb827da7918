#!/usr/bin/env bash
# The core CLI chain end to end on the embedded SmolLM2-135M-Instruct with the VADER reward:
# qvlm sample -> qvlm train ilql / value -> qvlm generate -> qvlm eval, with small settings (a few minutes).
# Usage: bash scripts/quickstart.sh [OUT_DIR]   (default runs/quickstart)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUT=${1:-runs/quickstart}
mkdir -p "$OUT"
START=$(date +%s)
qvlm sample --prompts demo:train --max-prompts 64 --n 4 --reward vader \
  --max-new-tokens 20 --batch-size 64 --seed 0 --fixed-horizon --out "$OUT/samples.jsonl"
qvlm train ilql --data "$OUT/samples.jsonl" --out "$OUT/ilql" --q-head tied --head-hidden 128 \
  --epochs 4 --batch-size 8 --max-length 160
qvlm train value --data "$OUT/samples.jsonl" --out "$OUT/mcq" --with-q --q-target next_v --q-head tied \
  --head-hidden 128 --epochs 6 --lr 3e-3 --batch-size 8 --max-length 160
qvlm generate --heads "$OUT/mcq" --beta 16 --guidance-top-k 10 --max-new-tokens 20 --seed 0 \
  --prompt "Write a one-sentence review of a hotel you stayed at." \
  --prompt "Describe the weather this morning in one sentence."
qvlm eval --heads "$OUT/ilql" --prompts demo:eval --max-prompts 48 --reward vader \
  --betas 0,4,16,64 --guidance-top-k 10 --max-new-tokens 20 --batch-size 64 --seed 1 --json "$OUT/eval.json"
qvlm eval --heads "$OUT/mcq" --prompts demo:eval --max-prompts 48 --reward vader \
  --betas 8,16 --guidance-top-k 20 --max-new-tokens 20 --batch-size 64 --seed 1 --json "$OUT/eval_mcq.json"
SECONDS_TAKEN=$(( $(date +%s) - START ))
echo "quickstart took $SECONDS_TAKEN s (after setup)"
# the README's CLI-chain table reads this file
python3 - "$OUT" "$SECONDS_TAKEN" <<'PY'
import json, os, platform, sys
import torch, transformers
from qvlm.fileio import atomic_write_text
out, seconds = sys.argv[1], int(sys.argv[2])
machine = (f"{os.cpu_count()}-core {platform.machine()}, torch {torch.__version__}, transformers "
           f"{transformers.__version__}, {'cuda' if torch.cuda.is_available() else 'no GPU'}")
result = {"command": "bash scripts/quickstart.sh", "seconds_after_setup": seconds, "machine": machine,
          "ilql": json.load(open(f"{out}/eval.json")), "mcq": json.load(open(f"{out}/eval_mcq.json"))}
atomic_write_text("benchmarks/results/quickstart_eval.json", json.dumps(result, indent=2) + "\n")
print("wrote benchmarks/results/quickstart_eval.json")
PY
