"""Build prompt_embeds content parts on the client side.

Why here: clients should not need to know the wire format. ``raw`` (the default) needs only
NumPy; ``safetensors`` needs the ``safetensors`` package; ``torch`` (the RFC's
``torch.save`` form, a pickle) needs PyTorch. This module imports neither vLLM nor PyTorch
unless asked to encode a PyTorch tensor or to use the ``torch`` encoding.
"""

from __future__ import annotations

import base64
import io
import sys
from pathlib import Path
from typing import Any, Final, Literal

Encoding = Literal["raw", "safetensors", "torch"]
WireDtype = Literal["float32", "float16", "bfloat16"]

_NUMPY_DTYPES: Final = {"float32": "<f4", "float16": "<f2"}


def _is_torch(value: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def _wire_dtype(value: Any, dtype: WireDtype | None) -> WireDtype:
    if dtype is not None:
        return dtype
    name = str(value.dtype).removeprefix("torch.")
    if name in ("float32", "float16", "bfloat16"):
        return name  # type: ignore[return-value]
    return "float32"


def _raw_bytes(value: Any, dtype: WireDtype) -> bytes:
    if _is_torch(value):
        import torch

        tensor = value.detach().to("cpu", getattr(torch, dtype)).contiguous()
        data = tensor.view(torch.uint8).numpy()
        if sys.byteorder == "big":  # the wire format is little-endian
            data = data.reshape(-1, tensor.element_size())[:, ::-1]
        return data.tobytes()
    import numpy as np

    if dtype == "bfloat16":
        raise ValueError("bfloat16 needs a torch.Tensor (NumPy has no bfloat16)")
    return np.ascontiguousarray(value, dtype=_NUMPY_DTYPES[dtype]).tobytes()


# What vLLM's ``embed_input_ids`` does to the embedding table's rows, per family (the text
# model's ``model_type`` in config.json). Facts read from vLLM 0.32/0.33's model classes;
# tests/unit/test_embedding_rows.py checks each against the installed vLLM's sources. A family
# in neither table is refused: guessing would give a part another answer than its text.
SQRT_HIDDEN_FAMILIES: Final = frozenset(
    {"gemma", "gemma2", "gemma3", "gemma3_text", "gemma3n", "gemma3n_text", "gemma4",
     "gemma4_text", "rnj1"}
)  # fmt: skip  # rows x sqrt(hidden_size), in the model dtype
CONFIG_SCALE_FAMILIES: Final = {"minicpm": "scale_emb"}  # rows x that config field
TABLE_ROW_FAMILIES: Final = frozenset(
    {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3",
     "granite", "granitemoe", "deepseek_v2", "deepseek_v3", "internlm2", "exaone4"}
)  # fmt: skip  # the table's rows as they are (Granite multiplies after them, rows included)
# Architectures whose embedding step scales by something the checkpoint alone does not settle
# for the helper (Granite 4 Vision applies its text model's multiplier there, HrmText a factor
# from its init range): refused, never guessed.
REFUSED_ARCHITECTURES: Final = frozenset(
    {"Granite4VisionForConditionalGeneration", "HrmTextForCausalLM"}
)
_DTYPE_NAMES: Final = {"float32", "float16", "bfloat16"}


class UnknownFamilyError(ValueError):
    """``embedding_rows`` does not know what a model's embedding step does to its rows."""


def _model_path(model: str | Path) -> Path:
    """A model directory, or a ``vllm serve``-style hub id already in the local hub cache."""
    path = Path(model)
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(model), local_files_only=True))
    except Exception as exc:
        raise FileNotFoundError(
            f"{model!r} is neither a model directory nor a model in the local hub cache"
        ) from exc


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    text = config.get("text_config")
    return text if isinstance(text, dict) and text.get("model_type") else config


def _table_name(keys: list[str]) -> str:
    """The input-embedding table among a checkpoint's tensors (a tied head when alone)."""
    names = [k for k in keys if k.endswith("embed_tokens.weight")]
    names = names or [k for k in keys if k.endswith("lm_head.weight")]
    if not names:
        raise ValueError("no embed_tokens.weight (or tied lm_head.weight) in the checkpoint")
    # A multimodal checkpoint may hold several: the language model's is the text path's.
    return min(names, key=lambda k: (0 if "language_model" in k else 1, len(k)))


def _table_file(model_dir: Path) -> tuple[Path, str]:
    """The safetensors file holding the table, single or sharded (``*.index.json``)."""
    import json

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        name = _table_name(list(weight_map))
        return model_dir / weight_map[name], name
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(
            f"no model.safetensors or model.safetensors.index.json in {model_dir}"
        )
    from safetensors import safe_open

    with safe_open(str(single), framework="np") as f:
        return single, _table_name(list(f.keys()))


def embedding_rows(model_dir: str | Path, text: str, *, dtype: str | None = None) -> Any:
    """The rows a served model's text path feeds its first layer for ``text``'s tokens.

    A part holding them gives the same greedy answer as ``text`` sent as text. They are the
    checkpoint's embedding-table rows times the factor the model family's embedding step
    applies (Gemma: sqrt(hidden_size), in the served dtype ``dtype``, by default the
    checkpoint's ``dtype`` or ``torch_dtype``); a family it does not know raises
    ``UnknownFamilyError`` (use ``rows_for_text``, which asks the server). ``model_dir``: a
    model directory (one
    ``model.safetensors`` or sharded with its index) or a hub id in the local cache. Needs
    ``transformers`` and ``safetensors``; returns a NumPy array, or a ``torch.Tensor`` for
    bfloat16.
    """
    import json
    import math

    from safetensors import safe_open
    from transformers import AutoTokenizer

    path = _model_path(model_dir)
    config = json.loads((path / "config.json").read_text())
    text_config = _text_config(config)
    family = str(text_config.get("model_type"))
    refused = sorted(REFUSED_ARCHITECTURES & set(config.get("architectures") or ()))
    known = SQRT_HIDDEN_FAMILIES | CONFIG_SCALE_FAMILIES.keys() | TABLE_ROW_FAMILIES
    if refused or family not in known:
        what = f"{family} ({', '.join(refused)})" if refused else family
        raise UnknownFamilyError(
            f"embedding_rows does not know what model type {what!r} does to its embedding "
            "rows; use vllm_chat_embeds.client.rows_for_text(base_url, text), which asks the "
            "served model itself"
        )
    scale: float | None = None
    if family in SQRT_HIDDEN_FAMILIES:
        scale = math.sqrt(float(text_config["hidden_size"]))
    elif family in CONFIG_SCALE_FAMILIES:
        scale = float(text_config[CONFIG_SCALE_FAMILIES[family]])
    # transformers writes ``dtype`` (newer) or ``torch_dtype`` (older).
    declared = [c.get(k) for c in (text_config, config) for k in ("dtype", "torch_dtype")]
    served = dtype or next((d for d in declared if isinstance(d, str)), "float32")
    if served not in _DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPE_NAMES)}; got {served!r}")
    ids = AutoTokenizer.from_pretrained(str(path)).encode(text, add_special_tokens=False)
    file, name = _table_file(path)
    rows = None
    if served != "bfloat16":  # NumPy has no bfloat16: such rows, or such a table, need torch
        try:
            with safe_open(str(file), framework="np") as f:
                rows = f.get_slice(name)[:][ids].astype(_NUMPY_DTYPES[served])
        except (TypeError, ValueError):
            rows = None
    if rows is not None:
        return rows if scale is None else rows * rows.dtype.type(scale)
    import torch

    with safe_open(str(file), framework="pt") as f:
        table = f.get_slice(name)[:]
    wanted = getattr(torch, served)
    out = table[ids].to(wanted)
    out = out if scale is None else out * torch.tensor(scale, dtype=wanted)
    return out if served == "bfloat16" else out.numpy()


def rows_for_text(
    base_url: str, text: str, *, api_key: str | None = None, timeout: float = 600.0
) -> tuple[dict[str, Any], Any]:
    """Ask the server for the served model's own rows of ``text`` (``POST /v1/prompt_embeds``
    with ``{"text": ...}``), exact on every model family. Returns the part naming them (kept by
    the server like an upload) and the rows (a ``torch.Tensor``, read back through
    ``GET /v1/files/{id}/content``), for checking a client's own encoder against the model.

    Both requests go over one kept-alive connection, so with ``--api-server-count N`` they
    reach the API server process that keeps the rows.
    """
    import http.client
    import json
    from urllib.parse import urlsplit

    url = urlsplit(base_url.rstrip("/"))
    kind = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
    connection = kind(url.netloc, timeout=timeout)
    headers = _auth_headers(api_key)

    def exchange(method: str, route: str, **extra: Any) -> bytes:
        connection.request(method, url.path + route, **extra)
        response = connection.getresponse()
        data = response.read()
        if response.status != 200:
            raise UploadError(response.status, data.decode(errors="replace"))
        return data

    try:
        body = json.dumps({"text": text}).encode()
        json_headers = {"Content-Type": "application/json", **headers}
        answer = json.loads(exchange("POST", "/prompt_embeds", body=body, headers=json_headers))
        data = exchange("GET", f"/files/{answer['id']}/content", headers=headers)
    finally:
        connection.close()
    from safetensors.torch import load

    return dict(answer["part"]), next(iter(load(data).values()))


def prompt_embeds_part(
    embeddings: Any, *, encoding: Encoding = "raw", dtype: WireDtype | None = None
) -> dict[str, Any]:
    """A ``{"type": "prompt_embeds", ...}`` content part for a 2-D array of embedding rows.

    ``embeddings`` is a ``numpy.ndarray`` or a ``torch.Tensor`` of shape
    ``(num_rows, hidden_size)``. ``dtype`` (raw and safetensors) defaults to the array's own
    when it is float32/float16/bfloat16, float32 otherwise; the server casts to the model's.
    """
    shape = [int(d) for d in embeddings.shape]
    if len(shape) != 2:
        raise ValueError(f"embeddings must be 2-D (num_rows, hidden_size); got shape {shape}")
    if encoding == "torch":
        import torch

        if _is_torch(embeddings):
            # A compact copy: torch.save of a view would carry its whole base storage.
            tensor = embeddings.detach().cpu().clone(memory_format=torch.contiguous_format)
        else:
            import numpy as np

            # A writable C-order copy: from_numpy refuses negative strides.
            tensor = torch.from_numpy(np.array(embeddings, order="C"))
        buf = io.BytesIO()
        torch.save(tensor, buf)
        return {"type": "prompt_embeds", "data": base64.b64encode(buf.getvalue()).decode()}
    wire = _wire_dtype(embeddings, dtype)
    if encoding == "raw":
        data = base64.b64encode(_raw_bytes(embeddings, wire)).decode()
        return {
            "type": "prompt_embeds",
            "encoding": "raw",
            "dtype": wire,
            "shape": shape,
            "data": data,
        }
    if encoding == "safetensors":
        if _is_torch(embeddings):
            import torch
            from safetensors.torch import save

            tensor = embeddings.detach().cpu().to(getattr(torch, wire)).contiguous()
            payload = save({"embeddings": tensor})  # save() refuses non-contiguous tensors
        else:
            import numpy as np
            from safetensors.numpy import save as save_numpy

            if wire == "bfloat16":
                raise ValueError("bfloat16 needs a torch.Tensor (NumPy has no bfloat16)")
            array = np.ascontiguousarray(embeddings, dtype=_NUMPY_DTYPES[wire])
            payload = save_numpy({"embeddings": array})
        data = base64.b64encode(payload).decode()
        return {"type": "prompt_embeds", "encoding": "safetensors", "data": data}
    raise ValueError(f"encoding must be 'raw', 'safetensors' or 'torch'; got {encoding!r}")


# -- rows as a standard OpenAI ``file`` part, and uploads ---------------------------------------

ROWS_FILENAME: Final = "prompt_embeds.safetensors"
# The server's prefix of ids of rows (``stores/uploads.UPLOAD_ID_PREFIX``, repeated here so this
# module needs no vLLM): a ``file_id`` with it always names rows, so one the server no longer
# holds gets ``prompt_embeds_reference_unknown`` instead of vLLM's answer to a file.
ROWS_ID_PREFIX: Final = "file-pe-"
# A part whose rows take more bytes than this is uploaded by ``Conversation`` (when it knows
# the server's ``base_url``) instead of being sent inline: about where base64 inside JSON starts
# to cost more than the extra HTTP request (measured in docs/user-guide.md#binary-upload).
UPLOAD_ABOVE_BYTES: Final = 1 << 20


def safetensors_bytes(
    embeddings: Any, *, dtype: WireDtype | Literal["float64"] | None = None
) -> bytes:
    """A safetensors file holding ``embeddings`` (NumPy or torch) as one tensor, in its own
    float dtype (``dtype`` overrides)."""
    shape = [int(d) for d in embeddings.shape]
    if len(shape) != 2:
        raise ValueError(f"embeddings must be 2-D (num_rows, hidden_size); got shape {shape}")
    name = dtype or _own_float(embeddings)
    if _is_torch(embeddings):
        import torch
        from safetensors.torch import save

        tensor = embeddings.detach().cpu().to(getattr(torch, name)).contiguous()
        return save({"embeddings": tensor})
    import numpy as np
    from safetensors.numpy import save as save_numpy

    if name == "bfloat16":
        raise ValueError("bfloat16 needs a torch.Tensor (NumPy has no bfloat16)")
    return save_numpy({"embeddings": np.ascontiguousarray(embeddings, dtype=np.dtype(name))})


def _own_float(value: Any) -> str:
    name = str(value.dtype).removeprefix("torch.")
    return name if name in ("float32", "float16", "bfloat16", "float64") else "float32"


def file_part(
    embeddings: Any,
    *,
    filename: str = ROWS_FILENAME,
    media_type: str = "application/octet-stream",
    dtype: WireDtype | None = None,
) -> dict[str, Any]:
    """The rows as a standard OpenAI ``file`` content part (``file_data``: a data URL of a
    safetensors file), for clients and gateways that pass only OpenAI's part types through.

    The server recognises rows by the ``.safetensors`` filename or by the content, so a client
    rewriting the media type (LangChain: ``application/pdf``) does no harm. On /v1/responses,
    use ``responses_file_part``.
    """
    data = base64.b64encode(safetensors_bytes(embeddings, dtype=dtype)).decode()
    return {
        "type": "file",
        "file": {"file_data": f"data:{media_type};base64,{data}", "filename": filename},
    }


def file_id_part(file_id: str) -> dict[str, Any]:
    """A ``file`` part naming rows the server holds (an upload's id, or a part's uuid)."""
    return {"type": "file", "file": {"file_id": file_id}}


def responses_file_part(part: dict[str, Any]) -> dict[str, Any]:
    """A chat ``file`` part as the /v1/responses ``input_file`` part it corresponds to."""
    return {"type": "input_file", **part["file"]}


def _auth_headers(api_key: str | None) -> dict[str, str]:
    return {} if api_key is None else {"Authorization": f"Bearer {api_key}"}


def _raw_body(rows: Any) -> tuple[bytes, str, str | None]:
    """The upload body for ``rows``: raw bytes in their float dtype, or (float64, which raw
    does not take) a safetensors file; with its media type and raw dtype."""
    name = _own_float(rows)
    if name == "float64":
        return safetensors_bytes(rows, dtype="float64"), "application/safetensors", None
    return _raw_bytes(rows, name), "application/octet-stream", name  # type: ignore[arg-type]


def upload_rows(
    base_url: str, rows: Any, *, api_key: str | None = None, timeout: float = 600.0
) -> dict[str, Any]:
    """Upload ``rows`` (a 2-D NumPy array or torch tensor, sent in its float dtype) to the
    server's binary route ``POST /v1/prompt_embeds`` and return the part to put in a message:
    ``{"type": "prompt_embeds", "uuid": <id>}``.

    ``base_url`` is what the ``openai`` client takes (``http://host:port/v1``). No base64 and
    no JSON around the rows: the body is their bytes. The server keeps them by reference
    (``CHAT_EMBEDS_REFERENCE_BYTES``, per API server process), so a chat sent much later, or to
    another API server process, may get ``prompt_embeds_reference_unknown``: upload again (or
    let ``Conversation`` handle it). Raises ``UploadError`` on an error answer.
    """
    import urllib.error
    import urllib.parse
    import urllib.request

    shape = [int(d) for d in rows.shape]
    if len(shape) != 2:
        raise ValueError(f"rows must be 2-D (num_rows, hidden_size); got shape {shape}")
    body, media_type, dtype = _raw_body(rows)
    query = (
        ""
        if dtype is None
        else "?" + urllib.parse.urlencode({"dtype": dtype, "shape": f"{shape[0]},{shape[1]}"})
    )
    request = urllib.request.Request(
        base_url.rstrip("/") + "/prompt_embeds" + query,
        data=body,
        method="POST",
        headers={"Content-Type": media_type, **_auth_headers(api_key)},
    )
    return dict(_send(request, timeout)["part"])


def _send(request: Any, timeout: float) -> dict[str, Any]:
    """An upload request's JSON answer; ``UploadError`` on an error answer."""
    import json
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return dict(json.loads(response.read()))
    except urllib.error.HTTPError as exc:
        raise UploadError(exc.code, exc.read().decode(errors="replace")) from None


class UploadError(RuntimeError):
    """The server refused an upload; ``status`` and the error body say why."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"upload refused with HTTP {status}: {body}")
        self.status = status
        self.body = body


def upload_file(client: Any, rows: Any, *, purpose: str = "user_data") -> dict[str, Any]:
    """Upload ``rows`` through the Files API (``client.files.create``, an ``openai.OpenAI``
    client or anything with its ``files.create``) and return the ``file`` part naming them:
    ``{"type": "file", "file": {"file_id": <id>}}`` (its id also works as a prompt_embeds
    part's ``uuid``)."""
    created = client.files.create(file=(ROWS_FILENAME, safetensors_bytes(rows)), purpose=purpose)
    return file_id_part(created.id)


# -- parts by reference: send a part's data once, its uuid afterwards -----------------------------

# The markers of the server's "send the data again" answers (``errors.REFERENCE_UNKNOWN_CODE``
# and ``errors.REFERENCES_OFF_CODE``), repeated here so this module needs no vLLM.
REFERENCE_UNKNOWN_CODE: Final = "prompt_embeds_reference_unknown"
REFERENCES_OFF_CODE: Final = "prompt_embeds_references_off"


def is_reference_miss(error: object) -> bool:
    """Whether an error (an ``openai.BadRequestError``, a response text, ...) is the server
    saying it does not hold a part sent by uuid alone, so the request should be resent with
    its data."""
    return REFERENCE_UNKNOWN_CODE in str(error)


Shape = Literal["prompt_embeds", "file"]


class Conversation:
    """Sends each part's rows once, and only its ``uuid`` in later requests.

    Chat clients resend the whole history every turn; with this helper a large part sent in
    turn 1 costs a few bytes in every later turn. Keep the full parts (with ``data``) in your
    messages as usual and send them through ``send``: once a request carrying a part's data
    succeeded, later requests carry that part's ``uuid`` alone. If the server answers that it
    does not hold a uuid (evicted, restarted, another API server process), ``send`` resends
    that request once with every part's data. If the server keeps no references at all, the
    conversation sends data from then on. One conversation per client thread.

    ``part`` builds a part with a fresh random uuid; any part you build with a ``uuid`` and
    ``data`` works the same. Uuids must be unguessable: any client that knows one can use its
    rows on that server.

    ``base_url`` (as the ``openai`` client takes it, ``http://host:port/v1``) and ``api_key``
    let ``part`` upload rows larger than ``upload_above`` bytes (``UPLOAD_ABOVE_BYTES``, 1 MiB,
    by default; ``None``: never) through ``upload_rows`` instead: the message then holds the
    reference alone from the first turn, and the rows are sent inline only if the server
    answers it no longer holds them. ``shape="file"`` builds standard OpenAI ``file`` parts
    (``file_data`` / ``file_id``) instead of prompt_embeds parts, for clients and gateways that
    pass only OpenAI's part types through (docs/clients.md).
    """

    def __init__(
        self,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        upload_above: int | None = UPLOAD_ABOVE_BYTES,
        shape: Shape = "prompt_embeds",
    ) -> None:
        if shape not in ("prompt_embeds", "file"):
            raise ValueError(f"shape must be 'prompt_embeds' or 'file'; got {shape!r}")
        self.sent: set[str] = set()  # uuids whose data a successful request carried
        self.references = True  # False once the server said it keeps none
        self.resends = 0  # requests resent with data after a miss
        self.uploads = 0  # parts uploaded by ``part``
        self.base_url = base_url
        self.api_key = api_key
        self.upload_above = upload_above
        self.shape: Shape = shape
        self._uploaded: dict[str, Any] = {}  # uuid -> rows of a part sent by upload

    def part(
        self, embeddings: Any, *, encoding: Encoding = "raw", dtype: WireDtype | None = None
    ) -> dict[str, Any]:
        """A part holding ``embeddings`` under a fresh random uuid: uploaded first when they
        are big and the server is known (see the class), else with its data inline."""
        import uuid

        nbytes = int(embeddings.shape[0]) * int(embeddings.shape[1]) * _itemsize(embeddings)
        if self.base_url and self.upload_above is not None and nbytes > self.upload_above:
            reference = upload_rows(self.base_url, embeddings, api_key=self.api_key)["uuid"]
            self._uploaded[reference] = embeddings
            self.sent.add(reference)
            self.uploads += 1
            return self._reference(reference)
        name = uuid.uuid4().hex
        if self.shape == "file":
            # The server's id prefix: a file_id it does not hold is then a miss, not a file.
            part = file_part(embeddings, dtype=dtype)
            return {"type": "file", "file": {**part["file"], "file_id": ROWS_ID_PREFIX + name}}
        return {**prompt_embeds_part(embeddings, encoding=encoding, dtype=dtype), "uuid": name}

    def _reference(self, reference: str) -> dict[str, Any]:
        if self.shape == "file":
            return file_id_part(reference)
        return {"type": "prompt_embeds", "uuid": reference}

    def outgoing(self, messages: Any) -> Any:
        """``messages`` (chat messages or Responses ``input``) as this conversation sends them:
        parts whose data the server already got carry their uuid alone."""
        if not self.references:
            return self._with_data(messages)
        return _map_parts(messages, self._strip)

    def _strip(self, part: dict[str, Any]) -> dict[str, Any]:
        reference, has_data = _reference_of(part)
        if reference in self.sent and has_data:
            if part["type"] == "prompt_embeds":
                return {"type": part["type"], "uuid": reference}
            fields = {"file_id": reference}
            return (
                {"type": "file", "file": fields}
                if part["type"] == "file"
                else {"type": part["type"], **fields}
            )
        return part

    def _with_data(self, messages: Any) -> Any:
        """``messages`` with the rows of uploaded parts inline again (under their uuids)."""
        if not self._uploaded:
            return messages
        return _map_parts(messages, self._inline)

    def _inline(self, part: dict[str, Any]) -> dict[str, Any]:
        reference, has_data = _reference_of(part)
        rows = self._uploaded.get(reference) if reference is not None else None
        if rows is None or has_data:
            return part
        if part["type"] == "prompt_embeds":
            return {**prompt_embeds_part(rows), "uuid": reference}
        fields = {**file_part(rows)["file"], "file_id": reference}
        return (
            {"type": "file", "file": fields}
            if part["type"] == "file"
            else {"type": part["type"], **fields}
        )

    def record(self, messages: Any) -> None:
        """Note that a request carrying ``messages`` (with data) succeeded."""
        _map_parts(messages, self._note)

    def _note(self, part: dict[str, Any]) -> dict[str, Any]:
        reference, has_data = _reference_of(part)
        if isinstance(reference, str) and has_data:
            self.sent.add(reference)
        return part

    def send(self, create: Any, *, messages: Any = None, input: Any = None, **kwargs: Any) -> Any:
        """``create(messages=..., **kwargs)`` (or ``input=...`` for /v1/responses), e.g.
        ``conversation.send(client.chat.completions.create, model=m, messages=messages)``.

        ``create`` raises on an error answer, as the ``openai`` client does; a miss (see
        ``is_reference_miss``) is retried once with data, anything else propagates.
        """
        key, full = ("input", input) if messages is None else ("messages", messages)
        wire = self.outgoing(full)
        try:
            result = create(**{key: wire}, **kwargs)
        except Exception as exc:  # the client's own error type; only a miss is handled
            if not is_reference_miss(exc):
                raise
            if REFERENCES_OFF_CODE in str(exc):
                self.references = False
            full = self._with_data(full)
            if wire is full:
                raise
            self.resends += 1
            result = create(**{key: full}, **kwargs)
        self.record(full)
        return result


def _itemsize(value: Any) -> int:
    return int(getattr(value.dtype, "itemsize", None) or value.element_size())


_FILE_PART_TYPES: Final = ("file", "input_file")


def _reference_of(part: dict[str, Any]) -> tuple[Any, bool]:
    """A part's uuid (a file part's ``file_id``) and whether it carries its rows."""
    if part.get("type") == "prompt_embeds":
        return part.get("uuid"), part.get("data") is not None
    fields = part.get("file") if part.get("type") == "file" else part
    if not isinstance(fields, dict):
        return None, False
    return fields.get("file_id"), fields.get("file_data") is not None


def _map_parts(value: Any, change: Any) -> Any:
    """``value`` with ``change(part)`` in place of each prompt_embeds part (copies only what
    changes)."""
    if isinstance(value, dict):
        if value.get("type") == "prompt_embeds" or value.get("type") in _FILE_PART_TYPES:
            return change(value)
        changed = {k: _map_parts(v, change) for k, v in value.items()}
        return value if all(changed[k] is value[k] for k in value) else changed
    if isinstance(value, list):
        items = [_map_parts(v, change) for v in value]
        return value if all(a is b for a, b in zip(items, value, strict=True)) else items
    return value
