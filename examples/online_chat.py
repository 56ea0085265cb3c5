"""Send a prompt_embeds content part to ``vllm serve`` with the official ``openai`` client.

The part holds the model's own input-embedding rows for a piece of text (looked up in the
checkpoint with its tokenizer), so with greedy decoding the answer equals the answer to the
same request sent as plain text. ``--compare`` sends that text request too. ``--api responses``
sends it to ``POST /v1/responses`` instead of ``/v1/chat/completions`` (the part sits beside
``input_text`` parts of an ``input`` message).

Run it against the demo server (SmolLM2-135M-Instruct, served as ``smollm2``)::

    make serve                                   # terminal 1: http://127.0.0.1:8000
    .venv/bin/python examples/online_chat.py --model-dir .models/smollm2-135m-instruct --compare

Any ``vllm serve MODEL --enable-prompt-embeds`` with vllm-chat-embeds installed works;
``--model-dir`` must be a local copy of the served checkpoint (one model.safetensors file plus
its tokenizer). Output lines: ``embeds answer: '...'`` and ``embeds prompt_tokens: N``, and with
``--compare`` the same two for ``text``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from openai import OpenAI

from vllm_chat_embeds.client import embedding_rows, prompt_embeds_part


def ask(
    client: OpenAI, api: str, model: str, content: list[dict[str, Any]], max_tokens: int
) -> tuple[str, int]:
    """The greedy answer and the prompt's token count, through the chosen endpoint."""
    messages: Any = [{"role": "user", "content": content}]
    if api == "responses":
        # /v1/responses names text parts "input_text"; prompt_embeds parts are the same.
        for part in content:
            if part["type"] == "text":
                part["type"] = "input_text"
        response = client.responses.create(
            model=model, input=messages, temperature=0.0, max_output_tokens=max_tokens
        )
        assert response.usage is not None
        return response.output_text, response.usage.input_tokens
    chat = client.chat.completions.create(
        model=model, messages=messages, temperature=0.0, max_tokens=max_tokens
    )
    assert chat.usage is not None
    return chat.choices[0].message.content or "", chat.usage.prompt_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", help="served model name (default: the server's first)")
    parser.add_argument("--model-dir", type=Path, required=True, help="local HF checkpoint")
    parser.add_argument("--text", default="What is the capital")
    parser.add_argument("--embed-text", default=" of France?")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--compare", action="store_true", help="also send it all as text")
    parser.add_argument("--encoding", choices=("raw", "safetensors", "torch"), default="raw")
    parser.add_argument("--api", choices=("chat", "responses"), default="chat")
    args = parser.parse_args()

    client = OpenAI(base_url=args.base_url, api_key=os.environ.get("OPENAI_API_KEY", "EMPTY"))
    model = args.model or client.models.list().data[0].id
    rows = embedding_rows(args.model_dir, args.embed_text)
    print(f"prompt_embeds part: {rows.shape[0]} rows x {rows.shape[1]} ({args.embed_text!r})")
    text_part = {"type": "text", "text": args.text}
    # "raw": base64 of little-endian float rows with dtype and shape; no pickle, NumPy only.
    embeds_part = prompt_embeds_part(rows, encoding=args.encoding)
    runs = [("embeds", [text_part, embeds_part])]
    if args.compare:
        runs.append(("text", [text_part, {"type": "text", "text": args.embed_text}]))
    for label, content in runs:
        answer, prompt_tokens = ask(client, args.api, model, content, args.max_tokens)
        print(f"{label} answer: {answer!r}")
        print(f"{label} prompt_tokens: {prompt_tokens}")


if __name__ == "__main__":
    main()
