"""The placeholder token: one id, consistent cached metadata, existing special tokens kept."""

from __future__ import annotations

import pytest
from tokenizers import AddedToken
from transformers import AutoTokenizer
from vllm.tokenizers.hf import get_cached_tokenizer

from vllm_chat_embeds import errors
from vllm_chat_embeds.placeholder import PLACEHOLDER_TOKEN, with_placeholder_token

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def cached(tiny_model):
    return get_cached_tokenizer(AutoTokenizer.from_pretrained(str(tiny_model)))


def test_placeholder_is_one_new_id_and_metadata_is_consistent(cached):
    before_len, before_special = len(cached), list(cached.all_special_tokens)
    tok, token_id = with_placeholder_token(cached)
    assert token_id == before_len
    assert tok.encode(f"a{PLACEHOLDER_TOKEN}{PLACEHOLDER_TOKEN}b", add_special_tokens=False)[
        1:3
    ] == [token_id, token_id]
    assert len(tok) == before_len + 1
    assert tok.max_token_id == token_id
    assert set(before_special) | {PLACEHOLDER_TOKEN} == set(tok.all_special_tokens)
    assert token_id in tok.all_special_ids
    # The tokenizer we were given is untouched.
    assert len(cached) == before_len and PLACEHOLDER_TOKEN not in cached.get_vocab()
    assert len(cached.encode(PLACEHOLDER_TOKEN, add_special_tokens=False)) > 1


def test_registration_is_reused_when_already_special(cached):
    tok, token_id = with_placeholder_token(cached)
    again, again_id = with_placeholder_token(tok)
    assert again is tok and again_id == token_id


def test_clash_with_an_ordinary_token_is_refused(tiny_model):
    raw = AutoTokenizer.from_pretrained(str(tiny_model))
    raw.add_tokens([AddedToken(PLACEHOLDER_TOKEN, special=False)])
    with pytest.raises(RuntimeError) as info:
        with_placeholder_token(get_cached_tokenizer(raw))
    assert str(info.value) == errors.TOKEN_CLASH.format(token=PLACEHOLDER_TOKEN)
