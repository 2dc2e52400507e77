"""torch.distributed.checkpoint (DCP) storage that never runs code from a file.

Stock DCP reads ``.metadata`` with plain ``pickle.load`` and every non-tensor entry of a
``.distcp`` file (optimizer hyperparameters...) with ``torch.load(weights_only=False)``:
a crafted checkpoint runs arbitrary code on load. Here:

- ``.metadata``: ``_MetadataUnpickler`` resolves only the DCP metadata dataclasses,
  ``torch.Size``, dtypes, layouts and memory formats (what DCP writes); any other global
  is refused before it is built. Every storage entry must name a plain file inside the
  checkpoint directory and carry no stream transforms.
- non-tensor entries: ``SafeSavePlanner`` writes them as JSON (``fastrlhf.integrity``
  ``encode_state``) behind a magic prefix; ``SafeLoadPlanner`` reads that, and reads the
  pickled entries of checkpoints written before it with ``torch.load(weights_only=True)``.
- tensor entries: DCP's own ``torch.load(weights_only=True)`` (torch's allow-list).

A failure while reading names the file it came from (``CheckpointError``).
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import filesystem as dcp_fs
from torch.distributed.checkpoint import metadata as dcp_md
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.planner import ReadItem, WriteItem, WriteItemType

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

    def _slice_file(self, file, sinfo):
        # called once per entry, right before it is read: remember which file it is in
        self._current = self._dir / sinfo.relative_path
        size = Path(self._current).stat().st_size
        if sinfo.offset + sinfo.length > size:
            raise CheckpointError(
                f"{self._current}: entry at bytes {sinfo.offset}..{sinfo.offset + sinfo.length}"
                f" beyond the file's {size} bytes (truncated)"
            )
        return super()._slice_file(file, sinfo)

    def read_data(self, plan, planner):
        try:
            return super().read_data(plan, planner)
        except CheckpointError as e:
            if str(e).startswith("entry "):  # from load_bytes, which cannot know the file
                raise CheckpointError(f"{self._current}: {e}") from None
            raise
        except FileNotFoundError as e:
            raise CheckpointError(f"{e.filename}: missing") from None
        except Exception as e:
            where = self._current or self._dir
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise CheckpointError(
                f"{where}: cannot read a checkpoint entry ({type(e).__name__}: {first[:200]})"
            ) from None


class SafeSavePlanner(DefaultSavePlanner):
    """Non-tensor entries as JSON instead of pickles."""

    def transform_object(self, write_item: WriteItem, object: Any):
        if write_item.type == WriteItemType.BYTE_IO:
            payload = json.dumps(encode_state(object)).encode("utf-8")
            return io.BytesIO(JSON_MAGIC + payload)
        return object


class SafeLoadPlanner(DefaultLoadPlanner):
    """Non-tensor entries from JSON (or, for older checkpoints, torch's weights_only)."""

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
            # written by torch's own planner before this one existed: a pickle, read by
            # torch's allow-listing unpickler (plain data only)
            obj = torch.load(io.BytesIO(raw), weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj
