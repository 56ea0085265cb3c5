"""Build a tiny, random, deterministic Llama served with ``--tokenizer-mode mistral``.

Why: the Mistral renderer turns a chat into token ids with ``mistral_common`` (no text
template), so its prompt_embeds support needs a model whose tokenizer is a Tekken file. This
writes a byte-only ``tekken.json`` (every Mistral special token, the 256 single bytes, no
merges: tokenising A then B equals tokenising A+B, which makes text-vs-embeddings parity exact)
beside a Hugging Face layout Llama with ``vocab_size`` equal to the Tekken vocabulary.
Deterministic from a seed, offline, a few seconds; idempotent through ``model_build``.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path
from typing import Any

from build_test_model import MIN_HEAD_DIM, redraw_weights
from model_build import build_once

BUILDER = "build_mistral_test_model"
BUILDER_VERSION = 1  # bump when the output format changes, so old builds are redone

NUM_BYTES = 256
NUM_SPECIAL = 64
VOCAB_SIZE = NUM_BYTES + NUM_SPECIAL
TEKKEN_VERSION = "v13"
# The pre-tokenizer pattern of Mistral's published Tekken files.
PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|"
    r"\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
EXPECTED_FILES = ("tekken.json", "config.json", "generation_config.json", "model.safetensors")


def tekken_json() -> dict[str, Any]:
    """The Tekken file: every ``SpecialTokens`` value in enum order, then the 256 bytes."""
    from mistral_common.tokens.tokenizers.base import SpecialTokens

    specials = [
        {"rank": rank, "token_str": token.value, "is_control": True}
        for rank, token in enumerate(SpecialTokens)
    ]
    if len(specials) > NUM_SPECIAL:
        raise RuntimeError(f"mistral_common has {len(specials)} special tokens > {NUM_SPECIAL}")
    vocab = [
        {
            "rank": b,
            "token_bytes": base64.b64encode(bytes([b])).decode("ascii"),
            "token_str": bytes([b]).decode("latin-1"),
        }
        for b in range(NUM_BYTES)
    ]
    config = {
        "pattern": PATTERN,
        "num_vocab_tokens": NUM_BYTES,
        "default_vocab_size": VOCAB_SIZE,
        "default_num_special_tokens": NUM_SPECIAL,
        "version": TEKKEN_VERSION,
    }
    return {"config": config, "vocab": vocab, "special_tokens": specials}


def build_model(args: argparse.Namespace, bos: int, eos: int, pad: int) -> Any:
    """A Llama whose vocabulary is exactly the Tekken vocabulary, with re-drawn weights."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    heads = 4
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=2,
        head_dim=max(MIN_HEAD_DIM, args.hidden // heads),
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        dtype="float32",
    )
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    redraw_weights(model, args.seed)
    model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    return model


def check_build(out: Path) -> None:
    """The Tekken file loads, round-trips text byte for byte and renders a chat."""
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    tok = MistralTokenizer.from_file(str(out / "tekken.json"))
    inner = tok.instruct_tokenizer.tokenizer
    if inner.n_words != VOCAB_SIZE:
        raise RuntimeError(f"tekken vocabulary is {inner.n_words}, expected {VOCAB_SIZE}")
    sample = "def f(x):\n    return x ** 2  # héllo 🙂"
    ids = inner.encode(sample, bos=False, eos=False)
    if len(ids) != len(sample.encode("utf-8")) or inner.decode(ids) != sample:
        raise RuntimeError("tekken round-trip is not byte for byte")
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
    ]
    request = ChatCompletionRequest.from_openai(messages)  # type: ignore[arg-type]
    if not tok.encode_chat_completion(request).tokens:
        raise RuntimeError("chat rendering produced no tokens")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Build a tiny random Llama + byte-only tekken.json for mistral mode tests."
    )
    parser.add_argument("--out", type=Path, required=True, help="output model directory")
    parser.add_argument("--seed", type=int, default=0, help="seed for the weights (default 0)")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size (default 64)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    args = parser.parse_args(argv)
    if args.hidden % 4 or args.hidden < 8:
        parser.error("--hidden must be a multiple of 4 and >= 8")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params = {
        "builder_version": BUILDER_VERSION,
        "seed": args.seed,
        "hidden": args.hidden,
        "layers": args.layers,
        "tekken_version": TEKKEN_VERSION,
    }

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    def make(tmp: Path) -> None:
        from mistral_common.tokens.tokenizers.base import SpecialTokens

        tekken = tekken_json()
        rank = {s["token_str"]: s["rank"] for s in tekken["special_tokens"]}
        (tmp / "tekken.json").write_text(json.dumps(tekken, indent=1) + "\n")
        bos, eos, pad = (
            rank[t.value] for t in (SpecialTokens.bos, SpecialTokens.eos, SpecialTokens.pad)
        )
        model = build_model(args, bos, eos, pad)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"[mistral-test-model] model: {n_params:,} float32 parameters, seed {args.seed}")
        model.save_pretrained(tmp)

    build_once(
        args.out,
        builder=BUILDER,
        params=params,
        expected_files=EXPECTED_FILES,
        make=make,
        check=check_build,
        log=lambda message: print(f"[mistral-test-model] {message}"),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
