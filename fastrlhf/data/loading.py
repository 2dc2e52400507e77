"""``load_records``: rows of a dataset as plain dicts, each tagged with where it came from.

Sources:
- ``*.jsonl``             one JSON object per line (blank lines skipped)
- ``*.json``              a JSON array of objects (or {split: [objects]})
- ``*.parquet``           rows of the table
- a directory             a ``datasets`` ``save_to_disk`` folder (Dataset or DatasetDict),
                          or a folder holding ``<split>.jsonl`` / ``<split>.parquet``
- ``embedded:<kind>``     records of the built-in ``ArithmeticTask``: kind is ``sft``,
                          ``preference`` or ``rl``; options ``?n=2000&seed=0&max_operand=20``
                          (the "test" split uses another seed, so it differs from "train")
- anything else           a hub dataset id through ``datasets.load_dataset`` (needs network)

Every record gets ``record[LOC_KEY] = "path:line"`` (or "path:row N") so malformed
rows can be reported precisely. Unparseable JSON lines are reported the same way,
then skipped or raised according to ``on_malformed``. A source that cannot be read (no
such file, unsupported type, no record at all, an offline hub id) is a one-line
``DataError`` naming it.

``train_eval_records``: the train and eval rows of a source; a single file has no
splits, so its eval rows are held out (seeded) and never trained on.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from urllib.parse import parse_qsl

from fastrlhf.errors import DataError

logger = logging.getLogger("fastrlhf.data")

LOC_KEY = "_loc"
# with keep_malformed=True an unparseable line comes back as {LOC_KEY: ..., MALFORMED_KEY:
# reason}, so the tokenizers count and report it with the other bad rows
MALFORMED_KEY = "_malformed"


class MalformedRecordError(DataError, ValueError):
    """A malformed record met with ``on_malformed="error"``; the message says where."""


def load_records(
    source: str, split: str = "train", *, on_malformed: str = "error", keep_malformed: bool = False
) -> list[dict]:
    """All records of ``source`` (see the module docstring) as dicts. ``keep_malformed``:
    unparseable JSONL lines (skipped with on_malformed="skip") are returned as
    ``{LOC_KEY: where, MALFORMED_KEY: reason}`` instead of logged here."""
    if on_malformed not in ("skip", "error"):
        raise ValueError(f"on_malformed must be 'skip' or 'error', got {on_malformed!r}")
    source = str(source)
    if source.startswith("embedded:"):
        return _embedded(source, split)
    path = Path(source).expanduser()
    if path.is_dir():
        return _directory(path, split, on_malformed, keep_malformed)
    readers = {
        ".jsonl": lambda: _jsonl(path, on_malformed, keep_malformed),
        ".json": lambda: _json(path, split),
    }
    readers[".parquet"] = lambda: _parquet(path)
    if path.is_file() and path.suffix not in readers:
        raise DataError(
            f"data.source={path}: unsupported file type {path.suffix or '(none)'!r} "
            "(expected .jsonl, .json or .parquet)"
        )
    if path.suffix in readers or source.startswith((".", "/", "~")):
        if not path.is_file():
            raise DataError(f"data.source={path}: no such file")
        try:
            records = readers[path.suffix]()
        except OSError as e:
            raise DataError(f"data.source={path}: cannot read ({e.strerror or e})") from e
        if not records:
            raise DataError(f"data.source={path}: no records (empty file or no valid row)")
        return records
    return _hub(source, split)


def _jsonl(path: Path, on_malformed: str, keep_malformed: bool = False) -> list[dict]:
    out, bad = [], []
    with path.open("rb") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            loc = f"{path}:{lineno}"
            try:
                record = json.loads(line.decode("utf-8"))  # bad UTF-8: a malformed line
                if not isinstance(record, dict):
                    raise ValueError(f"expected a JSON object, got {type(record).__name__}")
            except ValueError as e:
                if on_malformed == "error":
                    raise MalformedRecordError(f"{loc}: not a JSON object ({e})") from e
                bad.append(f"{loc}: {e}")
                if keep_malformed:
                    out.append({LOC_KEY: loc, MALFORMED_KEY: f"not a JSON object ({e})"})
                continue
            record[LOC_KEY] = loc
            out.append(record)
    if bad and not keep_malformed:
        logger.warning(
            "skipped %d unparseable lines of %s:\n  %s", len(bad), path, "\n  ".join(bad[:5])
        )
    return out


def _json(path: Path, split: str) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except ValueError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if isinstance(data, dict):
        if split not in data:
            raise DataError(f"{path} holds splits {sorted(data)}, not {split!r}")
        data = data[split]
    if not isinstance(data, list):
        raise DataError(f"{path} must hold a JSON array of records")
    return [_tag(r, f"{path}:record {i}") for i, r in enumerate(data)]


def _tag(record, loc: str):
    if isinstance(record, dict):
        record[LOC_KEY] = loc
    return record


def _parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow's errors: ArrowInvalid, OSError...
        raise DataError(f"{path}: not a readable parquet file ({type(e).__name__})") from None
    return [_tag(r, f"{path}:row {i}") for i, r in enumerate(rows)]


def _directory(path: Path, split: str, on_malformed: str, keep_malformed: bool) -> list[dict]:
    for suffix in (".jsonl", ".parquet", ".json"):
        candidate = path / f"{split}{suffix}"
        if candidate.is_file():
            return load_records(
                str(candidate), split, on_malformed=on_malformed, keep_malformed=keep_malformed
            )
    if any((path / n).is_file() for n in ("dataset_info.json", "state.json", "dataset_dict.json")):
        from datasets import DatasetDict, load_from_disk

        ds = load_from_disk(str(path))
        if isinstance(ds, DatasetDict):
            if split not in ds:
                raise DataError(f"{path} holds splits {sorted(ds)}, not {split!r}")
            ds = ds[split]
        return [_tag(dict(r), f"{path}[{split}]:row {i}") for i, r in enumerate(ds)]
    raise DataError(
        f"data.source={path}: neither a datasets save_to_disk folder nor holds "
        f"{split}.jsonl/.parquet"
    )


def _hub(source: str, split: str) -> list[dict]:
    from datasets import load_dataset

    try:
        ds = load_dataset(source, split=split)
    except Exception as e:  # offline, unknown id, no such split: datasets' many errors
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise DataError(
            f"data.source={source!r}: not a file, and loading it as a hub dataset failed "
            f"({type(e).__name__}: {first})"
        ) from None
    return [_tag(dict(r), f"{source}[{split}]:row {i}") for i, r in enumerate(ds)]


def _embedded(source: str, split: str) -> list[dict]:
    from fastrlhf.data.embedded import ArithmeticTask

    spec, _, query = source[len("embedded:") :].partition("?")
    opts = dict(parse_qsl(query))
    n = int(opts.pop("n", 2000))
    seed = int(opts.pop("seed", 0)) + (0 if split == "train" else 1_000_003)
    task_kwargs = {
        k: (v if k == "ops" else float(v) if "." in v else int(v)) for k, v in opts.items()
    }
    task = ArithmeticTask(seed, **task_kwargs)
    makers = {"sft": task.sft_records, "preference": task.preference_records, "rl": task.rl_prompts}
    if spec not in makers:
        raise ValueError(f"embedded source kind must be one of {sorted(makers)}, got {spec!r}")
    return [_tag(r, f"{source}[{split}]:record {i}") for i, r in enumerate(makers[spec](n))]


def single_file_source(source: str) -> bool:
    """A file whose rows carry no split (.jsonl, .parquet, a .json array): asking it for
    "train" and for "test" gives the same rows."""
    path = Path(str(source)).expanduser()
    if not path.is_file():
        return False
    if path.suffix != ".json":
        return True
    try:
        return not isinstance(json.loads(path.read_text(encoding="utf-8")), dict)
    except ValueError:
        return True  # load_records reports the broken file


def _content_key(record: dict) -> str:
    return json.dumps(
        {k: v for k, v in record.items() if k != LOC_KEY}, sort_keys=True, default=str
    )


def train_eval_records(
    source: str,
    train_split: str,
    eval_split: str,
    num_eval: int,
    *,
    seed: int,
    on_malformed: str = "error",
) -> tuple[list[dict], list[dict], str]:
    """(train records, at most ``num_eval`` eval records, how the eval split was made).

    A source with splits gives ``train_split`` and ``eval_split``. A single file has none:
    ``num_eval`` of its rows, drawn with ``seed``, are held out as the eval split and
    the rest train; held-out rows whose content equals a training row are dropped, so no
    eval example is a training example."""
    train = load_records(source, train_split, on_malformed=on_malformed, keep_malformed=True)
    if not num_eval:
        return train, [], "no eval split (data.num_eval=0)"
    if not single_file_source(source):
        held_out = load_records(source, eval_split, on_malformed=on_malformed, keep_malformed=True)[
            :num_eval
        ]
        return train, held_out, f"eval split {eval_split!r} of {source}"
    n = len(train)
    if num_eval >= n:
        raise DataError(
            f"data.num_eval={num_eval}: {source} has {n} rows and no splits; holding out "
            f"{num_eval} would leave nothing to train on (lower data.num_eval)"
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:num_eval])
    rest = [r for i, r in enumerate(train) if i not in held]
    seen = {_content_key(r) for r in rest}
    candidates = [r for i, r in enumerate(train) if i in held]
    held_out = [r for r in candidates if _content_key(r) not in seen]
    dropped = len(candidates) - len(held_out)
    how = (
        f"eval split: {len(held_out)} of the {n} rows of {source} held out (data.seed={seed}), "
        f"disjoint from the {len(rest)} training rows"
        + (f"; {dropped} held-out rows dropped as duplicates of training rows" if dropped else "")
    )
    return rest, held_out, how
