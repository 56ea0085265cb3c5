"""Which KV connectors key by token ids, and the rows a part needs under them."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vllm_chat_embeds.kv_transfer import connectors

pytestmark = pytest.mark.unit


def config(name: str | None, extra: dict | None = None, module: str | None = None):
    return SimpleNamespace(
        kv_connector=name, kv_connector_extra_config=extra or {}, kv_connector_module_path=module
    )


def test_every_connector_vllm_registers_is_classified():
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    known = (
        connectors.BY_BLOCK_HASHES
        | connectors.PER_REQUEST
        | connectors.NO_REUSE
        | connectors.BY_TOKEN_IDS
        | {"MultiConnector"}
    )
    assert set(KVConnectorFactory._registry) <= known


@pytest.mark.parametrize(
    ("kv", "expected"),
    [
        (None, None),
        (config(None), None),
        (config("NixlConnector"), None),
        (config("OffloadingConnector"), None),
        (config("DecodeBenchConnector"), None),
        (config("ExampleConnector"), "ExampleConnector"),
        (config("LMCacheConnectorV1"), "LMCacheConnectorV1"),
        (config("SomethingNew"), "SomethingNew"),  # unknown: taken to key by ids
        (config("NixlConnector", module="my.module"), "NixlConnector"),  # a custom class
        (
            config(
                "MultiConnector",
                {
                    "connectors": [
                        {"kv_connector": "NixlConnector"},
                        {"kv_connector": "HF3FSKVConnector"},
                    ]
                },
            ),
            "HF3FSKVConnector",
        ),
        (config("MultiConnector", {"connectors": [{"kv_connector": "NixlConnector"}]}), None),
    ],
)
def test_connectors_keyed_by_token_ids(kv, expected):
    assert connectors.keyed_by_token_ids(kv) == expected


def test_rows_for_64_bits_of_ids():
    assert connectors.min_rows(2_000) == 6  # the tiny test model
    assert connectors.min_rows(32_000) == 5
    assert connectors.min_rows(128_256) == 4  # Llama 3
    assert connectors.min_rows(1) == 64
    assert 2_000 ** connectors.min_rows(2_000) >= 2**64 > 2_000 ** (connectors.min_rows(2_000) - 1)
