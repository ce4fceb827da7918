#!/usr/bin/env bash
# Set up, then run the whole test suite (unit, tiny-model, equivalence, ground truth, SmolLM2).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# pytest exits 5 when it collected no test: that is a failure here too (set -e stops on it).
${PYTHON:-python3} -m pytest -q -p no:cacheprovider "$@"
