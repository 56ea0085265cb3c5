"""``prompt_is_token_ids`` as runs of embedding positions (extends ``vllm/v1/request.py``).

Why: vLLM keeps the mask as a Python list, 8 bytes per prompt position, for the life of every
request in the engine core and again in each worker. A chat with a few embedding spans needs
two integers per span. ``RunMask`` stores just those and behaves as the sequence of booleans
vLLM's code reads: ``len``, iteration, indexing, and NumPy conversion (the input batch copies
the mask into its own array with one NumPy assignment).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, overload

import numpy as np


class RunMask(Sequence[bool]):
    """True at token positions, False inside the ``[start, stop)`` embedding spans."""

    __slots__ = ("_length", "_spans")

    def __init__(self, length: int, spans: np.ndarray) -> None:
        self._length = int(length)
        self._spans = np.ascontiguousarray(spans, dtype=np.int64).reshape(-1, 2)

    @classmethod
    def from_mask(cls, mask: Any) -> RunMask:
        is_embed = ~np.asarray(mask, dtype=bool)
        padded = np.concatenate(([False], is_embed, [False])).astype(np.int8)
        edges = np.flatnonzero(np.diff(padded))  # alternating starts and stops
        return cls(is_embed.size, edges.reshape(-1, 2))

    @property
    def spans(self) -> list[tuple[int, int]]:
        return [(int(a), int(b)) for a, b in self._spans]

    @property
    def nbytes(self) -> int:
        return int(self._spans.nbytes)

    def dense(self) -> np.ndarray:
        out = np.ones(self._length, dtype=bool)
        for start, stop in self._spans:
            out[start:stop] = False
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self.dense()
        return out if dtype is None else out.astype(dtype, copy=False)

    def tolist(self) -> list[bool]:
        return self.dense().tolist()  # type: ignore[no-any-return]

    def __len__(self) -> int:
        return self._length

    @overload
    def __getitem__(self, index: int) -> bool: ...
    @overload
    def __getitem__(self, index: slice) -> list[bool]: ...
    def __getitem__(self, index: int | slice) -> bool | list[bool]:
        if isinstance(index, slice):
            return self.dense()[index].tolist()  # type: ignore[no-any-return]
        position = range(self._length)[index]  # normalises negatives, raises IndexError
        inside = (self._spans[:, 0] <= position) & (position < self._spans[:, 1])
        return not bool(inside.any())

    def __iter__(self) -> Iterator[bool]:
        return iter(self.tolist())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, RunMask):
            return self._length == other._length and np.array_equal(self._spans, other._spans)
        if isinstance(other, Sequence):
            return self.tolist() == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self) -> tuple[Any, ...]:
        return (RunMask, (self._length, self._spans))

    def __repr__(self) -> str:
        return f"RunMask(length={self._length}, embedding_spans={self.spans})"
