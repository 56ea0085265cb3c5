"""The rows' content digest (row_digest.py): BLAKE3 unless an operator asks for SHA-256, over
dtype, shape and bytes, the same whichever way the rows are laid out."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest
import torch
from blake3 import blake3

from vllm_chat_embeds import row_digest
from vllm_chat_embeds.limits import ENV_ROW_DIGEST, Limits


@pytest.fixture
def fresh_name(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    row_digest.digest_name.cache_clear()
    yield monkeypatch
    monkeypatch.delenv(ENV_ROW_DIGEST, raising=False)
    row_digest.digest_name.cache_clear()


def _expected(factory, rows: torch.Tensor) -> str:
    digest = factory(f"{rows.dtype}:{tuple(rows.shape)}:".encode())
    digest.update(rows.numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize(("env", "factory"), [(None, blake3), ("sha256", hashlib.sha256),
                                              (" BLAKE3 ", blake3)])  # fmt: skip
def test_the_digest_named_by_the_environment(fresh_name, env, factory):
    if env is not None:
        fresh_name.setenv(ENV_ROW_DIGEST, env)
    rows = torch.randn(5, 8).to(torch.float16)
    assert row_digest.rows_digest(rows) == _expected(factory, rows)
    assert len(row_digest.rows_digest(rows)) == 64  # what the shared store and row keys expect


def test_an_unknown_digest_fails_at_startup(fresh_name):
    fresh_name.setenv(ENV_ROW_DIGEST, "md5")
    with pytest.raises(ValueError, match=f"{ENV_ROW_DIGEST} must be one of blake3, sha256"):
        Limits.from_env()


def test_dtype_shape_and_layout():
    rows = torch.arange(24, dtype=torch.float32).view(6, 4)
    digest = row_digest.rows_digest(rows)
    assert row_digest.rows_digest(rows.view(4, 6)) != digest  # same bytes, other shape
    assert row_digest.rows_digest(rows.view(torch.int32)) != digest  # same bytes, other dtype
    assert row_digest.rows_digest(rows.t().contiguous().t()) == digest  # layout is not content
    changed = rows.clone()
    changed[5, 3] = 24.5
    assert row_digest.rows_digest(changed) != digest
