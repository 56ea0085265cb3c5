"""The PayloadSpec the unit tests decode against: small width, small limits."""

from __future__ import annotations

from typing import Any

import torch

from vllm_chat_embeds.payload import PayloadSpec

WIDTH = 8
MAX_ROWS = 64


def make_spec(dtype: torch.dtype = torch.float32, **overrides: Any) -> PayloadSpec:
    fields: dict[str, Any] = {
        "width": WIDTH,
        "dtype": dtype,
        "max_part_bytes": 1 << 20,
        "max_rows": MAX_ROWS,
        "rows_limit": MAX_ROWS,
    }
    fields.update(overrides)
    return PayloadSpec(**fields)
