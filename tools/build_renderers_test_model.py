"""Build the tiny random Llama of ``build_test_model`` with the structural tokens of vLLM's
other chat renderers (DeepSeek V3.2/V4/V4.1, Cohere, Inkling) added as special tokens.

Why: ``--tokenizer-mode deepseek_v32`` (and the others) picks a renderer for any architecture;
each writes its own turn tokens into the prompt. Registered as special tokens they render to
one id each, as with the real tokenizers, so a test sees the prompts those modes really build.
Same corpus, seed and weights recipe as the ChatML test model (whose template stays, for
``kimi_k3``, which renders through the tokenizer's chat template); ``vocab_size`` equals
``len(tokenizer)``. Deterministic, offline, a few seconds; idempotent through ``model_build``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from build_test_model import EXPECTED_FILES, FORBIDDEN, build_hf_tokenizer, build_model
from model_build import build_once

BUILDER = "build_renderers_test_model"
BUILDER_VERSION = 1  # bump when the output format changes, so old builds are redone

DEEPSEEK_TOKENS = [
    "<｜begin▁of▁sentence｜>",
    "<｜end▁of▁sentence｜>",
    "<｜System｜>",
    "<｜User｜>",
    "<｜Assistant｜>",
    "<｜latest_reminder｜>",
    "<think>",
    "</think>",
]
COHERE_TOKENS = [
    "<BOS_TOKEN>",
    "<|START_OF_TURN_TOKEN|>",
    "<|END_OF_TURN_TOKEN|>",
    "<|SYSTEM_TOKEN|>",
    "<|USER_TOKEN|>",
    "<|CHATBOT_TOKEN|>",
    "<|START_TEXT|>",
    "<|END_TEXT|>",
    "<|START_RESPONSE|>",
    "<|END_RESPONSE|>",
    "<|START_THINKING|>",
    "<|END_THINKING|>",
]
INKLING_TOKENS = [
    f"<|{name}|>"
    for name in (
        "message_user",
        "message_model",
        "message_system",
        "message_tool",
        "content_text",
        "content_image",
        "content_model_end_sampling",
        "content_thinking",
        "content_audio_input",
        "content_xml",
        "content_invoke_tool_json",
        "end_message",
        "audio_end",
    )
]
RENDERER_TOKENS = DEEPSEEK_TOKENS + COHERE_TOKENS + INKLING_TOKENS


def build_tokenizer(vocab: int):  # noqa: ANN201 - a transformers tokenizer
    hf_tok = build_hf_tokenizer(vocab, "openai")
    hf_tok.add_special_tokens({"additional_special_tokens": RENDERER_TOKENS})
    return hf_tok


def check_build(out: Path) -> None:
    """Every renderer token is one id; the placeholder vLLM registers is absent."""
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    if len(tok) != AutoConfig.from_pretrained(out).vocab_size:
        raise RuntimeError("len(tokenizer) != vocab_size")
    for token in RENDERER_TOKENS:
        if len(tok.encode(token, add_special_tokens=False)) != 1:
            raise RuntimeError(f"{token} is not a single token")
    if FORBIDDEN in tok.get_vocab():
        raise RuntimeError(f"{FORBIDDEN} must not be in the tokenizer")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output model directory")
    parser.add_argument("--seed", type=int, default=0, help="seed for the weights (default 0)")
    parser.add_argument("--vocab", type=int, default=2000, help="BPE vocabulary before specials")
    args = parser.parse_args(argv)
    model_args = argparse.Namespace(seed=args.seed, hidden=64, layers=2)
    params = {
        "builder_version": BUILDER_VERSION,
        "seed": args.seed,
        "vocab": args.vocab,
        "tokens": RENDERER_TOKENS,
        "python": ".".join(map(str, sys.version_info[:3])),  # the corpus is this stdlib
    }
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    def make(tmp: Path) -> None:
        hf_tok = build_tokenizer(args.vocab)
        model = build_model(hf_tok, model_args)
        hf_tok.save_pretrained(tmp, save_jinja_files=False)
        model.save_pretrained(tmp)

    build_once(
        args.out,
        builder=BUILDER,
        params=params,
        expected_files=EXPECTED_FILES,
        make=make,
        check=check_build,
        log=lambda message: print(f"[renderers-model] {message}"),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
