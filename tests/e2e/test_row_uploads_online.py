"""Rows uploaded as bytes (``POST /v1/prompt_embeds``), through the Files API (``/v1/files``)
and sent as standard OpenAI ``file`` parts, against a live server with the ``openai`` SDK.

Every shape must give the greedy answer of the same chat with inline prompt_embeds parts, and
of the text the rows stand for; every hostile payload of the inline table gets the inline
part's message through each shape, and nothing is kept. Runs on the session ``plugin_server``,
plus one server with ``--api-key``, two API server processes and small limits.
"""

from __future__ import annotations

import base64
import itertools
import re
import string
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest
import requests
import torch
from chat_cases import CASES, as_text, render
from conftest import GUARDED_API_KEY as API_KEY
from conftest import GUARDED_PART_BYTES as SMALL_PART_BYTES
from conftest import GUARDED_STORE_BYTES as SMALL_STORE_BYTES
from hostile_cases import PART_CASES, as_bytes
from safetensors.torch import save

from vllm_chat_embeds import client as helpers
from vllm_chat_embeds import errors

pytestmark = pytest.mark.e2e

GREEDY: dict[str, Any] = {"temperature": 0.0, "max_tokens": 8}
RESPONSES_GREEDY: dict[str, Any] = {"temperature": 0.0, "max_output_tokens": 8}
HEAD = {"type": "text", "text": "def hello(world):"}
TAIL = " return world + 1"


def template_regex(template: str) -> re.Pattern[str]:
    out = []
    for literal, field, _, _ in string.Formatter().parse(template):
        out.append(re.escape(literal))
        if field is not None:
            out.append(".*?")
    return re.compile("".join(out), re.DOTALL)


def upload_raw(server, rows: torch.Tensor, **headers: str) -> requests.Response:
    params = {
        "dtype": str(rows.dtype).removeprefix("torch."),
        "shape": ",".join(map(str, rows.shape)),
    }
    body = rows.contiguous().view(torch.uint8).numpy().tobytes()
    headers = {"Content-Type": "application/octet-stream", **headers}
    return requests.post(
        server.base_url + "/v1/prompt_embeds", params=params, data=body, headers=headers, timeout=60
    )


def upload_safetensors(server, rows: torch.Tensor) -> requests.Response:
    return requests.post(
        server.base_url + "/v1/prompt_embeds",
        data=save({"rows": rows.contiguous()}),
        headers={"Content-Type": "application/safetensors"},
        timeout=60,
    )


def data_url(rows: torch.Tensor, media: str = "application/pdf") -> str:
    return f"data:{media};base64," + base64.b64encode(save({"rows": rows.contiguous()})).decode()


def chat(server, messages, **kwargs) -> str:
    out = server.client.chat.completions.create(
        model=server.model, messages=messages, **GREEDY, **kwargs
    )
    return out.choices[0].message.content


class Shapes:
    """Each way of sending the rows of a text, cycling through the upload routes."""

    def __init__(self, server, table) -> None:
        self.server, self.table = server, table
        self.route = itertools.cycle(("raw", "safetensors", "files"))

    def uploaded(self, text: str) -> str:
        rows = self.table.rows(text)
        route = next(self.route)
        if route == "files":
            created = self.server.client.files.create(
                file=("rows.safetensors", save({"rows": rows})), purpose="user_data"
            )
            return created.id
        response = (upload_safetensors if route == "safetensors" else upload_raw)(self.server, rows)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["part"] == {"type": "prompt_embeds", "uuid": answer["id"]}
        assert answer["shape"] == list(rows.shape)
        return answer["id"]

    def by_uuid(self, text: str) -> dict[str, Any]:
        return {"type": "prompt_embeds", "uuid": self.uploaded(text)}

    def by_file_id(self, text: str) -> dict[str, Any]:
        return {"type": "file", "file": {"file_id": self.uploaded(text)}}

    def by_file_data(self, text: str) -> dict[str, Any]:
        rows = self.table.rows(text)
        return {"type": "file", "file": {"file_data": data_url(rows), "filename": "doc.pdf"}}


@pytest.mark.parametrize("name", list(CASES))
def test_every_shape_answers_as_inline_parts_and_as_text(plugin_server, table, name) -> None:
    case = CASES[name]
    shapes = Shapes(plugin_server, table)
    reference = chat(plugin_server, as_text(case))
    assert chat(plugin_server, render(case, table.part)) == reference
    for build in (shapes.by_uuid, shapes.by_file_id, shapes.by_file_data):
        assert chat(plugin_server, render(case, build)) == reference, build.__name__


def test_float16_uploads_answer_as_the_same_rows_inline(plugin_server, table) -> None:
    rows = table.rows(TAIL).to(torch.float16)
    response = upload_raw(plugin_server, rows)
    assert response.status_code == 200, response.text
    assert response.json()["dtype"] == "float16"  # kept in the dtype it travels in, as inline
    inline = helpers.prompt_embeds_part(rows.numpy())
    messages = [{"role": "user", "content": [HEAD, inline]}]
    by_id = [{"role": "user", "content": [HEAD, response.json()["part"]]}]
    assert chat(plugin_server, by_id) == chat(plugin_server, messages)
    # A chunked body (no Content-Length) streams in the same way.
    body = rows.contiguous().view(torch.uint8).numpy().tobytes()
    chunked = requests.post(
        plugin_server.base_url + "/v1/prompt_embeds",
        params={"dtype": "float16", "shape": f"{rows.shape[0]},{rows.shape[1]}"},
        data=(body[i : i + 100] for i in range(0, len(body), 100)),
        headers={"Content-Type": "application/octet-stream"},
        timeout=60,
    )
    assert chunked.status_code == 200, chunked.text
    by_chunked = [{"role": "user", "content": [HEAD, chunked.json()["part"]]}]
    assert chat(plugin_server, by_chunked) == chat(plugin_server, messages)


def test_responses_take_uploads_and_input_file_parts(plugin_server, table) -> None:
    shapes = Shapes(plugin_server, table)
    client = plugin_server.client

    def answer(part: dict[str, Any]) -> str:
        content = [{"type": "input_text", "text": "def hello(world):"}, part]
        out = client.responses.create(
            model=plugin_server.model, input=[{"role": "user", "content": content}],
            **RESPONSES_GREEDY,
        )  # fmt: skip
        return out.output_text

    reference = answer({"type": "input_text", "text": TAIL})
    assert answer(table.part(TAIL)) == reference
    assert answer(shapes.by_uuid(TAIL)) == reference
    file_id = shapes.uploaded(TAIL)
    assert answer({"type": "input_file", "file_id": file_id}) == reference
    rows = table.rows(TAIL)
    assert answer({"type": "input_file", "file_data": data_url(rows), "filename": "x.pdf"}) == (
        reference
    )
    # In a system message too, with the client helper's shape.
    system = helpers.responses_file_part(helpers.file_part(rows.numpy()))
    out = client.responses.create(
        model=plugin_server.model,
        input=[
            {"role": "system", "content": [system]},
            {"role": "user", "content": [{"type": "input_text", "text": "ok"}]},
        ],
        **RESPONSES_GREEDY,
    )
    assert out.output_text


def test_streaming_with_file_parts(plugin_server, table) -> None:
    shapes = Shapes(plugin_server, table)
    reference = chat(plugin_server, [{"role": "user", "content": [HEAD, table.part(TAIL)]}])
    for part in (shapes.by_file_data(TAIL), shapes.by_file_id(TAIL)):
        stream = plugin_server.client.chat.completions.create(
            model=plugin_server.model,
            messages=[{"role": "user", "content": [HEAD, part]}],
            stream=True,
            **GREEDY,
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text == reference


def test_files_api_behaves_as_its_users_expect(plugin_server, table) -> None:
    client = plugin_server.client
    rows = table.rows(TAIL)
    created = client.files.create(file=("mine.safetensors", save({"r": rows})), purpose="user_data")
    assert created.object == "file" and created.filename == "mine.safetensors"
    assert created.purpose == "user_data" and created.bytes == len(save({"r": rows}))
    assert client.files.retrieve(created.id).id == created.id
    assert created.id in [f.id for f in client.files.list()]
    content = client.files.content(created.id).read()
    from safetensors.torch import load

    assert torch.equal(next(iter(load(content).values())), rows)
    messages = [{"role": "user", "content": [HEAD, {"type": "prompt_embeds", "uuid": created.id}]}]
    reference = chat(plugin_server, [{"role": "user", "content": [HEAD, table.part(TAIL)]}])
    assert chat(plugin_server, messages) == reference
    deleted = client.files.delete(created.id)
    assert deleted.deleted and deleted.id == created.id
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        client.files.delete(created.id)
    with pytest.raises(openai.BadRequestError) as info:
        chat(plugin_server, messages)
    assert errors.REFERENCE_UNKNOWN_CODE in str(info.value)
    # Anything but rows: a clear 400.
    for name, body in (("batch.jsonl", b'{"custom_id": "a"}\n'), ("doc.pdf", b"%PDF-1.4 x")):
        with pytest.raises(openai.BadRequestError) as info:
            client.files.create(file=(name, body), purpose="batch")
        assert template_regex(errors.FILE_NOT_ROWS).match(info.value.body["message"])  # type: ignore[index]
    response = requests.post(plugin_server.base_url + "/v1/files", data={"purpose": "x"})
    assert response.status_code == 400 and "'file'" in response.json()["error"]["message"]


def test_the_upload_route_refuses_other_media_types(plugin_server) -> None:
    for media in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {} if media is None else {"Content-Type": media}
        response = requests.post(
            plugin_server.base_url + "/v1/prompt_embeds", data=b"{}", headers=headers, timeout=30
        )
        assert response.status_code == 415, response.text
        assert template_regex(errors.UPLOAD_MEDIA_TYPE).match(response.json()["error"]["message"])


def _held(server) -> list[str]:
    return [f.id for f in server.client.files.list()]


def test_every_hostile_payload_through_each_upload_shape(plugin_server, table) -> None:
    """The inline table as upload bytes: the part's message through the route, the Files API
    and the ``file`` part (naming the part there), the server alive, nothing kept."""
    width = int(table.weight.shape[1])
    rows = table.rows(" 1 + 2")
    before = _held(plugin_server)
    failures = []
    tried = 0
    for case in PART_CASES:
        bytes_case = as_bytes(case, width, rows)
        if bytes_case is None or bytes_case.expect is None:
            continue
        tried += 1
        expect = template_regex(bytes_case.expect)
        response = requests.post(
            plugin_server.base_url + "/v1/prompt_embeds",
            params=bytes_case.params(),
            data=bytes_case.body,
            headers={"Content-Type": bytes_case.media_type()},
            timeout=60,
        )
        message = response.json()["error"]["message"] if response.status_code == 400 else ""
        if not (expect.match(message) and message.startswith("upload")):
            failures.append(f"route {case.name}: {response.status_code} {response.text[:200]}")
        if bytes_case.kind != "safetensors" or bytes_case.dtype is not None:
            continue
        files = {"file": ("rows.safetensors", bytes_case.body)}
        response = requests.post(
            plugin_server.base_url + "/v1/files", files=files, data={"purpose": "x"}, timeout=60
        )
        message = response.json()["error"]["message"] if response.status_code == 400 else ""
        if not (expect.match(message) and message.startswith("file")):
            failures.append(f"files {case.name}: {response.status_code} {response.text[:200]}")
        if not bytes_case.body:
            continue  # an empty file_data is no rows: vLLM's answer to a file part
        messages = [{"role": "user", "content": [HEAD, bytes_case.file_part()]}]
        body = {"model": plugin_server.model, "messages": messages, **GREEDY}
        response = requests.post(
            plugin_server.base_url + "/v1/chat/completions", json=body, timeout=60
        )
        message = response.json()["error"]["message"] if response.status_code == 400 else ""
        if not (expect.match(message) and "messages[0].content[1]" in message):
            failures.append(f"file part {case.name}: {response.status_code} {response.text[:200]}")
    assert tried >= 25 and not failures, "\n".join(failures)
    assert plugin_server.healthy() and _held(plugin_server) == before
    reference = chat(plugin_server, [{"role": "user", "content": [HEAD, table.part(TAIL)]}])
    part = Shapes(plugin_server, table).by_file_data(TAIL)
    assert chat(plugin_server, [{"role": "user", "content": [HEAD, part]}]) == reference


def _answer(response: requests.Response) -> tuple[int, str]:
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text
    return response.status_code, message


def test_a_file_part_without_rows_gets_vllms_own_answer(plugin_server, builtin_server) -> None:
    pdf = "data:application/pdf;base64," + base64.b64encode(b"%PDF-1.4\n%fake").decode()
    parts = [
        {"type": "file", "file": {"file_data": pdf, "filename": "doc.pdf"}},
        {"type": "file", "file": {"file_id": "file-abc123"}},
    ]
    for part in parts:
        for role in ("user", "system"):
            messages = [{"role": role, "content": [{"type": "text", "text": "Read:"}, part]}]
            if role == "system":
                messages.append({"role": "user", "content": "go"})
            answers = []
            for server in (plugin_server, builtin_server):
                body = {"model": server.model, "messages": messages, **GREEDY}
                url = server.base_url + "/v1/chat/completions"
                answers.append(_answer(requests.post(url, json=body, timeout=60)))
            assert answers[0] == answers[1], (role, part, answers)
        content = [{"type": "input_text", "text": "Read:"}, {"type": "input_file", **part["file"]}]
        items = [{"role": "user", "content": content}]
        answers = []
        for server in (plugin_server, builtin_server):
            body = {"model": server.model, "input": items, **RESPONSES_GREEDY}
            url = server.base_url + "/v1/responses"
            answers.append(_answer(requests.post(url, json=body, timeout=60)))
        assert answers[0] == answers[1], (part, answers)


def test_many_clients_upload_and_chat_at_once(plugin_server, table) -> None:
    texts = [" return world + 1", " import sys", " in range(10):", " a loop"]
    references_ = {
        t: chat(plugin_server, [{"role": "user", "content": [HEAD, {"type": "text", "text": t}]}])
        for t in texts
    }
    shared = Shapes(plugin_server, table).uploaded(texts[0])

    def one(i: int) -> tuple[str, str]:
        text = texts[i % len(texts)]
        if i % 3 == 0:
            part: dict[str, Any] = {"type": "prompt_embeds", "uuid": shared}
            text = texts[0]
        elif i % 3 == 1:
            part = helpers.upload_rows(plugin_server.base_url + "/v1", table.rows(text).numpy())
        else:
            part = helpers.file_id_part(
                helpers.upload_file(plugin_server.client, table.rows(text))["file"]["file_id"]
            )
        return text, chat(plugin_server, [{"role": "user", "content": [HEAD, part]}])

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(one, range(12)))
    for text, answer in results:
        assert answer == references_[text]


# -- --api-key, two API server processes, small limits ------------------------------------------


def test_api_key_guards_every_upload_route(guarded_server, table) -> None:
    base = guarded_server.base_url
    rows = table.rows(TAIL)
    auth = {"Authorization": f"Bearer {API_KEY}"}
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        assert upload_raw(guarded_server, rows, **headers).status_code == 401
        for method, path in (("get", "/v1/files"), ("post", "/v1/files"),
                             ("get", "/v1/files/x"), ("delete", "/v1/files/x")):  # fmt: skip
            assert requests.request(method, base + path, headers=headers).status_code == 401
    with pytest.raises(helpers.UploadError) as info:
        helpers.upload_rows(base + "/v1", rows.numpy())
    assert info.value.status == 401
    part = helpers.upload_rows(base + "/v1", rows.numpy(), api_key=API_KEY)
    assert upload_raw(guarded_server, rows, **auth).status_code == 200
    client = openai.OpenAI(base_url=base + "/v1", api_key=API_KEY, max_retries=0)
    file_part = helpers.upload_file(client, rows)
    assert file_part["file"]["file_id"].startswith(helpers.ROWS_ID_PREFIX)
    # Over the part limit, or more than the store keeps: refused, as an inline part would be.
    big = torch.zeros(SMALL_PART_BYTES // (4 * rows.shape[1]) + 1, rows.shape[1])
    response = upload_raw(guarded_server, big, **auth)
    assert response.status_code == 400
    assert template_regex(errors.TOO_MANY_BYTES).match(response.json()["error"]["message"])
    # Two API servers share the store's bound: each keeps half of it.
    over_share = torch.zeros(SMALL_STORE_BYTES // 2 // (4 * rows.shape[1]) + 1, rows.shape[1])
    response = upload_raw(guarded_server, over_share, **auth)
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert template_regex(errors.UPLOAD_OVER_STORE).match(message)
    assert f"({SMALL_STORE_BYTES // 2} bytes per API server process" in message
    assert part["type"] == "prompt_embeds"
    # A Files API form of unknown length (chunked) past the part limit: refused while it
    # arrives (the form is held in memory), not read to its end; the server keeps serving.
    boundary = "b0undary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nx\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"r.safetensors\"\r\n\r\n").encode()  # fmt: skip

    def chunked_form():  # 64 MiB of file data, far past the part limit
        yield head
        for _ in range(1024):
            yield bytes(64 * 1024)

    response = requests.post(
        base + "/v1/files", data=chunked_form(), timeout=120,
        headers={**auth, "Content-Type": f"multipart/form-data; boundary={boundary}"},
    )  # fmt: skip
    assert response.status_code == 400, response.text
    assert template_regex(errors.TOO_MANY_BYTES).match(response.json()["error"]["message"])
    assert upload_raw(guarded_server, rows, **auth).status_code == 200


def test_two_api_servers_each_hold_their_own_uploads(guarded_server, table) -> None:
    """An upload is held by the API server process that took it: a chat reaching the other gets
    ``prompt_embeds_reference_unknown``, and ``Conversation`` resends the rows inline then."""
    base = guarded_server.base_url
    auth = {"Authorization": f"Bearer {API_KEY}"}
    url = base + "/v1/chat/completions"
    part = helpers.upload_rows(base + "/v1", table.rows(TAIL).numpy(), api_key=API_KEY)
    text = [{"role": "user", "content": [HEAD, {"type": "text", "text": TAIL}]}]
    body = {"model": guarded_server.model, **GREEDY}
    reference = requests.post(url, json={**body, "messages": text}, headers=auth).json()
    reference_text = reference["choices"][0]["message"]["content"]
    sessions = [requests.Session() for _ in range(8)]
    statuses = set()
    try:
        for session in sessions:
            messages = [{"role": "user", "content": [HEAD, part]}]
            response = session.post(url, json={**body, "messages": messages}, headers=auth)
            statuses.add(response.status_code)
            if response.status_code == 400:
                assert errors.REFERENCE_UNKNOWN_CODE in response.json()["error"]["message"]
            else:
                assert response.json()["choices"][0]["message"]["content"] == reference_text
    finally:
        for session in sessions:
            session.close()
    assert 200 in statuses
    client = openai.OpenAI(base_url=base + "/v1", api_key=API_KEY, max_retries=0)
    conversation = helpers.Conversation(base_url=base + "/v1", api_key=API_KEY, upload_above=0)
    messages = [{"role": "user", "content": [HEAD, conversation.part(table.rows(TAIL).numpy())]}]
    assert conversation.uploads == 1 and "data" not in messages[0]["content"][1]
    for _ in range(4):
        out = conversation.send(
            client.chat.completions.create, model=guarded_server.model, messages=messages, **GREEDY
        )
        assert out.choices[0].message.content == reference_text
