"""torch.distributed.checkpoint (DCP) storage that never runs code from a file.

Stock DCP reads ``.metadata`` with plain ``pickle.load``, every non-tensor entry of a
``.distcp`` file (optimizer hyperparameters...) with ``torch.load(weights_only=False)``
and tensors with ``torch.load(weights_only=True)``: a crafted checkpoint runs arbitrary
code on load. Here:

- ``.metadata``: ``_MetadataUnpickler`` resolves only the DCP metadata dataclasses,
  ``torch.Size``, dtypes, layouts and memory formats (what DCP writes); any other global
  is refused before it is built. Every storage entry must name a plain file inside the
  checkpoint directory and carry no stream transforms.
- non-tensor entries: ``SafeSavePlanner`` writes them as JSON (``fastrlhf.integrity``
  ``encode_state``) behind a magic prefix; ``SafeLoadPlanner`` reads that, and the
  pickled entries of checkpoints written before it with ``read_saved_plain``.
- tensor entries: ``read_saved_tensor`` (``fastrlhf.distributed.tensor_file``) decodes
  ``torch.save``'s archive without unpickling, checked against the metadata's dtype.

A failure while reading names the file it came from (``CheckpointError``).
"""

from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import filesystem as dcp_fs
from torch.distributed.checkpoint import metadata as dcp_md
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
    WriteItem,
    WriteItemType,
)
from torch.futures import Future

from fastrlhf.distributed.tensor_file import read_saved_plain, read_saved_tensor
from fastrlhf.errors import CheckpointError
from fastrlhf.integrity import decode_state, encode_state

JSON_MAGIC = b"FASTRLHF-JSON1\n"

_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch.distributed.checkpoint.metadata", n): getattr(dcp_md, n)
    for n in (
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "TensorProperties",
        "ChunkStorageMetadata",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    )
}
_ALLOWED_GLOBALS[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = dcp_fs._StorageInfo
_ALLOWED_GLOBALS[("torch", "Size")] = torch.Size
# a name -> layout lookup (torch.sparse_coo etc.), nothing else
_ALLOWED_GLOBALS[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
# StorageMeta.checkpoint_id: a path object built from a string, no I/O
_ALLOWED_GLOBALS[("pathlib", "PosixPath")] = PurePosixPath
_ALLOWED_GLOBALS[("pathlib", "PurePosixPath")] = PurePosixPath
_ALLOWED_GLOBALS[("collections", "OrderedDict")] = dict


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, where: Path):
        super().__init__(file)
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.memory_format):
            return getattr(torch, name)
        raise CheckpointError(
            f"{self.where}: refuses to load {module}.{name} (not DCP checkpoint metadata)"
        )


def load_metadata(path: Path) -> dcp_md.Metadata:
    """A DCP ``.metadata`` file through the allow-listing unpickler, then checked."""
    try:
        with open(path, "rb") as f:
            md = _MetadataUnpickler(f, path).load()
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except Exception as e:  # any malformed pickle stream: truncated, garbage, wrong types
        raise CheckpointError(f"{path}: not DCP metadata ({type(e).__name__}: {e})") from None
    if not isinstance(md, dcp_md.Metadata) or not isinstance(md.state_dict_metadata, dict):
        raise CheckpointError(f"{path}: not DCP metadata (got {type(md).__name__})")
    storage = md.storage_data
    if not isinstance(storage, dict):
        raise CheckpointError(f"{path}: no storage table")
    for index, info in storage.items():
        rel = getattr(info, "relative_path", None)
        if (
            not isinstance(info, dcp_fs._StorageInfo)
            or not isinstance(rel, str)
            or rel != PurePosixPath(rel).name  # a plain file name: no directory, no ".."
            or not rel.endswith(".distcp")  # data files only, never .metadata itself
            or not isinstance(info.offset, int)
            or not isinstance(info.length, int)
            or info.offset < 0
            or info.length < 0
            or info.transform_descriptors  # fastrlhf never writes stream transforms
        ):
            raise CheckpointError(f"{path}: bad storage entry for {index}")
    return md


class SafeFileSystemReader(FileSystemReader):
    """``FileSystemReader`` with the allow-listed metadata and file-naming errors."""

    def __init__(self, path: str | Path):
        super().__init__(str(path))
        self._dir = Path(path)
        self._current: Path | None = None
        # read (and checked) here, before DCP: a bad file then fails with its own error
        # instead of DCP's fallback to per-rank metadata files and its logged tracebacks
        self._metadata = load_metadata(self._dir / ".metadata")

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_md.Metadata:
        md = self._metadata
        if md.storage_meta is None:
            md.storage_meta = dcp_md.StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Every entry of ``plan``, read with ``read_saved_tensor`` / the planner's
        ``load_bytes``: no ``torch.load`` (DCP's own reader unpickles tensors)."""
        per_file: dict[str, list[ReadItem]] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(
                item
            )
        try:
            for rel, items in per_file.items():
                self._current = self._dir / rel
                with open(self._current, "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    for item in items:
                        self._read_item(f, size, item, planner)
        except CheckpointError as e:
            if str(e).startswith("entry "):  # from load_bytes, which cannot know the file
                raise CheckpointError(f"{self._current}: {e}") from None
            raise
        except OSError as e:
            raise CheckpointError(f"{self._current}: cannot read ({e.strerror or e})") from None
        fut: Future = Future()
        fut.set_result(None)
        return fut

    def _read_item(self, f, size: int, item: ReadItem, planner: LoadPlanner) -> None:
        info = self.storage_data[item.storage_index]
        fqn = item.storage_index.fqn
        end = info.offset + info.length
        if end > size:
            raise CheckpointError(
                f"{self._current}: entry {fqn} at bytes {info.offset}..{end} beyond the "
                f"file's {size} bytes (truncated)"
            )
        f.seek(info.offset)
        raw = f.read(info.length)
        if item.type == LoadItemType.BYTE_IO:
            planner.load_bytes(item, io.BytesIO(raw))
            return
        try:
            tensor = read_saved_tensor(raw)
        except (ValueError, RecursionError) as e:
            raise CheckpointError(f"{self._current}: entry {fqn}: {e}") from None
        entry = self._metadata.state_dict_metadata.get(fqn)
        expected = getattr(getattr(entry, "properties", None), "dtype", None)
        if tensor.dtype != expected:
            raise CheckpointError(
                f"{self._current}: entry {fqn} holds {tensor.dtype}, the metadata says {expected}"
            )
        tensor = narrow_tensor_by_index(tensor, item.storage_offsets, item.lengths)
        target = planner.resolve_tensor(item).detach()
        if target.size() != tensor.size():
            raise CheckpointError(
                f"{self._current}: entry {fqn} has shape {tuple(tensor.shape)}, expected "
                f"{tuple(target.shape)}"
            )
        target.copy_(tensor)
        planner.commit_tensor(item, target)


class SafeSavePlanner(DefaultSavePlanner):
    """Non-tensor entries as JSON instead of pickles."""

    def transform_object(self, write_item: WriteItem, object: Any):
        if write_item.type == WriteItemType.BYTE_IO:
            payload = json.dumps(encode_state(object)).encode("utf-8")
            return io.BytesIO(JSON_MAGIC + payload)
        return object


class SafeLoadPlanner(DefaultLoadPlanner):
    """Non-tensor entries from JSON (or, for older checkpoints, pickle-free decoding)."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        raw = value.getvalue()
        if raw.startswith(JSON_MAGIC):
            try:
                data = json.loads(raw[len(JSON_MAGIC) :].decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError) as e:
                raise CheckpointError(f"entry {fqn}: not JSON ({e})") from None
            obj = decode_state(data, f"entry {fqn}")
        else:
            # written by torch's own planner before this one existed: a torch.save'd
            # pickle, read without unpickling (plain data only)
            try:
                obj = read_saved_plain(raw)
            except (ValueError, RecursionError) as e:
                raise CheckpointError(f"entry {fqn}: {e}") from None
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj
