"""Content keys for rows in the engine's requests (kv_transfer/row_keys.py, v1_request patch).

Built on vLLM's own ``Request`` and block hasher, with the plugin's patches applied: what a KV
connector, a KV-cache event or a router reads of a request (its token ids, its block hashes)
must tell different rows apart and equal rows alike.
"""

from __future__ import annotations

import pytest
import torch

from vllm_chat_embeds.kv_transfer import row_keys
from vllm_chat_embeds.patches import apply_all
from vllm_chat_embeds.patches.v1_core_kv_cache_utils import SPAN_DIGESTS_KEY
from vllm_chat_embeds.position_mask import RunMask
from vllm_chat_embeds.row_digest import rows_digest

pytestmark = pytest.mark.unit

VOCAB = 97
BLOCK = 4
# Two parts: rows 0-2 at positions 1-3, rows 3-4 at positions 6-7.
IDS = [5, 0, 0, 0, 6, 7, 0, 0, 8, 9, 10, 11]
MASK = [True, False, False, False, True, True, False, False, True, True, True, True]
EMBED_POSITIONS = [1, 2, 3, 6, 7]


@pytest.fixture(scope="module", autouse=True)
def patched() -> None:
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import init_none_hash

    apply_all()
    init_none_hash(sha256)
    row_keys.note_vocab_size(VOCAB)


def rows(seed: int = 0) -> torch.Tensor:
    return torch.randn(5, 8, generator=torch.Generator().manual_seed(seed))


def request(prompt_rows: torch.Tensor, extra: dict | None = None):
    from vllm import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher
    from vllm.v1.request import Request

    return Request(
        request_id="r",
        prompt_token_ids=list(IDS),
        sampling_params=SamplingParams(max_tokens=1, extra_args=extra),
        pooling_params=None,
        prompt_embeds=prompt_rows,
        prompt_is_token_ids=list(MASK),
        block_hasher=get_request_block_hasher(BLOCK, sha256),
    )


def embed_ids(req) -> list[int]:
    return [req.prompt_token_ids[p] for p in EMBED_POSITIONS]


def test_rows_get_content_ids_in_every_view_of_the_prompt():
    req = request(rows())
    ids = embed_ids(req)
    assert all(0 <= i < VOCAB for i in ids)
    assert [req.prompt_token_ids[p] for p in (0, 4, 5, 8)] == [5, 6, 7, 8]  # text unchanged
    assert list(req.all_token_ids) == req.prompt_token_ids  # vLLM had zeroed the rows there
    assert isinstance(req.prompt_is_token_ids, RunMask) and req.prompt_is_token_ids == MASK
    assert len(req.block_hashes) == len(IDS) // BLOCK


def test_equal_rows_equal_keys_other_rows_other_keys():
    first, again = request(rows()), request(rows().clone())
    assert embed_ids(first) == embed_ids(again)
    assert first.block_hashes == again.block_hashes
    changed = rows()
    changed[4, 0] += 1.0  # the second part only
    other = request(changed)
    assert embed_ids(other)[:3] == embed_ids(first)[:3]  # the first part is the same
    assert embed_ids(other)[3:] != embed_ids(first)[3:]
    assert other.block_hashes[0] == first.block_hashes[0]
    assert other.block_hashes[1:] != first.block_hashes[1:]


def test_dtype_is_part_of_the_key():
    half = rows().half()
    assert request(half).block_hashes != request(half.view(torch.bfloat16)).block_hashes


def test_a_part_by_uuid_keys_as_the_same_rows_inline():
    data = rows()
    given = [[3, rows_digest(data[:3])], [2, None]]  # the first part kept by uuid
    by_uuid = request(data, {SPAN_DIGESTS_KEY: given})
    inline = request(data.clone())
    assert embed_ids(by_uuid) == embed_ids(inline)
    assert by_uuid.block_hashes == inline.block_hashes


def test_a_forged_table_that_does_not_cover_the_rows_is_ignored():
    data = rows()
    forged = request(data, {SPAN_DIGESTS_KEY: [[1, "00" * 32]]})
    assert forged.block_hashes == request(data.clone()).block_hashes


def test_prompts_without_rows_and_dense_prompts_are_untouched():
    from vllm import SamplingParams
    from vllm.v1.request import Request

    plain = Request("t", list(IDS), SamplingParams(max_tokens=1), None)
    assert plain.prompt_token_ids == IDS and list(plain.all_token_ids) == IDS
    dense = Request(
        "d",
        list(IDS),
        SamplingParams(max_tokens=1),
        None,
        prompt_embeds=torch.zeros(len(IDS), 8),
        prompt_is_token_ids=list(MASK),
    )
    assert dense.prompt_token_ids == IDS
    assert [dense.all_token_ids[p] for p in EMBED_POSITIONS] == [0] * 5


def test_content_ids_are_stable():
    # A key is only useful across servers and releases if it never changes: pinned here.
    digest = bytes(range(32))
    assert row_keys.content_ids(digest, 4, 50_000).tolist() == PINNED


PINNED = [41888, 7961, 48944, 23400]
