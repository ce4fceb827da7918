#!/usr/bin/env bash
# The main job: set up, then `qvlm demo --quick` on the embedded SmolLM2-135M-Instruct.
# Extra arguments go to qvlm demo (e.g. --out DIR, --target negative, or drop --quick with --full).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ "${1:-}" = "--full" ]; then shift; exec qvlm demo "$@"; fi
exec qvlm demo --quick "$@"
