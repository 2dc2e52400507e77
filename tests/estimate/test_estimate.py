"""fastrlhf.estimate: exact byte counts against formulas, and the fake-tensor estimate
against the same tracker on a real CPU run of the same phase (within 2%)."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fastrlhf.config import load_config
from fastrlhf.estimate import estimate, formulas, kv_cache_bytes, phases
from fastrlhf.estimate.measure import tracked
from fastrlhf.estimate.models import build_models, workload
from fastrlhf.estimate.presets import PRESETS, hf_config, model_config_dict

TINY = dict(
    model_type="qwen2",
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    max_position_embeddings=256,
    tie_word_embeddings=True,
)
# 8 prompts of 8 tokens, 4 new tokens: sequences of 12, 4 per micro-batch, 2 micro-batches
RL = [
    "data.max_prompt_length=8",
    "data.max_length=16",
    "ppo.max_new_tokens=4",
    "ppo.rollout_batch_size=8",
    "ppo.num_mini_batches=1",
    "train.micro_batch_tokens=48",
]


def _cfg(stage: str = "ppo", extra: tuple[str, ...] = ()):
    overrides = [f"stage={stage}"]
    if stage in ("ppo", "grpo"):
        overrides += [
            *RL,
            "ppo.reward_model=rm",
            "ppo.kind=" + ("ppo" if stage == "ppo" else "grpo"),
        ]
        if stage == "grpo":
            overrides.append("ppo.n_samples=2")
    else:
        overrides += [
            "data.max_prompt_length=8",
            "data.max_length=16",
            "train.micro_batch_tokens=64",
        ]
    return load_config(None, overrides + list(extra))


def _models(cfg, fake: bool, **cfg_over):
    data = {**TINY, **cfg_over}
    return build_models(cfg, hf_config(data), hf_config(data), fake=fake)


def _mode(fake: bool):
    return FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()


# ------------------------------------------------------------------------ presets


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_build_configs(name):
    display, data = model_config_dict(name.lower())
    assert display == name
    cfg = hf_config(data)
    assert cfg.hidden_size == PRESETS[name]["hidden_size"]


def test_local_config_json_and_bad_specs(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    assert model_config_dict(str(tmp_path))[1]["hidden_size"] == 64
    with pytest.raises(ValueError, match="neither a preset"):
        model_config_dict(str(tmp_path / "missing"))
    (tmp_path / "bad.json").write_text(json.dumps({"hidden_size": 3}))
    with pytest.raises(ValueError, match="model_type"):
        model_config_dict(str(tmp_path / "bad.json"))


@pytest.mark.parametrize(
    "name, count",
    [
        # the parameter counts the model cards publish
        ("Qwen2.5-0.5B", 494_032_768),
        ("Qwen2.5-1.5B", 1_543_714_304),
        ("Qwen2.5-7B", 7_615_616_512),
        ("Llama-3.1-8B", 8_030_261_248),
    ],
)
def test_preset_parameter_counts(name, count):
    cfg = _cfg("sft")
    with FakeTensorMode(allow_non_fake_inputs=True):
        m = build_models(cfg, hf_config(PRESETS[name]), fake=True)
        f = formulas(cfg, m)
    assert f["policy_params"] == count
    assert f["policy_param_bytes"] == 4 * count  # float32 master weights
    assert f["policy_adamw_bytes"] == 8 * count


# ------------------------------------------------------------------------ exact bytes


def _param_bytes(*modules) -> int:
    return sum(p.numel() * p.element_size() for mod in modules for p in mod.parameters())


@pytest.mark.parametrize("fake", [True, False])
def test_parameter_gradient_adamw_bytes_are_exact(fake):
    cfg = _cfg("ppo")
    with _mode(fake):
        m = _models(cfg, fake)
        f = formulas(cfg, m)
        for mod in m.trained():
            for p in mod.parameters():
                p.grad = torch.zeros_like(p)
        with tracked(*m.trained(), *m.frozen(), *m.optimizers) as t:
            for opt in m.optimizers:
                opt.step()
        cats = t.result().by_category
    params = sum(f[f"{n}_param_bytes"] for n in ("policy", "reference", "reward", "critic"))
    assert cats["parameters"] == params == _param_bytes(*m.trained(), *m.frozen())
    assert cats["gradients"] == f["policy_grad_bytes"] + f["critic_grad_bytes"]
    # AdamW: exp_avg and exp_avg_sq per parameter (+ a 0-d step tensor per parameter)
    steps = sum(4 for mod in m.trained() for _ in mod.parameters())
    assert cats["optimizer"] == f["policy_adamw_bytes"] + f["critic_adamw_bytes"] + steps


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kv_cache_bytes_match_formula(dtype):
    from fastrlhf.rollout import ReusableKVCache
    from fastrlhf.rollout.generate import _policy_parts

    cfg = _cfg("ppo", (f"model.dtype={dtype}",))
    with FakeTensorMode(allow_non_fake_inputs=True):
        m = _models(cfg, True)
        parts = _policy_parts(m.policy)
        kv = ReusableKVCache()
        cache = kv.acquire(parts.hf_config, 8, 12, dtype=parts.kv_dtype)
        m.policy.causal_lm.set_attn_implementation("sdpa")
        with torch.no_grad():
            parts.decoder(
                input_ids=torch.zeros(8, 8, dtype=torch.long),
                attention_mask=torch.ones(8, kv.capacity, dtype=torch.long),
                position_ids=torch.arange(8).expand(8, 8),
                past_key_values=cache,
                use_cache=True,
            )
        size = torch.empty((), dtype=getattr(torch, dtype)).element_size()
        assert kv.nbytes() == kv_cache_bytes(m.policy.config, 8, 12, size) > 0
        # 2 (K, V) x 2 layers x 8 rows x 2 kv heads x 64 (capacity granule) x 16 head dim
        assert kv.nbytes() == 2 * 2 * 8 * 2 * 64 * 16 * size


# ------------------------------------------------------------------------ fake vs real


def _phase_peaks(cfg, fake: bool) -> dict[str, int]:
    w = workload(cfg)
    out = {}
    with _mode(fake):
        torch.manual_seed(0)
        m = _models(cfg, fake)
        if cfg.stage in ("ppo", "grpo"):
            meas, out["kernels/token"] = phases.generate(cfg, m, w, reuse=True)
            out["generate"] = meas.total_bytes
            for fused in (True, False):
                out[f"score/{fused}"] = phases.score(cfg, m, w, fused=fused).total_bytes
        for fused in (True, False):
            meas, out[f"kernels/step/{fused}"] = phases.train(cfg, m, w, fused=fused)
            out[f"train/{fused}"] = meas.total_bytes
    return out


@pytest.mark.parametrize("stage", ["ppo", "grpo", "sft", "dpo", "rm"])
def test_fake_estimate_equals_real_cpu_run(stage):
    extra = ("dpo.reference=online",) if stage == "dpo" else ()
    cfg = _cfg(stage, extra)
    fake, real = _phase_peaks(cfg, True), _phase_peaks(cfg, False)
    assert fake.keys() == real.keys()
    for key in fake:  # peak bytes, and the ATen kernel counts (the launch proxy)
        assert fake[key] == pytest.approx(real[key], rel=0.02), key


def test_reference_logprobs_cost_logits_memory():
    # SFT with every token a label: the reference path (PolicyModel.token_logprobs with
    # reference=True) makes [N, V] logits, their fp32 copy and the fp32 log_softmax, which
    # backward keeps; the fused op none of them. At least that saved fp32 [N, V] shows.
    extra = ("data.max_prompt_length=1", "model.dtype=bfloat16", "train.micro_batch_tokens=1024")
    cfg = _cfg("sft", extra + ("train.batch_size=64",))
    w = workload(cfg)
    with FakeTensorMode(allow_non_fake_inputs=True):
        m = _models(cfg, True, vocab_size=32768)
        fused = phases.train(cfg, m, w, fused=True)[0].total_bytes
        ref = phases.train(cfg, m, w, fused=False)[0].total_bytes
    n = w.micro_seqs * w.loss_len
    assert ref - fused >= n * 32768 * 4 * 0.9


def test_estimate_document_and_cli(tmp_path, capsys):
    from fastrlhf.cli import main

    (tmp_path / "config.json").write_text(json.dumps(TINY))
    cfg = _cfg("grpo")
    doc = estimate(cfg, str(tmp_path))
    phases_seen = {(r["phase"], r["fused_ops"], r["memory_reuse"]) for r in doc["phases"]}
    assert len(phases_seen) == 12  # 3 phases x fused on/off x reuse on/off
    for row in doc["phases"]:
        assert row["peak_bytes"] > 0 and set(row) >= {"peak_gib", "by_category_bytes", "kernels"}
    assert doc["train_fused_over_reference"] > 0
    args = ["estimate", "--model", str(tmp_path), "--json", *RL, "stage=sft"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["stage"] == "sft" and {r["phase"] for r in out["phases"]} == {"train"}
    assert main(["estimate", "--model", str(tmp_path), "stage=sft"]) == 0
    assert "peak GiB" in capsys.readouterr().out
    assert main(["estimate", "--model", "no-such-model", "stage=sft"]) == 2


def test_calibrate_runs_the_trainer_on_cpu():
    # the GPU script's plumbing: real PPOStage iterations on models of a config's shape
    from fastrlhf.estimate import calibrate

    cfg = _cfg("ppo", ("device=cpu",))
    peaks = calibrate.measure(cfg, hf_config(TINY), torch.device("cpu"))
    assert set(peaks) == {"generate", "score", "train"}  # None on CPU: no CUDA peak
    if not torch.cuda.is_available():
        assert calibrate.main([]) == 2
