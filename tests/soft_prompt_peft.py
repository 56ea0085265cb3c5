"""PEFT itself, as the reference for soft prompts: build prompt-tuning checkpoints with
``peft`` and generate with ``PeftModel.generate``, for the tiny test model."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import torch

EOS_ID = 1  # the tiny test model's <|eos|>


def build_prompt_tuning(base: Path, out: Path, *, virtual_tokens: int, seed: int) -> Path:
    """A random PEFT prompt-tuning checkpoint (``save_pretrained``) for ``base``."""
    from peft import PromptTuningConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    if (out / "adapter_model.safetensors").is_file():
        config = json.loads((out / "adapter_config.json").read_text())
        if config.get("num_virtual_tokens") == virtual_tokens:
            return out
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=virtual_tokens)
    get_peft_model(model, config).save_pretrained(str(out))
    return out


def build_prefix_tuning(base: Path, out: Path) -> Path:
    """A PEFT prefix-tuning checkpoint: acts on the KV cache, so it must be refused."""
    from peft import PrefixTuningConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    config = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4)
    get_peft_model(model, config).save_pretrained(str(out))
    return out


def prompt_rows(checkpoint: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(checkpoint / "adapter_model.safetensors"))["prompt_embeddings"]


@cache
def _peft_model(base: str, checkpoint: str):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, checkpoint).eval()


def peft_greedy(base: Path, checkpoint: Path, ids: list[int], max_new_tokens: int) -> list[int]:
    """``PeftModel.generate``'s greedy tokens after ``ids`` (stopping at EOS, EOS dropped)."""
    model = _peft_model(str(base), str(checkpoint))
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=EOS_ID,
            pad_token_id=EOS_ID,
        )[0].tolist()
    if out[: len(ids)] == ids:  # some versions return the prompt too
        out = out[len(ids) :]
    return without_eos(out)


def without_eos(ids: list[int]) -> list[int]:
    return ids[: ids.index(EOS_ID)] if EOS_ID in ids else list(ids)
