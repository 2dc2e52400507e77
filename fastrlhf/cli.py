"""Command line: ``fastrlhf sft|rm|dpo|ppo|grpo --config FILE [--resume] [key.sub=value ...]`` and
``fastrlhf demo [--config FILE] [section.key=value ...]`` (also ``python -m fastrlhf``).

User errors (config key or value, model, data, checkpoint, run dir, permissions, full
disk) print one line naming the key or file and exit with status 2 (``--debug`` or
FASTRLHF_DEBUG=1: with the traceback); a non-finite loss exits with status 1. A fresh run
refuses a non-empty run dir: ``--resume`` continues it, ``--overwrite`` starts over.
"""

from __future__ import annotations

import argparse
import os
import sys

from fastrlhf.config import STAGES, ConfigError, load_config
from fastrlhf.config.demo_settings import default_demo_config
from fastrlhf.errors import run_reporting_errors


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastrlhf", description="Lean, kernel-optimized RLHF.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for stage in STAGES:
        s = sub.add_parser(stage, help=f"train the {stage} stage")
        s.add_argument("--config", "-c", help="YAML file (see examples/)")
        s.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
        s.add_argument("overrides", nargs="*", metavar="key.sub=value")
    d = sub.add_parser("demo", help="SFT -> reward model -> PPO, DPO and GRPO on the embedded task")
    d.add_argument("--config", "-c", help="demo YAML file (default: examples/demo.yaml)")
    d.add_argument("overrides", nargs="*", metavar="section.key=value")
    for s in sub.choices.values():
        s.add_argument(
            "--overwrite",
            action="store_true",
            help="start over in a run dir that holds an earlier run (removes its outputs)",
        )
        s.add_argument(
            "--debug", action="store_true", help="show tracebacks (also FASTRLHF_DEBUG=1)"
        )

    from fastrlhf.feedback.cli import add_parser as add_feedback_parser

    add_feedback_parser(sub)  # fastrlhf feedback ... (fastrlhf/feedback/cli.py)
    from fastrlhf.estimate.report import add_parser as add_estimate_parser

    add_estimate_parser(sub)  # fastrlhf estimate ... (fastrlhf/estimate/report.py)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "feedback":
        from fastrlhf.feedback.cli import main as feedback_main

        return feedback_main(args)
    _quiet_transformers()
    try:
        return run_reporting_errors(
            lambda: _run(args), debug=getattr(args, "debug", False), user_errors=(ConfigError,)
        )
    except FloatingPointError as e:
        print(f"fastrlhf: {e}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    from fastrlhf.checkpoint import claim_run_dir

    main_rank = os.environ.get("RANK", "0") == "0"  # torchrun: rank 0 alone removes
    if args.command == "estimate":
        from fastrlhf.estimate.report import run as run_estimate

        return run_estimate(args)
    if args.command == "demo":
        from fastrlhf.config import load_demo_config
        from fastrlhf.demo import run_demo

        path = args.config or default_demo_config()
        _, configs = load_demo_config(path, args.overrides)
        for c in configs.values():
            claim_run_dir(c.run_dir, resume=False, overwrite=args.overwrite, main=main_rank)
        run_demo(path, args.overrides)
        return 0
    cfg = load_config(args.config, args.overrides)
    if cfg.stage != args.command:
        # the file names another stage: running it as this one would be a silent mix-up
        if args.config is not None and _file_sets_stage(args.config):
            raise ConfigError(
                f"stage: {args.config} is a {cfg.stage!r} config, not {args.command!r}"
            )
        cfg = load_config(args.config, args.overrides + [f"stage={args.command}"])
    ignore = (args.config,) if args.config else ()
    claim_run_dir(
        cfg.run_dir, resume=args.resume, overwrite=args.overwrite, ignore=ignore, main=main_rank
    )
    from fastrlhf.trainers import run_stage

    result = run_stage(cfg, resume=args.resume)
    if result.final_dir is not None and main_rank:  # torchrun: once
        print(f"[{cfg.stage}] final model: {result.final_dir}")
    return 0


def _quiet_transformers() -> None:
    """Our own progress bars say what is happening; transformers' per-load/per-save bars
    (one per checkpoint) would bury them."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        return
    hf_logging.disable_progress_bar()


def _file_sets_stage(path: str) -> bool:
    from fastrlhf.config import read_yaml

    return "stage" in read_yaml(path)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
