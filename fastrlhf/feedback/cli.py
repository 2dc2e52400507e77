"""``fastrlhf feedback init|add-items|annotator|sample|serve|import-votes|agreement|export|demo``.

Bad input exits with status 2 and one line saying what is wrong (file and line where
there is one).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

COMMANDS = (
    "init",
    "add-items",
    "annotator",
    "sample",
    "serve",
    "import-votes",
    "agreement",
    "export",
    "demo",
)


def _db(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", required=True, help="the feedback database file")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``feedback`` and its subcommands to ``subparsers`` (of the fastrlhf parser)."""
    fb = subparsers.add_parser("feedback", help="collect human preferences (labeling web app)")
    sub = fb.add_subparsers(dest="feedback_command", required=True, metavar="COMMAND")

    p = sub.add_parser("init", help="create an empty feedback database")
    _db(p)

    p = sub.add_parser("add-items", help="add items from JSONL rows {id, prompt, responses, gold?}")
    _db(p)
    p.add_argument("items", help="items.jsonl")

    p = sub.add_parser("annotator", help="manage annotators")
    asub = p.add_subparsers(dest="annotator_command", required=True, metavar="ACTION")
    a = asub.add_parser("add", help="create an annotator and print their sign-in token")
    _db(a)
    a.add_argument("name")
    a = asub.add_parser("list", help="list annotators")
    _db(a)

    p = sub.add_parser("sample", help="sample K responses per prompt from a policy checkpoint")
    _db(p)
    p.add_argument("--model", required=True, help="checkpoint / final model directory")
    p.add_argument("--prompts", required=True, help="prompts.jsonl (rows {prompt, id?})")
    p.add_argument("-k", type=int, default=4, help="responses per prompt (default 4)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=32, help="prompts per generate() call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")

    p = sub.add_parser("serve", help="run the labeling web app")
    _db(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--guidelines", help="a text file shown to annotators")
    p.add_argument("--overlap", type=float, default=0.25, help="fraction of items given to ≥2")
    p.add_argument("--overlap-annotators", type=int, default=2)
    p.add_argument("--gold-rate", type=float, default=0.1, help="share of gold items per queue")
    p.add_argument("--lease-seconds", type=float, default=1800.0)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("import-votes", help="import votes from JSONL or a Label Studio export")
    _db(p)
    p.add_argument("votes", help="votes.jsonl, or a Label Studio JSON export")
    p.add_argument(
        "--format", choices=("auto", "jsonl", "labelstudio"), default="auto", help="input format"
    )

    p = sub.add_parser("agreement", help="inter-annotator agreement statistics")
    _db(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--min-overlap", type=int, default=10, help="pairs for a Cohen's kappa")
    p.add_argument("--heatmap", help="write a PNG heat map of pairwise Cohen's kappa here")

    p = sub.add_parser("export", help="export majority-vote preference pairs")
    _db(p)
    p.add_argument("-o", "--output", required=True, help=".jsonl, .parquet, or a directory")
    p.add_argument(
        "--format", choices=("auto", "jsonl", "parquet", "datasets"), default="auto",
        help="auto: by suffix (.jsonl / .parquet), else a datasets directory",
    )  # fmt: skip
    p.add_argument("--ties", action="store_true", help="keep pairs whose majority is a tie")
    p.add_argument("--min-agreement", type=float, default=0.0)
    p.add_argument("--min-gold-accuracy", type=float, default=None)
    p.add_argument("--exclude-flagged", action="store_true", help="drop votes with any flag")

    p = sub.add_parser("demo", help="the loop with simulated annotators voting over HTTP")
    p.add_argument("--run-dir", default="runs/feedback_demo")
    p.add_argument("--policy", help="an SFT model directory (default: train one here)")
    p.add_argument("--accuracies", default="0.9,0.8,0.7", help="one per simulated annotator")
    p.add_argument("--tie-rate", type=float, default=0.1)
    p.add_argument("--items", type=int, default=600, help="labelled response pairs")
    p.add_argument("--held-out", type=int, default=200, help="truth-labelled RM eval pairs")
    p.add_argument("--gold", type=int, default=20, help="labelled items with a gold answer")
    p.add_argument("--overlap", type=float, default=1.0)
    p.add_argument("--overlap-annotators", type=int, default=3)
    p.add_argument("--sft-steps", type=int, default=800)
    p.add_argument("--rm-steps", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    return fb


def main(args: argparse.Namespace) -> int:
    """Run the parsed ``feedback`` command; returns the exit status."""
    from fastrlhf.feedback.store import StoreError

    try:
        return _COMMANDS[args.feedback_command](args)
    except (StoreError, ValueError, FileNotFoundError, PermissionError) as e:
        print(f"fastrlhf feedback: {e}", file=sys.stderr)
        return 2


def _read_jsonl(path: str):
    """(where, row) per non-empty line; JSON errors name the file and line."""
    from fastrlhf.feedback.store import StoreError

    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{n}", json.loads(line)
            except json.JSONDecodeError as e:
                raise StoreError(f"{path}:{n}: not valid JSON ({e.msg})") from None


def _init(args) -> int:
    from fastrlhf.feedback.store import connect

    existed = Path(args.db).exists()
    connect(args.db, create=True).close()
    print(f"{'opened existing' if existed else 'created'} feedback database {args.db}")
    return 0


def _add_items(args) -> int:
    from fastrlhf.feedback.store import add_items, connect, parse_item

    items = [parse_item(row, where) for where, row in _read_jsonl(args.items)]
    conn = connect(args.db)
    added, skipped = add_items(conn, items)
    print(f"added {added} items ({skipped} already present) to {args.db}")
    return 0


def _annotator(args) -> int:
    from fastrlhf.feedback.store import add_annotator, annotator_names, connect

    conn = connect(args.db)
    if args.annotator_command == "add":
        token = add_annotator(conn, args.name)
        print(f"annotator {args.name!r} added; sign-in token (shown once): {token}")
    else:
        for name in annotator_names(conn):
            print(name)
    return 0


def _import_votes(args) -> int:
    from fastrlhf.feedback.imports import import_file
    from fastrlhf.feedback.store import connect

    added, dup = import_file(connect(args.db), args.votes, args.format)
    print(f"imported {added} votes ({dup} already present) into {args.db}")
    return 0


def _export(args) -> int:
    from fastrlhf.feedback.export import ExportSettings, export_rows, write_rows
    from fastrlhf.feedback.store import connect

    settings = ExportSettings(
        ties=args.ties,
        min_agreement=args.min_agreement,
        min_gold_accuracy=args.min_gold_accuracy,
        exclude_flagged=args.exclude_flagged,
    )
    report = export_rows(connect(args.db), settings)
    fmt = write_rows(report.rows, args.output, args.format)
    dropped = ", ".join(f"{n} {why}" for why, n in sorted(report.dropped.items())) or "none"
    print(f"exported {len(report.rows)} pairs of {report.pairs} labelled ({fmt}) to "
          f"{args.output}; dropped: {dropped}")  # fmt: skip
    if report.excluded_annotators:
        print(f"left out annotators below --min-gold-accuracy: {report.excluded_annotators}")
    return 0


def _agreement(args) -> int:
    from fastrlhf.feedback.agreement import agreement_stats, format_report, kappa_heatmap
    from fastrlhf.feedback.store import connect

    stats = agreement_stats(connect(args.db), args.min_overlap)
    print(json.dumps(stats, indent=2) if args.json else format_report(stats))
    if args.heatmap:
        path = kappa_heatmap(stats, args.heatmap)
        print(f"heat map: {path}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _serve(args) -> int:
    from fastrlhf.feedback.assign import AssignmentPolicy
    from fastrlhf.feedback.server import ServerSettings, read_guidelines, serve

    policy = AssignmentPolicy(
        overlap=args.overlap,
        overlap_annotators=args.overlap_annotators,
        gold_rate=args.gold_rate,
        lease_seconds=args.lease_seconds,
        seed=args.seed,
    )
    settings = ServerSettings(args.db, policy, read_guidelines(args.guidelines))
    serve(settings, args.host, args.port)
    return 0


def _sample(args) -> int:
    from fastrlhf.feedback.sample import SampleSettings, sample_items
    from fastrlhf.feedback.store import add_items, connect

    settings = SampleSettings(
        k=args.k,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        batch_size=args.batch_size,
        seed=args.seed,
        device=args.device,
    )
    conn = connect(args.db)  # before the (slow) sampling: a wrong --db fails at once
    prompts = [row for _, row in _read_jsonl(args.prompts)]
    items = sample_items(args.model, prompts, settings)
    added, skipped = add_items(conn, items)
    print(f"sampled {args.k} responses for {len(items)} prompts; added {added} items "
          f"({skipped} already present) to {args.db}")  # fmt: skip
    return 0


def _demo(args) -> int:
    from fastrlhf.feedback.demo import FeedbackDemoSettings, run_feedback_demo

    try:
        accuracies = [float(x) for x in args.accuracies.split(",")]
    except ValueError:
        raise ValueError(
            f"--accuracies: comma-separated numbers, got {args.accuracies!r}"
        ) from None
    run_feedback_demo(
        FeedbackDemoSettings(
            run_dir=args.run_dir,
            accuracies=accuracies,
            tie_rate=args.tie_rate,
            items=args.items,
            held_out=args.held_out,
            gold=args.gold,
            overlap=args.overlap,
            overlap_annotators=args.overlap_annotators,
            policy=args.policy,
            sft_steps=args.sft_steps,
            rm_steps=args.rm_steps,
            seed=args.seed,
        )
    )
    return 0


_COMMANDS = {
    "init": _init,
    "add-items": _add_items,
    "annotator": _annotator,
    "sample": _sample,
    "serve": _serve,
    "import-votes": _import_votes,
    "agreement": _agreement,
    "export": _export,
    "demo": _demo,
}
