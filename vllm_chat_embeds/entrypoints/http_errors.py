"""JSON error answers of the plugin's own routes, in vLLM's error shape (extends
``vllm/entrypoints/serve/utils/api_utils.py``'s ``create_error_response``).

Why one helper: the soft prompt and upload routes answer outside vLLM's serving classes, and
clients (the ``openai`` SDK) read errors from the same ``{"error": {...}}`` body everywhere.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any, Final

from fastapi import Request
from fastapi.responses import JSONResponse

_TYPES: Final = {
    HTTPStatus.NOT_FOUND: "NotFoundError",
    HTTPStatus.FORBIDDEN: "ForbiddenError",
    HTTPStatus.UNSUPPORTED_MEDIA_TYPE: "UnsupportedMediaTypeError",
}


def error_response(message: str, status: HTTPStatus, param: str | None = None) -> JSONResponse:
    from vllm.entrypoints.serve import create_error_response

    err_type = _TYPES.get(status, "BadRequestError")
    body = create_error_response(message, err_type=err_type, status_code=status, param=param)
    return JSONResponse(content=body.model_dump(), status_code=status.value)


async def retry_after_header(request: Request, call_next: Any) -> Any:
    """HTTP middleware: a ``Retry-After`` header on the 503s a shared row store fault causes
    (``stores/shared_store.py``), so clients and proxies back off the hinted time."""
    response = await call_next(request)
    if response.status_code == HTTPStatus.SERVICE_UNAVAILABLE:
        from ..stores import shared_store

        store = shared_store.active()
        wait = store.retry_after() if store is not None else 0
        if wait and "retry-after" not in response.headers:
            response.headers["Retry-After"] = str(wait)
    return response
