"""Build a tiny, random, deterministic Idefics3 (SmolVLM's architecture) for image tests.

Why: images beside prompt_embeds parts need a vision-language checkpoint that vLLM serves on
CPU in seconds, offline and without torchvision. Idefics3 qualifies with the PIL image
processor. The text side is the test model's recipe (``build_test_model.py``): the same
byte-level BPE tokenizer, plus Idefics3's image tokens as special tokens, a 2-layer Llama with
``vocab_size == len(tokenizer)`` (so the ``<prompt_embeds>`` placeholder lies outside the
model's vocabulary) and weights re-drawn at a large scale so every prompt position, the image's
included, moves the greedy output. The vision tower (2 layers, hidden 64, patch 8, image 32)
and the connector are re-drawn at a large scale too.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from build_test_model import IM_END, IM_START, build_hf_tokenizer, redraw_weights
from model_build import CHECKPOINT_FILES, build_once

BUILDER = "build_vlm_test_model"
BUILDER_VERSION = 1  # bump when the output format changes, so old builds are redone

IMAGE_SIZE = 32
PATCH_SIZE = 8
SCALE_FACTOR = 2
# Positions one image takes in the text: (32 / 8)^2 patches, pixel-shuffled by 2 x 2.
IMAGE_SEQ_LEN = (IMAGE_SIZE // PATCH_SIZE) ** 2 // SCALE_FACTOR**2

FAKE_IMAGE, IMAGE, END_OF_UTTERANCE, GLOBAL_IMAGE = (
    "<fake_token_around_image>",
    "<image>",
    "<end_of_utterance>",
    "<global-img>",
)
# Idefics3's processor looks up tile tokens for a 6 x 6 grid, even without image splitting.
TILE_TOKENS = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
IMAGE_TOKENS = [FAKE_IMAGE, IMAGE, END_OF_UTTERANCE, GLOBAL_IMAGE, *TILE_TOKENS]

EXPECTED_FILES = (*CHECKPOINT_FILES, "processor_config.json")

# ChatML-like, in list ("openai") content form: vLLM keeps image parts as {"type": "image"}
# and the template writes Idefics3's image token where each one sits.
CHAT_TEMPLATE = (
    "{%- for message in messages %}\n"
    "{{- '" + IM_START + "' + message['role'] + '\\n' }}\n"
    "{%- if message['content'] is string %}\n"
    "{{- message['content'] }}\n"
    "{%- else %}\n"
    "{%- for part in message['content'] %}\n"
    "{%- if part['type'] == 'text' %}\n"
    "{{- part['text'] }}\n"
    "{%- elif part['type'] == 'image' %}\n"
    "{{- '" + IMAGE + "' }}\n"
    "{%- endif %}\n"
    "{%- endfor %}\n"
    "{%- endif %}\n"
    "{{- '" + IM_END + "\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "{{- '" + IM_START + "assistant\\n' }}\n"
    "{%- endif %}\n"
)


def build_tokenizer(vocab: int) -> Any:
    """The test model's tokenizer with Idefics3's image tokens added as special tokens."""
    hf_tok = build_hf_tokenizer(vocab, "openai")
    hf_tok.add_special_tokens(
        {"extra_special_tokens": IMAGE_TOKENS}, replace_extra_special_tokens=False
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    return hf_tok


def redraw_vision(model: Any, seed: int) -> None:
    """Re-draw the vision tower and the connector, so the image visibly moves the output."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    parts = {
        "vision": model.model.vision_model.named_parameters(),
        "connector": model.model.connector.named_parameters(),
    }
    with torch.no_grad():
        for prefix, named in parts.items():
            for name, param in sorted(named, key=lambda item: item[0]):
                full = f"{prefix}.{name}"
                if name.endswith("bias"):
                    param.zero_()
                elif "norm" in name:
                    param.fill_(1.0)
                elif name.endswith("position_embedding.weight"):
                    param.copy_(torch.randn(param.shape, generator=gen))
                elif param.dim() >= 2:
                    fan_in = param[0].numel()
                    param.copy_(torch.randn(param.shape, generator=gen) * 2 / math.sqrt(fan_in))
                else:
                    raise RuntimeError(f"unexpected parameter {full} {tuple(param.shape)}")


def build_model(hf_tok: Any, args: argparse.Namespace) -> Any:
    """Idefics3 = a vision tower + connector + a Llama whose vocab equals the tokenizer's."""
    import torch
    from torch import nn
    from transformers import (
        GenerationConfig,
        Idefics3Config,
        Idefics3ForConditionalGeneration,
    )

    heads = 4
    text_config = {
        "model_type": "llama",
        "vocab_size": len(hf_tok),
        "hidden_size": args.hidden,
        "intermediate_size": 2 * args.hidden,
        "num_hidden_layers": args.layers,
        "num_attention_heads": heads,
        "num_key_value_heads": 2,
        "head_dim": args.hidden // heads,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "bos_token_id": hf_tok.bos_token_id,
        "eos_token_id": hf_tok.eos_token_id,
        "pad_token_id": hf_tok.pad_token_id,
    }
    vision_config = {
        "hidden_size": args.vision_hidden,
        "intermediate_size": 2 * args.vision_hidden,
        "num_hidden_layers": args.layers,
        "num_attention_heads": 2,
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH_SIZE,
    }
    config = Idefics3Config(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=hf_tok.convert_tokens_to_ids(IMAGE),
        scale_factor=SCALE_FACTOR,
        pad_token_id=hf_tok.pad_token_id,
        tie_word_embeddings=False,
        dtype="float32",
    )
    torch.manual_seed(args.seed)  # every weight is re-drawn below; this only fixes stray init
    model = Idefics3ForConditionalGeneration(config).to(torch.float32).eval()
    # The text side is the test model's recipe: its names match what redraw_weights expects.
    redraw_weights(
        nn.ModuleDict({"text": model.model.text_model, "lm_head": model.lm_head}), args.seed
    )
    redraw_vision(model, args.seed + 1)
    model.generation_config = GenerationConfig(
        bos_token_id=hf_tok.bos_token_id,
        eos_token_id=hf_tok.eos_token_id,
        pad_token_id=hf_tok.pad_token_id,
    )
    return model


def build_processor(hf_tok: Any) -> Any:
    """Idefics3's processor on the PIL image processor (no torchvision needed)."""
    from transformers import Idefics3ImageProcessorPil, Idefics3Processor

    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=False,
        size={"longest_edge": IMAGE_SIZE},
        max_image_size={"longest_edge": IMAGE_SIZE},
    )
    return Idefics3Processor(
        image_processor=image_processor,
        tokenizer=hf_tok,
        image_seq_len=IMAGE_SEQ_LEN,
        chat_template=CHAT_TEMPLATE,
    )


def check_build(out: Path) -> None:
    """Cheap sanity checks on the saved files (no forward pass)."""
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    config = AutoConfig.from_pretrained(out)
    if len(tok) != config.text_config.vocab_size:
        raise RuntimeError(
            f"len(tokenizer)={len(tok)} != vocab_size={config.text_config.vocab_size}"
        )
    for special in IMAGE_TOKENS:
        if len(tok.encode(special, add_special_tokens=False)) != 1:
            raise RuntimeError(f"{special} is not a single token")
    if any("<prompt_embeds>" in piece for piece in tok.get_vocab()):
        raise RuntimeError("<prompt_embeds> must not be in the tokenizer")
    processor = AutoProcessor.from_pretrained(out)
    if type(processor.image_processor).__name__ != "Idefics3ImageProcessorPil":
        raise RuntimeError(f"unexpected image processor {type(processor.image_processor)}")
    if processor.image_seq_len != IMAGE_SEQ_LEN:
        raise RuntimeError(f"image_seq_len {processor.image_seq_len} != {IMAGE_SEQ_LEN}")
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]},
    ]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if IMAGE not in rendered:
        raise RuntimeError("the chat template does not render image parts")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Build a tiny random Idefics3 + byte-level BPE tokenizer for tests (offline)."
    )
    parser.add_argument("--out", type=Path, required=True, help="output model directory")
    parser.add_argument("--seed", type=int, default=0, help="seed for the weights (default 0)")
    parser.add_argument("--hidden", type=int, default=128, help="text hidden size (default 128)")
    parser.add_argument(
        "--vision-hidden", type=int, default=64, help="vision hidden size (default 64)"
    )
    parser.add_argument("--layers", type=int, default=2, help="layers per tower (default 2)")
    parser.add_argument(
        "--vocab", type=int, default=2000, help="target BPE vocabulary size incl. specials"
    )
    args = parser.parse_args(argv)
    if args.hidden % 128:
        parser.error("--hidden must be a multiple of 128 (4 heads of >= 32, CPU attention)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out: Path = args.out.resolve()
    params = {
        "builder_version": BUILDER_VERSION,
        "seed": args.seed,
        "hidden": args.hidden,
        "vision_hidden": args.vision_hidden,
        "layers": args.layers,
        "vocab": args.vocab,
        "python": ".".join(map(str, sys.version_info[:3])),  # the corpus is this stdlib
    }
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    def make(tmp: Path) -> None:
        print(f"[vlm-model] training BPE tokenizer (vocab {args.vocab}) on stdlib sources")
        hf_tok = build_tokenizer(args.vocab)
        print(f"[vlm-model] tokenizer has {len(hf_tok)} tokens")
        model = build_model(hf_tok, args)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"[vlm-model] model: {n_params:,} float32 parameters, seed {args.seed}")
        build_processor(hf_tok).save_pretrained(tmp)
        # save_jinja_files=False keeps the template inside tokenizer_config.json
        hf_tok.save_pretrained(tmp, save_jinja_files=False)
        model.save_pretrained(tmp)

    build_once(
        out,
        builder=BUILDER,
        params=params,
        expected_files=EXPECTED_FILES,
        make=make,
        check=check_build,
        log=lambda message: print(f"[vlm-model] {message}"),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
