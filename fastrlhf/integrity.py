"""Checkpoint integrity and pickle-free state files.

Manifest: ``MANIFEST.json`` in a checkpoint directory lists every other file (relative
path, size in bytes, xxh3-128 digest). It is written last, just before the directory is
published, and ``verify_manifest`` checks it before anything in the directory is
deserialized: a missing, extra, resized or changed file is an error naming that file.
xxh3 (the ``xxhash`` package) hashes at memory speed, so verifying costs one read of the
checkpoint; it detects corruption and truncation, not a forger who rewrites the manifest
too (the loaders themselves never run code from a file: see ``encode_state``).

State files: ``encode_state`` / ``decode_state`` turn nested dicts, lists, tuples,
numbers, strings, None and tensors into JSON (tensors as dtype + shape + base64 bytes),
bit-exact both ways. Decoding builds only those types, so a file cannot smuggle in an
object: there is no unpickling anywhere on this path.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import torch

from fastrlhf.errors import CheckpointError

MANIFEST = "MANIFEST.json"
MANIFEST_FORMAT = "fastrlhf-manifest"
_HASH = "xxh3_128"
_CHUNK = 16 << 20


# ---------------------------------------------------------------------------------------
# manifest


def file_digest(path: Path) -> str:
    import xxhash

    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _tree_files(root: Path) -> list[str]:
    out = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def write_manifest(root: str | Path) -> Path:
    """List every file under ``root`` (size + digest) in ``root/MANIFEST.json``."""
    root = Path(root)
    files = {
        rel: {"size": (root / rel).stat().st_size, _HASH: file_digest(root / rel)}
        for rel in _tree_files(root)
    }
    body = {"format": MANIFEST_FORMAT, "version": 1, "hash": _HASH, "files": files}
    path = root / MANIFEST
    path.write_text(json.dumps(body, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return path


def has_manifest(root: str | Path) -> bool:
    return (Path(root) / MANIFEST).is_file()


def read_manifest(root: str | Path) -> dict[str, dict]:
    """The manifest's file table, checked for shape (no digest is verified here)."""
    path = Path(root) / MANIFEST
    try:
        body = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: not a JSON manifest ({e})") from None
    files = body.get("files") if isinstance(body, dict) else None
    if (
        not isinstance(body, dict)
        or body.get("format") != MANIFEST_FORMAT
        or body.get("hash") != _HASH
        or not isinstance(files, dict)
    ):
        raise CheckpointError(f"{path}: not a {MANIFEST_FORMAT} with {_HASH} digests")
    for rel, entry in files.items():
        parts = Path(rel).parts
        if (
            not isinstance(rel, str)
            or Path(rel).is_absolute()
            or ".." in parts
            or not parts
            or not isinstance(entry, dict)
            or not isinstance(entry.get("size"), int)
            or not isinstance(entry.get(_HASH), str)
        ):
            raise CheckpointError(f"{path}: malformed entry {rel!r}")
    return files


def verify_manifest(root: str | Path) -> None:
    """Raise ``CheckpointError`` naming the first file that is missing, unlisted, or
    whose size or digest differs from ``root/MANIFEST.json``."""
    root = Path(root)
    files = read_manifest(root)
    present = _tree_files(root)
    for rel in present:
        if rel not in files:
            raise CheckpointError(f"{root / rel}: not listed in {MANIFEST} (added after saving)")
    for rel, entry in sorted(files.items()):
        path = root / rel
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (listed in {MANIFEST})")
        size = path.stat().st_size
        if size != entry["size"]:
            raise CheckpointError(
                f"{path}: size {size} bytes, {MANIFEST} says {entry['size']} (truncated or "
                "overwritten)"
            )
        if file_digest(path) != entry[_HASH]:
            raise CheckpointError(f"{path}: contents differ from {MANIFEST} (corrupted)")


# ---------------------------------------------------------------------------------------
# pickle-free state: JSON with tagged tuples, non-string-keyed dicts and tensors

_TAGS = ("__tuple__", "__items__", "__tensor__")
_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
        torch.complex64,
        torch.complex128,
    )
}


def encode_state(obj: Any) -> Any:
    """``obj`` as JSON-ready data (see the module docstring); TypeError on other types."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        name = str(t.dtype).removeprefix("torch.")
        if name not in _DTYPES:
            raise TypeError(f"encode_state: unsupported tensor dtype {t.dtype}")
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        data = base64.b64encode(raw).decode("ascii")
        return {"__tensor__": {"dtype": name, "shape": list(t.shape), "data": data}}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_state(v) for v in obj]}
    if isinstance(obj, list):
        return [encode_state(v) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not any(k in _TAGS for k in obj):
            return {k: encode_state(v) for k, v in obj.items()}
        return {"__items__": [[encode_state(k), encode_state(v)] for k, v in obj.items()]}
    if hasattr(obj, "item") and hasattr(obj, "dtype"):  # numpy scalars
        return encode_state(obj.item())
    raise TypeError(f"encode_state: cannot store a {type(obj).__name__} (not plain data)")


# Deeper than any state this project writes (an optimizer state is about 5 levels). An
# explicit bound, not Python's recursion limit, which torch.compile raises at run time.
MAX_STATE_DEPTH = 64


def decode_state(data: Any, where: str = "state", depth: int = 0) -> Any:
    """Inverse of ``encode_state``; ``CheckpointError`` naming ``where`` on bad input."""
    if data is None or isinstance(data, (bool, int, float, str)):
        return data
    if depth >= MAX_STATE_DEPTH:
        raise CheckpointError(f"{where}: state nested too deeply (over {MAX_STATE_DEPTH} levels)")
    d = depth + 1
    if isinstance(data, list):
        return [decode_state(v, where, d) for v in data]
    if not isinstance(data, dict):
        raise CheckpointError(f"{where}: unexpected {type(data).__name__} in state")
    if len(data) == 1 and next(iter(data)) in _TAGS:
        tag, value = next(iter(data.items()))
        if tag == "__tuple__" and isinstance(value, list):
            return tuple(decode_state(v, where, d) for v in value)
        if tag == "__items__" and isinstance(value, list):
            if not all(isinstance(kv, list) and len(kv) == 2 for kv in value):
                raise CheckpointError(f"{where}: malformed __items__ entry")
            return {
                _key(decode_state(k, where, d), where): decode_state(v, where, d) for k, v in value
            }
        if tag == "__tensor__" and isinstance(value, dict):
            return _decode_tensor(value, where)
        raise CheckpointError(f"{where}: malformed {tag} entry")
    return {k: decode_state(v, where, d) for k, v in data.items()}


def _key(k: Any, where: str) -> Any:
    if isinstance(k, (list, dict)):  # unhashable: never written by encode_state
        raise CheckpointError(f"{where}: unhashable dict key {k!r}")
    return k


def _decode_tensor(spec: dict, where: str) -> torch.Tensor:
    dtype = _DTYPES.get(spec.get("dtype"))  # type: ignore[arg-type]
    shape = spec.get("shape")
    if (
        dtype is None
        or not isinstance(shape, list)
        or not all(isinstance(s, int) and s >= 0 for s in shape)
    ):
        raise CheckpointError(f"{where}: malformed tensor entry (dtype/shape)")
    try:
        raw = base64.b64decode(spec.get("data", ""), validate=True)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{where}: malformed tensor data ({e})") from None
    numel = 1
    for s in shape:
        numel *= s
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(raw) != numel * itemsize:
        raise CheckpointError(
            f"{where}: tensor data is {len(raw)} bytes, shape {shape} {spec['dtype']} needs "
            f"{numel * itemsize}"
        )
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape)


def save_state_json(state: Any, path: str | Path) -> None:
    Path(path).write_text(json.dumps(encode_state(state)) + "\n", encoding="utf-8")


def load_state_json(path: str | Path) -> Any:
    """A ``save_state_json`` file; ``CheckpointError`` naming it when unreadable."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
        data = json.loads(text)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: not a JSON state file ({e})") from None
    try:
        return decode_state(data, str(path))
    except RecursionError:
        raise CheckpointError(f"{path}: state nested too deeply") from None
