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


def embedding_rows(model_dir: str | Path, text: str) -> Any:
    """The rows of a local checkpoint's input-embedding table for ``text``'s tokens.

    A part holding these rows must give the same greedy answer as ``text`` sent as text: the
    quickest check that a setup works. Needs ``transformers`` and ``safetensors`` (one
    ``model.safetensors`` file); returns a NumPy array (a ``torch.Tensor`` for bfloat16 tables).
    """
    from safetensors import safe_open
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    ids = AutoTokenizer.from_pretrained(str(model_dir)).encode(text, add_special_tokens=False)
    path = str(model_dir / "model.safetensors")
    with safe_open(path, framework="np") as f:
        keys = list(f.keys())
    name = next((k for k in keys if k.endswith("embed_tokens.weight")), None)
    name = name or next(k for k in keys if k.endswith("lm_head.weight"))  # tied weights
    try:
        with safe_open(path, framework="np") as f:
            return f.get_slice(name)[:][ids]
    except (TypeError, ValueError):  # NumPy has no bfloat16
        with safe_open(path, framework="pt") as f:
            return f.get_tensor(name)[ids].clone()


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


class Conversation:
    """Sends each prompt_embeds part's data once, and only its ``uuid`` in later requests.

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
    """

    def __init__(self) -> None:
        self.sent: set[str] = set()  # uuids whose data a successful request carried
        self.references = True  # False once the server said it keeps none
        self.resends = 0  # requests resent with data after a miss

    @staticmethod
    def part(
        embeddings: Any, *, encoding: Encoding = "raw", dtype: WireDtype | None = None
    ) -> dict[str, Any]:
        """``prompt_embeds_part(...)`` with a fresh random ``uuid``."""
        import uuid

        return {
            **prompt_embeds_part(embeddings, encoding=encoding, dtype=dtype),
            "uuid": uuid.uuid4().hex,
        }

    def outgoing(self, messages: Any) -> Any:
        """``messages`` (chat messages or Responses ``input``) as this conversation sends them:
        parts whose data the server already got carry their uuid alone."""
        if not self.references:
            return messages
        return _map_parts(messages, self._strip)

    def _strip(self, part: dict[str, Any]) -> dict[str, Any]:
        if part.get("uuid") in self.sent and part.get("data") is not None:
            return {"type": part["type"], "uuid": part["uuid"]}
        return part

    def record(self, messages: Any) -> None:
        """Note that a request carrying ``messages`` (with data) succeeded."""
        _map_parts(messages, self._note)

    def _note(self, part: dict[str, Any]) -> dict[str, Any]:
        if isinstance(part.get("uuid"), str) and part.get("data") is not None:
            self.sent.add(part["uuid"])
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
            if wire is full or not is_reference_miss(exc):
                raise
            if REFERENCES_OFF_CODE in str(exc):
                self.references = False
            self.resends += 1
            result = create(**{key: full}, **kwargs)
        self.record(full)
        return result


def _map_parts(value: Any, change: Any) -> Any:
    """``value`` with ``change(part)`` in place of each prompt_embeds part (copies only what
    changes)."""
    if isinstance(value, dict):
        if value.get("type") == "prompt_embeds":
            return change(value)
        changed = {k: _map_parts(v, change) for k, v in value.items()}
        return value if all(changed[k] is value[k] for k in value) else changed
    if isinstance(value, list):
        items = [_map_parts(v, change) for v in value]
        return value if all(a is b for a, b in zip(items, value, strict=True)) else items
    return value
