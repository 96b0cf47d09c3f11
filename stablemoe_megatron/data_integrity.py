"""Is a ``.bin`` / ``.idx`` pair well formed, and does the ``.bin`` hold exactly what the ``.idx`` says?

megatron-core's ``IndexedDataset`` trusts its files: a truncated ``.bin`` fails deep inside numpy
("mmap length is greater than file size"), an empty one with "cannot mmap an empty file", and an
``.idx`` paired with a LONGER ``.bin`` (another dataset's, say) trains on the wrong tokens
without a word. :func:`check_indexed_dataset` reads only the ``.idx`` (header and its arrays) and
the ``.bin``'s size, so it is cheap enough to run on every prefix before any work.

The ``.idx`` layout (megatron's ``MMIDIDX`` version 1): the 9-byte magic, version (<Q), dtype
code (<B), sequence count S (<Q), document count D (<Q), then int32 lengths [S], int64 byte
pointers [S], int64 document indices [D] (and int8 modes [S] for multimodal data). The ``.bin`` is
the concatenation of the sequences, so its size is ``pointers[-1] + lengths[-1] * itemsize``.
"""
from __future__ import annotations

import os
import struct

import numpy as np

from stablemoe_megatron.errors import ConfigError

MAGIC = b"MMIDIDX\x00\x00"
HEADER_BYTES = len(MAGIC) + 8 + 1 + 8 + 8
DTYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}  # megatron's DType codes -> bytes
REBUILD = "re-create it with tools/preprocess_data.py (or copy the .bin/.idx pair again, together)"


def _fail(flag: str, path: str, problem: str) -> ConfigError:
    return ConfigError(f"{flag} {path}: {problem}; {REBUILD}")


def _read_header(idx: str, flag: str):
    """(itemsize, sequences, documents) from the ``.idx`` header; ConfigError if it is not one."""
    with open(idx, "rb") as handle:
        raw = handle.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES or raw[:len(MAGIC)] != MAGIC:
        raise _fail(flag, idx, "is not a megatron .idx index file (bad or missing MMIDIDX header)")
    version, code, sequences, documents = struct.unpack("<QBQQ", raw[len(MAGIC):])
    if version != 1 or code not in DTYPE_SIZES:
        raise _fail(flag, idx, f"has an unknown index version {version} or token type code {code}")
    return DTYPE_SIZES[code], sequences, documents


def check_indexed_dataset(prefix: str, flag: str = "--data-path") -> int:
    """Check ``prefix``.idx / ``prefix``.bin; return the number of sequences (> 0) or raise ConfigError."""
    idx, bin_path = prefix + ".idx", prefix + ".bin"
    itemsize, sequences, documents = _read_header(idx, flag)
    arrays = 4 * sequences + 8 * sequences + 8 * documents
    idx_size = os.path.getsize(idx)
    if idx_size not in (HEADER_BYTES + arrays, HEADER_BYTES + arrays + sequences):
        raise _fail(flag, idx, f"is {idx_size} bytes but its header describes {HEADER_BYTES + arrays} "
                               f"({sequences} sequences, {documents} documents): the file is damaged")
    if sequences == 0:
        raise ConfigError(f"{flag} {prefix}: the dataset holds no documents ({idx}); check the input "
                          f"given to tools/preprocess_data.py")
    lengths = np.fromfile(idx, dtype=np.int32, count=sequences, offset=HEADER_BYTES)
    pointers = np.fromfile(idx, dtype=np.int64, count=sequences, offset=HEADER_BYTES + 4 * sequences)
    expected = int(pointers[-1]) + int(lengths[-1]) * itemsize
    contiguous = np.array_equal(pointers[1:], pointers[:-1] + lengths[:-1].astype(np.int64) * itemsize)
    if int(pointers[0]) != 0 or not contiguous or (lengths < 0).any():
        raise _fail(flag, idx, "has inconsistent sequence lengths and offsets: the file is damaged")
    actual = os.path.getsize(bin_path)
    if actual != expected:
        kind = "shorter" if actual < expected else "longer"
        raise _fail(flag, bin_path, f"is {actual} bytes but {idx} describes {expected} ({kind}: truncated, or "
                                    f"the .bin of another dataset)")
    return sequences
