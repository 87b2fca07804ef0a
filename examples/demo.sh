#!/usr/bin/env bash
# Demo: compile the small GPT example for 2-way tensor parallelism and explain the artifact.
set -euo pipefail
cd "$(dirname "$0")/.."
# The console script's sys.path does not include the repo root; make `examples.gpt` importable.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

.venv/bin/tpcompile examples.gpt:build --tp 2 -o out/gpt-tp2 --force
.venv/bin/tpcompile explain out/gpt-tp2
