"""Prompt-tune a causal LM on the sentiment task with PEFT, on CPU, and save the checkpoint.

The prompt is the chat exactly as vLLM renders it (the model's own chat template, generation
prompt added, no extra special tokens); the loss covers the answer and the end-of-turn token.
PEFT puts the virtual tokens before everything, where the plugin puts them when served by name.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from task import INSTRUCTION, Review


def encode(tokenizer, review: Review) -> tuple[list[int], list[int]]:
    prompt = tokenizer.apply_chat_template(
        review.messages(), add_generation_prompt=True, tokenize=False
    )
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    end = tokenizer.eos_token or ""
    answer_ids = tokenizer(review.answer + end, add_special_tokens=False)["input_ids"]
    return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids


def train(
    model_dir: Path,
    out: Path,
    data: list[Review],
    *,
    virtual_tokens: int = 16,
    epochs: int = 2,
    batch_size: int = 8,
    lr: float = 3e-2,
    max_steps: int | None = None,
    seed: int = 0,
) -> float:
    """Train and ``save_pretrained`` into ``out``; returns the training time in seconds."""
    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    config = PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=virtual_tokens,
        prompt_tuning_init=PromptTuningInit.TEXT,
        prompt_tuning_init_text=INSTRUCTION,
        tokenizer_name_or_path=str(model_dir),
    )
    model = get_peft_model(model, config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    encoded = [encode(tokenizer, r) for r in data]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    started = time.monotonic()
    step = 0
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(encoded)).tolist()
        for start in range(0, len(order), batch_size):
            batch = [encoded[i] for i in order[start : start + batch_size]]
            width = max(len(ids) for ids, _ in batch)
            ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in batch])
            labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
            mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in batch])
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if step % 5 == 0:
                print(f"epoch {epoch} step {step} loss {loss.item():.4f}", flush=True)
            if max_steps is not None and step >= max_steps:
                break
        if max_steps is not None and step >= max_steps:
            break
    seconds = time.monotonic() - started
    model.save_pretrained(str(out))
    print(f"trained {step} steps in {seconds:.0f} s; saved {out}", flush=True)
    return seconds
