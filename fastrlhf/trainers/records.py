"""A stage's records from a DataConfig: the embedded arithmetic task or a data source,
split into train and held-out records, and the tokenisation settings."""

from __future__ import annotations

from pathlib import Path

from fastrlhf.config import DataConfig
from fastrlhf.trainers.loading import EMBEDDED


def embedded_task(data: DataConfig, seed: int | None = None):
    from fastrlhf.data.embedded import ArithmeticTask

    return ArithmeticTask(
        data.seed if seed is None else seed, max_operand=data.embedded_max_operand
    )


def _embedded_records(data: DataConfig, kind: str) -> tuple[list[dict], list[dict]]:
    """(train, eval) records of the embedded arithmetic task; eval prompts never occur in
    train (the task has few distinct problems, so held-out means filtered)."""

    def draw(task, n: int) -> list[dict]:
        if kind == "sft":
            return task.sft_records(n)
        if kind == "pairs":
            return task.preference_records(n)
        return task.rl_prompts(n)

    train = draw(embedded_task(data), data.num_train)
    seen = {r["prompt"] for r in train}
    pool = draw(embedded_task(data, data.seed + 1), 4 * data.num_eval + 64)
    held_out = [r for r in pool if r["prompt"] not in seen][: data.num_eval]
    return train, held_out


def stage_records(data: DataConfig, kind: str) -> tuple[list[dict], list[dict]]:
    """(train, eval) records for kind "sft" | "pairs" | "prompts"."""
    if data.source == EMBEDDED:
        return _embedded_records(data, kind)
    import os

    from fastrlhf.data.loading import train_eval_records

    train, held_out, how = train_eval_records(
        data.source,
        data.train_split,
        data.eval_split,
        data.num_eval,
        seed=data.seed,
        on_malformed=data.on_malformed,
    )
    if os.environ.get("RANK", "0") == "0":
        print(f"[data] {how}")
    return train, held_out


def data_settings(data: DataConfig, run_dir: str | None = None):
    """``run_dir``: skipped rows go to <run_dir>/malformed.jsonl."""
    from fastrlhf.data.formats import DataSettings

    return DataSettings(
        max_length=data.max_length,
        max_prompt_length=data.max_prompt_length,
        on_malformed=data.on_malformed,
        malformed_file=str(Path(run_dir) / "malformed.jsonl") if run_dir else None,
    )
