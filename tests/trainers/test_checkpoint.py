"""Checkpoints: atomic publication, pruning, bit-exact weights and safe loading."""

from __future__ import annotations

import json
import pickle
import random

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fastrlhf.checkpoint import (
    atomic_write_dir,
    checkpoint_dirs,
    latest_checkpoint,
    load_trainer_state,
    load_weights,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


class Toy(torch.nn.Module):
    """A 'backbone' saved HF-style (keys without the wrapper prefix) plus a head that the
    export stores under other names, and a frozen parameter."""

    def __init__(self):
        super().__init__()
        self.model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3))
        self.head = torch.nn.Linear(3, 1)
        self.frozen = torch.nn.Parameter(torch.randn(4), requires_grad=False)

    def save(self, path):
        path.mkdir(parents=True, exist_ok=True)
        # backbone under its own names (like an HF export), the head NOT exported
        save_file({k: v.contiguous() for k, v in self.model.state_dict().items()},
                  str(path / "model.safetensors"))  # fmt: skip


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_weights_round_trip_bit_exact(tmp_path):
    a, b = Toy(), Toy()
    opt = torch.optim.AdamW(a.parameters(), lr=1e-2)
    loss = a.head(a.model(torch.randn(6, 5))).square().sum()
    loss.backward()
    opt.step()
    state = {"step": 3, "optimizer": opt.state_dict(), "rng": rng_state()}
    path = save_checkpoint(tmp_path / "ck", 3, a, a.save, state, keep_last=2)
    mapping = json.loads((path / "weights_map.json").read_text())
    # the backbone is restored from the HF export, the head from extra_weights
    assert mapping["model.0.weight"] == ["model/model.safetensors", "0.weight"]
    assert mapping["head.weight"][0] == "extra_weights.safetensors"
    assert "frozen" not in mapping
    load_weights(b, path)
    for (k, va), vb in zip(a.named_parameters(), b.parameters()):
        if va.requires_grad:
            assert torch.equal(va, vb), k
    s = load_trainer_state(path)
    assert s["step"] == 3
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2)
    opt_b.load_state_dict(s["optimizer"])
    for sa, sb in zip(opt.state.values(), opt_b.state.values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"])


def test_wrong_model_is_refused(tmp_path):
    a = Toy()
    path = save_checkpoint(tmp_path, 1, a, a.save, {"step": 1}, keep_last=1)
    other = torch.nn.Linear(3, 3)
    with pytest.raises(ValueError, match="no weights for trainable parameters"):
        load_weights(other, path)


def test_keep_last_and_latest(tmp_path):
    a = Toy()
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, a, a.save, {"step": step}, keep_last=2)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step_00000003", "step_00000004"]
    assert latest_checkpoint(tmp_path).name == "step_00000004"


def test_interrupted_write_leaves_latest_intact(tmp_path):
    a = Toy()
    save_checkpoint(tmp_path, 1, a, a.save, {"step": 1}, keep_last=3)

    def dies_halfway(path):
        a.save(path)
        raise KeyboardInterrupt  # a kill in the middle of writing

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, a, dies_halfway, {"step": 2}, keep_last=3)
    # the half-written one is invisible; the next save cleans it up
    assert latest_checkpoint(tmp_path).name == "step_00000001"
    assert (tmp_path / ".tmp-step_00000002").exists()
    save_checkpoint(tmp_path, 2, a, a.save, {"step": 2}, keep_last=3)
    assert not (tmp_path / ".tmp-step_00000002").exists()
    assert load_trainer_state(latest_checkpoint(tmp_path))["step"] == 2


def test_atomic_write_dir_replaces(tmp_path):
    atomic_write_dir(tmp_path / "final", lambda p: (p / "a").write_text("1"))
    atomic_write_dir(tmp_path / "final", lambda p: (p / "b").write_text("2"))
    assert sorted(x.name for x in (tmp_path / "final").iterdir()) == ["b"]


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_loading_never_unpickles_arbitrary_objects(tmp_path):
    ck = tmp_path / "step_00000001"
    ck.mkdir()
    torch.save({"step": 1, "x": Evil()}, ck / "trainer_state.pt")
    with pytest.raises(pickle.UnpicklingError):
        load_trainer_state(ck)


def test_rng_state_round_trip(tmp_path):
    state = rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (torch.rand(3), random.random(), np.random.rand())  # noqa: NPY002
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(3), random.random(), np.random.rand())  # noqa: NPY002
    assert torch.equal(expected[0], got[0]) and expected[1:] == got[1:]
