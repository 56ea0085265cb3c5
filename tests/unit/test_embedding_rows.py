"""``client.embedding_rows``: its family tables against the installed vLLM's model sources, and
what it reads (single and sharded checkpoints, tied tables, bfloat16, unknown families)."""

from __future__ import annotations

import ast
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import vllm
from conftest import build_family, tiny_model  # noqa: F401 - the fixture
from safetensors import safe_open
from transformers import AutoTokenizer

from vllm_chat_embeds import client
from vllm_chat_embeds.client import (
    CONFIG_SCALE_FAMILIES,
    SQRT_HIDDEN_FAMILIES,
    TABLE_ROW_FAMILIES,
    UnknownFamilyError,
    embedding_rows,
)

pytestmark = pytest.mark.unit

MODELS_DIR = Path(vllm.__file__).parent / "model_executor" / "models"
# vLLM modules whose embed_input_ids scales the table but which serve no chat with parts:
# pooling models and speculative-decoding drafts; and those the helper refuses by architecture
# (client.REFUSED_ARCHITECTURES) rather than guess.
NOT_CHAT_MODELS = {"embedding_gemma2", "gemma4_dspark", "gemma4_mtp", "minicpm_eagle",
                   "qwen3_dflash2", "hrm_text", "granite4_vision"}  # fmt: skip
MODULE_OF = {"deepseek_v3": "deepseek_v2"}  # model_type -> vLLM module, where they differ
TEXT = " return world + 1"


def scaled_modules() -> set[str]:
    """vLLM model modules with an ``embed_input_ids`` that multiplies the table's rows."""
    found = set()
    for path in MODELS_DIR.glob("*.py"):
        source = path.read_text()
        if "def embed_input_ids" not in source:
            continue
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef) and node.name == "embed_input_ids":
                returns = [n for n in ast.walk(node) if isinstance(n, ast.Return)]
                if any(isinstance(r.value, ast.BinOp) and isinstance(r.value.op, ast.Mult)
                       for r in returns):  # fmt: skip
                    found.add(path.stem)
    return found


def module(family: str) -> str:
    return MODULE_OF.get(family, family.removesuffix("_text"))


def test_tables_agree_with_vllms_model_classes():
    scaled = scaled_modules()
    assert {"gemma", "gemma2", "gemma3", "gemma3n", "minicpm"} <= scaled  # the scan works
    for family in SQRT_HIDDEN_FAMILIES | set(CONFIG_SCALE_FAMILIES):
        assert module(family) in scaled, family
    for family in TABLE_ROW_FAMILIES:
        assert (MODELS_DIR / f"{module(family)}.py").is_file(), family
        assert module(family) not in scaled, family
    covered = {module(f) for f in SQRT_HIDDEN_FAMILIES | set(CONFIG_SCALE_FAMILIES)}
    unknown = scaled - covered - NOT_CHAT_MODELS
    assert not unknown, f"vLLM scales rows in {unknown}: teach embedding_rows these families"


def table_rows(model: Path, text: str) -> torch.Tensor:
    ids = AutoTokenizer.from_pretrained(model).encode(text, add_special_tokens=False)
    tables = {}
    for file in model.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            tables.update({k: f.get_tensor(k) for k in f.keys() if "embed_tokens" in k})
    return next(iter(tables.values()))[ids]


def test_gemma_rows_are_scaled_by_sqrt_hidden(tiny_model):  # noqa: F811
    model = build_family("gemma2", tiny_model)
    rows = torch.from_numpy(embedding_rows(model, TEXT))
    hidden = json.loads((model / "config.json").read_text())["hidden_size"]
    assert torch.equal(rows, table_rows(model, TEXT) * torch.tensor(math.sqrt(hidden)))


def test_sharded_checkpoint_and_table_rows(tiny_model):  # noqa: F811
    model = build_family("llama", tiny_model, shards=3)
    assert (model / "model.safetensors.index.json").is_file()
    rows = embedding_rows(model, TEXT)
    assert isinstance(rows, np.ndarray)
    assert torch.equal(torch.from_numpy(rows), table_rows(model, TEXT))


def test_served_dtype_and_bfloat16(tiny_model):  # noqa: F811
    model = build_family("gemma2", tiny_model)
    half = embedding_rows(model, TEXT, dtype="float16")
    assert half.dtype == np.float16
    bf16 = embedding_rows(model, TEXT, dtype="bfloat16")
    assert isinstance(bf16, torch.Tensor) and bf16.dtype == torch.bfloat16
    expected = table_rows(model, TEXT).to(torch.bfloat16) * torch.tensor(8.0, dtype=torch.bfloat16)
    assert torch.equal(bf16, expected)
    with pytest.raises(ValueError, match="dtype"):
        embedding_rows(model, TEXT, dtype="int8")


def test_unknown_family_and_missing_model(tiny_model, tmp_path):  # noqa: F811
    odd = tmp_path / "odd"
    shutil.copytree(tiny_model, odd)
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "model_type": "hrm_text"}))
    with pytest.raises(UnknownFamilyError, match="rows_for_text"):
        embedding_rows(odd, TEXT)
    (odd / "config.json").write_text(
        json.dumps({**config, "architectures": ["Granite4VisionForConditionalGeneration"]})
    )
    with pytest.raises(UnknownFamilyError, match="Granite4Vision"):
        embedding_rows(odd, TEXT)
    with pytest.raises(FileNotFoundError):
        embedding_rows(tmp_path / "nowhere", TEXT)
    with pytest.raises(FileNotFoundError):
        embedding_rows("no-such-org/no-such-model", TEXT)


def test_multimodal_config_reads_its_text_model(tmp_path):
    config = {"model_type": "paligemma", "text_config": {"model_type": "gemma2"}}
    assert client._text_config(config)["model_type"] == "gemma2"
    assert client._table_name(["vision_tower.x.embed_tokens.weight",
                               "language_model.model.embed_tokens.weight"]) == (
        "language_model.model.embed_tokens.weight"
    )  # fmt: skip


def test_bfloat16_checkpoint(tiny_model, tmp_path):  # noqa: F811
    """A bfloat16 table (most released checkpoints): rows in bfloat16, scaled in bfloat16."""
    from safetensors.torch import load_file, save_file

    source = build_family("gemma2", tiny_model)
    model = tmp_path / "gemma2-bf16"
    shutil.copytree(source, model)
    tensors = load_file(str(model / "model.safetensors"))
    save_file(
        {k: v.to(torch.bfloat16) for k, v in tensors.items()}, str(model / "model.safetensors")
    )
    config = json.loads((model / "config.json").read_text())
    config.pop("torch_dtype", None)
    (model / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    rows = embedding_rows(model, TEXT)
    assert isinstance(rows, torch.Tensor) and rows.dtype == torch.bfloat16
    table = table_rows(model, TEXT)
    assert table.dtype == torch.bfloat16
    assert torch.equal(rows, table * torch.tensor(8.0, dtype=torch.bfloat16))
    as_float = embedding_rows(model, TEXT, dtype="float32")
    assert as_float.dtype == np.float32
    assert torch.equal(torch.from_numpy(as_float), table.float() * 8.0)
