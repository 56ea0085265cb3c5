"""Where a ``torch.save`` archive keeps a tensor's bytes, so the tensor can be viewed in place.

Why: a ``torch`` payload (the RFC's default encoding) is a zip archive whose storage records
are stored uncompressed, each at an offset aligned for its dtype. ``payload.py`` decodes a big
payload straight into a shared-memory segment and lets ``torch.load`` read the archive from
there (mapped: it checks the pickle, weights only, and yields dtype, shape and strides without
copying anything). The rows the engine receives must lie in the segment's own mapping, not in
``torch.load``'s private one, so this finds the record's offset in the file, and the caller
views the rows there. Anything unusual (several storages, a compressed or misplaced record, a
big-endian archive) gets None, and the caller keeps ``torch.load``'s tensor (then copied).
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path
from typing import Final

import torch

# A zip local file header: its signature, and the fixed part before the name and extra field.
_LOCAL_HEADER: Final = b"PK\x03\x04"
_LOCAL_HEADER_BYTES: Final = 30


def storage_offset(path: Path, tensor: torch.Tensor) -> int | None:
    """The byte offset in the archive at ``path`` of ``tensor``'s first element, when its one
    storage record holds exactly the storage ``torch.load`` mapped; else None."""
    try:
        with zipfile.ZipFile(path) as archive, path.open("rb") as file:
            records = [i for i in archive.infolist() if "/data/" in i.filename]
            byteorder = [i for i in archive.infolist() if i.filename.endswith("/byteorder")]
            if len(records) != 1 or len(byteorder) != 1:
                return None
            if archive.read(byteorder[0]) != b"little":
                return None
            (record,) = records
            if record.compress_type != zipfile.ZIP_STORED:
                return None
            if record.file_size != tensor.untyped_storage().nbytes():
                return None
            file.seek(record.header_offset)
            header = file.read(_LOCAL_HEADER_BYTES)
    except (OSError, zipfile.BadZipFile, KeyError, ValueError):
        return None
    if len(header) != _LOCAL_HEADER_BYTES or not header.startswith(_LOCAL_HEADER):
        return None
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    start = record.header_offset + _LOCAL_HEADER_BYTES + name_len + extra_len
    offset = start + tensor.storage_offset() * tensor.element_size()
    if offset % tensor.element_size():
        return None
    if start + record.file_size > path.stat().st_size:
        return None
    return offset
