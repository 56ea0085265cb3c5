"""What each of vLLM's KV connectors keys KV by, and what that asks of a part (extends
``vllm/distributed/kv_transfer/kv_connector/factory.py``'s registry, read only).

Why: a connector that stores KV for later requests must tell one part's rows from another's.
Those keyed by vLLM's block hashes do (the hashes carry the rows' digests,
``patches/v1_core_kv_cache_utils.py``); those that move one request's KV between two servers
need no key (both servers render the same chat); those keyed by token ids see, at the rows,
ids drawn from the rows' digest (``row_keys.py``), which tell ``n`` rows apart from other rows
with probability ``1 - vocab ** -n``. For short parts that bound is weak (one row of a
32,000-id vocabulary: 1 in 32,000), so under such a connector a part needs enough rows for
``KEY_BITS`` bits; a shorter part is refused with a 400 naming it, never served another
part's KV. A connector this module does not know (``kv_connector_module_path``) is taken to key
by token ids.

The survey behind the sets (vLLM 0.32, read in its sources) is in ``docs/user-guide.md``
("Disaggregated serving and KV connectors").
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, Final

from ..log import logger

# Keyed by vLLM's block hashes (which carry the rows' digests).
BY_BLOCK_HASHES: Final = frozenset(
    {"OffloadingConnector", "SimpleCPUOffloadConnector", "MooncakeStoreConnector"}
)
# Move one request's KV from a prefill server to a decode server: no key.
PER_REQUEST: Final = frozenset(
    {"NixlConnector", "NixlPullConnector", "NixlPushConnector", "MooncakeConnector",
     "MoRIIOConnector"}
)  # fmt: skip
# Reuse no KV across requests (benchmarks, hidden-state export, sparse attention).
NO_REUSE: Final = frozenset(
    {"DecodeBenchConnector", "ExampleHiddenStatesConnector", "HiSparseConnector"}
)
# Keyed by token ids (ExampleConnector adds multimodal hashes; LMCache and FlexKV hand the ids
# to their own libraries).
BY_TOKEN_IDS: Final = frozenset(
    {"ExampleConnector", "HF3FSKVConnector", "LMCacheConnectorV1", "LMCacheMPConnector",
     "FlexKVConnectorV1"}
)  # fmt: skip
# Every connector whose key this module knows not to be token ids.
_NOT_BY_TOKEN_IDS: Final = BY_BLOCK_HASHES | PER_REQUEST | NO_REUSE
# Bits of content key a part needs under a connector keyed by token ids.
KEY_BITS: Final = 64


def connector_names(kv_transfer_config: Any) -> Iterator[str]:
    """The connectors a KV-transfer config runs (``MultiConnector``'s children too)."""
    if kv_transfer_config is None or not getattr(kv_transfer_config, "kv_connector", None):
        return
    name = str(kv_transfer_config.kv_connector)
    if name != "MultiConnector":
        yield name
        return
    extra = getattr(kv_transfer_config, "kv_connector_extra_config", None) or {}
    for child in extra.get("connectors", []):
        if isinstance(child, dict) and child.get("kv_connector"):
            yield str(child["kv_connector"])


def keyed_by_token_ids(kv_transfer_config: Any) -> str | None:
    """The first configured connector that keys KV by token ids (or is unknown), if any."""
    custom = getattr(kv_transfer_config, "kv_connector_module_path", None)
    for name in connector_names(kv_transfer_config):
        if custom or name not in _NOT_BY_TOKEN_IDS:
            return name
    return None


def min_rows(vocab_size: int) -> int:
    """Rows a part needs for ``KEY_BITS`` bits of content ids in a vocabulary this size."""
    return max(1, math.ceil(KEY_BITS / math.log2(max(vocab_size, 2))))


def part_min_rows(config: Any) -> tuple[int, str | None]:
    """The fewest rows a part may hold on this server, and the connector that asks for it."""
    connector = keyed_by_token_ids(getattr(config, "kv_transfer_config", None))
    if connector is None:
        return 1, None
    rows = min_rows(config.model_config.get_vocab_size())
    logger.info(
        "vllm_chat_embeds: KV connector %s keys KV by token ids; a prompt_embeds part's "
        "positions hold ids drawn from its rows' digest, and parts of fewer than %d rows are "
        "refused (too few ids to tell them from other rows).",
        connector,
        rows,
    )
    return rows, connector
