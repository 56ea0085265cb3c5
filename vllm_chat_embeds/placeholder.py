"""Register the ``<prompt_embeds>`` placeholder token (extends ``vllm/tokenizers/hf.py``).

Why a new tokenizer object instead of mutating vLLM's: vLLM wraps Hugging Face tokenizers in a
proxy that freezes ``len()``, ``max_token_id`` and the special-token list when it is built.
Adding a token to that proxy leaves the frozen values stale (the built-in's defect), so we add
the token to a private copy of the underlying tokenizer, extending (never replacing) its
special tokens, and wrap the copy again so every cached value includes the placeholder.
"""

from __future__ import annotations

import copy
from typing import Any, Final

from vllm.tokenizers.hf import get_cached_tokenizer

from . import errors

PLACEHOLDER_TOKEN: Final = "<prompt_embeds>"


def _unwrap(tokenizer: Any) -> Any:
    """A private, deep copy of the tokenizer under vLLM's caching proxy."""
    cls = type(tokenizer)
    if not cls.__name__.startswith("Cached"):
        raise RuntimeError(
            f"vllm-chat-embeds expected vLLM's cached HF tokenizer, got {cls.__name__}; "
            "this vLLM version is not supported."
        )
    plain = copy.copy(tokenizer)
    plain.__class__ = cls.__mro__[1]  # the Hugging Face class the proxy derives from
    return copy.deepcopy(plain)


def _single_id(tokenizer: Any) -> int | None:
    ids = tokenizer.encode(PLACEHOLDER_TOKEN, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def with_placeholder_token(tokenizer: Any) -> tuple[Any, int]:
    """Return ``(tokenizer with the placeholder, placeholder id)``; ``tokenizer`` is untouched."""
    if PLACEHOLDER_TOKEN in tokenizer.get_vocab():
        # Already present: fine only if it is a special token of its own (e.g. a tokenizer
        # saved after registration), otherwise it means something else to this model.
        token_id = _single_id(tokenizer)
        if token_id is None or PLACEHOLDER_TOKEN not in tokenizer.all_special_tokens:
            raise RuntimeError(errors.TOKEN_CLASH.format(token=PLACEHOLDER_TOKEN))
        return tokenizer, token_id

    plain = _unwrap(tokenizer)
    try:
        plain.add_special_tokens(
            {"extra_special_tokens": [PLACEHOLDER_TOKEN]}, replace_extra_special_tokens=False
        )
    except TypeError:  # transformers < 5 spells the option differently
        plain.add_special_tokens(
            {"additional_special_tokens": [PLACEHOLDER_TOKEN]},
            replace_additional_special_tokens=False,
        )
    token_id = _single_id(plain)
    if token_id is None:
        raise RuntimeError(errors.TOKEN_CLASH.format(token=PLACEHOLDER_TOKEN))
    return get_cached_tokenizer(plain), token_id
