#!/usr/bin/env bash
# Demo: compile the small GPT example (6 heads) for 2-way tensor parallelism, show the plan, and check the
# sharded program against the original on two real gloo processes.
set -euo pipefail
cd "$(dirname "$0")/.."

.venv/bin/tpcompile examples.gpt:build --tp 2 -o out/gpt-tp2 --force
.venv/bin/tpcompile explain out/gpt-tp2
.venv/bin/tpcompile verify out/gpt-tp2 --reference examples.gpt:build
