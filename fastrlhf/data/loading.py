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
then skipped or raised according to ``on_malformed``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from urllib.parse import parse_qsl

logger = logging.getLogger("fastrlhf.data")

LOC_KEY = "_loc"


class MalformedRecordError(ValueError):
    """A malformed record met with ``on_malformed="error"``; the message says where."""


def load_records(source: str, split: str = "train", *, on_malformed: str = "error") -> list[dict]:
    """All records of ``source`` (see the module docstring) as dicts."""
    if on_malformed not in ("skip", "error"):
        raise ValueError(f"on_malformed must be 'skip' or 'error', got {on_malformed!r}")
    source = str(source)
    if source.startswith("embedded:"):
        return _embedded(source, split)
    path = Path(source).expanduser()
    if path.is_dir():
        return _directory(path, split, on_malformed)
    if path.suffix == ".jsonl":
        return _jsonl(path, on_malformed)
    if path.suffix == ".json":
        return _json(path, split)
    if path.suffix == ".parquet":
        return _parquet(path)
    if path.exists():
        raise ValueError(f"unsupported data file {path} (expected .jsonl, .json or .parquet)")
    if path.suffix in (".jsonl", ".json", ".parquet") or source.startswith((".", "/", "~")):
        raise FileNotFoundError(f"data file not found: {path}")
    return _hub(source, split)


def _jsonl(path: Path, on_malformed: str) -> list[dict]:
    out, bad = [], []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            loc = f"{path}:{lineno}"
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError(f"expected a JSON object, got {type(record).__name__}")
            except ValueError as e:
                if on_malformed == "error":
                    raise MalformedRecordError(f"{loc}: not a JSON object ({e})") from e
                bad.append(f"{loc}: {e}")
                continue
            record[LOC_KEY] = loc
            out.append(record)
    if bad:
        logger.warning(
            "skipped %d unparseable lines of %s:\n  %s", len(bad), path, "\n  ".join(bad[:5])
        )
    return out


def _json(path: Path, split: str) -> list[dict]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict):
        if split not in data:
            raise KeyError(f"{path} holds splits {sorted(data)}, not {split!r}")
        data = data[split]
    if not isinstance(data, list):
        raise ValueError(f"{path} must hold a JSON array of records")
    return [_tag(r, f"{path}:record {i}") for i, r in enumerate(data)]


def _tag(record, loc: str):
    if isinstance(record, dict):
        record[LOC_KEY] = loc
    return record


def _parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    rows = pq.read_table(path).to_pylist()
    return [_tag(r, f"{path}:row {i}") for i, r in enumerate(rows)]


def _directory(path: Path, split: str, on_malformed: str) -> list[dict]:
    for suffix in (".jsonl", ".parquet", ".json"):
        candidate = path / f"{split}{suffix}"
        if candidate.is_file():
            return load_records(str(candidate), split, on_malformed=on_malformed)
    if any((path / n).is_file() for n in ("dataset_info.json", "state.json", "dataset_dict.json")):
        from datasets import DatasetDict, load_from_disk

        ds = load_from_disk(str(path))
        if isinstance(ds, DatasetDict):
            if split not in ds:
                raise KeyError(f"{path} holds splits {sorted(ds)}, not {split!r}")
            ds = ds[split]
        return [_tag(dict(r), f"{path}[{split}]:row {i}") for i, r in enumerate(ds)]
    raise FileNotFoundError(
        f"{path} is neither a datasets save_to_disk folder nor holds {split}.jsonl/.parquet"
    )


def _hub(source: str, split: str) -> list[dict]:
    from datasets import load_dataset

    ds = load_dataset(source, split=split)
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
