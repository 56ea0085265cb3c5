"""Build a tiny random model of one family vLLM serves with prompt embeds, with the tokenizer of
the tiny test model (``build_test_model.py``).

Why: whether a part's rows are the embedding table's rows or something the model derives from
them (Gemma multiplies them by sqrt(hidden_size)) depends on the family; parity between the text
path and the embeddings path has to be shown on each. Weights are drawn so every prompt
position moves the greedy output (``redraw_weights``; norms at 1, so a family's own scaling is
what decides). ``--shards N`` saves the weights in N safetensors files with an index, as every
checkpoint from a few billion parameters up is.

    python tools/build_family_model.py --family gemma2 --base .models/tiny-llama-test \\
        --out .models/family-gemma2
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
from pathlib import Path
from typing import Any

from model_build import build_once

BUILDER = "build_family_model"
BUILDER_VERSION = 3
HIDDEN = 64
HEADS = 2
HEAD_DIM = 32  # vLLM's CPU attention supports head sizes >= 32 only
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# Family -> (transformers config class, model class, extra config fields).
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "granite": (
        "GraniteConfig",
        "GraniteForCausalLM",
        {
            "embedding_multiplier": 4.0,
            "residual_multiplier": 0.5,
            "attention_multiplier": 0.2,
            "logits_scaling": 2.0,
        },
    ),  # fmt: skip
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {
            "query_pre_attn_scalar": HEAD_DIM,
            "sliding_window": 4096,
            "attn_logit_softcapping": None,
            "final_logit_softcapping": None,
        },
    ),  # fmt: skip
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {
            "query_pre_attn_scalar": HEAD_DIM,
            "sliding_window": 4096,
            "attn_logit_softcapping": None,
            "final_logit_softcapping": None,
        },
    ),  # fmt: skip
}


def redraw(model: Any, seed: int) -> None:
    """Every weight drawn again: embeddings N(0, 1), matrices N(0, 4/fan_in), norms at their
    identity (1, or 0 for Gemma's ``1 + weight`` norms), biases 0."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    zero_centred = type(model).__name__.startswith("Gemma")
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            if "norm" in name:
                # Gemma's norms scale by 1 + weight. Its tied head reads the residual stream
                # against the very rows that feed it, so a stream left to the last token's own
                # row repeats that token: the sublayers' post-norms (x4) outweigh it.
                post = "post_" in name and "layernorm" in name
                param.fill_((3.0 if post else 0.0) if zero_centred else 1.0)
            elif name.endswith("bias"):
                param.zero_()
            elif name.endswith("embed_tokens.weight") or name == "lm_head.weight":
                # Gemma multiplies its rows by sqrt(hidden_size): drawn smaller, they reach the
                # first layer at the scale other families' rows do.
                std = 1.0 / math.sqrt(param.shape[1]) if zero_centred else 1.0
                param.copy_(torch.randn(param.shape, generator=gen) * std)
            elif param.dim() == 2:
                std = 2.0 / math.sqrt(param.shape[1])
                param.copy_(torch.randn(param.shape, generator=gen) * std)
            else:
                raise RuntimeError(f"unexpected parameter {name} {tuple(param.shape)}")


def build(base: Path, out: Path, family: str, seed: int, shards: int) -> None:
    import torch
    import transformers
    from transformers import AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(base)
    config_name, model_name, extra = FAMILIES[family]
    config = getattr(transformers, config_name)(
        vocab_size=len(tok),
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_key_value_heads=1,
        head_dim=HEAD_DIM,
        max_position_embeddings=2048,
        tie_word_embeddings=family.startswith("gemma"),  # as Gemma checkpoints are
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **extra,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).to(torch.float32).eval()
    redraw(model, seed)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    shard_size = f"{max(1, size // shards // 1000 + 1)}KB" if shards > 1 else "10GB"
    model.save_pretrained(out, max_shard_size=shard_size)
    for name in TOKENIZER_FILES:
        if (base / name).is_file():
            shutil.copy(base / name, out / name)


def check(out: Path, shards: int) -> None:
    files = sorted(p.name for p in out.glob("*.safetensors"))
    if shards > 1 and (len(files) < 2 or not (out / "model.safetensors.index.json").is_file()):
        raise RuntimeError(f"expected a sharded checkpoint, got {files}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), required=True)
    parser.add_argument("--base", type=Path, required=True, help="the tiny test model (tokenizer)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--shards", type=int, default=1)
    args = parser.parse_args(argv)
    params = {"version": BUILDER_VERSION, "family": args.family, "seed": args.seed,
              "shards": args.shards, "base": args.base.name}  # fmt: skip
    expected = ["config.json", "tokenizer.json"]
    build_once(
        args.out,
        builder=BUILDER,
        params=params,
        expected_files=expected,
        make=lambda tmp: build(args.base.resolve(), tmp, args.family, args.seed, args.shards),
        check=lambda tmp: check(tmp, args.shards),
        log=lambda line: print(f"[family-model] {line}", flush=True),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
