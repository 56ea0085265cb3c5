"""Patch of ``vllm/v1/worker/gpu_model_runner.py``: compact rows, and LoRA beside embeddings.

Compact transport. What: while ``GPUModelRunner._prepare_inputs`` runs, the input batch's
per-request embeddings are hidden from vLLM's per-step copy (which slices them by absolute
position, assuming one row per prompt position); just before ``_prepare_input_ids`` moves the
step's inputs to the device, we write the rows of the scheduled embedding positions, and only
those, into ``inputs_embeds``. Token positions are filled by vLLM from the embedding table as
before. Requests with one row per position (vLLM's own embeds prompts) are copied as vLLM
does. This is the V1 runner (the CPU runner subclasses it; CUDA's fallback). When it can go:
when vLLM carries embedding rows compactly itself.

LoRA. What: when LoRA is enabled and a step mixes embedding rows with token positions,
``GPUModelRunner._preprocess`` first embeds **every** scheduled position (embedding positions
as token id 0, a valid id) and keeps the rows at the embedding positions; vLLM's own partial
lookup then sees no token position left to embed. Why: vLLM embeds only the token positions
of such a step, but a LoRA-wrapped embedding layer applies the per-token LoRA mapping, which
covers every scheduled position; the lengths differ and the worker dies (punica's
``bgmv_expand``: ``einsum(): subscript b has size N ... M``), taking every tenant down. So an
adapter's embedding-layer delta reaches token positions only: rows are final input embeddings.
Multimodal models (vLLM embeds every position there) and the V2 runner (it embeds every
position, then overlays the rows) need no change. When it can go: when vLLM's V1 runner
embeds every scheduled position under LoRA itself (docs/upstream.md).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from . import Patch, check

_PENDING = "_vllm_chat_embeds_pending_rows"


def copy_scheduled_rows(
    dst: torch.Tensor,
    rows_by_req: dict[int, torch.Tensor],
    *,
    num_reqs: int,
    cu_num_tokens: np.ndarray,
    num_scheduled: np.ndarray,
    num_computed: np.ndarray,
    num_prompt: np.ndarray,
    is_token_ids: np.ndarray,
) -> None:
    """Write each request's scheduled embedding rows at their places in ``dst``."""
    for req_idx, rows in rows_by_req.items():
        if req_idx >= num_reqs:
            continue
        count = int(num_scheduled[req_idx])
        start = int(num_computed[req_idx])
        prompt_len = int(num_prompt[req_idx])
        if count <= 0 or start >= prompt_len:
            continue
        end = min(start + count, prompt_len)
        out = int(cu_num_tokens[req_idx]) - count
        if rows.shape[0] == prompt_len:  # one row per position: vLLM's own layout
            dst[out : out + end - start].copy_(rows[start:end])
            continue
        embedded = ~is_token_ids[req_idx, :end]
        local = np.flatnonzero(embedded[start:])
        if local.size == 0:
            continue
        first = int(np.count_nonzero(embedded[:start]))
        chunk = rows[first : first + local.size]
        lo, hi = int(local[0]), int(local[-1]) + 1
        if hi - lo == local.size:  # one run of rows: a slice copy, which also widens them
            dst[out + lo : out + hi].copy_(chunk)
        else:  # rows keep their payload's dtype (float16 under float32); put needs dst's
            dst[torch.from_numpy(out + local)] = chunk.to(dst.dtype)


class _NoTokenPositions:
    """The step's ``is_token_ids`` buffer as vLLM's partial lookup should see it: every
    scheduled position already embedded. A stand-in, so the (possibly pinned, in-flight)
    buffer itself is never written."""

    def __init__(self, buffer: Any, num_tokens: int) -> None:
        self._buffer = buffer
        self.np = np.zeros(num_tokens, dtype=bool)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._buffer, name)


def embed_every_position(
    embed: Any, input_ids: torch.Tensor, is_token_ids: torch.Tensor, inputs_embeds: torch.Tensor
) -> None:
    """Embed all positions (id 0 where a row is given) and keep the rows where they are."""
    safe_ids = torch.where(is_token_ids, input_ids.clamp(min=0), torch.zeros_like(input_ids))
    embedded = embed(input_ids=safe_ids)
    inputs_embeds.copy_(torch.where(is_token_ids.unsqueeze(-1), embedded, inputs_embeds))


def _lora_embeds_step(runner: Any, num_tokens: int) -> bool:
    """A step the partial lookup would break: LoRA on, rows beside tokens, text-only model."""
    if not (runner.lora_config and runner.enable_prompt_embeds and num_tokens > 0):
        return False
    if runner.supports_mm_inputs and not runner.model_config.is_encoder_decoder:
        return False  # vLLM's multimodal branch embeds every position already
    from vllm.distributed.parallel_state import get_pp_group

    if not get_pp_group().is_first_rank:
        return False
    mask = runner.is_token_ids.np[:num_tokens]
    return bool(mask.any()) and not bool(mask.all())  # rows only: vLLM embeds nothing


def apply(patch: Patch) -> None:
    from vllm.v1.worker import gpu_model_runner

    check(
        patch,
        {
            "GPUModelRunner._prepare_inputs": ("self", "scheduler_output", "num_scheduled_tokens"),
            "GPUModelRunner._prepare_input_ids": (
                "self",
                "scheduler_output",
                "num_reqs",
                "total_num_scheduled_tokens",
                "cu_num_tokens",
            ),
            "GPUModelRunner._preprocess": (
                "self",
                "scheduler_output",
                "num_input_tokens",
                "intermediate_tensors",
            ),
        },
    )
    cls = gpu_model_runner.GPUModelRunner
    original_prepare_inputs = cls._prepare_inputs
    original_prepare_input_ids = cls._prepare_input_ids
    original_preprocess = cls._preprocess

    def _prepare_inputs(self: Any, scheduler_output: Any, num_scheduled_tokens: Any) -> Any:
        batch = self.input_batch
        rows_by_req = batch.req_prompt_embeds
        if not rows_by_req:
            return original_prepare_inputs(self, scheduler_output, num_scheduled_tokens)
        batch.req_prompt_embeds = {}  # vLLM's absolute-position copy is skipped...
        setattr(self, _PENDING, (rows_by_req, num_scheduled_tokens))
        try:
            return original_prepare_inputs(self, scheduler_output, num_scheduled_tokens)
        finally:
            batch.req_prompt_embeds = rows_by_req
            setattr(self, _PENDING, None)

    def _prepare_input_ids(
        self: Any,
        scheduler_output: Any,
        num_reqs: int,
        total_num_scheduled_tokens: int,
        cu_num_tokens: Any,
    ) -> None:
        pending = getattr(self, _PENDING, None)
        if pending is not None:  # ...and ours runs before the inputs move to the device
            rows_by_req, num_scheduled = pending
            batch = self.input_batch
            copy_scheduled_rows(
                self.inputs_embeds.cpu,
                rows_by_req,
                num_reqs=num_reqs,
                cu_num_tokens=np.asarray(cu_num_tokens),
                num_scheduled=np.asarray(num_scheduled),
                num_computed=batch.num_computed_tokens_cpu,
                num_prompt=batch.num_prompt_tokens,
                is_token_ids=batch.is_token_ids,
            )
        original_prepare_input_ids(
            self, scheduler_output, num_reqs, total_num_scheduled_tokens, cu_num_tokens
        )

    cls._prepare_inputs = _prepare_inputs  # type: ignore[method-assign]
    cls._prepare_input_ids = _prepare_input_ids  # type: ignore[method-assign]

    def _preprocess(
        self: Any,
        scheduler_output: Any,
        num_input_tokens: int,
        intermediate_tensors: Any = None,
    ) -> Any:
        num_tokens = int(scheduler_output.total_num_scheduled_tokens)
        if not _lora_embeds_step(self, num_tokens):
            return original_preprocess(
                self, scheduler_output, num_input_tokens, intermediate_tensors
            )
        buffer = self.is_token_ids
        embed_every_position(
            self.model.embed_input_ids,
            self.input_ids.gpu[:num_tokens],
            buffer.gpu[:num_tokens],
            self.inputs_embeds.gpu[:num_tokens],
        )
        self.is_token_ids = _NoTokenPositions(buffer, num_tokens)
        try:
            return original_preprocess(
                self, scheduler_output, num_input_tokens, intermediate_tensors
            )
        finally:
            self.is_token_ids = buffer

    cls._preprocess = _preprocess  # type: ignore[method-assign]
