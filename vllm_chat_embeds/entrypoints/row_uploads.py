"""``POST /v1/prompt_embeds`` (rows as the raw body) and the Files API over rows
(``POST/GET /v1/files``, ``GET/DELETE /v1/files/{id}``, ``GET /v1/files/{id}/content``).

Why routes of our own: vLLM 0.32/0.33 define no ``/v1/files`` and no way to send rows without
base64 inside JSON. Both upload routes run the one implementation in ``stores/uploads.py``
(same checks and messages as an inline part, the reference store's bound), and answer with an
id usable as ``{"type": "prompt_embeds", "uuid": id}`` or ``{"type": "file", "file":
{"file_id": id}}`` in any later chat. They sit under ``/v1``, so ``vllm serve --api-key``
guards them as every other route (vLLM's ``AuthenticationMiddleware`` checks every ``/v1``
path). Attached by the ``entrypoints_launchers_app`` patch, as the soft prompt routes are.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import Any, Final

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import FormData
from starlette.formparsers import MultiPartParser
from vllm.exceptions import VLLMValidationError

from .. import errors
from ..payload import PayloadSpec, looks_like_safetensors
from ..stores import uploads
from ..stores.uploads import Kind, Upload
from . import body_sink
from .http_errors import error_response

UPLOAD_PATH: Final = "/v1/prompt_embeds"
FILES_PATH: Final = "/v1/files"
RAW_MEDIA_TYPES: Final = frozenset({"application/octet-stream"})
JSON_MEDIA_TYPE: Final = "application/json"  # {"text": ...}: the served model's rows for it
SAFETENSORS_MEDIA_TYPES: Final = frozenset(
    {"application/safetensors", "application/x-safetensors", "application/vnd.safetensors"}
)
# Headers that may carry what the query parameters carry.
DTYPE_HEADER: Final = "x-prompt-embeds-dtype"
SHAPE_HEADER: Final = "x-prompt-embeds-shape"
UPLOAD_PURPOSE: Final = "prompt_embeds"
_FILE_CHUNK: Final = 1 << 20
# Bytes of a Files API body beyond its rows file: the form's other fields and part headers.
_FORM_ROOM: Final = 64 * 1024
# A rows form: one file and a few fields (``purpose``), whichever parser reads it.
_FORM_BOUNDS: Final = {"max_files": 1, "max_fields": 16}
# No tokenizer's token spans more characters than this: a longer text has more tokens than
# rows allowed, refused before the tokenizer runs (off the event loop) over all of it.
_CHARS_PER_ROW_BOUND: Final = 1024


def _spec(request: Request, where: str) -> PayloadSpec:
    """The payload spec of the model this server renders for (its renderer's)."""
    from ..renderers.base import EmbedsRendererMixin

    engine = getattr(request.app.state, "engine_client", None)
    renderer = getattr(engine, "renderer", None)
    if not isinstance(renderer, EmbedsRendererMixin):
        mode = getattr(getattr(renderer, "model_config", None), "tokenizer_mode", "?")
        errors.reject(errors.MODE_UNSUPPORTED, where=where, mode=mode)
    if not (renderer.embeds_enabled and renderer.placeholder_id is not None):
        errors.reject(errors.NOT_ENABLED, where=where)
    return renderer.payload_spec


def _shape_param(value: str | None) -> object:
    """``"8192,4096"`` (or ``[8192, 4096]``) as a list of ints; anything else as given, for the
    part's own shape message."""
    if value is None:
        return None
    items = value.strip().strip("[]()").split(",")
    try:
        return [int(item) for item in items]
    except ValueError:
        return value


def _size(request: Request) -> int | None:
    value = request.headers.get("content-length")
    return int(value) if value is not None and value.isdigit() else None


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _file_object(upload: Upload) -> dict[str, Any]:
    """The OpenAI ``FileObject`` shape."""
    return {
        "id": upload.id,
        "object": "file",
        "bytes": upload.bytes,
        "created_at": upload.created_at,
        "filename": upload.filename,
        "purpose": upload.purpose,
        "status": "processed",
        "expires_at": None,
        "status_details": None,
    }


async def _store(
    request: Request,
    chunks: AsyncIterator[bytes],
    kind: Kind,
    where: str,
    *,
    size: int | None,
    filename: str,
    purpose: str,
    dtype: object = None,
    shape: object = None,
    lend: uploads.Lend | None = None,
) -> tuple[Upload, Any]:
    spec = _spec(request, where)
    rows, nbytes = await uploads.receive_rows(
        chunks, kind, spec, where, size=size, dtype=dtype, shape=shape, lend=lend
    )
    # Validation, the cast and the content digest are CPU work: off the event loop.
    return await asyncio.to_thread(
        uploads.keep, rows, spec, where, filename=filename, purpose=purpose, size=nbytes
    )


def _refused(exc: VLLMValidationError, param: str) -> JSONResponse:
    return error_response(str(exc), HTTPStatus.BAD_REQUEST, param)


async def upload_prompt_embeds(request: Request) -> JSONResponse:
    """Rows as the body: raw (``dtype``, ``shape`` query parameters or headers) or safetensors."""
    media = _media_type(request)
    if media == JSON_MEDIA_TYPE:
        return await _rows_for_text(request)
    if media in RAW_MEDIA_TYPES:
        kind: Kind = "raw"
    elif media in SAFETENSORS_MEDIA_TYPES:
        kind = "safetensors"
    else:
        message = errors.UPLOAD_MEDIA_TYPE.format(got=media or None)
        return error_response(message, HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "Content-Type")
    params, headers = request.query_params, request.headers
    dtype = params.get("dtype", headers.get(DTYPE_HEADER))
    shape = _shape_param(params.get("shape", headers.get(SHAPE_HEADER)))
    where = errors.UPLOAD_WHERE
    try:
        upload, rows = await _store(
            request,
            request.stream(),
            kind,
            where,
            size=_size(request),
            filename="prompt_embeds.safetensors" if kind == "safetensors" else "prompt_embeds.raw",
            purpose=UPLOAD_PURPOSE,
            dtype=dtype,
            shape=shape,
            lend=functools.partial(body_sink.attach, request.scope, receive=request.receive),
        )
    except VLLMValidationError as exc:
        return _refused(exc, "body")
    return _uploaded(upload, rows)


def _uploaded(upload: Upload, rows: Any, **more: Any) -> JSONResponse:
    """The upload route's answer: the id and the parts naming it."""
    return JSONResponse(
        {
            "id": upload.id,
            "object": "prompt_embeds",
            "uuid": upload.id,
            "part": {"type": "prompt_embeds", "uuid": upload.id},
            "file_part": {"type": "file", "file": {"file_id": upload.id}},
            "shape": list(rows.shape),
            "dtype": str(rows.dtype).removeprefix("torch."),
            "bytes": upload.bytes,
            "created_at": upload.created_at,
            **more,
        }
    )


async def _rows_for_text(request: Request) -> JSONResponse:
    """``{"text": ..., "add_special_tokens": false}``: the served model's own input rows for the
    text's tokens (``model_rows.py``), kept like an upload; the answer adds their ``token_ids``.
    A part holding them gives the text's answer on any model family."""
    from .. import model_rows

    where = errors.TEXT_ROWS_WHERE
    try:
        spec = _spec(request, where)
        body = await request.json()
        text = body.get("text") if isinstance(body, dict) else None
        special = body.get("add_special_tokens", False) if isinstance(body, dict) else False
        if not isinstance(text, str) or not text:
            errors.reject(errors.TEXT_ROWS_TEXT, where=where, got=type(text).__name__)
        if not isinstance(special, bool):
            errors.reject(errors.TEXT_ROWS_SPECIAL, where=where, got=type(special).__name__)
        if len(text) > spec.max_rows * _CHARS_PER_ROW_BOUND:  # before tokenizing all of it
            errors.reject(errors.TOO_MANY_ROWS, where=where, limit=spec.rows_limit)
        renderer = request.app.state.engine_client.renderer
        encode = renderer.get_tokenizer().encode
        ids = list(await asyncio.to_thread(encode, text, add_special_tokens=special))
        vocab = int(renderer.model_config.get_vocab_size())
        if not ids or any(not 0 <= i < vocab or i == renderer.placeholder_id for i in ids):
            errors.reject(errors.TEXT_ROWS_TOKENS, where=where, vocab=vocab)
        if len(ids) > spec.max_rows:
            errors.reject(errors.TOO_MANY_ROWS, where=where, limit=spec.rows_limit)
        rows = await model_rows.rows_for_ids(request.app.state.engine_client, ids)
        upload, kept = await asyncio.to_thread(
            uploads.keep, rows, spec, where, filename="text-rows.safetensors",
            purpose=UPLOAD_PURPOSE, size=int(rows.numel() * rows.element_size()),
        )  # fmt: skip
    except VLLMValidationError as exc:
        return _refused(exc, "text")
    except ValueError:  # the body is not JSON
        message = errors.TEXT_ROWS_TEXT.format(where=where, got="a body that is not JSON")
        return error_response(message, HTTPStatus.BAD_REQUEST, "text")
    return _uploaded(upload, kept, token_ids=ids)


def _form_error(problem: str, param: str | None) -> JSONResponse:
    return error_response(errors.FILE_FORM.format(problem=problem), HTTPStatus.BAD_REQUEST, param)


async def _upload_chunks(upload: Any) -> AsyncIterator[bytes]:
    while chunk := await upload.read(_FILE_CHUNK):
        yield chunk


async def _read_form(request: Request, spec: PayloadSpec) -> FormData:
    """The form, its file part held in memory up to the part limit.

    Why not ``request.form()``: Starlette spools a file part above 1 MiB to a temporary file
    on disk, one write per body chunk through a worker thread, and it is then read back: for
    a 64 MiB part that costs more CPU than the rest of the upload (measured in
    ``benchmarks/cpu_per_request.py``). The part is read once, into the rows, right after.
    """
    if _media_type(request) != "multipart/form-data":
        return await request.form(**_FORM_BOUNDS)
    limit = spec.max_part_bytes + _FORM_ROOM
    parser = MultiPartParser(request.headers, _bounded(request.stream(), limit), **_FORM_BOUNDS)
    parser.spool_max_size = limit
    return await parser.parse()


async def _bounded(chunks: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    """``chunks``, refused once past ``limit`` bytes (a body of unknown length held in memory
    must stop growing where the part limit says)."""
    seen = 0
    async for chunk in chunks:
        seen += len(chunk)
        if seen > limit:
            errors.reject(errors.TOO_MANY_BYTES, where=errors.FILE_WHERE, size=f">{seen}",
                          limit=limit - _FORM_ROOM)  # fmt: skip
        yield chunk


async def create_file(request: Request) -> JSONResponse:
    """``client.files.create(file=..., purpose=...)``: a rows file (one safetensors tensor)."""
    where = errors.FILE_WHERE
    try:
        spec = _spec(request, where)
    except VLLMValidationError as exc:
        return _refused(exc, "file")
    size = _size(request)
    if size is not None and size > spec.max_part_bytes + _FORM_ROOM:
        message = errors.TOO_MANY_BYTES.format(where=where, size=size, limit=spec.max_part_bytes)
        return error_response(message, HTTPStatus.BAD_REQUEST, "file")
    try:
        form = await _read_form(request, spec)
    except VLLMValidationError as exc:
        return _refused(exc, "file")
    except Exception as exc:  # Starlette's parser raises several types on a malformed form
        return _form_error(f"the form could not be read ({exc})", None)
    try:
        return await _create_file(request, form, spec)
    finally:
        await form.close()


async def _create_file(request: Request, form: Any, spec: PayloadSpec) -> JSONResponse:
    where = errors.FILE_WHERE
    file, purpose = form.get("file"), form.get("purpose")
    if file is None or isinstance(file, str):
        problem = "'file' is missing" if file is None else "'file' is not a file"
        return _form_error(problem, "file")
    if not isinstance(purpose, str) or not purpose.strip():
        return _form_error("'purpose' is missing", "purpose")
    filename = file.filename or "rows"
    prefix = await file.read(9)
    await file.seek(0)
    if not (filename.lower().endswith(".safetensors") or looks_like_safetensors(prefix)):
        message = errors.FILE_NOT_ROWS.format(width=spec.width, filename=filename)
        return error_response(message, HTTPStatus.BAD_REQUEST, "file")
    try:
        upload, _ = await _store(
            request,
            _upload_chunks(file),
            "safetensors",
            where,
            size=file.size,
            filename=filename,
            purpose=purpose.strip(),
        )
    except VLLMValidationError as exc:
        return _refused(exc, "file")
    return JSONResponse(_file_object(upload))


def _not_found(file_id: str) -> JSONResponse:
    message = errors.FILE_NOT_FOUND.format(file_id=file_id)
    return error_response(message, HTTPStatus.NOT_FOUND, "file_id")


# The Files API's reads and deletes may wait on the shared row store (stores/shared_store.py):
# off the event loop. Its faults raise vLLM's GracefulHTTPError, a 503 by vLLM's own handler.
async def list_files() -> JSONResponse:
    data = [_file_object(u) for u in await asyncio.to_thread(uploads.listing)]
    first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
    return JSONResponse(
        {"object": "list", "data": data, "has_more": False, "first_id": first, "last_id": last}
    )


async def retrieve_file(file_id: str) -> JSONResponse:
    upload = await asyncio.to_thread(uploads.describe, file_id)
    return _not_found(file_id) if upload is None else JSONResponse(_file_object(upload))


async def file_content(request: Request, file_id: str) -> Response:
    """The rows as kept (in the model dtype), as a safetensors file of one tensor."""
    try:
        spec = _spec(request, errors.FILE_WHERE)
        found = await asyncio.to_thread(uploads.find, file_id, spec)
    except VLLMValidationError as exc:
        return _refused(exc, "file_id")
    if found is None:
        return _not_found(file_id)
    from safetensors.torch import save

    data = await asyncio.to_thread(save, {"embeddings": found[1]})
    return Response(data, media_type="application/octet-stream")


async def delete_file(file_id: str) -> JSONResponse:
    if not await asyncio.to_thread(uploads.delete, file_id):
        return _not_found(file_id)
    return JSONResponse({"id": file_id, "object": "file", "deleted": True})


def attach(app: FastAPI) -> None:
    """Add the upload route and the Files API routes to ``app``, unless vLLM has its own."""
    taken = {getattr(route, "path", None) for route in app.routes}
    router = APIRouter()
    router.add_api_route(UPLOAD_PATH, upload_prompt_embeds, methods=["POST"])
    if FILES_PATH not in taken:  # vLLM 0.32/0.33 have none; never shadow a later one
        router.add_api_route(FILES_PATH, create_file, methods=["POST"])
        router.add_api_route(FILES_PATH, list_files, methods=["GET"])
        router.add_api_route(FILES_PATH + "/{file_id}", retrieve_file, methods=["GET"])
        router.add_api_route(FILES_PATH + "/{file_id}/content", file_content, methods=["GET"])
        router.add_api_route(FILES_PATH + "/{file_id}", delete_file, methods=["DELETE"])
    app.include_router(router)
