"""The rows a served model expects for a text, computed by the model's own embedding step.

Why: a part's rows replace what the model's text path feeds its first layer, which is the
output of vLLM's ``embed_input_ids``, not always the embedding table's row: Gemma (1 to 4,
3n, PaliGemma) multiplies the table's rows by sqrt(hidden_size) in the model dtype, and any
family may do its own. Asking the served model itself is exact on every family, with no list
of families to keep: ``POST /v1/prompt_embeds`` with a JSON ``{"text": ...}`` body
(``entrypoints/row_uploads.py``) keeps these rows like an upload, and ``/v1/models`` reports the
model's ``embedding_scale`` found the same way (``entrypoints_openai_models_serving`` patch).

How: a method added to vLLM's worker (``v1_worker_gpu_worker`` patch), reached through vLLM's
own ``collective_rpc`` (every tensor-parallel rank takes part, as the vocabulary-parallel
embedding needs; rank 0's answer is used).
"""

from __future__ import annotations

import math
from typing import Any, Final

import torch

# The worker method's name (``collective_rpc`` looks it up on the worker).
WORKER_METHOD: Final = "vllm_chat_embeds_embed_ids"
# Token ids whose rows the scale probe compares (the first ids sit on tensor-parallel rank 0).
_PROBE_IDS: Final = tuple(range(1, 9))
_SCALE_TOLERANCE: Final = 1e-3


def _input_table(model: Any) -> torch.Tensor | None:
    """The weight of the model's input-embedding table (not its output head), if found."""
    from vllm.model_executor.layers.vocab_parallel_embedding import (
        ParallelLMHead,
        VocabParallelEmbedding,
    )

    tables = [m for m in model.modules() if isinstance(m, VocabParallelEmbedding)]
    inputs = [m for m in tables if not isinstance(m, ParallelLMHead)] or tables
    weight = getattr(inputs[0], "weight", None) if inputs else None
    return weight if isinstance(weight, torch.Tensor) else None


def embed_on_worker(worker: Any, token_ids: list[int] | None) -> dict[str, Any]:
    """On a worker: the model's input rows for ``token_ids`` (``rows``, CPU, model dtype), or,
    for ``None``, the constant its embedding step multiplies table rows by (``scale``; None
    when it is not one constant)."""
    model = worker.model_runner.get_model()
    weight = _input_table(model)
    device = weight.device if weight is not None else torch.device(worker.device)
    ids = list(_PROBE_IDS) if token_ids is None else token_ids
    with torch.inference_mode():
        rows = model.embed_input_ids(torch.tensor(ids, dtype=torch.long, device=device))
        if token_ids is not None:  # as bytes: the RPC's reply encoder would list the values
            out = rows.to("cpu").contiguous()
            data = out.view(-1).view(torch.uint8).numpy().tobytes()
            return {"rows": data, "dtype": str(out.dtype).removeprefix("torch."),
                    "shape": list(out.shape)}  # fmt: skip
        if weight is None or weight.shape[0] <= max(ids):
            return {"scale": None}
        table = weight[torch.tensor(ids, device=device)].float()
        out = rows.float()
        mask = table.abs() > 1e-6
        if not bool(mask.any()):
            return {"scale": None}
        ratios = out[mask] / table[mask]
        scale = float(ratios.median())
        spread = float((ratios - scale).abs().max()) / max(abs(scale), 1e-12)
    return {"scale": round(scale, 6) if spread <= _SCALE_TOLERANCE and math.isfinite(scale)
            else None}  # fmt: skip


async def rows_for_ids(engine_client: Any, token_ids: list[int]) -> torch.Tensor:
    """The served model's input rows for ``token_ids`` (API server side)."""
    reply = (await engine_client.collective_rpc(WORKER_METHOD, args=(token_ids,)))[0]
    dtype = getattr(torch, str(reply["dtype"]))
    flat = torch.frombuffer(bytearray(reply["rows"]), dtype=torch.uint8).view(dtype)
    return flat.view(*[int(n) for n in reply["shape"]])


_scales: dict[int, float | None] = {}


async def embedding_scale(engine_client: Any) -> float | None:
    """What the served model's embedding step multiplies its table rows by (1.0: nothing;
    None: not one constant), found once per engine client."""
    key = id(engine_client)
    if key not in _scales:
        results = await engine_client.collective_rpc(WORKER_METHOD, args=(None,))
        _scales[key] = results[0]["scale"]
    return _scales[key]


async def describe(engine_client: Any) -> dict[str, Any] | None:
    """What a part must hold for the served model (``/v1/models``), or None when this server
    takes no prompt_embeds parts."""
    from .payload import RAW_DTYPES
    from .renderers.base import EmbedsRendererMixin
    from .stores import references, shared_store

    renderer = getattr(engine_client, "renderer", None)
    if not isinstance(renderer, EmbedsRendererMixin):
        return None
    if not (renderer.embeds_enabled and renderer.placeholder_id is not None):
        return None
    spec, limits = renderer.payload_spec, renderer.limits
    try:
        scale = await embedding_scale(engine_client)
    except Exception:  # the probe is informative; never fail the listing on it
        scale = None
    return {
        "hidden_size": spec.width,
        "dtype": str(spec.dtype).removeprefix("torch."),
        "accepted_dtypes": sorted(RAW_DTYPES),
        "encodings": sorted(spec.encodings),
        "max_parts": limits.max_parts,
        "max_rows": spec.rows_limit,
        "min_rows_per_part": spec.min_rows,
        "max_part_bytes": spec.max_part_bytes,
        "max_request_bytes": limits.max_request_bytes,
        # Rows stand for the output of the model's embedding step, after any scale it applies
        # to its table (``embedding_scale``: 1.0 for none; None when not one constant).
        "rows": "after_embedding_scale",
        "embedding_scale": scale,
        "references": references.process_bytes() > 0,
        "shared_store": shared_store.active() is not None,
        "routes": {
            "upload": "/v1/prompt_embeds",
            "rows_for_text": "/v1/prompt_embeds",
            "files": "/v1/files",
        },
    }
