"""Write a random PEFT LoRA adapter for a locally built Llama checkpoint, without ``peft``.

Why: LoRA serving (``--enable-lora --lora-modules NAME=PATH``) must be tested with parts, and no
adapter can be fetched here. A PEFT adapter is two files: ``adapter_config.json`` and
``adapter_model.safetensors`` holding ``lora_A``/``lora_B`` per targeted projection. Both
matrices are drawn non-zero (PEFT starts ``lora_B`` at zero, which would change nothing), scaled
so that the adapter moves the greedy output of the tiny test model.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from model_build import STAMP_NAME, build_once

BUILDER = "build_lora_adapter"
BUILDER_VERSION = 1
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


def _projection_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """(in, out) features of each attention projection of a Llama layer."""
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads", heads))
    head_dim = int(config.get("head_dim") or hidden // heads)
    return {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv_heads * head_dim),
        "v_proj": (hidden, kv_heads * head_dim),
        "o_proj": (heads * head_dim, hidden),
    }


def make_adapter(
    base: Path, out: Path, *, seed: int, rank: int, targets: list[str], embed: bool
) -> None:
    import torch
    from safetensors.torch import save_file

    config = json.loads((base / "config.json").read_text())
    shapes = _projection_shapes(config)
    unknown = sorted(set(targets) - set(shapes))
    if unknown:
        raise SystemExit(f"unknown target modules {unknown}; choose from {sorted(shapes)}")
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape: int, fan_in: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) / math.sqrt(fan_in)

    tensors: dict[str, torch.Tensor] = {}
    prefix = "base_model.model.model"
    for layer in range(int(config["num_hidden_layers"])):
        for name in targets:
            fan_in, fan_out = shapes[name]
            key = f"{prefix}.layers.{layer}.self_attn.{name}"
            tensors[f"{key}.lora_A.weight"] = draw(rank, fan_in, fan_in=fan_in)
            tensors[f"{key}.lora_B.weight"] = draw(fan_out, rank, fan_in=rank)
    modules = list(targets)
    if embed:
        vocab, hidden = int(config["vocab_size"]), int(config["hidden_size"])
        tensors[f"{prefix}.embed_tokens.lora_embedding_A"] = draw(rank, vocab, fan_in=1)
        tensors[f"{prefix}.embed_tokens.lora_embedding_B"] = draw(hidden, rank, fan_in=rank)
        modules.append("embed_tokens")
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / WEIGHTS))
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base),
        "r": rank,
        "lora_alpha": rank,  # scaling 1: the drawn matrices set the size of the change
        "lora_dropout": 0.0,
        "target_modules": modules,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "inference_mode": True,
    }
    (out / CONFIG).write_text(json.dumps(adapter_config, indent=2) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True, help="the base model directory")
    parser.add_argument("--out", type=Path, required=True, help="output adapter directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default="q_proj,v_proj", help="comma-separated projections")
    parser.add_argument(
        "--embed", action="store_true", help="also adapt the input embedding (embed_tokens)"
    )
    return parser.parse_args(argv)


def _base_stamp(base: Path) -> str:
    """The base build's stamp, so a rebuilt base model rebuilds its adapters too."""
    stamp = base / STAMP_NAME
    return stamp.read_text() if stamp.is_file() else ""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    params = {
        "version": BUILDER_VERSION,
        "base": str(args.base.resolve()),
        "base_stamp": _base_stamp(args.base),
        "seed": args.seed,
        "rank": args.rank,
        "targets": targets,
        "embed": args.embed,
    }
    build_once(
        args.out,
        builder=BUILDER,
        params=params,
        expected_files=(CONFIG, WEIGHTS),
        make=lambda tmp: make_adapter(
            args.base, tmp, seed=args.seed, rank=args.rank, targets=targets, embed=args.embed
        ),
        check=lambda tmp: None,
        log=lambda line: print(f"{BUILDER}: {line}", file=sys.stderr),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
