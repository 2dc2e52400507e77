"""Shared set-up for trainer tests: one embedded tiny model per session, small configs."""

from __future__ import annotations

import pytest
import torch

from fastrlhf.config import load_config

# small, fast settings every trainer test starts from (2-core CPU)
SMALL = [
    "data.max_length=40",
    "data.max_prompt_length=20",
    "data.num_train=64",
    "data.num_eval=16",
    "train.batch_size=8",
    "train.micro_batch_tokens=96",
    "train.progress_bar=false",
    "train.cpu_threads=1",
    "logging.log_every=1",
    "logging.plots=false",
    "checkpoint.save_final=false",
]


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Trainer runs may set torch's thread count (train.cpu_threads); later tests get the
    count they started with."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    from fastrlhf.data.embedded import embedded_model

    return embedded_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture
def small_config(tmp_path, tiny_model_dir):
    def make(stage: str, *overrides: str):
        return load_config(
            None,
            [
                f"stage={stage}",
                f"run_dir={tmp_path / stage}",
                f"model.name_or_path={tiny_model_dir}",
            ]
            + SMALL
            + list(overrides),
        )

    torch.set_num_threads(1)
    return make
