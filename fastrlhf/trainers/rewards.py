"""The rewards of RL rollouts: reward functions named in the config, and reward models.

Two reward sources, one per run:

- a reward model (``fastrlhf.models.ValueModel``): the score of a whole sequence (prompt +
  response) is its value at the last token, normalised with the statistics stored with
  the model, ``(r - reward_mean) / reward_std``, so a reward of 0 is "as good as an
  average training response" whatever scale the model learned;
- a Python function named ``"package.module:function"`` (rule-based or verifiable
  rewards), called as ``fn(prompts: list[str], responses: list[str], meta: list[dict])``
  and returning one float per response.

Legend: B = sequences, N = packed tokens.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Sequence

import torch

RewardFn = Callable[[list[str], list[str], list[dict]], Sequence[float]]


# ---------------------------------------------------------------------------------------
# reward functions given by name


def load_reward_function(spec: str) -> RewardFn:
    """The callable named by ``spec`` = ``"package.module:function"`` (a dotted attribute
    path after the colon is allowed, e.g. ``"pkg.mod:Class.method"``).

    Raises ValueError naming ``spec`` when it is malformed, cannot be imported, has no
    such attribute, or names something that is not callable.
    """
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ValueError(f"reward function spec {spec!r} must look like 'package.module:function'")
    module_name, attr_path = spec.split(":")
    if not module_name or not attr_path:
        raise ValueError(f"reward function spec {spec!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(
            f"reward function {spec!r}: cannot import module {module_name!r} ({e}); is it on "
            "PYTHONPATH?"
        ) from e
    obj = module
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as e:
            raise ValueError(
                f"reward function {spec!r}: module {module_name!r} has no attribute {attr_path!r}"
            ) from e
    if not callable(obj):
        raise ValueError(f"reward function {spec!r} is a {type(obj).__name__}, not a callable")
    check_reward_function(obj, spec)
    return obj


def call_reward_function(
    fn: RewardFn,
    prompts: list[str],
    responses: list[str],
    meta: list[dict],
    *,
    name: str = "reward function",
) -> torch.Tensor:
    """``fn(prompts, responses, meta)`` as a float32 [B] tensor, its output checked."""
    out = fn(prompts, responses, meta)
    try:
        scores = torch.as_tensor([float(x) for x in out], dtype=torch.float32)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must return a sequence of numbers; got {out!r:.200}") from e
    if scores.numel() != len(responses):
        raise ValueError(f"{name} returned {scores.numel()} rewards for {len(responses)} responses")
    if not bool(torch.isfinite(scores).all()):
        bad = (~torch.isfinite(scores)).nonzero().flatten()[:5].tolist()
        raise ValueError(f"{name} returned non-finite rewards at indices {bad}")
    return scores


def arithmetic_reward(prompts: list[str], responses: list[str], meta: list[dict]) -> list[float]:
    """A verifiable reward for the embedded arithmetic task: 1.0 when the response is the
    exact answer of its ``"a+b="`` prompt, else 0.0 (``meta`` is not used).

    Usable as ``ppo.reward_fn: fastrlhf.trainers.rewards:arithmetic_reward``.
    """
    from fastrlhf.data.embedded import ArithmeticTask

    task = ArithmeticTask()
    return [task.gold_score(p, r) for p, r in zip(prompts, responses)]


# ---------------------------------------------------------------------------------------
# reward model scores


def normalize_scores(scores: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """``(scores - mean) / std`` in float32; ``std`` must be positive."""
    if not std > 0:
        raise ValueError(f"reward std must be > 0 to normalise rewards; got {std}")
    return (scores.float() - mean) / std


@torch.no_grad()
def reward_model_scores(
    model: torch.nn.Module,
    input_ids: torch.Tensor,  # [N]
    position_ids: torch.Tensor,  # [N]
    cu_seqlens: torch.Tensor,  # [B + 1] int32
    max_seqlen: int,
    *,
    normalize: bool = True,
) -> torch.Tensor:
    """[B] float32 sequence scores of a ``ValueModel`` on packed sequences (value at each
    sequence's last token), normalised with its stored ``reward_mean`` / ``reward_std``."""
    values = model(input_ids, position_ids, cu_seqlens, max_seqlen)  # [N]
    scores = model.sequence_scores(values, cu_seqlens).float()  # [B]
    if not normalize:
        return scores
    return normalize_scores(scores, model.reward_mean, model.reward_std)


def _accepts_three_lists(fn: Callable) -> bool:
    """Best effort: False only when the signature clearly cannot take 3 positionals."""
    try:
        inspect.signature(fn).bind([], [], [])
    except TypeError:
        return False
    except ValueError:  # builtins without a signature
        return True
    return True


def check_reward_function(fn: Callable, spec: str) -> None:
    if not _accepts_three_lists(fn):
        raise ValueError(
            f"reward function {spec!r} must accept (prompts, responses, meta); its signature "
            f"is {inspect.signature(fn)}"
        )
