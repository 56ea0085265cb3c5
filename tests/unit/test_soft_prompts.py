"""Loading soft prompts: every form served, every refusal naming the entry (no server)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from safetensors.torch import save_file

from vllm_chat_embeds import errors
from vllm_chat_embeds.renderers.parts import extract_parts
from vllm_chat_embeds.stores import soft_prompts
from vllm_chat_embeds.stores.soft_prompts import (
    ModelShape,
    SoftPromptError,
    SoftPromptStore,
    parse_entries,
    read_soft_prompt,
)

pytestmark = pytest.mark.unit

SHAPE = ModelShape(width=8, dtype=torch.float16, max_model_len=64, served_names=("base",))


def peft_folder(root: Path, rows: torch.Tensor, **config: object) -> Path:
    """The two files PEFT's ``save_pretrained`` writes for prompt tuning."""
    root.mkdir(parents=True, exist_ok=True)
    base = {
        "peft_type": "PROMPT_TUNING",
        "num_virtual_tokens": rows.shape[0],
        "token_dim": rows.shape[1],
        "num_transformer_submodules": 1,
        "task_type": "CAUSAL_LM",
    }
    (root / "adapter_config.json").write_text(json.dumps({**base, **config}))
    save_file({"prompt_embeddings": rows}, str(root / "adapter_model.safetensors"))
    return root


def refusal(name: str, path: Path, shape: ModelShape = SHAPE) -> str:
    with pytest.raises(SoftPromptError) as info:
        read_soft_prompt(name, str(path), shape)
    message = str(info.value)
    assert message.startswith(errors.SOFT_PROMPT_ENTRY.format(entry=f"{name}={path}"))
    return message


def test_peft_folder_is_read_and_cast_once_to_the_model_dtype(tmp_path):
    rows = torch.randn(5, 8)
    prompt = read_soft_prompt("sp", str(peft_folder(tmp_path / "a", rows)), SHAPE)
    assert prompt.rows.dtype == torch.float16 and prompt.rows.is_contiguous()
    assert torch.equal(prompt.rows, rows.half())
    assert prompt.num_virtual_tokens == 5


def test_single_tensor_safetensors_file(tmp_path):
    rows = torch.randn(3, 8)
    save_file({"anything": rows}, str(tmp_path / "sp.safetensors"))
    prompt = read_soft_prompt("sp", str(tmp_path / "sp.safetensors"), SHAPE)
    assert torch.equal(prompt.rows, rows.half())
    save_file({"a": rows, "b": rows.clone()}, str(tmp_path / "two.safetensors"))
    message = refusal("two", tmp_path / "two.safetensors")
    assert message.endswith(errors.SOFT_PROMPT_TENSOR_COUNT.format(count=2))


def test_wrong_width_is_refused(tmp_path):
    folder = peft_folder(tmp_path / "w", torch.randn(4, 6))
    assert refusal("w", folder).endswith(errors.SOFT_PROMPT_WIDTH.format(got=6, width=8))
    save_file({"x": torch.randn(4, 6)}, str(tmp_path / "w.safetensors"))
    message = refusal("w", tmp_path / "w.safetensors")
    assert message.endswith(errors.SOFT_PROMPT_WIDTH.format(got=6, width=8))


def test_prefix_tuning_and_encoder_decoder_checkpoints_are_refused(tmp_path):
    prefix = peft_folder(tmp_path / "p", torch.randn(4, 8), peft_type="PREFIX_TUNING")
    message = refusal("p", prefix)
    assert message.endswith(errors.SOFT_PROMPT_PEFT_TYPE.format(peft_type="PREFIX_TUNING"))
    two = peft_folder(tmp_path / "t", torch.randn(4, 8), num_transformer_submodules=2)
    assert refusal("t", two).endswith(errors.SOFT_PROMPT_SUBMODULES.format(got=2))


def test_non_finite_values_are_refused_also_after_the_cast(tmp_path):
    rows = torch.randn(4, 8)
    rows[1, 2] = float("nan")
    assert refusal("n", peft_folder(tmp_path / "n", rows)).endswith(errors.SOFT_PROMPT_NOT_FINITE)
    big = torch.full((2, 8), 1e6)  # finite in float32, infinite in float16
    assert refusal("b", peft_folder(tmp_path / "b", big)).endswith(errors.SOFT_PROMPT_NOT_FINITE)


def test_other_malformed_checkpoints(tmp_path):
    assert refusal("m", tmp_path / "missing").endswith(errors.SOFT_PROMPT_MISSING)
    (tmp_path / "empty").mkdir()
    assert refusal("e", tmp_path / "empty").endswith(errors.SOFT_PROMPT_NOT_PEFT)
    three_d = peft_folder(tmp_path / "3d", torch.randn(4, 8))
    save_file(
        {"prompt_embeddings": torch.randn(1, 4, 8)}, str(three_d / "adapter_model.safetensors")
    )
    assert "2-D tensor" in refusal("3d", three_d)
    counted = peft_folder(tmp_path / "c", torch.randn(4, 8), num_virtual_tokens=9)
    assert refusal("c", counted).endswith(errors.SOFT_PROMPT_ROW_COUNT.format(rows=4, virtual=9))
    long = peft_folder(tmp_path / "l", torch.randn(64, 8))
    assert refusal("l", long).endswith(errors.SOFT_PROMPT_ROWS.format(rows=64, limit=64))
    ints = tmp_path / "i.safetensors"
    save_file({"x": torch.ones(2, 8, dtype=torch.int64)}, str(ints))
    assert refusal("i", ints).endswith(errors.SOFT_PROMPT_DTYPE.format(dtype=torch.int64))


def test_entry_list_syntax():
    assert parse_entries(" a=/x , b/c=/y ,") == [("a", "/x"), ("b/c", "/y")]
    for raw, tail in [
        ("a", errors.SOFT_PROMPT_SYNTAX),
        ("a=/x,a=/y", errors.SOFT_PROMPT_DUPLICATE),
        ("-a=/x", errors.SOFT_PROMPT_BAD_NAME.format(name="-a")),
    ]:
        with pytest.raises(SoftPromptError, match=None) as info:
            parse_entries(raw)
        assert str(info.value).endswith(tail), raw


def fake_model_config(width: int = 8) -> SimpleNamespace:
    return SimpleNamespace(
        get_hidden_size=lambda: width,
        dtype=torch.float32,
        max_model_len=64,
        served_model_name="base",
        model="/models/base",
    )


def test_store_reads_the_variable_and_refuses_without_prompt_embeds(tmp_path, monkeypatch):
    folder = peft_folder(tmp_path / "a", torch.randn(2, 8))
    monkeypatch.setenv(soft_prompts.ENV_SOFT_PROMPTS, f"sp={folder}")
    store = SoftPromptStore()
    with pytest.raises(SoftPromptError, match="--enable-prompt-embeds"):
        store.configure(fake_model_config(), embeds_enabled=False)
    store.configure(fake_model_config(), embeds_enabled=True)
    assert store.names() == ["sp"]
    monkeypatch.setenv(soft_prompts.ENV_SOFT_PROMPTS, f"base={folder}")
    with pytest.raises(SoftPromptError) as info:
        SoftPromptStore().configure(fake_model_config(), embeds_enabled=True)
    assert str(info.value).endswith(errors.SOFT_PROMPT_NAME_TAKEN.format(name="base"))


def test_named_part_resolves_rows_and_unknown_names_are_400(tmp_path, monkeypatch):
    from vllm.exceptions import VLLMValidationError

    from vllm_chat_embeds.limits import Limits
    from vllm_chat_embeds.payload import PayloadSpec

    folder = peft_folder(tmp_path / "a", torch.randn(2, 8))
    monkeypatch.setenv(soft_prompts.ENV_SOFT_PROMPTS, f"sp={folder}")
    store = SoftPromptStore()
    store.configure(fake_model_config(), embeds_enabled=True)
    monkeypatch.setattr(soft_prompts, "STORE", store)
    spec = PayloadSpec(width=8, dtype=torch.float32, max_part_bytes=1 << 20, max_rows=64,
                       rows_limit=64, encodings=frozenset({"torch"}))  # fmt: skip
    part = {"type": "prompt_embeds", "name": "sp"}
    messages = [{"role": "user", "content": [{"type": "text", "text": "x"}, part]}]
    _, plan = extract_parts(messages, enabled=True, spec=spec, limits=Limits())
    assert plan is not None and plan.parts[0].tensor is store.get("sp").rows
    messages[0]["content"][1] = {"type": "prompt_embeds", "name": "zz"}
    with pytest.raises(VLLMValidationError) as info:
        extract_parts(messages, enabled=True, spec=spec, limits=Limits())
    where = "messages[0].content[1]"
    expected = errors.NAMED_PART_UNKNOWN.format(where=where, name="zz", served=["sp"])
    assert str(info.value).startswith(expected)


def test_offline_helper_names_the_soft_prompt_for_the_block(tmp_path, monkeypatch):
    folder = peft_folder(tmp_path / "a", torch.randn(2, 8))
    store = SoftPromptStore()
    monkeypatch.setenv(soft_prompts.ENV_SOFT_PROMPTS, f"sp={folder}")
    store.configure(fake_model_config(), embeds_enabled=True)
    monkeypatch.setattr(soft_prompts, "STORE", store)
    import vllm_chat_embeds

    assert soft_prompts.active() is None
    with vllm_chat_embeds.soft_prompt("sp") as prompt:
        assert soft_prompts.active() is prompt
    assert soft_prompts.active() is None
    with pytest.raises(SoftPromptError):
        with vllm_chat_embeds.soft_prompt("zz"):
            pass


# -- runtime routes ----------------------------------------------------------------------------


def client(api_server_count: int = 1) -> TestClient:
    from vllm_chat_embeds.entrypoints.soft_prompt_routes import attach

    app = FastAPI()
    attach(app, api_server_count)
    return TestClient(app)


def test_routes_refuse_when_disabled_or_with_several_api_servers(monkeypatch):
    monkeypatch.delenv(soft_prompts.ENV_ALLOW_RUNTIME, raising=False)
    response = client().post("/v1/load_soft_prompt", json={"name": "a", "path": "/x"})
    assert response.status_code == 403
    assert response.json()["error"]["message"] == errors.RUNTIME_DISABLED
    monkeypatch.setenv(soft_prompts.ENV_ALLOW_RUNTIME, "1")
    response = client(api_server_count=2).post("/v1/unload_soft_prompt", json={"name": "a"})
    assert response.status_code == 400
    assert response.json()["error"]["message"] == errors.RUNTIME_MULTI_SERVER.format(count=2)


def test_routes_need_a_root(monkeypatch):
    monkeypatch.setenv(soft_prompts.ENV_ALLOW_RUNTIME, "1")
    monkeypatch.delenv(soft_prompts.ENV_ROOT, raising=False)
    response = client().post("/v1/load_soft_prompt", json={"name": "a", "path": "/x"})
    assert response.status_code == 403
    assert response.json()["error"]["message"] == errors.RUNTIME_NO_ROOT
