"""Read what ``torch.save`` wrote (one tensor, or plain data) without unpickling anything.

``torch.save(tensor)`` writes a zip: ``<name>/data.pkl`` (a pickle that calls
``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)``)
and ``<name>/data/<key>`` (the storage's raw bytes). DCP stores every tensor entry of a
``.distcp`` file that way. ``read_saved_tensor`` walks the pickle's opcodes with
``pickletools.genops`` (a disassembler: nothing is imported, called or built) through a
small stack machine that records globals and calls as plain tuples, checks that the
result is exactly that one rebuild call on a storage of a known dtype, and builds the
tensor from the raw bytes itself, bounds-checked. Anything else is refused.
"""

from __future__ import annotations

import io
import pickletools
import zipfile

import torch

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
}
_MARK = object()


class _Global(tuple):
    """("module", "name") of a GLOBAL opcode: recorded, never imported."""


class _Call(tuple):
    """(callable, args) of a REDUCE opcode: recorded, never called."""


class _PersId(tuple):
    """(pid,) of a BINPERSID opcode."""


def _pop_mark(stack: list) -> list:
    for i in range(len(stack) - 1, -1, -1):
        if stack[i] is _MARK:
            items = stack[i + 1 :]
            del stack[i:]
            return items
    raise ValueError("MARK missing")


def _interpret(data: bytes):
    """The object ``data`` would build, with every global/call/persistent id recorded
    as a tuple instead of executed."""
    stack: list = []
    memo: dict = {}
    for op, arg, _ in pickletools.genops(data):
        name = op.name
        if name in ("PROTO", "FRAME"):
            continue
        if name == "STOP":
            if len(stack) != 1:
                raise ValueError("stack not empty at STOP")
            return stack[0]
        if name == "GLOBAL":
            module, _, attr = str(arg).partition(" ")
            stack.append(_Global((module, attr)))
        elif name == "STACK_GLOBAL":
            attr, module = stack.pop(), stack.pop()
            stack.append(_Global((module, attr)))
        elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[arg] = stack[-1]
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1]
        elif name in ("BINGET", "LONG_BINGET", "GET"):
            stack.append(memo[arg])
        elif name == "MARK":
            stack.append(_MARK)
        elif name == "TUPLE":
            stack.append(tuple(_pop_mark(stack)))
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            n = int(name[-1])
            items = stack[-n:]
            del stack[-n:]
            stack.append(tuple(items))
        elif name == "EMPTY_TUPLE":
            stack.append(())
        elif name == "EMPTY_DICT":
            stack.append({})
        elif name == "EMPTY_LIST":
            stack.append([])
        elif name == "APPEND":
            value = stack.pop()
            stack[-1].append(value)
        elif name == "APPENDS":
            items = _pop_mark(stack)
            stack[-1].extend(items)
        elif name == "SETITEM":
            value, key = stack.pop(), stack.pop()
            stack[-1][key] = value
        elif name == "SETITEMS":
            items = _pop_mark(stack)
            stack[-1].update(zip(items[::2], items[1::2]))
        elif name == "BINFLOAT":
            stack.append(float(arg))
        elif name == "NONE":
            stack.append(None)
        elif name in ("NEWFALSE", "NEWTRUE"):
            stack.append(name == "NEWTRUE")
        elif name in ("BININT", "BININT1", "BININT2", "LONG1", "INT", "LONG"):
            stack.append(int(arg))
        elif name in ("BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "UNICODE"):
            stack.append(str(arg))
        elif name == "BINPERSID":
            stack.append(_PersId((stack.pop(),)))
        elif name == "REDUCE":
            args = stack.pop()
            stack.append(_Call((stack.pop(), args)))
        else:
            raise ValueError(f"opcode {name} is not part of a saved tensor")
    raise ValueError("no STOP opcode")


def _ints(value, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise ValueError(f"{what} is not a tuple of non-negative ints")
    return value


def _open(raw: bytes) -> tuple[zipfile.ZipFile, str]:
    try:
        archive = zipfile.ZipFile(io.BytesIO(raw))
    except zipfile.BadZipFile as e:
        raise ValueError(f"not a torch.save archive ({e})") from None
    pkls = [n for n in archive.namelist() if n.endswith("/data.pkl")]
    if len(pkls) != 1:
        raise ValueError("not a torch.save archive (no single data.pkl)")
    for info in archive.infolist():
        if info.compress_type != zipfile.ZIP_STORED:  # torch never compresses; no bombs
            raise ValueError(f"compressed member {info.filename}")
    return archive, pkls[0][: -len("data.pkl")]


def _is_rebuild(obj) -> bool:
    return isinstance(obj, _Call) and obj[0] == ("torch._utils", "_rebuild_tensor_v2")


def _convert(obj, build):
    """``obj`` with every tensor rebuild replaced by ``build(args)``; ValueError for any
    other global, call or storage reference."""
    if _is_rebuild(obj):
        return build(obj[1])
    if obj == _Call((("collections", "OrderedDict"), ())):
        return {}
    if isinstance(obj, (_Global, _Call, _PersId)):
        raise ValueError(f"refers to code: {tuple(obj)!r:.120}")
    if isinstance(obj, list):
        return [_convert(v, build) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_convert(v, build) for v in obj)
    if isinstance(obj, dict):
        return {_convert(k, build): _convert(v, build) for k, v in obj.items()}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise ValueError(f"unexpected {type(obj).__name__}")


def read_saved(raw: bytes, *, tensors: bool = True):
    """What ``torch.save`` stored in ``raw``: plain data (numbers, strings, None, lists,
    tuples, dicts) and, with ``tensors``, CPU tensors; ValueError for anything else."""
    archive, prefix = _open(raw)
    names = set(archive.namelist())
    if prefix + "byteorder" in names and archive.read(prefix + "byteorder") != b"little":
        raise ValueError("big-endian tensor data")
    try:
        obj = _interpret(archive.read(prefix + "data.pkl"))
    except (IndexError, KeyError, TypeError, AttributeError) as e:  # a malformed stream
        raise ValueError(f"malformed pickle stream ({type(e).__name__})") from None

    def build(args) -> torch.Tensor:
        if not tensors:
            raise ValueError("a tensor where plain data was expected")
        return _build_tensor(archive, prefix, names, args)

    try:
        return _convert(obj, build)
    except TypeError as e:  # e.g. an unhashable dict key
        raise ValueError(f"malformed data ({e})") from None


def read_saved_plain(raw: bytes):
    """A ``torch.save``d plain value (what older DCP checkpoints hold as optimizer
    hyperparameters); ValueError otherwise."""
    return read_saved(raw, tensors=False)


def read_saved_tensor(raw: bytes) -> torch.Tensor:
    """The one tensor in ``raw`` (``torch.save`` bytes); ValueError for anything else."""
    out = read_saved(raw)
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"holds a {type(out).__name__}, not a tensor")
    return out


def _build_tensor(archive: zipfile.ZipFile, prefix: str, names: set, args) -> torch.Tensor:
    if not isinstance(args, tuple) or len(args) not in (6, 7):
        raise ValueError("unexpected rebuild arguments")
    pers, offset, size, stride, _requires_grad, hooks = args[:6]
    if hooks != _Call((("collections", "OrderedDict"), ())) or (len(args) == 7 and args[6]):
        raise ValueError("tensor with hooks or metadata")
    if not (isinstance(pers, _PersId) and isinstance(pers[0], tuple) and len(pers[0]) == 5):
        raise ValueError("unexpected storage reference")
    kind, storage_type, key, _location, numel = pers[0]
    dtype = None
    if isinstance(storage_type, _Global) and storage_type[0] == "torch":
        dtype = _STORAGE_DTYPES.get(storage_type[1])
    if kind != "storage" or dtype is None or not isinstance(key, str) or "/" in key:
        raise ValueError(f"unsupported storage {storage_type!r}")
    if not isinstance(offset, int) or offset < 0 or not isinstance(numel, int) or numel < 0:
        raise ValueError("bad storage offset or size")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if len(size) != len(stride):
        raise ValueError("size and stride differ in length")
    member = prefix + "data/" + key
    if member not in names:
        raise ValueError(f"storage {key} missing")
    data = archive.read(member)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(data) != numel * itemsize:
        raise ValueError(f"storage is {len(data)} bytes, expected {numel} x {itemsize}")
    if any(s == 0 for s in size):
        return torch.empty(size, dtype=dtype)
    last = offset + sum((s - 1) * st for s, st in zip(size, stride))
    if last >= numel:
        raise ValueError("tensor reaches past its storage")
    flat = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype)
    return flat.as_strided(size, stride, offset).clone()
