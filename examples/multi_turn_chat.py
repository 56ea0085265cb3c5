"""A multi-turn chat whose prompt_embeds part is uploaded once, then referred to by uuid.

Chat clients resend the whole history on every turn. ``vllm_chat_embeds.client.Conversation``
gives the part a random ``uuid``, sends its data in turn 1 and the uuid alone in every later
turn (the server keeps the rows), and resends a request once with data if the server answers
that it does not hold the uuid (evicted, restarted, or another API server process).

The part holds the model's own input-embedding rows for a piece of text, so with greedy
decoding every turn's answer equals that of the same conversation sent as plain text;
``--compare`` runs that conversation too. Run it against the demo server::

    make serve                                   # terminal 1: http://127.0.0.1:8000
    .venv/bin/python examples/multi_turn_chat.py --model-dir .models/smollm2-135m-instruct --compare

Output lines: ``embeds_turnN answer: '...'``, ``embeds_turnN prompt_tokens: N`` (and ``text_...``
with ``--compare``), and how many bytes of messages each turn sent.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from openai import OpenAI

from vllm_chat_embeds.client import Conversation, embedding_rows

FOLLOW_UPS = ["Say more.", "Shorter, please.", "And then?", "Thanks. One last word?"]


def run(
    client: OpenAI, model: str, first: list[dict[str, Any]], args: argparse.Namespace, label: str
) -> None:
    """The whole conversation: ``first`` as turn 1's content, then the follow-ups."""
    chat = Conversation()
    messages: list[dict[str, Any]] = [{"role": "user", "content": first}]
    for turn in range(1, args.turns + 1):
        sent = len(json.dumps(chat.outgoing(messages)))
        reply = chat.send(
            client.chat.completions.create,
            model=model,
            messages=messages,
            temperature=0.0,
            max_tokens=args.max_tokens,
        )
        answer = reply.choices[0].message.content or ""
        assert reply.usage is not None
        print(f"{label}_turn{turn} answer: {answer!r}")
        print(f"{label}_turn{turn} prompt_tokens: {reply.usage.prompt_tokens}")
        print(f"  ({label}, turn {turn}: {sent} bytes of messages sent)")
        messages.append({"role": "assistant", "content": answer})
        messages.append({"role": "user", "content": FOLLOW_UPS[(turn - 1) % len(FOLLOW_UPS)]})
    if chat.resends:
        print(f"  ({label}: {chat.resends} request(s) resent with data after a miss)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", help="served model name (default: the server's first)")
    parser.add_argument("--model-dir", type=Path, required=True, help="local HF checkpoint")
    parser.add_argument("--text", default="What is the capital")
    parser.add_argument("--embed-text", default=" of France?")
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--compare", action="store_true", help="also run it all as text")
    args = parser.parse_args()

    client = OpenAI(base_url=args.base_url, api_key=os.environ.get("OPENAI_API_KEY", "EMPTY"))
    model = args.model or client.models.list().data[0].id
    rows = embedding_rows(args.model_dir, args.embed_text)
    text_part = {"type": "text", "text": args.text}
    # A part with a fresh random uuid: only clients that know it can refer to its rows.
    run(client, model, [text_part, Conversation().part(rows)], args, "embeds")
    if args.compare:
        run(client, model, [text_part, {"type": "text", "text": args.embed_text}], args, "text")


if __name__ == "__main__":
    main()
