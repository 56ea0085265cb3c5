"""A decode request's ``kv_transfer_params``, checked before the engine sees them (extends the
NIXL connectors' reading of them in ``vllm/distributed/kv_transfer/kv_connector/v1/nixl/``).

Why: in prefill/decode disaggregation a client (the proxy) hands the decode server the
``kv_transfer_params`` the prefill server returned: where the prompt's KV lies (engine, host,
port, request, block ids). vLLM's NIXL connectors read them in the engine core and the workers
without checking them: block ids that are not integers kill the engine (every request fails,
the server exits), missing fields leave the request waiting for KV that never comes. Checked
here, in the API server, against the rendered prompt: a forged or garbled value is a 400
naming the field, and the engine never sees it. Requests that ask for no remote prefill are
left alone. Block ids that are well formed but name blocks the prefill server does not hold
can only be checked by that server (vLLM's own load-failure policy applies).
"""

from __future__ import annotations

import math
from typing import Any, Final

from vllm.exceptions import VLLMValidationError

from .. import errors
from ..errors import reject

_PARAMETER: Final = "kv_transfer_params"
_STRINGS: Final = ("remote_engine_id", "remote_request_id", "remote_host")
_COUNTS: Final = ("tp_size", "dcp_size", "pp_size")


def _bad(field: str, problem: str) -> None:
    reject(errors.BAD_KV_TRANSFER_PARAMS, parameter=_PARAMETER, field=field, problem=problem)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def well_formed(params: Any) -> bool:
    """Whether a connector can read these params (the prompt aside): no remote prefill asked,
    or every field of one there, of its type."""
    try:
        check_remote_prefill(params, None, 1)
    except VLLMValidationError:
        return False
    return True


def check_remote_prefill(
    params: Any, prompt_tokens: int | None, block_size: int, *, exact: bool = False
) -> None:
    """Refuse ``kv_transfer_params`` asking for a remote prefill that the engine could not
    follow: each field's type and range, and (given the prompt's length) no more blocks than
    the prompt fills; ``exact``: as many as it fills (the prefill server computed the whole
    prompt: no Mamba layers, no multi-token lookahead), since vLLM would place fewer blocks at
    the wrong positions."""
    if not isinstance(params, dict) or not params.get("do_remote_prefill"):
        return
    for field in _STRINGS:
        value = params.get(field)
        if not isinstance(value, str) or not value:
            _bad(field, "must be a non-empty string")
    port = params.get("remote_port")
    if not _is_int(port) or not 0 < port < 65536:
        _bad("remote_port", "must be a port number (1-65535)")
    for field in _COUNTS:
        if field in params and (not _is_int(params[field]) or params[field] < 1):
            _bad(field, "must be a positive integer")
    groups = params.get("remote_block_ids")
    if not isinstance(groups, list) or not groups:
        _bad("remote_block_ids", "must be a non-empty list of lists of block ids")
    for group in groups:
        if not isinstance(group, list) or not all(_is_int(b) and b >= 0 for b in group):
            _bad("remote_block_ids", "must be a list of lists of non-negative integers")
    if prompt_tokens is None:
        return
    most = math.ceil(prompt_tokens / max(block_size, 1))
    for group in groups:
        if exact and len(group) < most:
            _bad(
                "remote_block_ids",
                f"lists {len(group)} blocks; this prompt of {prompt_tokens} tokens fills "
                f"{most} of {block_size} tokens",
            )
        if len(group) > most:
            _bad(
                "remote_block_ids",
                f"lists {len(group)} blocks; this prompt of {prompt_tokens} tokens fills at most "
                f"{most} of {block_size} tokens",
            )
    remote_tokens = params.get("remote_num_tokens")
    if remote_tokens is not None and (
        not _is_int(remote_tokens) or not 0 <= remote_tokens <= prompt_tokens
    ):
        _bad("remote_num_tokens", f"must be an integer from 0 to the prompt's {prompt_tokens}")
