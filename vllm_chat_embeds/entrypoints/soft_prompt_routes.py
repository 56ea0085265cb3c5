"""``POST /v1/load_soft_prompt`` and ``/v1/unload_soft_prompt`` (extends
``vllm/entrypoints/serve/lora/api_router.py``, vLLM's runtime LoRA routes).

Why separate from vLLM's LoRA routes: a soft prompt lives in the renderer's process (the API
server), not in the engine, so loading one touches no engine state. The routes are always
there, and answer with a clear refusal unless ``CHAT_EMBEDS_ALLOW_RUNTIME_SOFT_PROMPTS=1``; a
loaded path must lie inside ``CHAT_EMBEDS_SOFT_PROMPTS_ROOT``. With several API server
processes each keeps its own registry, so updates are refused there.
"""

from __future__ import annotations

import asyncio
import os
from http import HTTPStatus
from typing import Any, Final

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse

from .. import errors
from ..log import logger
from ..stores.soft_prompts import (
    ENV_ROOT,
    STORE,
    SoftPromptError,
    inside_root,
    runtime_enabled,
)
from .http_errors import error_response as _error

LOAD_PATH: Final = "/v1/load_soft_prompt"
UNLOAD_PATH: Final = "/v1/unload_soft_prompt"


async def _body(raw_request: Request, fields: tuple[str, ...]) -> dict[str, str] | JSONResponse:
    try:
        body: Any = await raw_request.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        body = {}
    out = {}
    for field in fields:
        value = body.get(field)
        if not isinstance(value, str) or not value.strip():
            return _error(
                errors.RUNTIME_BAD_FIELD.format(field=field), HTTPStatus.BAD_REQUEST, field
            )
        out[field] = value.strip()
    return out


def attach(app: FastAPI, api_server_count: int) -> None:
    """Add both routes to ``app``; ``api_server_count`` is the server's process count."""
    router = APIRouter()

    def refused() -> JSONResponse | None:
        if not runtime_enabled():
            return _error(errors.RUNTIME_DISABLED, HTTPStatus.FORBIDDEN)
        if api_server_count > 1:
            message = errors.RUNTIME_MULTI_SERVER.format(count=api_server_count)
            return _error(message, HTTPStatus.BAD_REQUEST)
        return None

    @router.post(LOAD_PATH)
    async def load_soft_prompt(raw_request: Request) -> JSONResponse:
        if (refusal := refused()) is not None:
            return refusal
        body = await _body(raw_request, ("name", "path"))
        if isinstance(body, JSONResponse):
            return body
        name, path = body["name"], body["path"]
        if not inside_root(path):
            if not os.environ.get(ENV_ROOT, "").strip():
                return _error(errors.RUNTIME_NO_ROOT, HTTPStatus.FORBIDDEN, "path")
            message = errors.RUNTIME_OUTSIDE_ROOT.format(path=path)
            return _error(message, HTTPStatus.FORBIDDEN, "path")
        try:
            # Reading and checking the file is blocking work: keep it off the event loop.
            prompt, replaced = await asyncio.to_thread(STORE.add, name, path)
        except SoftPromptError as exc:
            return _error(str(exc), HTTPStatus.BAD_REQUEST, "path")
        logger.info(
            "soft prompt %r %s from %s at runtime (%d virtual tokens)",
            name,
            "replaced" if replaced else "loaded",
            prompt.path,
            prompt.num_virtual_tokens,
        )
        return JSONResponse(
            {
                "name": name,
                "path": prompt.path,
                "num_virtual_tokens": prompt.num_virtual_tokens,
                "replaced": replaced,
            }
        )

    @router.post(UNLOAD_PATH)
    async def unload_soft_prompt(raw_request: Request) -> JSONResponse:
        if (refusal := refused()) is not None:
            return refusal
        body = await _body(raw_request, ("name",))
        if isinstance(body, JSONResponse):
            return body
        removed = STORE.remove(body["name"])
        if removed is None:
            message = errors.RUNTIME_NOT_LOADED.format(name=body["name"])
            return _error(message, HTTPStatus.NOT_FOUND, "name")
        logger.info("soft prompt %r unloaded at runtime", removed.name)
        return JSONResponse({"name": removed.name, "unloaded": True})

    app.include_router(router)
