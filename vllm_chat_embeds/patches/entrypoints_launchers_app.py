"""Patch of ``vllm/entrypoints/launchers/app.py``: add the plugin's own routes.

What: ``build_app`` also attaches ``POST /v1/load_soft_prompt`` and ``/v1/unload_soft_prompt``
(``entrypoints.soft_prompt_routes``), and the row uploads: ``POST /v1/prompt_embeds`` and the
Files API over rows, ``/v1/files`` (``entrypoints.row_uploads``; not attached where vLLM has a
``/v1/files`` of its own); with ``--enable-prompt-embeds``, also the middleware that keeps big
part strings away from FastAPI's JSON parser (``entrypoints.big_bodies``); and it sizes the
reference store as this API server's share of ``CHAT_EMBEDS_REFERENCE_BYTES``; with a shared row
store, it names the ``--api-key`` realm its keys live in and adds the ``Retry-After`` header to
its 503s (``stores.shared_store``); and it sets this API server process's malloc thresholds
(``heap.bound``), since only here is a process known to be one. Why: vLLM's own way
for plugins to add routes, the ``vllm.endpoint_plugins`` entry point group, loads a plugin only
when the operator names it in ``VLLM_PLUGINS``, which is also the allowlist of general plugins;
requiring that for the routes of a general plugin would be a trap. ``build_app`` looks
``register_api_routers`` up in its module's globals at call time, so wrapping that name reaches
it. When it can go: when endpoint plugins can be enabled without narrowing the general-plugin
allowlist.
"""

from __future__ import annotations

from typing import Any

from . import Patch, check


def apply(patch: Patch) -> None:
    from vllm.entrypoints.launchers import app as app_module

    check(
        patch,
        {"register_api_routers": ("args", "app", "supported_tasks", "model_config")},
    )
    original = app_module.register_api_routers

    def register_api_routers(
        args: Any, app: Any, supported_tasks: Any, model_config: Any = None
    ) -> None:
        original(args, app, supported_tasks, model_config)
        if "generate" in supported_tasks:
            from .. import heap
            from ..entrypoints import big_bodies, http_errors, row_uploads, soft_prompt_routes
            from ..stores import references, shared_store

            heap.bound()  # every big body's blocks go back when freed, in every thread
            api_servers = int(getattr(args, "api_server_count", None) or 1)
            references.share_among(api_servers)
            shared_store.set_realm(getattr(args, "api_key", None))
            if shared_store.active() is not None:
                app.middleware("http")(http_errors.retry_after_header)
            soft_prompt_routes.attach(app, api_servers)
            row_uploads.attach(app)
            if getattr(args, "enable_prompt_embeds", False):
                big_bodies.attach(app)

    app_module.register_api_routers = register_api_routers
