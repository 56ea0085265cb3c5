"""The shared row store (``stores/shared_store.py``) against a real ``redis-server``: the value
layout, every check of a value read back, the tiers together (``resolve``), faults and recovery,
and the parts path (``extract_parts``) with two processes' local stores sharing one Redis."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import time
from collections.abc import Iterator
from http import HTTPStatus

import pytest
import torch
from payload_spec import WIDTH, make_spec
from redis_server import RedisServer
from vllm.exceptions import GracefulHTTPError, VLLMValidationError

from vllm_chat_embeds import errors
from vllm_chat_embeds.limits import ENV_SHARED_STORE, ENV_SHARED_STORE_TIMEOUT, Limits
from vllm_chat_embeds.renderers.parts import extract_parts
from vllm_chat_embeds.row_digest import digest_name, rows_digest
from vllm_chat_embeds.stores import references, shared_store, uploads
from vllm_chat_embeds.stores.references import ReferenceStore
from vllm_chat_embeds.stores.shared_store import FORMAT, SharedStore

pytestmark = pytest.mark.unit

SPEC = make_spec()
WHERE = "messages[0].content[0]"


@pytest.fixture
def redis_server(redis_store: RedisServer) -> RedisServer:
    """conftest's Redis, under this file's name for it."""
    return redis_store


@pytest.fixture
def store(redis_server: RedisServer) -> Iterator[SharedStore]:
    if redis_server.proc is None or redis_server.proc.poll() is not None:
        redis_server.start()
    redis_server.client().flushdb()
    shared = SharedStore(redis_server.url, timeout_s=1.0, ttl_s=600)
    shared.bind(("tiny",), WIDTH, "")
    shared_store.reset(shared)
    try:
        yield shared
    finally:
        shared_store.reset(None)


def rows(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, WIDTH, generator=torch.Generator().manual_seed(seed))


def b64(tensor: torch.Tensor) -> str:
    buf = io.BytesIO()
    torch.save(tensor, buf)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def found_rows(store: SharedStore, ident: str) -> torch.Tensor:
    found = store.read({ident: True})[ident]
    assert found is not None
    return shared_store.rows_of(found, SPEC, WHERE)[0]


# -- layout -------------------------------------------------------------------------------------


def test_round_trip_keeps_bytes_dtype_and_digest(store, redis_server):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = rows(5, 1).to(dtype)
        store.write("u", x, rows_digest(x))
        got = found_rows(store, "u")
        assert got.dtype == dtype and torch.equal(got, x)
    raw = redis_server.client().hgetall(store.key("u"))
    assert set(raw) == {b"meta", b"rows"}  # no base64, no pickle: the bytes as kept
    assert raw[b"rows"] == x.view(torch.uint8).numpy().tobytes()
    meta = json.loads(raw[b"meta"])
    assert (meta["digest"], meta["digest_name"]) == (rows_digest(x), "blake3")


def test_meta_alone_for_a_process_that_holds_the_rows(store):
    x = rows(3, 2)
    store.write("u", x, rows_digest(x))
    found = store.read({"u": False, "missing": True})
    assert found["u"] is not None and found["u"].rows is None
    assert found["u"].meta["shape"] == [3, WIDTH]
    assert found["missing"] is None


def test_ttl_is_set_and_refreshed_on_use(store, redis_server):
    x = rows(2, 3)
    store.write("u", x, rows_digest(x))
    client = redis_server.client()
    assert 590 <= client.ttl(store.key("u")) <= 600
    client.expire(store.key("u"), 5)
    store.read({"u": False})
    assert client.ttl(store.key("u")) > 500


def test_keys_are_namespaced_by_model_width_and_realm(store):
    keys = set()
    for names, width, realm in [
        (("tiny",), WIDTH, ""),
        (("other",), WIDTH, ""),
        (("tiny",), WIDTH + 1, ""),
        (("tiny",), WIDTH, shared_store._realm_of("secret")),
        (("tiny",), WIDTH, shared_store._realm_of(["secret", "second"])),
    ]:
        store.bind(names, width, realm)
        keys.add(store.key("u"))
    assert len(keys) == 5
    assert all("secret" not in k for k in keys)


def test_files_listing_drops_what_the_store_lost(store, redis_server):
    for i in range(3):
        x = rows(2, 10 + i)
        fields = shared_store.FileFields(f"f{i}.safetensors", "prompt_embeds", 99, 1000 + i)
        store.write(f"file-pe-{i}", x, rows_digest(x), fields)
    redis_server.client().delete(store.key("file-pe-1"))  # evicted by the store's own policy
    listed = store.files()
    assert [i for i, _ in listed] == ["file-pe-0", "file-pe-2"]
    assert listed[1][1].filename == "f2.safetensors" and listed[1][1].created_at == 1002
    assert redis_server.client().zcard(store.files_key) == 2
    assert store.delete("file-pe-0") and not store.delete("file-pe-0")
    assert [i for i, _ in store.files()] == ["file-pe-2"]


# -- nothing read back is trusted -------------------------------------------------------------


def _forge(store: SharedStore, redis_server: RedisServer, meta: object, data: bytes) -> None:
    body = meta if isinstance(meta, bytes) else json.dumps(meta).encode()
    redis_server.client().hset(store.key("u"), mapping={"meta": body, "rows": data})


def _meta(x: torch.Tensor, **changes: object) -> dict:
    meta = {"format": FORMAT, "dtype": "float32", "shape": list(x.shape),
            "digest": rows_digest(x), "digest_name": digest_name()}  # fmt: skip
    meta.update(changes)
    return meta


def _bad_values() -> list[tuple[str, object, bytes]]:
    x = rows(4, 5)
    data = x.numpy().tobytes()
    nan = x.clone()
    nan[1, 2] = float("nan")
    flipped = bytearray(data)
    flipped[7] ^= 0x40
    return [
        ("not json", b"{not json", data),
        ("a json list", [1, 2], data),
        ("no format", {k: v for k, v in _meta(x).items() if k != "format"}, data),
        ("future format", _meta(x, format=FORMAT + 1), data),
        (
            "format 1 (a SHA-256 under sha256)",
            {**_meta(x, format=1, digest=None), "sha256": hashlib.sha256(data).hexdigest()},
            data,
        ),
        (
            "another digest",
            _meta(x, digest_name="sha256" if digest_name() != "sha256" else "md5"),
            data,
        ),
        ("int dtype", _meta(x, dtype="int64"), data),
        ("unknown dtype", _meta(x, dtype="float8"), data),
        ("1-d shape", _meta(x, shape=[32]), data),
        ("wrong width", _meta(x, shape=[2, WIDTH * 2]), data),
        ("negative rows", _meta(x, shape=[-4, WIDTH]), data),
        ("bool rows", _meta(x, shape=[True, WIDTH]), data),
        ("short data", _meta(x), data[:-4]),
        ("long data", _meta(x), data + b"\0\0\0\0"),
        ("no digest", _meta(x, digest=None), data),
        ("flipped bit", _meta(x), bytes(flipped)),
        ("NaN, digest matching", _meta(nan), nan.numpy().tobytes()),
        ("huge meta", {"format": 1, "pad": "x" * 20000}, data),
    ]


@pytest.mark.parametrize("case", _bad_values(), ids=lambda c: c[0])
def test_a_bad_value_is_refused_and_never_served(store, redis_server, case, caplog):
    _, meta, data = case
    _forge(store, redis_server, meta, data)
    local = ReferenceStore(1 << 20)
    with pytest.raises(VLLMValidationError) as info:
        shared_store.resolve({"u": WHERE}, SPEC, local)
    message = str(info.value)
    assert message.startswith(WHERE) and errors.REFERENCE_UNKNOWN_CODE in message
    assert "'u'" in message and "failed their check" in message
    assert local.get("u") is None  # nothing kept


def test_too_many_rows_read_back_answers_the_part_limit(store):
    x = rows(SPEC.max_rows + 1, 6)
    store.write("u", x, rows_digest(x))
    with pytest.raises(VLLMValidationError, match="rows"):
        shared_store.resolve({"u": WHERE}, SPEC, ReferenceStore(1 << 20))


# -- the tiers together ---------------------------------------------------------------------------


def test_read_once_then_held_and_confirmed(store, redis_server):
    x = rows(4, 7)
    store.write("u", x, rows_digest(x))
    local = ReferenceStore(1 << 20)
    first = shared_store.resolve({"u": WHERE}, SPEC, local)["u"]
    assert first is not None and torch.equal(first, x)
    assert references.kept_rows_digest(first) == rows_digest(x)
    again = shared_store.resolve({"u": WHERE}, SPEC, local)["u"]
    assert again is first  # held here: only meta was read


def test_a_uuid_sent_again_elsewhere_with_other_rows_replaces_the_local_copy(store):
    old, new = rows(4, 8), rows(4, 9)
    local = ReferenceStore(1 << 20)
    local.put("u", old)
    store.write("u", new, rows_digest(new))  # another replica took new rows for the uuid
    got = shared_store.resolve({"u": WHERE}, SPEC, local)["u"]
    assert got is not None and torch.equal(got, new)


def test_deleted_for_the_deployment_is_gone_here_too(store):
    x = rows(4, 10)
    local = ReferenceStore(1 << 20)
    local.put("u", x)
    store.write("u", x, rows_digest(x))
    assert store.delete("u")
    assert shared_store.resolve({"u": WHERE}, SPEC, local)["u"] is None
    assert local.get("u") is None


def test_store_down_held_rows_serve_misses_get_503_fast_then_recovery(store, redis_server):
    x, y = rows(4, 11), rows(4, 12)
    local = ReferenceStore(1 << 20)
    local.put("held", x)
    store.write("held", x, rows_digest(x))
    store.write("other", y, rows_digest(y))
    redis_server.stop()
    try:
        started = time.monotonic()
        assert torch.equal(shared_store.resolve({"held": WHERE}, SPEC, local)["held"], x)
        with pytest.raises(GracefulHTTPError) as info:
            shared_store.resolve({"held": WHERE, "other": WHERE}, SPEC, local)
        assert time.monotonic() - started < 4 * store.timeout_s + 1
        assert info.value.http_status == HTTPStatus.SERVICE_UNAVAILABLE
        message = str(info.value)
        assert "'other'" in message and store.where in message and "retry in" in message
        assert store.retry_after() >= 1
        with pytest.raises(shared_store.StoreUnavailable):  # in its window: no network wait
            store.ping()
    finally:
        redis_server.start()
    # The data is lost with the restart; another replica (not in a back-off window) sends it.
    writer = SharedStore(redis_server.url, timeout_s=1.0, ttl_s=600)
    writer.bind(("tiny",), WIDTH, "")
    writer.write("other", y, rows_digest(y))
    deadline = time.monotonic() + shared_store.RETRY_AFTER_S + 2
    while True:
        try:
            got = shared_store.resolve({"other": WHERE}, SPEC, local)["other"]
            break
        except GracefulHTTPError:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    assert got is not None and torch.equal(got, y)


def test_keep_through_writes_once_and_again_only_when_lost(store, redis_server):
    x = rows(4, 13)
    local = ReferenceStore(1 << 20)
    kept = local.put("u", x)
    shared_store.keep_through("u", kept, None)
    client = redis_server.client()
    assert client.exists(store.key("u"))
    client.hset(store.key("u"), "rows", b"marker")  # a rewrite would replace it
    shared_store.keep_through("u", kept, references.kept_rows_digest(kept))
    assert client.hget(store.key("u"), "rows") == b"marker"
    client.delete(store.key("u"))
    shared_store.keep_through("u", kept, references.kept_rows_digest(kept))
    assert client.hget(store.key("u"), "rows") == x.numpy().tobytes()


def test_settings_are_checked(monkeypatch):
    monkeypatch.setenv(ENV_SHARED_STORE, "http://example:6379")
    with pytest.raises(ValueError, match=ENV_SHARED_STORE):
        Limits.from_env()
    monkeypatch.setenv(ENV_SHARED_STORE, "redis://127.0.0.1:1/0")
    monkeypatch.setenv(ENV_SHARED_STORE_TIMEOUT, "0")
    with pytest.raises(ValueError, match=ENV_SHARED_STORE_TIMEOUT):
        Limits.from_env()
    monkeypatch.setenv(ENV_SHARED_STORE_TIMEOUT, "0.5")
    assert Limits.from_env().shared_store_timeout_s == 0.5


# -- two processes' parts through one store ------------------------------------------------------


def _chat(part: dict) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": "a"}, part]}]


def test_parts_by_uuid_across_two_local_stores(store, monkeypatch):
    a, b = ReferenceStore(1 << 20), ReferenceStore(1 << 20)
    x = rows(3, 14)
    limits = Limits()
    monkeypatch.setattr(references, "_store", a)
    extract_parts(_chat({"type": "prompt_embeds", "uuid": "k", "data": b64(x)}), enabled=True,
                  spec=SPEC, limits=limits)  # fmt: skip
    monkeypatch.setattr(references, "_store", b)  # the other replica
    _, plan = extract_parts(_chat({"type": "prompt_embeds", "uuid": "k"}), enabled=True,
                            spec=SPEC, limits=limits)  # fmt: skip
    assert plan is not None and torch.equal(plan.parts[0].tensor, x)
    assert b.get("k") is not None and torch.equal(b.get("k"), x)


def test_uploads_are_written_before_their_id_is_handed_out(store, monkeypatch, redis_server):
    monkeypatch.setattr(references, "_store", ReferenceStore(1 << 20))
    x = rows(3, 15)
    upload, _ = uploads.keep(x, SPEC, "upload", filename="x.safetensors", purpose="p", size=9)
    assert redis_server.client().exists(store.key(upload.id))
    monkeypatch.setattr(references, "_store", ReferenceStore(1 << 20))  # another replica
    described = uploads.describe(upload.id)
    assert described is not None and described.filename == "x.safetensors"
    found = uploads.find(upload.id, SPEC)
    assert found is not None and torch.equal(found[1], x)
    assert [u.id for u in uploads.listing()] == [upload.id]
    assert uploads.delete(upload.id)
    assert uploads.describe(upload.id) is None and not redis_server.client().exists(
        store.key(upload.id)
    )
    redis_server.stop()
    try:
        with pytest.raises(GracefulHTTPError):
            uploads.keep(x, SPEC, "upload", filename="x", purpose="p", size=9)
        assert len(references.process_store()) == 0  # nothing kept locally either
    finally:
        redis_server.start()
