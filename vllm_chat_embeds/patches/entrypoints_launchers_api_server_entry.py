"""Patch of ``vllm/entrypoints/launchers/api_server/entry.py``: serve HTTP with uvicorn's
httptools protocol extended by body sinks (``entrypoints.body_sink``).

What: the ``serve_http`` this module calls passes ``http=`` the extended protocol class to
``uvicorn.Config`` (unless a caller already chose one). Why: a big chat body is written
straight into the buffer the big-body middleware lends (``entrypoints.big_bodies``), instead
of going through uvicorn's queue in copied pieces: about 5 ms less of the API server's CPU per
22 MB body. vLLM has no option for uvicorn's protocol, and the app never sees the protocol, so
the launcher is the one place to choose it. When it can go: when uvicorn hands bodies to a
buffer the app lends (or vLLM serves with a server that does).

Where: only in a process that has imported the launcher module before plugins load, which is
what ``vllm serve`` and its API server processes do. Engine cores, workers, ``LLM`` and vLLM's
model-inspection subprocesses serve no HTTP, so they are spared importing the API server's
modules (0.3 s and their memory, in every one of them). A program that loads plugins first
and imports the launcher later gets uvicorn's own protocol: bodies then take the ordinary path.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

from ..log import logger
from . import Patch, check


def apply(patch: Patch) -> None:
    from ..compat.vllm_api import locate
    from ..entrypoints import body_sink

    if locate(f"{patch.target}:serve_http")[0] not in sys.modules:
        return  # not an API server process
    module = patch.home()
    check(
        patch,
        {"serve_http": ("app", "sock", "enable_ssl_refresh", "peer_loads", "uvicorn_kwargs")},
    )
    protocol = body_sink.protocol_class()
    if protocol is None:
        return
    original = module.serve_http

    @functools.wraps(original)
    async def serve_http(app: Any, sock: Any, *args: Any, **uvicorn_kwargs: Any) -> Any:
        uvicorn_kwargs.setdefault("http", protocol)
        if uvicorn_kwargs["http"] is protocol:  # said here: vLLM's logging is set up by now
            logger.info(body_sink.SINKING)
        return await original(app, sock, *args, **uvicorn_kwargs)

    module.serve_http = serve_http
