"""The manifest of every vLLM module this plugin patches, and how patches are applied.

Why patches at all: some prompt_embeds behaviour lives in vLLM modules that have no registry.
Each patch is one module here, named after the vLLM module it changes, and says what it
changes, why, and when it can go. ``apply_all()`` checks every target before changing any, so
a vLLM whose internals moved fails loudly at startup instead of misbehaving later.

``Patch.target`` is the vLLM module by its canonical name (``compat.vllm_api``); where a
series moved the patched attributes elsewhere, ``Patch.home()`` is the module that holds them
there, and it is the module a patch must read and replace them in: a patch takes its module
from ``patch.home()`` rather than importing the target by name (required once the target
moves in any supported series; older patches still import it directly).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Final


@dataclass(frozen=True)
class Patch:
    """One patched vLLM module: what it replaces, and the function that replaces it."""

    name: str  # our module under vllm_chat_embeds.patches
    target: str  # the vLLM module
    attributes: tuple[str, ...]  # "Class.method" or "function" names we wrap
    why: str

    def home(self) -> ModuleType:
        """The module holding this patch's attributes on the running vLLM."""
        from ..compat.vllm_api import import_home

        homes = {import_home(self.target, attribute) for attribute in self.attributes}
        if len(homes) != 1:
            names = sorted(module.__name__ for module in homes)
            raise RuntimeError(
                f"vllm-chat-embeds: patch {self.name} spans several vLLM modules {names}; "
                "split it, one patch per vLLM module."
            )
        return homes.pop()


MANIFEST: Final = (
    Patch(
        name="vllm_utils",
        target="vllm.utils",
        attributes=("length_from_prompt_token_ids_or_embeds",),
        why="compact transport: a prompt's length comes from its token ids",
    ),
    Patch(
        name="v1_engine_input_processor",
        target="vllm.v1.engine.input_processor",
        attributes=("InputProcessor._validate_model_input", "InputProcessor.process_inputs"),
        why="compact transport: validate embeds inputs that carry only their rows; carry the "
        "content digests of rows kept by uuid to the engine; check kv_transfer_params",
    ),
    Patch(
        name="v1_request",
        target="vllm.v1.request",
        attributes=("Request.__init__",),
        why="compact transport: the engine keeps a compact request's mask as runs; rows get "
        "content ids (kv_transfer/row_keys.py)",
    ),
    Patch(
        name="v1_core_kv_cache_utils",
        target="vllm.v1.core.kv_cache_utils",
        attributes=("_gen_prompt_embeds_extra_hash_keys",),
        why="compact transport: hash a block's own rows and mask; text blocks hash as text",
    ),
    Patch(
        name="v1_worker_gpu_model_runner",
        target="vllm.v1.worker.gpu_model_runner",
        attributes=(
            "GPUModelRunner._prepare_inputs",
            "GPUModelRunner._prepare_input_ids",
            "GPUModelRunner._preprocess",
        ),
        why="V1 runner: copy only the scheduled embedding rows each step (compact transport); "
        "under LoRA, embed every scheduled position so the LoRA mapping lines up",
    ),
    Patch(
        name="v1_worker_gpu_model_states_prompt_embeds",
        target="vllm.v1.worker.gpu.model_states.prompt_embeds",
        attributes=("PromptEmbedsState.add_request",),
        why="compact transport: the V2 runner gets the dense tensor it expects",
    ),
    Patch(
        name="v1_engine_logprobs",
        target="vllm.v1.engine.logprobs",
        attributes=(
            "LogprobsProcessor.from_new_request",
            "LogprobsProcessor._update_prompt_logprobs",
        ),
        why="report None as the prompt logprob of rows given as embeddings",
    ),
    Patch(
        name="entrypoints_serve_tokenize_serving",
        target="vllm.entrypoints.serve.tokenize.serving",
        attributes=("ServingTokenization.create_tokenize",),
        why="/tokenize says which positions of a chat hold embeddings",
    ),
    Patch(
        name="entrypoints_openai_responses_protocol",
        target="vllm.entrypoints.openai.responses.protocol",
        attributes=("ResponsesRequest.input_item_parsing",),
        why="/v1/responses input messages may hold prompt_embeds parts (schema widened)",
    ),
    Patch(
        name="entrypoints_openai_chat_completion_protocol",
        target="vllm.entrypoints.openai.chat_completion.protocol",
        attributes=(
            "ChatCompletionRequest._normalize_messages_before",
            "BatchChatCompletionRequest.check_batch_mode",
        ),
        why="chat messages validate with prompt_embeds parts stood in for (our errors, any place)",
    ),
    Patch(
        name="entrypoints_serve_tokenize_protocol",
        target="vllm.entrypoints.serve.tokenize.protocol",
        attributes=("TokenizeChatRequest.check_generation_prompt",),
        why="/tokenize chat messages validate with prompt_embeds parts stood in for",
    ),
    Patch(
        name="renderers_online_renderer",
        target="vllm.renderers.online_renderer",
        attributes=("OnlineRenderer._render_responses_with_harmony",),
        why="Harmony models refuse /v1/responses parts instead of dropping them",
    ),
    Patch(
        name="renderers_chat_utils",
        target="vllm.renderers.chat_utils",
        attributes=("_reject_reserved_placeholder_in_text",),
        why="the generic renderer's bounded part markers pass vLLM's reserved-text check",
    ),
    Patch(
        name="entrypoints_generate_beam_search_utils",
        target="vllm.entrypoints.generate.beam_search.utils",
        attributes=("BeamSearchSequence.get_prompt",),
        why="beam search: a beam of an embeds prompt is its rows plus the beam's tokens",
    ),
    Patch(
        name="entrypoints_generate_beam_search_online",
        target="vllm.entrypoints.generate.beam_search.online",
        attributes=("BeamSearchOnlineMixin.beam_search",),
        why="beam search: chats with parts (embeds prompts) are served, not refused with 501",
    ),
    Patch(
        name="entrypoints_generate_beam_search_offline",
        target="vllm.entrypoints.generate.beam_search.offline",
        attributes=("BeamSearchOfflineMixin.beam_search",),
        why="beam search: LLM.beam_search serves embeds prompts",
    ),
    # -- rows kept by uuid, kept again beside the engine (stores/engine_rows.py) -------------
    Patch(
        name="v1_engine_core_client",
        target="vllm.v1.engine.core_client",
        attributes=(
            "SyncMPClient._send_input",
            "AsyncMPClient._send_input",
            "AsyncMPClient.abort_requests_async",
            "DPLBAsyncMPClient.abort_requests_async",
        ),
        why="references: send the engine core only the kept rows it does not hold yet; free "
        "an aborted request's shared rows soon",
    ),
    Patch(
        name="v1_engine_core",
        target="vllm.v1.engine.core",
        attributes=("EngineCore.preprocess_add_request",),
        why="references: put back the kept rows a request left behind",
    ),
    Patch(
        name="v1_executor_multiproc_executor",
        target="vllm.v1.executor.multiproc_executor",
        attributes=("MultiprocExecutor.execute_model",),
        why="references: send the workers only the kept rows they do not hold yet",
    ),
    Patch(
        name="v1_worker_gpu_worker",
        target="vllm.v1.worker.gpu_worker",
        attributes=("Worker.execute_model",),
        why="references: put back the kept rows a scheduled request left behind",
    ),
    # -- parts across the KV-transfer layer (kv_transfer/) ------------------------------------
    Patch(
        name="entrypoints_generate_base_serving",
        target="vllm.entrypoints.generate.base.serving",
        attributes=("GenerateBaseServing._with_kv_transfer_rejection_cleanup",),
        why="no rejection notice to the KV connector for kv_transfer_params it cannot read",
    ),
    # -- soft prompts served by name (stores/soft_prompts.py) --------------------------------
    Patch(
        name="entrypoints_serve_engine_serving",
        target="vllm.entrypoints.serve.engine.serving",
        attributes=("BaseServing._check_model", "BaseServing._is_model_supported"),
        why="soft prompt names pass the model check and reach the renderer",
    ),
    Patch(
        name="entrypoints_openai_models_serving",
        target="vllm.entrypoints.openai.models.serving",
        attributes=(
            "OpenAIServingModels.show_available_models",
            "OpenAIServingModels.model_name",
        ),
        why="/v1/models lists soft prompts; responses name the soft prompt served",
    ),
    # -- vLLM's scale-out split: render servers -> token engines (entrypoints/scale_out_rows.py)
    Patch(
        name="entrypoints_scale_out_render_serving",
        target="vllm.entrypoints.scale_out.render.serving",
        attributes=("ServingRender._extract_mm_features",),
        why="scale-out: a rendered prompt's rows travel as prompt_embeds items in features",
    ),
    Patch(
        name="entrypoints_scale_out_token_in_token_out_serving",
        target="vllm.entrypoints.scale_out.token_in_token_out.serving",
        attributes=("ServingTokens.serve_tokens", "mm_input"),
        why="scale-out: generate checks carried rows and serves them as an embeds input",
    ),
    Patch(
        name="entrypoints_launchers_app",
        target="vllm.entrypoints.launchers.app",
        attributes=("register_api_routers",),
        why="POST /v1/load_soft_prompt and /v1/unload_soft_prompt",
    ),
    Patch(
        name="entrypoints_launchers_api_server_entry",
        target="vllm.entrypoints.launchers.api_server.entry",
        attributes=("serve_http",),
        why="big bodies: uvicorn writes a chat body straight into the buffer the app lends",
    ),
)

_applied: set[str] = set()


def _resolve(module: object, dotted: str) -> object:
    value = module
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def check(patch: Patch, expected: dict[str, Iterable[str]]) -> None:
    """Fail at startup if a patched attribute is missing or its parameters changed.

    ``expected`` names every attribute of the manifest entry, so no patched attribute goes
    without a signature check and the manifest cannot drift from what the patch wraps.
    """
    if set(expected) != set(patch.attributes):
        raise RuntimeError(
            f"vllm-chat-embeds: patch {patch.name} checks {sorted(expected)} but the manifest "
            f"lists {sorted(patch.attributes)}."
        )
    module = patch.home()
    for attribute in patch.attributes:
        try:
            target = _resolve(module, attribute)
        except AttributeError as exc:
            raise RuntimeError(
                f"vllm-chat-embeds: {module.__name__}.{attribute} is missing; this vLLM version "
                f"is not supported (patch {patch.name}: {patch.why})."
            ) from exc
        params = list(inspect.signature(target).parameters)  # type: ignore[arg-type]
        want = list(expected[attribute])
        if params != want:
            raise RuntimeError(
                f"vllm-chat-embeds: {module.__name__}.{attribute} takes {params}, expected {want}; "
                f"this vLLM version is not supported (patch {patch.name})."
            )


def one_of(target: object, *shapes: tuple[str, ...]) -> tuple[str, ...]:
    """The one of ``shapes`` (known parameter lists, e.g. of two vLLM series) that ``target``
    takes, for ``check``; the first if none matches, so ``check`` reports the mismatch."""
    params = tuple(inspect.signature(target).parameters)  # type: ignore[arg-type]
    return params if params in shapes else shapes[0]


def apply_all() -> None:
    """Apply each patch of the manifest once per process."""
    for patch in MANIFEST:
        if patch.name in _applied:
            continue
        module = importlib.import_module(f"{__name__}.{patch.name}")
        apply: Callable[[Patch], None] = module.apply
        apply(patch)
        _applied.add(patch.name)
