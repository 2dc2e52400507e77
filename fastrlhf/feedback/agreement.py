"""Agreement between annotators, on the pair labels of ``pairs`` (units = (item, i, j),
categories = first better / second better / tie; "can't tell" is missing data).

- ``raw_agreement``: over every two annotators who labelled the same unit, the share
  that gave the same label (pooled: a unit labelled by n annotators counts n(n-1)/2
  times). Two annotators with accuracies p and q on a binary choice agree with
  probability pq + (1-p)(1-q).
- ``cohen_kappa``: scikit-learn's ``cohen_kappa_score`` for each annotator pair with at
  least ``min_overlap`` shared units (``{"a", "b", "kappa", "n"}``; kappa is null where
  it is undefined, e.g. both always gave the same label).
- ``pair_agreement``: raw agreement of each annotator pair (``{"a", "b", "agreement",
  "n"}``), for every pair that shares a unit.
- ``fleiss_kappa``: statsmodels' ``fleiss_kappa``, which needs the same number of
  ratings per unit: it is computed on the units with the most common count m >= 2 of
  labels (``fleiss_units``, ``fleiss_raters`` = m).
- ``krippendorff_alpha``: the ``krippendorff`` package, nominal, on the annotator x
  unit matrix (any number of labels per unit; units with one label do not count).
- per annotator: ``votes`` (active votes), ``agreement_with_majority`` (on units where
  the other annotators' labels have a strict majority: the share equal to it),
  ``gold_accuracy`` (share of their labels on gold units equal to gold; a tie is wrong),
  ``tie_rate`` (tie votes / votes), ``cant_tell_rate`` and ``votes_per_hour`` (3600 /
  mean seconds a timed vote took).

Statistics with nothing to compute on are null.
"""

from __future__ import annotations

import math
import sqlite3
from collections import Counter, defaultdict
from itertools import combinations
from pathlib import Path

from fastrlhf.feedback.export import majority
from fastrlhf.feedback.pairs import TIE, by_unit, gold_accuracy, gold_labels, pair_labels
from fastrlhf.feedback.store import Vote, active_votes, all_items

CATEGORIES = (0, 1, 2)


def _finite(x) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)


def raw_agreement(units: dict) -> float | None:
    agree = total = 0
    for labels in units.values():
        for a, b in combinations(labels, 2):
            agree += a.label == b.label
            total += 1
    return agree / total if total else None


def _shared(units: dict) -> dict[tuple[str, str], list[tuple[int, int]]]:
    """{(annotator a, annotator b), a < b: [(a's label, b's label) on each shared unit]}"""
    shared: dict[tuple[str, str], list[tuple[int, int]]] = defaultdict(list)
    for labels in units.values():
        for x, y in combinations(sorted(labels, key=lambda pl: pl.annotator), 2):
            shared[(x.annotator, y.annotator)].append((x.label, y.label))
    return dict(sorted(shared.items()))


def pair_agreement(units: dict) -> list[dict]:
    """Raw agreement of every annotator pair that shares a unit: {"a", "b", "agreement", "n"}."""
    return [
        {"a": a, "b": b, "agreement": sum(x == y for x, y in pairs) / len(pairs), "n": len(pairs)}
        for (a, b), pairs in _shared(units).items()
    ]


def cohen_kappas(units: dict, min_overlap: int) -> list[dict]:
    import warnings

    from sklearn.metrics import cohen_kappa_score

    out = []
    for (a, b), pairs in _shared(units).items():
        if len(pairs) < min_overlap:
            continue
        la, lb = zip(*pairs)
        with warnings.catch_warnings():  # undefined kappa: sklearn warns and returns nan
            warnings.simplefilter("ignore", RuntimeWarning)
            kappa = cohen_kappa_score(la, lb, labels=list(CATEGORIES))
        out.append({"a": a, "b": b, "kappa": _finite(kappa), "n": len(pairs)})
    return out


def fleiss(units: dict) -> tuple[float | None, int, int]:
    """(kappa, units used, raters per unit) on the units with the most common count >= 2."""
    import numpy as np
    from statsmodels.stats.inter_rater import fleiss_kappa

    counts = Counter(len(labels) for labels in units.values() if len(labels) >= 2)
    if not counts:
        return None, 0, 0
    m = max(counts, key=lambda c: (counts[c], c))
    table = np.array(
        [[sum(pl.label == c for pl in labels) for c in CATEGORIES]
         for labels in units.values() if len(labels) == m]
    )  # fmt: skip
    with np.errstate(divide="ignore", invalid="ignore"):
        kappa = fleiss_kappa(table, method="fleiss")
    return _finite(kappa), len(table), m


def krippendorff_alpha(units: dict, annotators: list[str]) -> float | None:
    import krippendorff
    import numpy as np

    pairable = [labels for labels in units.values() if len(labels) >= 2]
    if not pairable:
        return None
    row = {a: n for n, a in enumerate(annotators)}
    data = np.full((len(annotators), len(pairable)), np.nan)
    for u, labels in enumerate(pairable):
        for pl in labels:
            data[row[pl.annotator], u] = pl.label
    if len(np.unique(data[~np.isnan(data)])) < 2:
        return None  # one label everywhere: expected disagreement is 0, alpha undefined
    alpha = krippendorff.alpha(
        reliability_data=data, value_domain=list(CATEGORIES), level_of_measurement="nominal"
    )
    return _finite(alpha)


def _with_majority(units: dict, name: str) -> float | None:
    agree = total = 0
    for labels in units.values():
        mine = [pl.label for pl in labels if pl.annotator == name]
        others = [pl.label for pl in labels if pl.annotator != name]
        if not mine or not others:
            continue
        maj = majority(others)
        if maj is not None:
            agree += mine[0] == maj
            total += 1
    return agree / total if total else None


def _per_annotator(votes: list[Vote], units: dict, labels, items) -> list[dict]:
    by_name: dict[str, list[Vote]] = defaultdict(list)
    for v in votes:
        by_name[v.annotator].append(v)
    gold = gold_accuracy(labels, gold_labels(items.values()))
    out = []
    for name in sorted(by_name):
        vs = by_name[name]
        timed = [v.time_ms for v in vs if v.time_ms]
        c, n = gold.get(name, (0, 0))
        out.append(
            {
                "name": name,
                "votes": len(vs),
                "agreement_with_majority": _with_majority(units, name),
                "gold_accuracy": c / n if n else None,
                "gold_pairs": n,
                "tie_rate": sum(v.tie for v in vs) / len(vs),
                "cant_tell_rate": sum(v.cant_tell for v in vs) / len(vs),
                "votes_per_hour": 3600 * 1000 * len(timed) / sum(timed) if timed else None,
            }
        )
    return out


def agreement_stats(conn: sqlite3.Connection, min_overlap: int = 10) -> dict:
    """Every statistic of the module docstring, as a JSON-ready dict."""
    if min_overlap < 1:
        raise ValueError(f"min_overlap must be >= 1, got {min_overlap}")
    items = {it.id: it for it in all_items(conn)}
    votes = active_votes(conn)
    labels = pair_labels(votes, items)
    units = by_unit(labels)
    annotators = sorted({v.annotator for v in votes})
    fk, fleiss_units, fleiss_raters = fleiss(units)
    timed = [v.time_ms for v in votes if v.time_ms]
    return {
        "raw_agreement": raw_agreement(units),
        "fleiss_kappa": fk,
        "fleiss_units": fleiss_units,
        "fleiss_raters": fleiss_raters,
        "krippendorff_alpha": krippendorff_alpha(units, annotators),
        "cohen_kappa": cohen_kappas(units, min_overlap),
        "pair_agreement": pair_agreement(units),
        "annotators": _per_annotator(votes, units, labels, items),
        "votes": len(votes),
        "labels": len(labels),
        "units": len(units),
        "units_multiply_labelled": sum(len(ls) >= 2 for ls in units.values()),
        "tie_rate": sum(v.tie for v in votes) / len(votes) if votes else None,
        "tie_label_rate": sum(pl.label == TIE for pl in labels) / len(labels) if labels else None,
        "votes_per_hour": 3600 * 1000 * len(timed) / sum(timed) if timed else None,
        "min_overlap": min_overlap,
    }


def format_report(stats: dict) -> str:
    def f(x):
        return "-" if x is None else f"{x:.3f}"

    lines = [
        f"votes {stats['votes']}, pair labels {stats['labels']}, units {stats['units']} "
        f"({stats['units_multiply_labelled']} labelled by >= 2)",
        f"raw agreement        {f(stats['raw_agreement'])}",
        f"Fleiss' kappa        {f(stats['fleiss_kappa'])}  ({stats['fleiss_units']} units x "
        f"{stats['fleiss_raters']} raters)",
        f"Krippendorff's alpha {f(stats['krippendorff_alpha'])}",
        f"tie rate             {f(stats['tie_rate'])}",
        f"votes per hour       {f(stats['votes_per_hour'])}",
        "",
        f"{'annotator':<20} {'votes':>6} {'w/ majority':>11} {'gold acc':>9} {'ties':>6}",
    ]
    for a in stats["annotators"]:
        lines.append(
            f"{a['name']:<20} {a['votes']:>6} {f(a['agreement_with_majority']):>11} "
            f"{f(a['gold_accuracy']):>9} {f(a['tie_rate']):>6}"
        )
    if stats["cohen_kappa"]:
        lines += ["", f"Cohen's kappa (pairs with >= {stats['min_overlap']} shared units)"]
        for c in stats["cohen_kappa"]:
            lines.append(f"  {c['a']} / {c['b']}: {f(c['kappa'])} (n={c['n']})")
    return "\n".join(lines)


def kappa_heatmap(stats: dict, path: str | Path) -> Path:
    """A PNG heat map of pairwise Cohen's kappa (blank where a pair has too little overlap)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [a["name"] for a in stats["annotators"]]
    idx = {n: i for i, n in enumerate(names)}
    m = np.full((len(names), len(names)), np.nan)
    np.fill_diagonal(m, 1.0)
    for c in stats["cohen_kappa"]:
        if c["kappa"] is not None:
            m[idx[c["a"]], idx[c["b"]]] = m[idx[c["b"]], idx[c["a"]]] = c["kappa"]
    size = 2.5 + 0.6 * len(names)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    if not names:
        ax.text(0.5, 0.5, "no votes yet", ha="center", va="center")
        ax.set_axis_off()
    im = ax.imshow(m if names else np.zeros((1, 1)), vmin=-1, vmax=1, cmap="RdBu")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    for i in range(len(names)):
        for j in range(len(names)):
            if not np.isnan(m[i, j]):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="Cohen's kappa")
    ax.set_title("pairwise agreement")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
