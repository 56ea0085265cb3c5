"""Patch of ``vllm/v1/engine/input_processor.py``: validate compact embeds inputs.

What: ``InputProcessor._validate_model_input`` sees, for an embeds input that carries only its
embedding rows (fewer rows than token ids), a zero-copy stand-in of full length (the first row
broadcast), so vLLM's own length and mask checks run unchanged. Why: vLLM takes an embeds
input's length from its rows. When it can go: with the ``vllm_utils`` patch.

Also: ``InputProcessor.process_inputs`` moves the content digests of rows kept by uuid from
the engine input (``SPAN_DIGESTS_KEY``, set by ``splice.build_embeds_input``) into the
request's ``sampling_params.extra_args``, the field vLLM leaves to plugins, so the engine keys
those blocks without hashing the rows again (``v1_core_kv_cache_utils``). Any value a client
sent under that key or the rows wire's (``vllm_xargs``) is dropped first: only the server sets
them. When it can go:
when vLLM's engine requests carry a content hash for embedding rows, as they do for media.

Also: ``process_inputs`` first checks a decode request's ``kv_transfer_params`` against its
rendered prompt (``kv_transfer/transfer_params.py``), on servers that run a KV connector, so a
forged value is a 400 instead of a dead engine. When it can go: when vLLM's NIXL connectors
check what they are given.
"""

from __future__ import annotations

from typing import Any

from ..kv_transfer.transfer_params import check_remote_prefill
from ..stores.engine_rows import WIRE_KEY
from . import Patch, check
from .v1_core_kv_cache_utils import SPAN_DIGESTS_KEY

_PROCESS_INPUTS_PARAMS = (
    "self", "request_id", "prompt", "params", "supported_tasks", "arrival_time",
    "lora_request", "tokenization_kwargs", "trace_headers", "priority", "data_parallel_rank",
    "resumable", "session_id", "kv_hints",
)  # fmt: skip


def is_compact(engine_input: Any) -> bool:
    """An embeds input whose rows cover only the positions the mask marks as embeddings."""
    if engine_input.get("type") != "embeds":
        return False
    ids = engine_input.get("prompt_token_ids")
    return ids is not None and len(engine_input["prompt_embeds"]) != len(ids)


def apply(patch: Patch) -> None:
    from vllm.v1.engine import input_processor

    check(
        patch,
        {
            "InputProcessor._validate_model_input": ("self", "prompt_input", "prompt_type"),
            "InputProcessor.process_inputs": _PROCESS_INPUTS_PARAMS,
        },
    )
    cls = input_processor.InputProcessor
    original = cls._validate_model_input

    def _validate_model_input(self: Any, prompt_input: Any, prompt_type: Any) -> None:
        if is_compact(prompt_input):
            rows = prompt_input["prompt_embeds"]
            length = len(prompt_input["prompt_token_ids"])
            stand_in = rows[:1].expand(length, -1)  # a view: nothing is allocated
            prompt_input = {**prompt_input, "prompt_embeds": stand_in}
        original(self, prompt_input, prompt_type)

    cls._validate_model_input = _validate_model_input  # type: ignore[method-assign]
    original_process = cls.process_inputs

    def process_inputs(self: Any, request_id: str, prompt: Any, params: Any, *args: Any,
                       **kwargs: Any) -> Any:  # fmt: skip
        check_transfer_params(self, prompt, params)
        request = original_process(self, request_id, prompt, params, *args, **kwargs)
        carry_span_digests(request, prompt)
        return request

    cls.process_inputs = process_inputs  # type: ignore[method-assign]


def check_transfer_params(processor: Any, prompt: Any, params: Any) -> None:
    """A decode request's ``kv_transfer_params`` against its prompt
    (``kv_transfer/transfer_params.py``), on servers that run a KV connector."""
    config = getattr(processor, "vllm_config", None)
    extra = getattr(params, "extra_args", None) or {}
    if config is None or config.kv_transfer_config is None or "kv_transfer_params" not in extra:
        return
    ids = prompt.get("prompt_token_ids") if isinstance(prompt, dict) else None
    if ids is None:
        return  # vLLM counts other prompts itself
    block_size = int(config.cache_config.block_size or 0)
    # The prefill server leaves trailing tokens to the decode server only for Mamba layers or
    # a multi-token lookahead (vLLM's NIXL backoff): otherwise it sends every block.
    whole = getattr(config, "num_prefill_lookahead_tokens", 2) <= 1
    exact = whole and not getattr(config.model_config, "is_hybrid", True)
    check_remote_prefill(extra["kv_transfer_params"], len(ids), block_size, exact=exact)


def carry_span_digests(request: Any, engine_input: Any) -> None:
    """Put the server's span digests (only those) into the request's ``extra_args``."""
    params = request.sampling_params
    if params is None:
        return
    extra = dict(params.extra_args or {})
    extra.pop(SPAN_DIGESTS_KEY, None)  # never a client's
    extra.pop(WIRE_KEY, None)  # nor this (stores/engine_rows.py)
    digests = engine_input.get(SPAN_DIGESTS_KEY) if isinstance(engine_input, dict) else None
    if digests and is_compact(engine_input):
        extra[SPAN_DIGESTS_KEY] = digests
    if extra != (params.extra_args or {}):
        params.extra_args = extra or None
