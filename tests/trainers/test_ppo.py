"""The RL stage (PPO with a critic; GRPO / RLOO / REINFORCE++ without) on the embedded tiny
model: iterations run and train, GAE goes through the extension, the reference-op switch
gives the same losses and gradients, early stop, checkpoint + resume."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastrlhf.config import PPOConfig
from fastrlhf.trainers.experience import critic_free_advantages, gae_advantages
from fastrlhf.trainers.loop import train
from fastrlhf.trainers.ppo import PPOStage
from fastrlhf.trainers.rl_models import load_models

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TINY = dict(rollout_batch_size=3, max_new_tokens=5, eval_max_new_tokens=4)


@pytest.fixture(scope="session")
def reward_model_dir(tiny_model_dir, tmp_path_factory) -> str:
    """A random reward model (its own head init) with non-trivial stored statistics."""
    from fastrlhf.models import load_value_model

    model = load_value_model(tiny_model_dir, seed=11)
    model.reward_mean, model.reward_std = 0.2, 0.05  # spreads the random scores out
    return str(model.save_pretrained(tmp_path_factory.mktemp("rm") / "rm"))


def _params(module: torch.nn.Module, trainable: bool = True) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().clone()
        for n, p in module.named_parameters()
        if p.requires_grad or not trainable
    }


def _changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> int:
    return sum(not torch.equal(before[n], p) for n, p in module.named_parameters() if n in before)


def _finite(metrics: dict[str, torch.Tensor]) -> None:
    bad = {k: float(v) for k, v in metrics.items() if not math.isfinite(float(v))}
    assert not bad, f"non-finite metrics: {bad}"


def test_ppo_iteration_trains_policy_and_critic(small_config, reward_model_dir):
    cfg = small_config("sft", "optim.lr=1e-3")
    ppo = PPOConfig(
        kind="ppo",
        reward_model=reward_model_dir,
        ppo_epochs=2,
        num_mini_batches=2,
        entropy_coef=0.01,
        **TINY,
    )
    trainer = PPOStage(cfg, ppo)
    policy0, critic0 = _params(trainer.policy), _params(trainer.critic)
    ref0 = _params(trainer.ref, trainable=False)
    assert len(ref0) > 0
    metrics, host = trainer.iteration(1)
    _finite(metrics)
    assert float(metrics["updates"]) == 4 and float(metrics["early_stop"]) == 0
    assert _changed(policy0, trainer.policy) > 0.5 * len(policy0)
    assert _changed(critic0, trainer.critic) > 0.5 * len(critic0)
    assert _changed(ref0, trainer.ref) == 0  # the reference stays frozen
    for k in (
        "reward_mean",
        "reward_std",
        "kl",
        "policy/clip_frac",
        "entropy",
        "value_loss",
        "explained_variance",
        "response_length",
        "approx_kl",
    ):
        assert k in metrics, k
    assert 0 < float(metrics["response_length"]) <= TINY["max_new_tokens"]
    assert all(v > 0 for k, v in host.items() if k.startswith("tokens_per_s/"))


def test_experience_layout_and_select(small_config, reward_model_dir):
    cfg = small_config("sft")
    trainer = PPOStage(cfg, PPOConfig(kind="ppo", reward_model=reward_model_dir, **TINY))
    trainer.memory.generate()
    items = trainer.prompts[:4]
    rollout = trainer._generate(items, trainer.gen_config)
    trainer.memory.score()
    exp, _ = trainer.score(rollout, items, torch.arange(4))
    # the hidden state at positions[j] predicts labels[j], the next (response) token
    torch.testing.assert_close(exp.input_ids[exp.positions + 1], exp.labels)
    assert int(exp.cu_resp[-1]) == exp.labels.numel() == int(rollout.response_lens.sum())
    # recomputed old log-probs match the generation-time ones (same weights, fp32)
    gen_lp = rollout.to_training_batch().old_logprobs[exp.positions]
    torch.testing.assert_close(exp.old_logprobs, gen_lp, atol=1e-4, rtol=1e-4)
    sub = exp.select([2, 0])
    for s_new, s_old in enumerate([2, 0]):
        a, b = exp.cu_resp_cpu[s_old], exp.cu_resp_cpu[s_old + 1]
        c, d = sub.cu_resp_cpu[s_new], sub.cu_resp_cpu[s_new + 1]
        torch.testing.assert_close(sub.advantages[c:d], exp.advantages[a:b])
        torch.testing.assert_close(sub.labels[c:d], exp.labels[a:b])
    torch.testing.assert_close(sub.input_ids[sub.positions + 1], sub.labels)


@pytest.mark.parametrize("kind, lora", [("grpo", False), ("rloo", True), ("reinforce++", False)])
def test_critic_free_iteration(small_config, reward_model_dir, kind, lora):
    extra = ["model.lora_rank=4"] if lora else []
    cfg = small_config("sft", "optim.lr=1e-3", *extra)
    ppo = PPOConfig(kind=kind, reward_model=reward_model_dir, n_samples=3, rollout_batch_size=2,
                    max_new_tokens=5, kl_placement="loss", kl_coef=0.01)  # fmt: skip
    trainer = PPOStage(cfg, ppo)
    assert trainer.critic is None
    # with LoRA the reference is the policy with its adapter off, not a second model
    assert (trainer.ref is None) == lora and trainer.policy.has_lora == lora
    before = _params(trainer.policy)
    metrics, _ = trainer.iteration(1)
    _finite(metrics)
    assert "value_loss" not in metrics and "policy/kl" in metrics
    # (LoRA: the first step moves every B; A's gradient is B^T(...) = 0 while B = 0)
    assert _changed(before, trainer.policy) >= 0.5 * len(before)
    if lora:  # a fresh adapter (B = 0) is the identity: policy == reference at scoring time
        assert abs(float(metrics["kl"])) < 1e-5
    else:
        assert float(metrics["kl"]) == 0.0  # the reference starts as an exact copy


def test_reward_function_drives_grpo(small_config):
    cfg = small_config("sft", "optim.lr=1e-3")
    ppo = PPOConfig(
        kind="grpo",
        reward_fn="tests.trainers.test_rewards:length_reward",
        n_samples=4,
        rollout_batch_size=2,
        max_new_tokens=6,
        kl_coef=0.0,
    )
    trainer = PPOStage(cfg, ppo)
    assert trainer.ref is None and trainer.reward_model is None  # no KL: no reference
    metrics, _ = trainer.iteration(1)
    _finite(metrics)
    # the rewards are 0.1 * the decoded response lengths: a non-trivial mean
    assert 0 < float(metrics["reward_mean"]) <= 0.1 * 6


def _check(ppo: PPOConfig) -> None:
    """What the RL stage does with a section built in code: resolve, then the rules."""
    from fastrlhf.config import check_section

    check_section(ppo.for_stage("ppo"), "ppo")


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"ppo.n_samples=1 must be >= 2 for kind='grpo'"):
        _check(PPOConfig(kind="grpo", n_samples=1, reward_fn="m:f"))
    with pytest.raises(ValueError, match=r"ppo.kind: 'bogus' is not one of"):
        _check(PPOConfig(kind="bogus", reward_fn="m:f"))
    with pytest.raises(
        ValueError, match="set exactly one of ppo.reward_model .* and ppo.reward_fn"
    ):
        load_models(None, PPOConfig(reward_model="rm", reward_fn="m:f"), torch.device("cpu"))
    with pytest.raises(ValueError, match="ppo.dual_clip=0.5 must be > 1"):
        _check(PPOConfig(reward_fn="m:f", dual_clip=0.5))


# ---------------------------------------------------------------------------------------
# advantages


def test_gae_uses_the_extension_and_matches_reference(monkeypatch):
    from fastrlhf.ops import advantages as adv_mod
    from fastrlhf.ops.reference.advantages import masked_whiten_reference, packed_gae_reference

    assert "cpu" in adv_mod._EXTENSION_DEVICES, "the compiled fastrlhf._C extension is not loaded"

    def no_fallback(*args, **kwargs):
        raise AssertionError("packed_gae took the PyTorch fallback, not the extension")

    monkeypatch.setattr(adv_mod, "_packed_gae_torch", no_fallback)
    lens = [4, 1, 7, 3]
    cu = torch.tensor([0, 4, 5, 12, 15], dtype=torch.int32)
    rewards, values = torch.randn(15), torch.randn(15)
    adv, ret = gae_advantages(rewards, values, cu, 0.99, 0.9, whiten=False)
    ref_adv, ref_ret = packed_gae_reference(rewards.double(), values.double(), cu, 0.99, 0.9)
    torch.testing.assert_close(adv.double(), ref_adv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ret.double(), ref_ret, atol=1e-5, rtol=1e-5)
    whitened, _ = gae_advantages(rewards, values, cu, 0.99, 0.9, whiten=True)
    torch.testing.assert_close(
        whitened.double(), masked_whiten_reference(ref_adv), atol=1e-5, rtol=1e-5
    )
    # the reference-ops switch: the padded reverse loop, same numbers
    padded, padded_ret = gae_advantages(rewards, values, cu, 0.99, 0.9, whiten=True, fused=False)
    torch.testing.assert_close(padded, whitened, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded_ret, ret, atol=1e-5, rtol=1e-5)
    assert sum(lens) == rewards.numel()


def test_group_advantages_with_kl_in_reward_by_hand():
    scores = torch.tensor([1.0, 0.0, 2.0, 2.0])  # two groups of two
    groups = torch.tensor([0, 0, 1, 1])
    cu = torch.tensor([0, 2, 3, 5, 6], dtype=torch.int32)
    token_rewards = torch.tensor([-0.1, -0.2, 0.0, -0.5, 0.0, 0.0])  # -beta * k1
    adv = critic_free_advantages("rloo", scores, groups, cu, token_rewards=token_rewards)
    # sequence scores with the KL summed in: 0.7, 0.0, 1.5, 2.0; RLOO: s - the other's
    expected_seq = torch.tensor([0.7, -0.7, -0.5, 0.5])
    torch.testing.assert_close(adv, expected_seq[[0, 0, 1, 2, 2, 3]])


# ---------------------------------------------------------------------------------------
# fused vs reference ops; early stop; checkpoints


@pytest.mark.parametrize("dev", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_fused_and_reference_switch_give_the_same_loss(small_config, reward_model_dir, dev):
    # fp32 (no autocast): on CUDA the fused side runs the Triton kernels for real
    cfg = small_config("sft", f"device={dev}", "train.bf16=false")
    ppo = PPOConfig(
        kind="ppo",
        reward_model=reward_model_dir,
        kl_placement="loss",
        dual_clip=3.0,
        entropy_coef=0.01,
        agg="seq-mean-token-mean",
        **TINY,
    )
    trainer = PPOStage(cfg, ppo)
    items = trainer.prompts[:5]
    trainer.memory.generate()
    rollout = trainer._generate(items, trainer.gen_config)
    assert rollout.input_ids.device.type == dev
    trainer.memory.score()
    fused_exp, fused_m = trainer.score(rollout, items, torch.arange(5))
    trainer.ppo = PPOConfig(**{**ppo.__dict__, "fused_ops": False})
    ref_exp, ref_m = trainer.score(rollout, items, torch.arange(5))
    for name in ("old_logprobs", "ref_logprobs", "values", "advantages", "returns"):
        torch.testing.assert_close(
            getattr(ref_exp, name), getattr(fused_exp, name), atol=1e-5, rtol=1e-5, msg=name
        )
    # perturb the advantages so that clipping and the dual clip are exercised
    fused_exp.advantages = fused_exp.advantages + torch.randn_like(fused_exp.advantages)
    outs = {}
    for fused in (True, False):
        trainer.ppo = PPOConfig(**{**ppo.__dict__, "fused_ops": fused})
        trainer.policy.zero_grad(set_to_none=True)
        trainer.critic.zero_grad(set_to_none=True)
        pg, vl, m = trainer.micro_losses(fused_exp)
        (pg + vl).backward()
        grads = [p.grad.clone() for p in trainer.policy.parameters() if p.grad is not None]
        grads += [p.grad.clone() for p in trainer.critic.parameters() if p.grad is not None]
        outs[fused] = (pg.detach(), vl.detach(), m, grads)
    (pg_f, vl_f, m_f, g_f), (pg_r, vl_r, m_r, g_r) = outs[True], outs[False]
    # tight enough that a 1e-4 relative error in the loss fails (CUDA reduces in another order)
    tol = dict(atol=1e-7, rtol=2e-6) if dev == "cpu" else dict(atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(pg_f, pg_r, **tol)
    torch.testing.assert_close(vl_f, vl_r, **tol)
    for k in ("approx_kl", "entropy", "policy/clip_frac", "policy/kl", "value/mse"):
        torch.testing.assert_close(m_f[k].float(), m_r[k].float(), atol=1e-5, rtol=1e-5, msg=k)
    assert len(g_f) == len(g_r) > 0
    for a, b in zip(g_f, g_r):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert float(pg_f.abs()) > 0 and float(vl_f) > 0


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["ppo", "grpo"])
def test_cuda_bf16_iteration(small_config, reward_model_dir, kind):
    """bf16 autocast around fp32 master weights, KV-cache reuse, per-phase peak memory."""
    cfg = small_config("sft", "device=cuda", "train.bf16=true", "optim.lr=1e-3")
    ppo = PPOConfig(kind=kind, reward_model=reward_model_dir, n_samples=1 if kind == "ppo" else 4,
                    rollout_batch_size=8, max_new_tokens=8, num_mini_batches=2)  # fmt: skip
    trainer = PPOStage(cfg, ppo)
    before = _params(trainer.policy)
    for step in (1, 2):
        metrics, host = trainer.iteration(step)
        _finite(metrics)
    assert _changed(before, trainer.policy) > 0.5 * len(before)
    assert not trainer.memory.kv_cache.alive  # released before training, every iteration
    for phase in ("generate", "score", "train"):
        assert host[f"memory/{phase}_peak_gb"] > 0


def test_early_stop_on_approx_kl(small_config, reward_model_dir):
    cfg = small_config("sft", "optim.lr=1e-2")
    ppo = PPOConfig(
        kind="ppo",
        reward_model=reward_model_dir,
        ppo_epochs=2,
        num_mini_batches=2,
        target_kl=1e-9,
        offload_models=True,  # the reference and reward model live on the host between uses
        offload_optimizer=True,
        **TINY,
    )
    trainer = PPOStage(cfg, ppo)
    metrics, _ = trainer.iteration(1)
    # 4 mini-batch updates were planned; once one has moved the policy, the next
    # mini-batch's approx KL exceeds the tiny threshold
    assert float(metrics["early_stop"]) == 1.0
    assert 1 <= float(metrics["updates"]) <= 2
    assert trainer.memory.is_offloaded("reference") and trainer.memory.is_offloaded("reward")


def _checkpoint_tensors(ckpt) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted((ckpt / "model").rglob("*.safetensors")):
        out.update({f"{f.parent.name}/{k}": v for k, v in load_file(str(f)).items()})
    return out


def test_checkpoint_and_resume_is_bit_identical(small_config, reward_model_dir):
    cfg = small_config(
        "sft",
        "train.max_steps=2",
        "train.eval_every=0",
        "checkpoint.save_every=1",
        "checkpoint.keep_last=3",
        "optim.lr=1e-3",
    )
    ppo = PPOConfig(
        kind="ppo", reward_model=reward_model_dir, adaptive_kl=True, kl_horizon=100, **TINY
    )
    train(PPOStage(cfg, ppo), cfg)
    root = cfg.run_dir + "/checkpoints"
    step2 = Path(root) / "step_00000002"
    reference = _checkpoint_tensors(step2)
    assert any(k.startswith("critic/") for k in reference)  # the critic is checkpointed
    shutil.rmtree(step2)
    result = train(PPOStage(cfg, ppo), cfg, resume=True)
    resumed = _checkpoint_tensors(step2)
    assert reference.keys() == resumed.keys()
    for k in reference:
        assert torch.equal(reference[k], resumed[k]), k
    from fastrlhf.metrics import read_metrics

    rows = [r for r in read_metrics(Path(cfg.run_dir) / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in rows] == [1, 2]
    assert "gold_accuracy" in result.eval_metrics


# ---------------------------------------------------------------------------------------
# configuration files and the command line


def _rl_config(path, overrides=(), stage="ppo"):
    from fastrlhf.config import load_config

    cfg = load_config(path, [*overrides, f"stage={stage}"])
    return cfg, cfg.ppo


def test_example_configs_load_and_bad_keys_are_named():
    from fastrlhf.config import ConfigError

    cfg, ppo = _rl_config(EXAMPLES / "ppo.yaml")
    assert ppo.kind == "ppo" and ppo.reward_model and cfg.train.max_steps > 0
    _, grpo = _rl_config(EXAMPLES / "grpo.yaml", ["ppo.kind=rloo"], "grpo")
    assert grpo.kind == "rloo" and grpo.n_samples >= 2
    with pytest.raises(ConfigError, match="unknown key 'ppo.n_sampels'.*did you mean"):
        _rl_config(EXAMPLES / "ppo.yaml", ["ppo.n_sampels=3"])
    with pytest.raises(ConfigError, match="ppo.n_samples=1 must be >= 2 for kind='grpo'"):
        _rl_config(EXAMPLES / "grpo.yaml", ["ppo.n_samples=1"], "grpo")


def test_command_line_runs_a_grpo_stage(tmp_path, tiny_model_dir):
    from fastrlhf.cli import main

    rc = main([
        "grpo", "--config", str(EXAMPLES / "grpo.yaml"), f"run_dir={tmp_path / 'grpo'}",
        f"model.name_or_path={tiny_model_dir}", "ppo.kl_placement=reward",
        "train.max_steps=1", "train.progress_bar=false", "logging.plots=false",
        "data.num_train=16", "data.num_eval=4", "ppo.rollout_batch_size=2", "ppo.n_samples=2",
        "ppo.max_new_tokens=3", "ppo.eval_max_new_tokens=3",
    ])  # fmt: skip
    assert rc == 0
    assert (tmp_path / "grpo" / "final" / "config.json").is_file()
    assert (tmp_path / "grpo" / "checkpoints" / "step_00000001").is_dir()


def test_fastrlhf_cli_runs_ppo(tmp_path, tiny_model_dir, reward_model_dir):
    from fastrlhf.cli import main

    rc = main([
        "ppo", "--config", str(EXAMPLES / "ppo.yaml"), f"run_dir={tmp_path / 'ppo'}",
        f"model.name_or_path={tiny_model_dir}", f"ppo.reward_model={reward_model_dir}",
        "train.max_steps=1", "train.progress_bar=false", "logging.plots=false",
        "data.num_train=16", "data.num_eval=4", "ppo.rollout_batch_size=2",
        "ppo.num_mini_batches=2", "ppo.max_new_tokens=3", "ppo.eval_max_new_tokens=3",
    ])  # fmt: skip
    assert rc == 0
    assert (tmp_path / "ppo" / "final" / "critic" / "value_head.json").is_file()
