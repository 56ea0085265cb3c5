"""Use prompt_embeds content parts with ``LLM.chat()``: as a tensor, raw, and torch.save.

The part holds the model's own input-embedding rows for a piece of text (looked up in the
checkpoint with its tokenizer), so with greedy decoding every request gives one answer: the
part as a 2-D ``torch.Tensor`` (offline only), as ``raw`` bytes (the pickle-free wire form),
as base64 of ``torch.save``, and the same words sent as a plain text part.

Run it on the demo model (built by ``make demo-model``)::

    .venv/bin/python examples/offline_chat.py --model-dir .models/smollm2-135m-instruct

The engine flags below suit a small CPU machine; adjust them for your hardware. Output lines:
``tensor answer: '...'``, ``raw answer: '...'``, ``torch answer: '...'``, ``text answer: '...'``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from vllm import LLM, SamplingParams

from vllm_chat_embeds.client import embedding_rows, prompt_embeds_part


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True, help="local HF checkpoint")
    parser.add_argument("--text", default="What is the capital")
    parser.add_argument("--embed-text", default=" of France?")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()

    rows = embedding_rows(args.model_dir, args.embed_text)
    print(f"prompt_embeds part: {rows.shape[0]} rows x {rows.shape[1]} ({args.embed_text!r})")
    llm = LLM(
        model=str(args.model_dir),
        enable_prompt_embeds=True,
        dtype="float32",
        enforce_eager=True,
        max_model_len=2048,
        kv_cache_memory_bytes=128 * 1024 * 1024,  # 2048 tokens of the demo model fit
    )
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    text_part = {"type": "text", "text": args.text}
    variants: list[tuple[str, dict[str, Any]]] = [
        ("tensor", {"type": "prompt_embeds", "data": torch.as_tensor(rows)}),  # offline only
        ("raw", prompt_embeds_part(rows)),  # the wire forms work offline too
        ("torch", prompt_embeds_part(rows, encoding="torch")),
        ("text", {"type": "text", "text": args.embed_text}),
    ]
    for label, part in variants:
        messages: Any = [{"role": "user", "content": [text_part, part]}]
        output = llm.chat(messages, params, use_tqdm=False)[0]
        print(f"{label} answer: {output.outputs[0].text!r}")
        print(f"{label} prompt_tokens: {len(output.prompt_token_ids or [])}")


if __name__ == "__main__":
    main()
