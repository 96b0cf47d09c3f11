"""Read a torch_dist checkpoint in ONE process, one tensor at a time, without building the model.

megatron's torch_dist format is torch.distributed.checkpoint (DCP) underneath: ``.metadata``
lists every stored tensor under its global key with its global shape and dtype, and the shards
written by every rank lie in ``__R_I.distcp`` files. DCP can load a whole global tensor into a
plain tensor with no process group (``no_dist=True``), reading only that tensor's byte ranges, so
a checkpoint of any size and layout is read with one tensor in memory at a time.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from stablemoe_megatron.checkpoint import (
    CONFIG_FILE,
    DCP_METADATA,
    MEGATRON_METADATA,
    read_train_state,
    resolve_load_dir,
)
from stablemoe_megatron.errors import ConfigError
from stablemoe_megatron.export import names


@dataclass
class TensorInfo:
    shape: Tuple[int, ...]
    dtype: torch.dtype


class TorchDistCheckpoint:
    """One iteration of a run: its RunConfig, TrainState and the stored tensors.

    Args:
        path: a run directory (the tracker names the iteration) or one ``iter_*`` directory.
    """

    def __init__(self, path):
        from stablemoe_megatron.cli_args import config_from_yaml_text

        if not Path(path).is_dir():
            raise ConfigError(f"{path}: no such checkpoint directory")
        self.directory = resolve_load_dir(path)
        for needed in (CONFIG_FILE, DCP_METADATA, MEGATRON_METADATA):
            if not (self.directory / needed).is_file():
                raise ConfigError(f"{self.directory}: no {needed}; not a complete torch_dist checkpoint "
                                  f"of this project")
        self.config = config_from_yaml_text((self.directory / CONFIG_FILE).read_text())
        self.state = read_train_state(self.directory)
        self._metadata = self._read_metadata()
        self._tensors = self._stored_tensors()

    def _read_metadata(self):
        from torch.distributed.checkpoint import FileSystemReader

        try:
            return FileSystemReader(str(self.directory)).read_metadata()
        except Exception as exc:  # noqa: BLE001 - a corrupt file is a user-facing problem
            raise ConfigError(f"{self.directory}/.metadata: cannot be read ({exc})") from None

    # -- what is stored ---------------------------------------------------------------------------
    def stored_tensors(self) -> Dict[str, TensorInfo]:
        """{key: TensorInfo} of every stored tensor (model, optimizer state ...)."""
        return dict(self._tensors)

    def _stored_tensors(self) -> Dict[str, TensorInfo]:
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        return {key: TensorInfo(tuple(meta.size), meta.properties.dtype)
                for key, meta in self._metadata.state_dict_metadata.items()
                if isinstance(meta, TensorStorageMetadata)}

    def model_tensors(self) -> Dict[str, TensorInfo]:
        """{megatron key: TensorInfo} of the model's tensors, in the checkpoint's order."""
        return {key: info for key, info in self._tensors.items() if names.is_model_key(key)}

    def has_optimizer_state(self) -> bool:
        return any(not names.is_model_key(k) and "optimizer" in k for k in self._tensors)

    def iterations(self) -> List[int]:
        """Every complete iteration saved in the run directory of this checkpoint."""
        root = self.directory.parent
        found = [int(p.name[5:]) for p in root.glob("iter_*") if p.name[5:].isdigit() and (p / DCP_METADATA).is_file()]
        return sorted(found)

    # -- reading ------------------------------------------------------------------------------
    def read(self, key: str) -> torch.Tensor:
        """The whole global tensor ``key`` (one DCP read, no process group)."""
        from torch.distributed.checkpoint import FileSystemReader, load

        info = self._tensors.get(key)
        if info is None:
            raise ConfigError(f"{self.directory}: no tensor {key!r}")
        tensor = torch.empty(info.shape, dtype=info.dtype)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
            load({key: tensor}, storage_reader=FileSystemReader(str(self.directory)), no_dist=True)
        return tensor

    def tokenizer_vocab_size(self) -> Optional[int]:
        """The tokenizer's vocabulary size recorded at save time (None in older checkpoints)."""
        return getattr(self.state, "tokenizer_vocab_size", None) or None

