#!/usr/bin/env bash
# The main job until `qvlm demo` lands: set up, then sample -> score (VADER) -> train ILQL heads ->
# guided generation -> evaluation, on the embedded SmolLM2-135M-Instruct, with small settings.
# Usage: bash scripts/quickstart.sh [OUT_DIR]   (default runs/quickstart)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUT=${1:-runs/quickstart}
mkdir -p "$OUT"
qvlm sample --prompts demo:train --max-prompts ${QS_PROMPTS:-64} --n 4 --reward vader \
  --max-new-tokens 32 --seed 0 --out "$OUT/samples.jsonl"
qvlm train ilql --data "$OUT/samples.jsonl" --out "$OUT/ilql" --epochs 3 --batch-size 8 --max-length 160
qvlm generate --heads "$OUT/ilql" --beta 4 --max-new-tokens 32 --seed 0 \
  --prompt "Write a one-sentence review of a hotel you stayed at." \
  --prompt "Describe the weather this morning in one sentence."
qvlm eval --heads "$OUT/ilql" --prompts demo:eval --max-prompts ${QS_EVAL:-48} --reward vader \
  --betas 0,2,4 --max-new-tokens 32 --seed 1 --json "$OUT/eval.json"
