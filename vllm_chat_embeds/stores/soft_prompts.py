"""PEFT prompt-tuning soft prompts, kept by name in every process that renders.

Why here: a soft prompt is a few rows of input embeddings trained to stand before the prompt
(PEFT ``PROMPT_TUNING``; vLLM served these as "prompt adapters" until 0.10 removed them). Our
renderers already splice rows into prompts, so serving one is a lookup: by model name (the
rows go before the whole prompt, BOS included, where ``PeftModel.generate`` puts them) or as a
named part (``{"type": "prompt_embeds", "name": ...}``, the rows go where the part stands).

The registry is read from ``CHAT_EMBEDS_SOFT_PROMPTS`` when a renderer is built (API servers,
``LLM``); rows are checked and cast to the model's dtype once. The model name of the current
request travels in a context variable: set where vLLM checks the model name of an online
request (``patches/entrypoints_serve_engine_serving.py``) or by ``soft_prompt(name)`` offline,
and read by the renderer when it builds the engine input.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import torch

from .. import errors
from ..errors import reject
from ..log import logger

ENV_SOFT_PROMPTS: Final = "CHAT_EMBEDS_SOFT_PROMPTS"
ENV_ALLOW_RUNTIME: Final = "CHAT_EMBEDS_ALLOW_RUNTIME_SOFT_PROMPTS"
ENV_ROOT: Final = "CHAT_EMBEDS_SOFT_PROMPTS_ROOT"

ADAPTER_CONFIG: Final = "adapter_config.json"
ADAPTER_WEIGHTS: Final = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_KEY: Final = "prompt_embeddings"
PEFT_TYPE: Final = "PROMPT_TUNING"
NAME_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]*")
# Keys a named part may hold: a name stands for its rows, so payload keys make no sense.
NAMED_PART_KEYS: Final = frozenset({"type", "name"})


class SoftPromptError(ValueError):
    """A soft prompt that cannot be served; the message names the entry and the problem."""


@dataclass(frozen=True)
class SoftPrompt:
    name: str
    path: str
    rows: torch.Tensor  # (num_virtual_tokens, hidden_size), the model's dtype, contiguous

    @property
    def num_virtual_tokens(self) -> int:
        return int(self.rows.shape[0])


@dataclass(frozen=True)
class ModelShape:
    """What a soft prompt must fit: the served model's embedding width, dtype and context."""

    width: int
    dtype: torch.dtype
    max_model_len: int
    served_names: tuple[str, ...]


def _fail(entry: str, template: str, **fields: object) -> SoftPromptError:
    return SoftPromptError(errors.SOFT_PROMPT_ENTRY.format(entry=entry) + template.format(**fields))


def _read_tensor_file(path: Path, entry: str, *, key: str | None) -> torch.Tensor:
    """The one tensor of a safetensors file (``key``: the PEFT tensor), or of a torch .bin."""
    if path.suffix == ".bin":
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # any unreadable file is the same problem to the operator
            raise _fail(entry, errors.SOFT_PROMPT_UNREADABLE, reason=exc) from exc
    else:
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device="cpu")
        except Exception as exc:
            raise _fail(entry, errors.SOFT_PROMPT_UNREADABLE, reason=exc) from exc
    if not isinstance(state, Mapping):
        raise _fail(entry, errors.SOFT_PROMPT_UNREADABLE, reason="not a dict of tensors")
    if key is not None:
        if key not in state:
            raise _fail(entry, errors.SOFT_PROMPT_NO_TENSOR, file=path.name, keys=sorted(state))
        return state[key]
    if len(state) != 1:
        raise _fail(entry, errors.SOFT_PROMPT_TENSOR_COUNT, count=len(state))
    return next(iter(state.values()))


def _read_peft_folder(folder: Path, entry: str, width: int) -> torch.Tensor:
    config_path = folder / ADAPTER_CONFIG
    if not config_path.is_file():
        raise _fail(entry, errors.SOFT_PROMPT_NOT_PEFT)
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise _fail(entry, errors.SOFT_PROMPT_UNREADABLE, reason=exc) from exc
    peft_type = str(config.get("peft_type"))
    if peft_type != PEFT_TYPE:
        raise _fail(entry, errors.SOFT_PROMPT_PEFT_TYPE, peft_type=peft_type)
    submodules = config.get("num_transformer_submodules", 1)
    if submodules not in (1, None):
        raise _fail(entry, errors.SOFT_PROMPT_SUBMODULES, got=submodules)
    token_dim = config.get("token_dim")
    if token_dim is not None and token_dim != width:
        raise _fail(entry, errors.SOFT_PROMPT_WIDTH, got=token_dim, width=width)
    weights = next((folder / w for w in ADAPTER_WEIGHTS if (folder / w).is_file()), None)
    if weights is None:
        raise _fail(entry, errors.SOFT_PROMPT_NO_WEIGHTS, files=", ".join(ADAPTER_WEIGHTS))
    rows = _read_tensor_file(weights, entry, key=PEFT_KEY)
    virtual = config.get("num_virtual_tokens")
    if virtual is not None and rows.ndim == 2 and rows.shape[0] != virtual:
        raise _fail(entry, errors.SOFT_PROMPT_ROW_COUNT, rows=rows.shape[0], virtual=virtual)
    return rows


def read_soft_prompt(name: str, path: str, shape: ModelShape) -> SoftPrompt:
    """Load, check and cast one soft prompt; a ``SoftPromptError`` naming ``name=path``."""
    entry = f"{name}={path}"
    where = Path(path)
    if where.is_dir():
        rows = _read_peft_folder(where, entry, shape.width)
    elif where.is_file() and where.suffix == ".safetensors":
        rows = _read_tensor_file(where, entry, key=None)
    elif where.exists():
        raise _fail(entry, errors.SOFT_PROMPT_NOT_PEFT)
    else:
        raise _fail(entry, errors.SOFT_PROMPT_MISSING)
    if not isinstance(rows, torch.Tensor) or rows.ndim != 2:
        got = tuple(rows.shape) if isinstance(rows, torch.Tensor) else type(rows).__name__
        raise _fail(entry, errors.SOFT_PROMPT_NDIM, got=got, width=shape.width)
    if not rows.is_floating_point():
        raise _fail(entry, errors.SOFT_PROMPT_DTYPE, dtype=rows.dtype)
    if rows.shape[1] != shape.width:
        raise _fail(entry, errors.SOFT_PROMPT_WIDTH, got=rows.shape[1], width=shape.width)
    if rows.shape[0] == 0 or rows.shape[0] >= shape.max_model_len:
        raise _fail(entry, errors.SOFT_PROMPT_ROWS, rows=rows.shape[0], limit=shape.max_model_len)
    if not bool(torch.isfinite(rows).all()):
        raise _fail(entry, errors.SOFT_PROMPT_NOT_FINITE)
    rows = rows.to(dtype=shape.dtype).contiguous()
    if not bool(torch.isfinite(rows).all()):  # finite in float32, overflowing in float16
        raise _fail(entry, errors.SOFT_PROMPT_NOT_FINITE)
    return SoftPrompt(name=name, path=str(path), rows=rows)


def parse_entries(raw: str) -> list[tuple[str, str]]:
    """``name=path[,name=path...]`` as pairs; a ``SoftPromptError`` for a malformed list."""
    pairs: list[tuple[str, str]] = []
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, path = item.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not path:
            raise SoftPromptError(
                errors.SOFT_PROMPT_ENTRY.format(entry=item) + errors.SOFT_PROMPT_SYNTAX
            )
        check_name(name, item)
        if any(name == seen for seen, _ in pairs):
            raise SoftPromptError(
                errors.SOFT_PROMPT_ENTRY.format(entry=item) + errors.SOFT_PROMPT_DUPLICATE
            )
        pairs.append((name, path))
    return pairs


def check_name(name: str, entry: str) -> None:
    if not NAME_PATTERN.fullmatch(name):
        raise _fail(entry, errors.SOFT_PROMPT_BAD_NAME, name=name)


class SoftPromptStore:
    """The soft prompts of this process, by name; updated at runtime under a lock."""

    def __init__(self) -> None:
        self._prompts: dict[str, SoftPrompt] = {}
        self._lock = threading.Lock()
        self.shape: ModelShape | None = None
        self.embeds_enabled = False

    def configure(self, model_config: Any, *, embeds_enabled: bool) -> None:
        """Load ``CHAT_EMBEDS_SOFT_PROMPTS`` for this model (renderer construction).

        Idempotent for one model; a process that builds a renderer for another model (a
        second ``LLM``) reloads the entries for that model.
        """
        served = getattr(model_config, "served_model_name", None) or model_config.model
        served_names = tuple(served) if isinstance(served, list | tuple) else (str(served),)
        shape = ModelShape(
            width=int(model_config.get_hidden_size()),
            dtype=model_config.dtype,
            max_model_len=int(model_config.max_model_len),
            served_names=served_names,
        )
        if shape == self.shape and embeds_enabled == self.embeds_enabled:
            return
        pairs = parse_entries(os.environ.get(ENV_SOFT_PROMPTS, ""))
        if not embeds_enabled:
            if pairs:
                raise SoftPromptError(errors.SOFT_PROMPTS_NEED_EMBEDS)
            # A renderer without prompt_embeds serves no soft prompt; it leaves the store to
            # the renderers of this process that do (another ``LLM``).
            return
        loaded = {}
        for name, path in pairs:
            if name in served_names:
                raise _fail(f"{name}={path}", errors.SOFT_PROMPT_NAME_TAKEN, name=name)
            loaded[name] = read_soft_prompt(name, path, shape)
        with self._lock:
            self._prompts = loaded
            self.shape = shape
            self.embeds_enabled = embeds_enabled
        for prompt in loaded.values():
            logger.info(
                "soft prompt %r served from %s (%d virtual tokens)",
                prompt.name,
                prompt.path,
                prompt.num_virtual_tokens,
            )

    def get(self, name: object) -> SoftPrompt | None:
        return self._prompts.get(name) if isinstance(name, str) else None

    def names(self) -> list[str]:
        return sorted(self._prompts)

    def items(self) -> list[SoftPrompt]:
        return [self._prompts[n] for n in sorted(self._prompts)]

    def add(self, name: str, path: str) -> tuple[SoftPrompt, bool]:
        """Load ``path`` as ``name`` (runtime); returns the prompt and whether it replaced one."""
        if self.shape is None or not self.embeds_enabled:
            raise SoftPromptError(errors.SOFT_PROMPTS_NEED_EMBEDS)
        entry = f"{name}={path}"
        check_name(name, entry)
        if name in self.shape.served_names:
            raise _fail(entry, errors.SOFT_PROMPT_NAME_TAKEN, name=name)
        prompt = read_soft_prompt(name, path, self.shape)
        with self._lock:
            replaced = name in self._prompts
            self._prompts = {**self._prompts, name: prompt}
        return prompt, replaced

    def remove(self, name: str) -> SoftPrompt | None:
        with self._lock:
            prompts = dict(self._prompts)
            removed = prompts.pop(name, None)
            self._prompts = prompts
        return removed


STORE: Final = SoftPromptStore()

# The soft prompt named as the model of the request being rendered (None: the base model).
_ACTIVE: ContextVar[str | None] = ContextVar("vllm_chat_embeds_soft_prompt", default=None)


def set_active(name: str | None) -> None:
    """Name the soft prompt of the request this context renders (online: per request task)."""
    _ACTIVE.set(name)


def active_name() -> str | None:
    """The name of the soft prompt this context renders for, or None (the base model)."""
    return _ACTIVE.get()


def active() -> SoftPrompt | None:
    """The soft prompt of the request being rendered, or None."""
    name = _ACTIVE.get()
    if name is None:
        return None
    prompt = STORE.get(name)
    if prompt is None:  # unloaded between the model check and rendering
        reject(errors.SOFT_PROMPT_GONE, parameter="model", name=name)
    return prompt


@contextmanager
def soft_prompt(name: str) -> Iterator[SoftPrompt]:
    """Offline: ``with soft_prompt("name"): llm.chat(...)`` serves the soft prompt as the model.

    Every prompt rendered inside the block (``LLM.chat``, ``LLM.generate``) gets its rows before
    the whole prompt, as a request with ``"model": name`` does online.
    """
    prompt = STORE.get(name)
    if prompt is None:
        raise SoftPromptError(
            errors.SOFT_PROMPT_UNKNOWN_MODEL.format(name=name, served=STORE.names())
        )
    token = _ACTIVE.set(name)
    try:
        yield prompt
    finally:
        _ACTIVE.reset(token)


def named_part_rows(part: Mapping[str, Any], where: str) -> torch.Tensor:
    """The rows a ``{"type": "prompt_embeds", "name": ...}`` part stands for, or a 400."""
    extra = sorted(str(k) for k in part if k not in NAMED_PART_KEYS)
    if extra:
        reject(errors.NAMED_PART_KEYS, where=where, keys=extra)
    name = part.get("name")
    if not isinstance(name, str) or not name:
        reject(errors.NAMED_PART_BAD_NAME, where=where, got=type(name).__name__)
    prompt = STORE.get(name)
    if prompt is None:
        reject(errors.NAMED_PART_UNKNOWN, where=where, name=name, served=STORE.names())
    return prompt.rows


def runtime_enabled() -> bool:
    return os.environ.get(ENV_ALLOW_RUNTIME, "").strip().lower() in ("1", "true", "yes")


def inside_root(path: str) -> bool:
    """Whether ``path`` (symlinks resolved) lies inside ``CHAT_EMBEDS_SOFT_PROMPTS_ROOT``."""
    root = os.environ.get(ENV_ROOT, "").strip()
    if not root:
        return False
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    return os.path.commonpath([real_root, real]) == real_root
