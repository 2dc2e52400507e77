"""Votes -> preference rows in the format the RM and DPO stages read.

One row per (item, response pair) with a majority (see ``pairs`` for the units):

    {"prompt", "chosen", "rejected",           # what fastrlhf.data.tokenize_preferences reads
     "group": item id,                          # shared by every pair of one ranking
     "item_id", "chosen_index", "rejected_index",
     "tie": false,                              # true only with ties=True (then chosen/rejected
                                                #   are responses i < j in index order)
     "margin",     # mean over the pair's votes of +strength (for chosen), -strength (for
                   #   rejected), 0 (tie); strength is 1 where a vote gave none
     "agreement",  # share of the pair's votes that equal the majority label
     "annotators", # how many annotators labelled the pair
     "votes": {"chosen": n, "rejected": n, "tie": n}}

Majority: the label (first better / second better / tie) with strictly more votes than
each other label; a pair without one (e.g. one vote each way) is dropped. Pairs whose
majority is a tie are dropped unless ``ties``. Filters, applied in this order:
``exclude_flagged`` drops votes that carry any flag; ``min_gold_accuracy`` drops every
vote of an annotator whose accuracy on gold pairs is below it (annotators without gold
votes are kept); ``min_agreement`` drops pairs whose agreement is below it.
Rows come out in item order, then pair order (i, j).
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from fastrlhf.feedback.pairs import FIRST, SECOND, TIE, by_unit, gold_accuracy, gold_labels
from fastrlhf.feedback.pairs import pair_labels as make_pair_labels
from fastrlhf.feedback.store import active_votes, all_items


@dataclass
class ExportSettings:
    ties: bool = False
    min_agreement: float = 0.0
    min_gold_accuracy: float | None = None
    exclude_flagged: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_agreement <= 1.0:
            raise ValueError(f"min_agreement must be in [0, 1], got {self.min_agreement}")
        g = self.min_gold_accuracy
        if g is not None and not 0.0 <= g <= 1.0:
            raise ValueError(f"min_gold_accuracy must be in [0, 1], got {g}")


@dataclass
class ExportReport:
    rows: list[dict]
    pairs: int = 0  # units with at least one label after the vote filters
    dropped: Counter = field(default_factory=Counter)  # reason -> pairs
    excluded_annotators: list[str] = field(default_factory=list)


def majority(labels: list[int]) -> int | None:
    """The label with strictly more votes than every other, or None."""
    counts = Counter(labels).most_common()
    if len(counts) > 1 and counts[0][1] == counts[1][1]:
        return None
    return counts[0][0]


def export_rows(conn: sqlite3.Connection, settings: ExportSettings | None = None) -> ExportReport:
    settings = settings or ExportSettings()
    items = {it.id: it for it in all_items(conn)}
    labels = make_pair_labels(active_votes(conn), items)
    report = ExportReport([])
    if settings.exclude_flagged:
        labels = [pl for pl in labels if not pl.flagged]
    if settings.min_gold_accuracy is not None:
        acc = gold_accuracy(labels, gold_labels(items.values()))
        low = sorted(a for a, (c, n) in acc.items() if c / n < settings.min_gold_accuracy)
        report.excluded_annotators = low
        labels = [pl for pl in labels if pl.annotator not in low]
    order = {item_id: n for n, item_id in enumerate(items)}
    units = sorted(by_unit(labels).items(), key=lambda kv: (order[kv[0][0]], kv[0][1:]))
    for (item_id, i, j), unit_labels in units:
        report.pairs += 1
        winner = majority([pl.label for pl in unit_labels])
        if winner is None:
            report.dropped["no majority"] += 1
            continue
        if winner == TIE and not settings.ties:
            report.dropped["tie"] += 1
            continue
        n = len(unit_labels)
        agreement = sum(pl.label == winner for pl in unit_labels) / n
        if agreement < settings.min_agreement:
            report.dropped["agreement"] += 1
            continue
        chosen, rejected = (j, i) if winner == SECOND else (i, j)
        win_label = FIRST if chosen == i else SECOND
        signed = [0 if pl.label == TIE else pl.strength * (1 if pl.label == win_label else -1)
                  for pl in unit_labels]  # fmt: skip
        counts = Counter(pl.label for pl in unit_labels)
        item = items[item_id]
        report.rows.append(
            {
                "prompt": item.prompt,
                "chosen": item.responses[chosen],
                "rejected": item.responses[rejected],
                "group": item_id,
                "item_id": item_id,
                "chosen_index": chosen,
                "rejected_index": rejected,
                "tie": winner == TIE,
                "margin": sum(signed) / n,
                "agreement": agreement,
                "annotators": len({pl.annotator for pl in unit_labels}),
                "votes": {
                    "chosen": counts[win_label] if winner != TIE else counts[FIRST],
                    "rejected": counts[1 - win_label] if winner != TIE else counts[SECOND],
                    "tie": counts[TIE],
                },
            }
        )
    return report


def write_rows(rows: list[dict], output: str | Path, fmt: str = "auto") -> str:
    """Write rows as JSONL, Parquet or a ``datasets`` folder; returns the format used."""
    output = Path(output)
    if fmt == "auto":
        suffix = output.suffix.lower()
        fmt = {".jsonl": "jsonl", ".parquet": "parquet"}.get(suffix, "datasets")
        if fmt == "datasets" and suffix:
            raise ValueError(
                f"-o {output}: unknown suffix {suffix!r}; use .jsonl, .parquet, a folder "
                "name without a suffix (datasets), or --format"
            )
    output.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        with open(output, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows, schema=_schema()), output)
    elif fmt == "datasets":
        import datasets

        datasets.Dataset.from_list(rows, features=_features()).save_to_disk(str(output))
    else:
        raise ValueError(f"unknown export format {fmt!r} (jsonl, parquet, datasets)")
    return fmt


_COLUMNS = (
    ("prompt", "string"),
    ("chosen", "string"),
    ("rejected", "string"),
    ("group", "string"),
    ("item_id", "string"),
    ("chosen_index", "int64"),
    ("rejected_index", "int64"),
    ("tie", "bool"),
    ("margin", "float64"),
    ("agreement", "float64"),
    ("annotators", "int64"),
)


def _schema():
    """An explicit schema, so an empty export still has its columns."""
    import pyarrow as pa

    votes = pa.struct([(k, pa.int64()) for k in ("chosen", "rejected", "tie")])
    fields = [pa.field(n, pa.type_for_alias(t)) for n, t in _COLUMNS]
    return pa.schema(fields + [pa.field("votes", votes)])


def _features():
    import datasets

    f = {n: datasets.Value(t) for n, t in _COLUMNS}
    f["votes"] = {k: datasets.Value("int64") for k in ("chosen", "rejected", "tie")}
    return datasets.Features(f)
