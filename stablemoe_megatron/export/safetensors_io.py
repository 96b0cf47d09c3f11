"""A streaming safetensors writer and a zero-copy (mmap) reader, with no dependency beyond torch.

Format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length N, N
bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str:
str}}`` padded with spaces to a multiple of 8, then the tensors' bytes back to back (row-major,
little-endian), offsets relative to the end of the header.

Why our own code: the exporter writes a model tensor by tensor (the header is computed from the
checkpoint's metadata first), so at most one tensor is in memory, whereas ``safetensors.torch.
save_file`` needs every tensor at once. The reader maps the file (copy-on-write, so nothing is ever
written back) and returns views of it: loading a model and slicing one expert shard out of a large
file read only the pages touched. Files written here load with the official ``safetensors``
package too (the tests check it).
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from stablemoe_megatron.errors import ConfigError

DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
TORCH_DTYPES = {code: dtype for dtype, code in DTYPES.items()}


def _nbytes(shape: Iterable[int], dtype: torch.dtype) -> int:
    count = 1
    for size in shape:
        count *= int(size)
    return count * torch.empty((), dtype=dtype).element_size()


def storage_order(specs: List[Tuple[str, torch.dtype, Tuple[int, ...]]]) -> List[Tuple[str, torch.dtype, Tuple[int, ...]]]:
    """Specs re-ordered so every tensor starts aligned to its element size (widest dtypes first).

    Stable: tensors of one element size keep their given order (the exporter relies on it to
    write the q/k/v parts of one fused weight one after the other).
    """
    return sorted(specs, key=lambda spec: -torch.empty((), dtype=spec[1]).element_size())


class SafetensorsWriter:
    """Write tensors one at a time into ``path``; the layout is fixed up front by ``specs``.

    Args:
        path: the output file; written as ``path.tmp`` and renamed on :meth:`close`.
        specs: ``[(name, dtype, shape)]`` in the order :meth:`write` will be called (use
            :func:`storage_order`).
        metadata: string-to-string ``__metadata__``.
    """

    def __init__(self, path, specs, metadata: Optional[Dict[str, str]] = None):
        self.path = Path(path)
        self.specs = list(specs)
        header, offset = {}, 0
        for name, dtype, shape in self.specs:
            if dtype not in DTYPES:
                raise ValueError(f"{name}: dtype {dtype} cannot be stored in safetensors")
            if name in header:
                raise ValueError(f"tensor name {name!r} appears twice")
            size = _nbytes(shape, dtype)
            header[name] = {"dtype": DTYPES[dtype], "shape": [int(s) for s in shape],
                            "data_offsets": [offset, offset + size]}
            offset += size
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self._file = open(self._tmp, "wb")
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor`` (must be the next spec's name, dtype and shape)."""
        if self._next >= len(self.specs):
            raise ValueError(f"{name}: all {len(self.specs)} declared tensors were already written")
        want_name, want_dtype, want_shape = self.specs[self._next]
        if name != want_name or tensor.dtype != want_dtype or tuple(tensor.shape) != tuple(want_shape):
            raise ValueError(f"expected {want_name} {want_dtype} {tuple(want_shape)}, got {name} "
                             f"{tensor.dtype} {tuple(tensor.shape)}")
        data = tensor.detach().cpu().contiguous().reshape(-1)
        if data.numel():
            self._file.write(data.view(torch.uint8).numpy().data)
        self._next += 1

    def close(self) -> None:
        """Flush, check every declared tensor was written, and rename into place."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        if self._next != len(self.specs):
            self._tmp.unlink(missing_ok=True)
            raise ValueError(f"only {self._next} of {len(self.specs)} declared tensors were written")
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """Close and delete the partial file (after an error)."""
        if not self._file.closed:
            self._file.close()
        self._tmp.unlink(missing_ok=True)


class SafetensorsFile:
    """Read-only view of a safetensors file: names, shapes, dtypes and zero-copy tensors.

    ``get(name)`` returns a tensor backed by the mapped file (copy-on-write: writing to it never
    changes the file); ``get(name)[index]`` touches only the pages of that slice.
    """

    def __init__(self, path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as handle:
                self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except ValueError:  # an empty file cannot be mapped
            raise ConfigError(f"{path}: empty file, not a safetensors file") from None
        self._entries, self.metadata, self._data_start = self._parse_header()

    def _parse_header(self):
        size = len(self._map)
        if size < 8:
            raise ConfigError(f"{self.path}: too short to be a safetensors file")
        (length,) = struct.unpack("<Q", self._map[:8])
        if 8 + length > size:
            raise ConfigError(f"{self.path}: header length {length} exceeds the file size {size}")
        try:
            header = json.loads(bytes(self._map[8:8 + length]).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{self.path}: not a safetensors file ({exc})") from None
        metadata = header.pop("__metadata__", {}) or {}
        for name, entry in header.items():
            if entry.get("dtype") not in TORCH_DTYPES:
                raise ConfigError(f"{self.path}: tensor {name} has unsupported dtype {entry.get('dtype')}")
            begin, end = entry["data_offsets"]
            if end - begin != _nbytes(entry["shape"], TORCH_DTYPES[entry["dtype"]]) or 8 + length + end > size:
                raise ConfigError(f"{self.path}: tensor {name} has inconsistent offsets (truncated file?)")
        return header, metadata, 8 + length

    def keys(self) -> List[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return TORCH_DTYPES[self._entries[name]["dtype"]]

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name`` as a view of the mapped file."""
        if name not in self._entries:
            raise KeyError(f"{self.path}: no tensor named {name!r}")
        entry, dtype = self._entries[name], self.dtype(name)
        begin, end = entry["data_offsets"]
        if end == begin:
            return torch.empty(entry["shape"], dtype=dtype)
        count = (end - begin) // torch.empty((), dtype=dtype).element_size()
        flat = torch.frombuffer(self._map, dtype=dtype, count=count, offset=self._data_start + begin)
        return flat.view(entry["shape"])

    def tensors(self) -> Dict[str, torch.Tensor]:
        """Every tensor, as views of the mapped file (no copy)."""
        return {name: self.get(name) for name in self._entries}
