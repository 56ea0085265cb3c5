"""Patch of ``vllm/v1/worker/gpu/model_states/prompt_embeds.py`` (the V2 model runner).

What: ``PromptEmbedsState.add_request`` receives, for a compact request (embedding rows only,
beside full-length ids and a mask), the dense full-length tensor it expects, built here at its
own boundary. Why: the V2 runner (CUDA's default in vLLM 0.32) overlays embeddings with a
Triton kernel indexed by absolute position; it cannot run on the CPU machines this project is
tested on, so it gets exactly the input it was written for. Everything before it (frontend,
transport, engine core, block hashing) stays compact. Skipped where the module cannot be
imported (no Triton: the V2 runner cannot run there either). When it can go: when the V2
kernel takes a row index per position.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from ..position_mask import RunMask
from . import Patch, check


def densify(rows: torch.Tensor, is_token_ids: Any) -> torch.Tensor:
    """The full-length tensor: rows at embedding positions, zeros at token positions."""
    mask = torch.as_tensor(is_token_ids, dtype=torch.bool)
    dense = rows.new_zeros((mask.numel(), rows.shape[1]))
    dense[~mask] = rows
    return dense


def apply(patch: Patch) -> None:
    try:
        from vllm.v1.worker.gpu.model_states import prompt_embeds
    except ImportError:
        return  # no Triton here: the V2 runner cannot run in this process
    check(patch, {"PromptEmbedsState.add_request": ("self", "req_index", "new_req_data")})
    cls = prompt_embeds.PromptEmbedsState
    original = cls.add_request

    def add_request(self: Any, req_index: int, new_req_data: Any) -> None:
        rows = new_req_data.prompt_embeds
        mask = new_req_data.prompt_is_token_ids
        if rows is not None and mask is not None and rows.shape[0] != len(mask):
            # The V2 state copies the mask to the device from a list, as vLLM sends it.
            dense_mask = mask.tolist() if isinstance(mask, RunMask) else mask
            new_req_data = replace(
                new_req_data,
                prompt_embeds=densify(rows, dense_mask),
                prompt_is_token_ids=dense_mask,
            )
        original(self, req_index, new_req_data)

    cls.add_request = add_request  # type: ignore[method-assign]
