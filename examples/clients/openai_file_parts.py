"""Rows through the shapes every OpenAI-compatible client and gateway knows, with ``openai``.

Sends the same rows four ways: as a standard ``file`` part holding a safetensors file
(``file_data``), uploaded through the Files API (``client.files.create``, then ``file_id``),
uploaded as raw bytes (``upload_rows``, then ``{"type": "prompt_embeds", "uuid": ...}``), and
by ``Conversation(shape="file")``. With the model's own embedding rows, each greedy answer
equals the answer to the same text (``--compare``). ``--api responses`` sends them to
``POST /v1/responses`` (``input_file`` parts).

    make serve                                                      # terminal 1
    .venv/bin/python examples/clients/openai_file_parts.py \\
        --model-dir .models/smollm2-135m-instruct --compare

Output lines: ``<shape> answer: '...'`` and ``<shape> prompt_tokens: N``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from openai import OpenAI

from vllm_chat_embeds.client import (
    Conversation,
    embedding_rows,
    file_part,
    responses_file_part,
    upload_file,
    upload_rows,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", help="served model name (default: the server's first)")
    parser.add_argument("--model-dir", type=Path, required=True, help="local HF checkpoint")
    parser.add_argument("--text", default="What is the capital")
    parser.add_argument("--embed-text", default=" of France?")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--compare", action="store_true", help="also send it all as text")
    parser.add_argument("--api", choices=("chat", "responses"), default="chat")
    args = parser.parse_args()

    api_key = os.environ.get("OPENAI_API_KEY", "EMPTY")
    client = OpenAI(base_url=args.base_url, api_key=api_key)
    model = args.model or client.models.list().data[0].id
    rows = embedding_rows(args.model_dir, args.embed_text)

    def ask(part: dict[str, Any], send: Any = None) -> tuple[str, int]:
        if args.api == "responses":
            if part["type"] == "file":
                part = responses_file_part(part)
            elif part["type"] == "text":
                part = {**part, "type": "input_text"}
            content = [{"type": "input_text", "text": args.text}, part]
            create = send or (lambda **kw: client.responses.create(**kw))
            out = create(
                model=model,
                input=[{"role": "user", "content": content}],
                temperature=0.0,
                max_output_tokens=args.max_tokens,
            )
            return out.output_text, out.usage.input_tokens
        content = [{"type": "text", "text": args.text}, part]
        create = send or (lambda **kw: client.chat.completions.create(**kw))
        out = create(
            model=model,
            messages=[{"role": "user", "content": content}],
            temperature=0.0,
            max_tokens=args.max_tokens,
        )
        return out.choices[0].message.content or "", out.usage.prompt_tokens

    conversation = Conversation(shape="file")
    chat_api = client.chat.completions.create
    endpoint = client.responses.create if args.api == "responses" else chat_api
    runs: list[tuple[str, Any, Any]] = [
        # file_data: a data URL of a safetensors file; any media type, the server looks inside.
        ("file_data", file_part(rows, media_type="application/pdf"), None),
        # Files API: the openai SDK's own upload, then the id as a file part.
        ("file_id", upload_file(client, rows), None),
        # The binary route: the rows' bytes as the body, then the id as a part's uuid.
        ("upload", upload_rows(args.base_url, rows, api_key=api_key), None),
        # data once under a fresh id, the id alone afterwards (here: the first request).
        ("conversation", conversation.part(rows), lambda **kw: conversation.send(endpoint, **kw)),
    ]
    if args.compare:
        runs.append(("text", {"type": "text", "text": args.embed_text}, None))
    for label, part, send in runs:
        answer, prompt_tokens = ask(part, send)
        print(f"{label} answer: {answer!r}")
        print(f"{label} prompt_tokens: {prompt_tokens}")


if __name__ == "__main__":
    main()
