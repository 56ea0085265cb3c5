"""A two-step proxy for prefill/decode disaggregation: prefill on one server, decode on another.

Start two servers of the same model with the plugin, NIXL installed (``pip install nixl``) and
``--enable-prompt-embeds``:

    # prefill (kv_producer) and decode (kv_consumer); on CPU, kv_buffer_device "cpu"
    VLLM_NIXL_SIDE_CHANNEL_HOST=127.0.0.1 VLLM_NIXL_SIDE_CHANNEL_PORT=5600 \\
        vllm serve MODEL --port 8100 --enable-prompt-embeds --kv-transfer-config \\
        '{"kv_connector":"NixlConnector","kv_role":"kv_producer","kv_buffer_device":"cpu"}'
    VLLM_NIXL_SIDE_CHANNEL_HOST=127.0.0.1 VLLM_NIXL_SIDE_CHANNEL_PORT=5601 \\
        vllm serve MODEL --port 8200 --enable-prompt-embeds --kv-transfer-config \\
        '{"kv_connector":"NixlConnector","kv_role":"kv_consumer","kv_buffer_device":"cpu"}'
    python examples/disaggregated_proxy.py --prefill http://127.0.0.1:8100 \\
        --decode http://127.0.0.1:8200 --port 8000

Then send chats (with prompt_embeds parts anywhere) to http://127.0.0.1:8000/v1 as to any
vLLM server. Each request goes twice, whole: to the prefill server with
``kv_transfer_params: {"do_remote_decode": true}`` and one token to generate (its KV stays
there), then to the decode server with the ``kv_transfer_params`` the prefill answer returned
(the decode server pulls that KV over NIXL and computes only what is left). Both servers render
the same chat, so both need every part: its rows inline, or the same uuid or upload id held by
both. With ``--shared-store`` (both servers started with the same
``CHAT_EMBEDS_SHARED_STORE=redis://...``), the decode request carries parts by reference alone:
the prefill server has written every part sent with a uuid to the store before it answered, and
the decode server reads it from there, so rows cross the network once. The prefill server's
error is passed on as it came; streaming is passed through from the decode server.

Only the standard library and ``httpx`` (a dependency of ``openai`` and of vLLM) are used.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

ROUTES = ("/v1/chat/completions", "/v1/completions")
TIMEOUT_S = 600.0
# An idle connection is dropped before the servers drop it (vLLM's VLLM_HTTP_TIMEOUT_KEEP_ALIVE,
# 5 s, httpx's default too): else a request sent as the server closes gets no answer.
KEEPALIVE_S = 2.0


def prefill_body(body: dict[str, Any]) -> dict[str, Any]:
    """The request as the prefill server gets it: one token, no stream, KV kept for decode."""
    prefill = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    prefill["max_tokens"] = 1
    if "max_completion_tokens" in prefill:  # chat's newer name wins there
        prefill["max_completion_tokens"] = 1
    prefill["kv_transfer_params"] = {"do_remote_decode": True, "do_remote_prefill": False}
    return prefill


# What a part sent with its data also carries, dropped with the data (--shared-store).
PART_DATA_KEYS = ("data", "encoding", "dtype", "shape")


def by_reference(part: Any) -> Any:
    """A part that names its rows (a prompt_embeds ``uuid``, a file part's ``file_id``) without
    its data; any other content as it is."""
    if not isinstance(part, dict):
        return part
    if part.get("type") == "prompt_embeds" and part.get("uuid") and part.get("data"):
        return {k: v for k, v in part.items() if k not in PART_DATA_KEYS}
    file = part.get("file")
    if part.get("type") == "file" and isinstance(file, dict) and file.get("file_id"):
        return {**part, "file": {k: v for k, v in file.items() if k != "file_data"}}
    return part


def decode_body(
    body: dict[str, Any], kv_transfer_params: dict[str, Any], *, shared_store: bool = False
) -> dict[str, Any]:
    """The request as the decode server gets it: the same request, plus where its KV is (with
    a shared row store: parts by reference alone)."""
    decode = {**body, "kv_transfer_params": kv_transfer_params}
    messages = body.get("messages")
    if shared_store and isinstance(messages, list):
        decode["messages"] = [
            {**m, "content": [by_reference(p) for p in m["content"]]}
            if isinstance(m, dict) and isinstance(m.get("content"), list)
            else m
            for m in messages
        ]
    return decode


class Proxy:
    def __init__(self, prefill: str, decode: str, *, shared_store: bool = False) -> None:
        self.prefill = prefill.rstrip("/")
        self.decode = decode.rstrip("/")
        self.shared_store = shared_store
        self.client = httpx.Client(
            timeout=TIMEOUT_S, limits=httpx.Limits(keepalive_expiry=KEEPALIVE_S)
        )

    def forward(
        self, route: str, body: dict[str, Any], headers: dict[str, str]
    ) -> tuple[int, dict[str, str], Iterator[bytes]]:
        """Prefill, then decode: the decode server's answer (or the prefill server's error)."""
        first = self.client.post(self.prefill + route, json=prefill_body(body), headers=headers)
        if first.status_code != 200:
            return first.status_code, dict(first.headers), iter([first.content])
        params = first.json().get("kv_transfer_params")
        if not isinstance(params, dict):
            error = {"error": {"message": "the prefill server returned no kv_transfer_params "
                                          "(is it started with a kv_producer NixlConnector?)",
                               "type": "BadGateway", "code": 502}}  # fmt: skip
            return 502, {"content-type": "application/json"}, iter([json.dumps(error).encode()])
        request = self.client.build_request(
            "POST",
            self.decode + route,
            json=decode_body(body, params, shared_store=self.shared_store),
            headers=headers,
        )
        second = self.client.send(request, stream=True)

        def chunks() -> Iterator[bytes]:
            try:
                yield from second.iter_raw()
            finally:
                second.close()

        return second.status_code, dict(second.headers), chunks()


def handler_for(proxy: Proxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            if self.path not in ROUTES:
                self.send_error(404, f"only {', '.join(ROUTES)}")
                return
            length = int(self.headers.get("content-length", 0))
            try:
                body = json.loads(self.rfile.read(length))
            except ValueError:
                self.send_error(400, "the body is not JSON")
                return
            auth = {"authorization": self.headers["authorization"]}
            headers = auth if self.headers.get("authorization") else {}
            status, answer_headers, chunks = proxy.forward(self.path, body, headers)
            self.send_response(status)
            kind = answer_headers.get("content-type", "application/json")
            self.send_header("content-type", kind)
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            for chunk in chunks:
                if chunk:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            sys.stderr.write("proxy: " + format % args + "\n")

    return Handler


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefill", required=True, help="the kv_producer server's base URL")
    parser.add_argument("--decode", required=True, help="the kv_consumer server's base URL")
    parser.add_argument(
        "--shared-store",
        action="store_true",
        help="both servers share CHAT_EMBEDS_SHARED_STORE: send the decode server parts by "
        "reference alone",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    server = ThreadingHTTPServer(
        (args.host, args.port),
        handler_for(Proxy(args.prefill, args.decode, shared_store=args.shared_store)),
    )
    print(f"proxy: http://{args.host}:{args.port} -> {args.prefill} then {args.decode}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
