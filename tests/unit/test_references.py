"""Unit tests for parts by reference: the store (``stores/references.py``) and how
``parts.extract_parts`` resolves a part's rows from its ``data`` or its ``uuid``."""

from __future__ import annotations

import base64
import io
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from vllm.exceptions import VLLMValidationError

from vllm_chat_embeds import errors
from vllm_chat_embeds.limits import ENV_REFERENCE_BYTES, Limits
from vllm_chat_embeds.payload import PayloadSpec
from vllm_chat_embeds.renderers.parts import extract_parts
from vllm_chat_embeds.stores import references
from vllm_chat_embeds.stores.references import MAX_UUID_CHARS, ReferenceStore, content_hash

pytestmark = pytest.mark.unit

WIDTH = 8
SPEC = PayloadSpec(
    width=WIDTH, dtype=torch.float32, max_part_bytes=1 << 20, max_rows=64, rows_limit=64
)
WHERE = "messages[0].content[1]"


def rows(n: int, value: float) -> torch.Tensor:
    return torch.full((n, WIDTH), value)


def b64(tensor: torch.Tensor) -> str:
    buf = io.BytesIO()
    torch.save(tensor, buf)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def part(tensor: torch.Tensor | None = None, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "prompt_embeds", **extra}
    if tensor is not None:
        out["data"] = b64(tensor)
    return out


def user(*parts: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "text", "text": "x"}, *parts]}]


def tensors(messages: list[Any]) -> list[torch.Tensor]:
    _, plan = extract_parts(messages, enabled=True, spec=SPEC, limits=Limits())
    assert plan is not None
    return [p.tensor for p in plan.parts]


def rejected(messages: list[Any]) -> str:
    with pytest.raises(VLLMValidationError) as info:
        tensors(messages)
    return info.value.args[0]


@pytest.fixture(autouse=True)
def fresh_store() -> Iterator[ReferenceStore]:
    yield references.configure(1 << 20)
    references.configure(Limits().reference_bytes)


# -- the store ---------------------------------------------------------------------------------


def test_store_keeps_a_private_copy() -> None:
    store = ReferenceStore(1 << 20)
    mine = rows(2, 1.0)
    kept = store.put("a", mine)
    mine.fill_(7.0)  # the client's tensor changes afterwards (offline)
    got = store.get("a")
    assert got is kept and torch.equal(got, rows(2, 1.0))
    assert store.held_bytes() == 2 * WIDTH * 4


def test_store_evicts_least_recently_used_first() -> None:
    one = 2 * WIDTH * 4
    store = ReferenceStore(3 * one)
    for name in "abc":
        store.put(name, rows(2, 0.0))
    assert store.get("a") is not None  # a is now the most recently used
    store.put("d", rows(2, 0.0))
    assert store.get("b") is None
    assert all(store.get(n) is not None for n in "acd")
    assert store.held_bytes() == 3 * one and len(store) == 3


def test_replacing_with_rows_too_large_forgets_the_old_rows() -> None:
    store = ReferenceStore(4 * WIDTH * 4)
    store.put("a", rows(2, 1.0))
    store.put("a", rows(8, 2.0))  # larger than the whole store: not kept
    assert store.get("a") is None and store.held_bytes() == 0


def test_store_off_keeps_nothing() -> None:
    store = ReferenceStore(0)
    assert not store.enabled
    store.put("a", rows(1, 1.0))
    assert store.get("a") is None


def test_store_size_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_REFERENCE_BYTES, "0")
    assert Limits.from_env().reference_bytes == 0
    monkeypatch.setenv(ENV_REFERENCE_BYTES, "-1")
    with pytest.raises(ValueError, match=ENV_REFERENCE_BYTES):
        Limits.from_env()
    monkeypatch.delenv(ENV_REFERENCE_BYTES)
    assert Limits.from_env().reference_bytes == 512 * 1024 * 1024


def test_store_is_thread_safe() -> None:
    store = ReferenceStore(40 * WIDTH * 4)

    def work(k: int) -> None:
        for i in range(200):
            name = f"u{(k * 7 + i) % 60}"
            store.put(name, rows(1 + i % 3, float(k)))
            store.get(f"u{i % 60}")

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    kept = [store.get(f"u{i}") for i in range(60)]
    held = sum(t.numel() * 4 for t in kept if t is not None)
    assert held == store.held_bytes() <= store.capacity


def test_content_hash_is_computed_once_for_kept_rows_only() -> None:
    calls: list[int] = []

    def compute(t: torch.Tensor) -> str:
        calls.append(1)
        return str(float(t.sum()))

    kept = ReferenceStore(1 << 20).put("a", rows(2, 1.0))
    assert content_hash(kept, "k", compute) == content_hash(kept, "k", compute)
    assert len(calls) == 1
    loose = rows(2, 1.0)
    content_hash(loose, "k", compute)
    content_hash(loose, "k", compute)
    assert len(calls) == 3  # rows not kept by the store may change: hashed every time


# -- resolving parts ---------------------------------------------------------------------------


def test_uuid_alone_gives_the_rows_sent_with_it() -> None:
    sent = tensors(user(part(rows(3, 1.5), uuid="u1")))[0]
    again = tensors(user(part(uuid="u1")))[0]
    also = tensors(user(part(uuid="u1", data=None)))[0]
    assert torch.equal(sent, rows(3, 1.5)) and torch.equal(again, sent) and also is again


def test_same_uuid_with_other_data_replaces_the_rows() -> None:
    tensors(user(part(rows(3, 1.0), uuid="u1")))
    tensors(user(part(rows(2, 2.0), uuid="u1")))
    assert torch.equal(tensors(user(part(uuid="u1")))[0], rows(2, 2.0))


def test_uuid_sent_with_data_later_in_the_request_names_those_rows() -> None:
    got = tensors(user(part(uuid="u9"), part(rows(1, 4.0), uuid="u9")))
    assert torch.equal(got[0], rows(1, 4.0)) and torch.equal(got[1], rows(1, 4.0))


def test_unknown_uuid_says_to_send_the_data_again() -> None:
    message = rejected(user(part(uuid="nope")))
    assert message == errors.REFERENCE_UNKNOWN.format(where=WHERE, uuid="nope")
    assert errors.REFERENCE_UNKNOWN_CODE in message


def test_uuid_with_store_off_is_served_but_not_kept() -> None:
    references.configure(0)
    assert torch.equal(tensors(user(part(rows(1, 1.0), uuid="u1")))[0], rows(1, 1.0))
    message = rejected(user(part(uuid="u1")))
    assert message == errors.REFERENCES_OFF.format(where=WHERE)
    assert errors.REFERENCE_UNKNOWN_CODE in message and errors.REFERENCES_OFF_CODE in message


def test_rows_kept_for_another_width_are_unknown() -> None:
    references.process_store().put("wide", torch.zeros(1, WIDTH + 1))
    assert errors.REFERENCE_UNKNOWN_CODE in rejected(user(part(uuid="wide")))


def test_half_precision_rows_are_kept_at_half_the_bytes() -> None:
    """float16 rows for a float32 model stay float16 (the worker widens them): so are they
    kept, and a reference to them resolves."""
    sent = tensors(user(part(rows(3, 1.5).half(), uuid="h")))[0]
    assert sent.dtype == torch.float16
    kept = references.process_store().get("h")
    assert kept is not None and kept.dtype == torch.float16
    assert tensors(user(part(uuid="h")))[0] is kept


def test_rows_kept_in_a_dtype_this_model_would_cast_are_unknown() -> None:
    """float64 rows (another LLM in the process) are not rows a float32 model carries."""
    references.process_store().put("f64", torch.zeros(1, WIDTH, dtype=torch.float64))
    assert errors.REFERENCE_UNKNOWN_CODE in rejected(user(part(uuid="f64")))


def test_referenced_rows_count_towards_the_row_limit() -> None:
    tensors(user(part(rows(40, 1.0), uuid="big")))
    message = rejected(user(part(rows(30, 1.0)), part(uuid="big")))
    assert message == errors.TOO_MANY_ROWS.format(where="messages[0].content[2]", limit=64)


@pytest.mark.parametrize(
    ("uuid", "expect"),
    [
        (42, errors.UUID_WRONG_TYPE.format(where=WHERE, got="int")),
        (["a"], errors.UUID_WRONG_TYPE.format(where=WHERE, got="list")),
        ({"a": 1}, errors.UUID_WRONG_TYPE.format(where=WHERE, got="dict")),
        (True, errors.UUID_WRONG_TYPE.format(where=WHERE, got="bool")),
        ("", errors.UUID_EMPTY.format(where=WHERE)),
        (
            "x" * (MAX_UUID_CHARS + 1),
            errors.UUID_TOO_LONG.format(where=WHERE, length=MAX_UUID_CHARS + 1, limit=256),
        ),
    ],
    ids=["int", "list", "dict", "bool", "empty", "too_long"],
)
def test_bad_uuids_are_refused_before_decoding(uuid: object, expect: str) -> None:
    assert rejected(user(part(rows(1, 1.0), uuid=uuid))) == expect
    assert rejected(user(part(uuid=uuid))) == expect
    assert len(references.process_store()) == 0


def test_null_uuid_without_data_is_missing_data() -> None:
    assert rejected(user(part(uuid=None))) == errors.DATA_MISSING.format(where=WHERE)


def test_a_failed_request_keeps_nothing() -> None:
    message = rejected(user(part(rows(1, 1.0), uuid="u1"), {"type": "prompt_embeds", "data": "@"}))
    assert "not valid base64" in message
    assert references.process_store().get("u1") is None


# -- the client helper -------------------------------------------------------------------------


def test_client_markers_are_the_servers() -> None:
    from vllm_chat_embeds import client

    assert client.REFERENCE_UNKNOWN_CODE == errors.REFERENCE_UNKNOWN_CODE
    assert client.REFERENCES_OFF_CODE == errors.REFERENCES_OFF_CODE
    assert client.REFERENCE_UNKNOWN_CODE in errors.REFERENCE_UNKNOWN
    assert client.REFERENCE_UNKNOWN_CODE in errors.REFERENCES_OFF
    assert client.REFERENCES_OFF_CODE in errors.REFERENCES_OFF


class FakeServer:
    """Resolves parts like the server (``extract_parts``), raising what the server answers."""

    def __init__(self) -> None:
        self.bodies: list[list[Any]] = []

    def create(self, *, messages: list[Any], **kwargs: Any) -> list[torch.Tensor]:
        self.bodies.append(messages)
        try:
            return tensors(messages)
        except VLLMValidationError as exc:
            raise RuntimeError(f"Error code: 400 - {exc}") from exc


def test_conversation_sends_data_once_then_uuid_and_resends_on_a_miss() -> None:
    from vllm_chat_embeds.client import Conversation

    conversation, server = Conversation(), FakeServer()
    part = conversation.part(rows(2, 3.0).numpy())
    assert set(part) == {"type", "encoding", "dtype", "shape", "data", "uuid"}
    messages: list[Any] = user(part)
    first = conversation.send(server.create, messages=messages)
    messages += [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "more"}]
    second = conversation.send(server.create, messages=messages)
    assert torch.equal(first[0], second[0])
    assert server.bodies[1][0]["content"][1] == {"type": "prompt_embeds", "uuid": part["uuid"]}
    assert "data" in messages[0]["content"][1]  # the caller's messages are not changed
    references.configure(1 << 20)  # the server forgot everything (evicted, restarted)
    third = conversation.send(server.create, messages=messages)
    assert torch.equal(third[0], first[0]) and conversation.resends == 1
    assert "data" in server.bodies[3][0]["content"][1]
    references.configure(0)  # a server that keeps no references: data from then on
    conversation.send(server.create, messages=messages)
    assert not conversation.references and conversation.resends == 2
    conversation.send(server.create, messages=messages)
    assert len(server.bodies) == 7 and "data" in server.bodies[6][0]["content"][1]


def test_conversation_lets_other_errors_through() -> None:
    from vllm_chat_embeds.client import Conversation

    conversation, server = Conversation(), FakeServer()
    bad = {**conversation.part(rows(1, 1.0).numpy()), "data": "@"}
    with pytest.raises(RuntimeError, match="base64 characters"):
        conversation.send(server.create, messages=user(bad))
    assert not conversation.sent and len(server.bodies) == 1


def test_engine_input_carries_digests_of_kept_rows_only() -> None:
    from vllm_chat_embeds.patches.v1_core_kv_cache_utils import SPAN_DIGESTS_KEY
    from vllm_chat_embeds.renderers.splice import build_embeds_input
    from vllm_chat_embeds.stores.references import kept_rows_digest

    kept = references.process_store().put("k", rows(2, 1.0))
    fresh = rows(1, 2.0)
    digest = kept_rows_digest(kept)
    assert digest is not None and kept_rows_digest(fresh) is None
    assert digest == kept_rows_digest(ReferenceStore(1 << 20).put("x", rows(2, 1.0)))
    ph = 99
    ids = [5, ph, ph, 6, ph, 7]
    both = build_embeds_input(ids, [kept, fresh], ph)
    assert both[SPAN_DIGESTS_KEY] == [[2, digest], [1, None]]  # type: ignore[typeddict-item]
    assert SPAN_DIGESTS_KEY not in build_embeds_input([5, ph, 6], [fresh], ph)
    assert SPAN_DIGESTS_KEY not in build_embeds_input(ids, [kept, fresh], ph, compact=False)


def test_api_servers_share_the_bound(monkeypatch):
    """Each of N API servers keeps 1/N of CHAT_EMBEDS_REFERENCE_BYTES: the machine's total."""
    monkeypatch.setenv(ENV_REFERENCE_BYTES, str(1 << 20))
    try:
        references.share_among(2)
        assert references.process_bytes() == 1 << 19
        assert references.process_store().capacity == 1 << 19
        from vllm_chat_embeds.stores import engine_rows

        assert engine_rows.new_sender().capacity == 1 << 19
    finally:
        references.share_among(1)
    assert references.process_store().capacity == 1 << 20
