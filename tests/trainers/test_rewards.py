"""Rewards of the RL stages: reward functions by name, reward-model normalisation, and the
KL controllers' arithmetic (checked by hand)."""

from __future__ import annotations

import pytest
import torch

from fastrlhf.trainers.kl import AdaptiveKLController, FixedKLController, kl_controller
from fastrlhf.trainers.rewards import (
    arithmetic_reward,
    call_reward_function,
    load_reward_function,
    normalize_scores,
    reward_model_scores,
)

NOT_CALLABLE = 3


def length_reward(prompts: list[str], responses: list[str], meta: list[dict]) -> list[float]:
    """A reward function for the tests: longer responses score higher."""
    return [0.1 * len(r) for r in responses]


def two_args(prompts, responses):
    return [0.0] * len(responses)


# ---------------------------------------------------------------------------------------
# reward functions


def test_reward_function_loads_and_is_called():
    fn = load_reward_function("tests.trainers.test_rewards:length_reward")
    assert fn is length_reward
    out = call_reward_function(fn, ["1+1=", "2+2="], ["2", "40"], [{}, {}])
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([0.1, 0.2]))
    gold = load_reward_function("fastrlhf.trainers.rewards:arithmetic_reward")
    assert gold(["12+7=", "9-4=", "3+3="], ["19", "6", " 6 "], [{}] * 3) == [1.0, 0.0, 1.0]
    assert gold is arithmetic_reward


@pytest.mark.parametrize(
    "spec, match",
    [
        ("no_colon_here", "must look like 'package.module:function'"),
        ("a:b:c", "must look like"),
        (":fn", "must look like"),
        ("tests.trainers.test_rewards:", "must look like"),
        ("fastrlhf_no_such_module_xyz:fn", "cannot import module 'fastrlhf_no_such_module_xyz'"),
        ("tests.trainers.test_rewards:nope", "has no attribute 'nope'"),
        ("tests.trainers.test_rewards:NOT_CALLABLE", "is a int, not a callable"),
        ("tests.trainers.test_rewards:two_args", r"must accept \(prompts, responses, meta\)"),
    ],
)
def test_reward_function_errors_name_the_spec(spec, match):
    with pytest.raises(ValueError, match=match) as info:
        load_reward_function(spec)
    if spec.count(":") == 1 and spec.split(":")[0] and spec.split(":")[1]:
        assert repr(spec) in str(info.value)


def test_reward_function_output_is_checked():
    with pytest.raises(ValueError, match="returned 1 rewards for 2 responses"):
        call_reward_function(lambda p, r, m: [1.0], ["a", "b"], ["x", "y"], [{}, {}])
    with pytest.raises(ValueError, match=r"non-finite rewards at indices \[1\]"):
        call_reward_function(lambda p, r, m: [0.0, float("nan")], ["a", "b"], ["x", "y"], [{}, {}])
    with pytest.raises(ValueError, match="sequence of numbers"):
        call_reward_function(lambda p, r, m: ["good", "bad"], ["a", "b"], ["x", "y"], [{}, {}])


# ---------------------------------------------------------------------------------------
# reward model normalisation


def test_reward_model_scores_are_normalised_with_stored_stats(tiny_model_dir, tmp_path):
    from fastrlhf.models import ValueModel, load_value_model

    model = load_value_model(tiny_model_dir, seed=3)
    model.reward_mean, model.reward_std = 0.37, 2.5
    model.save_pretrained(tmp_path / "rm")
    loaded = ValueModel.from_pretrained(tmp_path / "rm").eval()
    assert (loaded.reward_mean, loaded.reward_std) == (0.37, 2.5)

    lens = [5, 1, 8]
    ids = torch.randint(6, 40, (sum(lens),))
    pos = torch.cat([torch.arange(n) for n in lens])
    cu = torch.tensor([0, 5, 6, 14], dtype=torch.int32)
    raw = reward_model_scores(loaded, ids, pos, cu, 8, normalize=False)
    norm = reward_model_scores(loaded, ids, pos, cu, 8)
    # independent: each sequence alone, value at its last token
    with torch.no_grad():
        alone = []
        for s, n in zip(cu[:-1].tolist(), lens):
            v = loaded(ids[s : s + n], torch.arange(n), torch.tensor([0, n], dtype=torch.int32), n)
            alone.append(v[-1])
    torch.testing.assert_close(raw, torch.stack(alone), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(norm, (raw - 0.37) / 2.5)
    assert raw.std() > 0  # random inputs: the check above cannot pass by being constant


def test_normalize_scores_rejects_bad_std():
    torch.testing.assert_close(
        normalize_scores(torch.tensor([1.0, 3.0]), 2.0, 0.5), torch.tensor([-2.0, 2.0])
    )
    with pytest.raises(ValueError, match="reward std must be > 0"):
        normalize_scores(torch.ones(2), 0.0, 0.0)


# ---------------------------------------------------------------------------------------
# KL controllers


def test_adaptive_kl_controller_by_hand():
    c = AdaptiveKLController(0.1, target=6.0, horizon=100)
    c.update(9.0, n_steps=10)  # error 0.5 clipped to 0.2: beta * (1 + 0.2 * 10/100)
    assert c.value == pytest.approx(0.1 * 1.02, abs=1e-15)
    c.update(1.0, n_steps=10)  # error -5/6 clipped to -0.2
    assert c.value == pytest.approx(0.1 * 1.02 * 0.98, abs=1e-15)
    c.update(6.6, n_steps=50)  # error 0.1, inside the clip
    assert c.value == pytest.approx(0.1 * 1.02 * 0.98 * 1.05, abs=1e-15)
    c.update(6.0, n_steps=1000)  # on target: unchanged
    assert c.value == pytest.approx(0.1 * 1.02 * 0.98 * 1.05, abs=1e-15)

    # the tensor path (no host sync) gives the same numbers and stays a tensor
    t = AdaptiveKLController(0.1, target=6.0, horizon=100)
    for kl, n in ((9.0, 10), (1.0, 10), (6.6, 50)):
        t.update(torch.tensor(kl), n_steps=n)
    assert isinstance(t.value, torch.Tensor) and t.value.dim() == 0
    assert float(t.value) == pytest.approx(0.1 * 1.02 * 0.98 * 1.05, rel=1e-6)

    # state round trip
    fresh = AdaptiveKLController(0.5, target=6.0, horizon=100)
    fresh.load_state_dict(t.state_dict())
    assert fresh.value == pytest.approx(float(t.value))


def test_fixed_kl_controller_and_factory():
    c = kl_controller(0.05)
    assert isinstance(c, FixedKLController)
    c.update(100.0, n_steps=1000)
    assert c.value == 0.05
    a = kl_controller(0.05, adaptive=True, target=3.0, horizon=7)
    assert isinstance(a, AdaptiveKLController) and (a.target, a.horizon) == (3.0, 7)
    with pytest.raises(ValueError, match="target must be > 0"):
        AdaptiveKLController(0.1, target=0.0, horizon=10)
    with pytest.raises(ValueError, match="kl coef must be >= 0"):
        FixedKLController(-1.0)
