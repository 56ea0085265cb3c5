"""Build a tiny, random, deterministic Llama with its own byte-level BPE tokenizer.

Why: end-to-end tests need a real checkpoint that vLLM loads in seconds, offline, with a chat
template, and whose greedy output depends on every prompt position (so a wrong embedding or a
shifted token anywhere in the prompt shows up as a different completion).

The tokenizer is trained on a fixed, sorted slice of this interpreter's stdlib sources, so a
build is reproducible for a given Python version and seed. The build is idempotent: a stamp file
records the parameters and a rebuild only happens when they change.
"""

from __future__ import annotations

import argparse
import math
import sys
import sysconfig
from pathlib import Path
from typing import Any

from model_build import CHECKPOINT_FILES, build_once

BUILDER = "build_test_model"
DEFAULT_HEADS = 4
DEFAULT_KV_HEADS = 2
BUILDER_VERSION = 2  # bump when the output format changes, so old builds are redone
CORPUS_BYTES = 2_000_000
MIN_HEAD_DIM = 32  # vLLM's CPU attention backend supports head sizes >= 32 only

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, IM_START, IM_END]
FORBIDDEN = "<prompt_embeds>"  # vLLM registers this itself; it must not pre-exist

EXPECTED_FILES = CHECKPOINT_FILES

# The pieces shared by both content formats. Newlines are emitted only from string literals so
# the output does not depend on Jinja's trim_blocks/lstrip_blocks settings.
_TOOLS_PREAMBLE = """\
{%- if tools %}
{{- '<|im_start|>system\\nAvailable tools: ' }}
{%- for tool in tools %}
{%- set fn = tool['function'] if tool['function'] is defined else tool %}
{{- fn['name'] }}{{- ', ' if not loop.last else '' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- endif %}
"""

_TOOL_CALLS = """\
{%- if message['tool_calls'] is defined and message['tool_calls'] %}
{%- for call in message['tool_calls'] %}
{%- set fn = call['function'] if call['function'] is defined else call %}
{%- set args = fn['arguments'] if fn['arguments'] is defined else {} %}
{{- '\\n<tool_call>\\n{"name": "' + fn['name'] + '", "arguments": ' }}
{{- args if args is string else args | tojson }}
{{- '}\\n</tool_call>' }}
{%- endfor %}
{%- endif %}
"""

_OPENAI_CONTENT = """\
{%- if message['content'] is string %}
{{- message['content'] }}
{%- elif message['content'] is iterable %}
{%- for part in message['content'] %}
{%- if part['type'] == 'text' %}
{{- part['text'] }}
{%- endif %}
{%- endfor %}
{%- endif %}
"""

_STRING_CONTENT = """\
{%- if message['content'] is not none %}
{{- message['content'] }}
{%- endif %}
"""


def chat_template(content_format: str) -> str:
    """Return the ChatML-like template; ``openai`` loops over content parts, as vLLM detects."""
    content = _OPENAI_CONTENT if content_format == "openai" else _STRING_CONTENT
    return (
        _TOOLS_PREAMBLE
        + "{%- for message in messages %}\n"
        + "{{- '<|im_start|>' + message['role'] + '\\n' }}\n"
        + content
        + _TOOL_CALLS
        + "{{- '<|im_end|>\\n' }}\n"
        + "{%- endfor %}\n"
        + "{%- if add_generation_prompt %}\n"
        + "{{- '<|im_start|>assistant\\n' }}\n"
        + "{%- endif %}\n"
    )


def corpus_files(budget: int = CORPUS_BYTES) -> list[Path]:
    """Pick stdlib top-level modules in sorted order until the byte budget is used up."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    picked: list[Path] = []
    total = 0
    for path in sorted(stdlib.glob("*.py")):
        if total >= budget:
            break
        picked.append(path)
        total += path.stat().st_size
    if not picked:
        raise SystemExit(f"no .py files found in stdlib dir {stdlib}")
    return picked


def train_tokenizer(vocab: int) -> Any:
    """Train a byte-level BPE ``tokenizers.Tokenizer`` offline on the stdlib corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in corpus_files()]
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    # Like Llama tokenizers: BOS only when the caller asks for special tokens. The chat template
    # adds none, so a chat's `add_special_tokens` visibly changes the prompt.
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tok


def build_hf_tokenizer(vocab: int, content_format: str) -> Any:
    """Wrap the trained tokenizer for transformers, with special tokens and chat template."""
    from transformers import PreTrainedTokenizerFast

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(vocab),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
    )
    hf_tok.chat_template = chat_template(content_format)
    return hf_tok


def redraw_weights(model: Any, seed: int) -> None:
    """Re-draw every parameter so each prompt position visibly moves the greedy output.

    HF's default init (std 0.02) leaves a tiny model dominated by the last token.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith("embed_tokens.weight") or name == "lm_head.weight":
                param.copy_(torch.randn(param.shape, generator=gen))
            elif param.dim() == 2:
                std = 2.0 / math.sqrt(param.shape[1])
                param.copy_(torch.randn(param.shape, generator=gen) * std)
            else:
                raise RuntimeError(f"unexpected parameter {name} {tuple(param.shape)}")


def build_model(hf_tok: Any, args: argparse.Namespace) -> Any:
    """Create the Llama, sized so ``vocab_size`` equals ``len(tokenizer)`` exactly."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    # Other builders pass their own arguments, without the layer-shape options.
    heads = getattr(args, "heads", DEFAULT_HEADS)
    config = LlamaConfig(
        vocab_size=len(hf_tok),
        hidden_size=args.hidden,
        intermediate_size=getattr(args, "intermediate", 0) or 2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=getattr(args, "kv_heads", DEFAULT_KV_HEADS),
        head_dim=getattr(args, "head_dim", 0) or max(MIN_HEAD_DIM, args.hidden // heads),
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=hf_tok.bos_token_id,
        eos_token_id=hf_tok.eos_token_id,
        pad_token_id=hf_tok.pad_token_id,
        dtype="float32",
    )
    torch.manual_seed(args.seed)  # every weight is re-drawn below; this only fixes stray init
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    redraw_weights(model, args.seed)
    model.generation_config = GenerationConfig(
        bos_token_id=hf_tok.bos_token_id,
        eos_token_id=hf_tok.eos_token_id,
        pad_token_id=hf_tok.pad_token_id,
    )
    return model


def check_build(out: Path, content_format: str) -> None:
    """Cheap sanity checks on the saved files (no forward pass)."""
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    config = AutoConfig.from_pretrained(out)
    if len(tok) != config.vocab_size:
        raise RuntimeError(f"len(tokenizer)={len(tok)} != vocab_size={config.vocab_size}")
    sample = f"{IM_START}user\ndef f(x):\n    return x ** 2  # héllo 🙂{IM_END}\n"
    ids = tok.encode(sample, add_special_tokens=False)
    if tok.decode(ids) != sample:
        raise RuntimeError("tokenizer round-trip failed")
    for special in SPECIAL_TOKENS:
        if len(tok.encode(special, add_special_tokens=False)) != 1:
            raise RuntimeError(f"{special} is not a single token")
    if any(FORBIDDEN in piece for piece in tok.get_vocab()) or FORBIDDEN in tok.chat_template:
        raise RuntimeError(f"{FORBIDDEN} must not be in the tokenizer")
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"function": {"name": "f", "arguments": {"x": 1}}}],
        },
        {"role": "tool", "content": "1"},
    ]
    if content_format == "string":
        messages = messages[1:]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Build a tiny random Llama + byte-level BPE tokenizer for tests (offline)."
    )
    parser.add_argument("--out", type=Path, required=True, help="output model directory")
    parser.add_argument("--seed", type=int, default=0, help="seed for the weights (default 0)")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size (default 64)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    parser.add_argument(
        "--vocab", type=int, default=2000, help="target vocabulary size incl. specials"
    )
    # Layer shape (defaults: 4 heads of hidden/4, 2 KV heads, MLP twice the width). Small values
    # give a wide model with cheap layers, to measure what surrounds the model (benchmarks).
    parser.add_argument("--heads", type=int, default=DEFAULT_HEADS, help="attention heads")
    parser.add_argument("--kv-heads", type=int, default=DEFAULT_KV_HEADS, help="KV heads")
    parser.add_argument("--head-dim", type=int, default=0, help="head size (default hidden/heads)")
    parser.add_argument("--intermediate", type=int, default=0, help="MLP size (default 2*hidden)")
    parser.add_argument(
        "--content-format",
        choices=("openai", "string"),
        default="openai",
        help="chat template style: loop over content parts (openai) or plain string",
    )
    args = parser.parse_args(argv)
    if args.hidden % 4 or args.hidden < 8:
        parser.error("--hidden must be a multiple of 4 and >= 8")
    if args.heads < 1 or args.kv_heads < 1 or args.heads % args.kv_heads:
        parser.error("--heads must be a positive multiple of --kv-heads")
    if args.vocab < 256 + len(SPECIAL_TOKENS):
        parser.error("--vocab must cover the 256 byte symbols plus the special tokens")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out: Path = args.out.resolve()
    params = {
        "builder_version": BUILDER_VERSION,
        "seed": args.seed,
        "hidden": args.hidden,
        "layers": args.layers,
        "vocab": args.vocab,
        "content_format": args.content_format,
        # Only non-default layer shapes enter the key, so existing builds stay valid.
        **{
            key: value
            for key, value, default in (
                ("heads", args.heads, DEFAULT_HEADS),
                ("kv_heads", args.kv_heads, DEFAULT_KV_HEADS),
                ("head_dim", args.head_dim, 0),
                ("intermediate", args.intermediate, 0),
            )
            if value != default
        },
        "python": ".".join(map(str, sys.version_info[:3])),  # the corpus is this stdlib
    }
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    def make(tmp: Path) -> None:
        print(f"[test-model] training BPE tokenizer (vocab {args.vocab}) on stdlib sources")
        hf_tok = build_hf_tokenizer(args.vocab, args.content_format)
        print(f"[test-model] tokenizer has {len(hf_tok)} tokens")
        model = build_model(hf_tok, args)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"[test-model] model: {n_params:,} float32 parameters, seed {args.seed}")
        # save_jinja_files=False keeps the template inside tokenizer_config.json
        hf_tok.save_pretrained(tmp, save_jinja_files=False)
        model.save_pretrained(tmp)

    build_once(
        out,
        builder=BUILDER,
        params=params,
        expected_files=EXPECTED_FILES,
        make=make,
        check=lambda tmp: check_build(tmp, args.content_format),
        log=lambda message: print(f"[test-model] {message}"),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
