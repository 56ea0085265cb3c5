"""Rows through LangChain's ``ChatOpenAI`` on both of its paths, as standard ``file`` parts.

A ``prompt_embeds`` part is silently dropped on LangChain's Responses path (which switches on
by itself with ``include``, ``reasoning``, ``text``, ``truncation`` or built-in tools); a
``file`` part survives both paths (docs/clients.md). Needs ``pip install langchain-openai``
(not part of this project's dev environment).

    make serve                                                      # terminal 1
    python examples/clients/langchain_file_parts.py --model-dir .models/smollm2-135m-instruct

Prints ``<path> answer: '...'`` and ``<path> prompt_tokens: N`` for chat completions, the
Responses path and the same chat as text. The text is sent in the same layout as the rows: two
text parts, ``--text`` then ``--embed-text``. The server joins parts with a newline, so two
text parts count one token more than one string would (demo model: 38 against 37). With the
same layout the token counts are equal when every row arrived (demo model: 38, 38, 38).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from langchain_openai import ChatOpenAI

from vllm_chat_embeds.client import embedding_rows, file_part


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--model-dir", type=Path, required=True, help="local HF checkpoint")
    parser.add_argument("--text", default="What is the capital")
    parser.add_argument("--embed-text", default=" of France?")
    args = parser.parse_args()

    rows = embedding_rows(args.model_dir, args.embed_text)
    part = file_part(rows)  # LangChain rewrites its media type to application/pdf: harmless
    api_key = os.environ.get("OPENAI_API_KEY", "EMPTY")
    first = {"type": "text", "text": args.text}
    for label, responses, content in (
        ("chat", False, [first, part]),
        ("responses", True, [first, part]),
        # Like for like: the embedded text as a second text part, where the rows were.
        ("text", False, [first, {"type": "text", "text": args.embed_text}]),
    ):
        llm = ChatOpenAI(
            model=args.model,
            base_url=args.base_url,
            api_key=api_key,
            temperature=0,
            max_tokens=12,
            use_responses_api=responses,
        )
        reply = llm.invoke([{"role": "user", "content": content}])
        print(f"{label} answer: {reply.text!r}")
        print(f"{label} prompt_tokens: {(reply.usage_metadata or {}).get('input_tokens')}")


if __name__ == "__main__":
    main()
