"""SFT: the packed, fused response-only loss equals an unpacked HF forward; the fused
and reference lm_head paths give the same loss curve; a run writes its run directory."""

from __future__ import annotations

import json

import pytest
import torch

from fastrlhf.models.attention import padded_attention
from fastrlhf.trainers.loop import train
from fastrlhf.trainers.sft import SFTStage


def test_packed_fused_loss_matches_unpacked_hf_forward(small_config):
    stage = SFTStage(small_config("sft"))
    idx = [3, 0, 7, 5, 11]
    mb = stage.micro_batch(idx)
    loss_sum, _ = stage.loss_sum(mb)
    # independent derivation: each sequence alone through HF's own forward and logits
    model = stage.policy.causal_lm
    expected = torch.zeros((), dtype=torch.float64)
    tokens = 0
    with torch.no_grad():
        for i in idx:
            seq = stage.train_seqs[i]
            ids = torch.tensor(seq.input_ids)[None]  # [1, T]
            with padded_attention(model):
                logits = model(input_ids=ids).logits[0].double()  # [T, V]
            logp = torch.log_softmax(logits[:, : stage.policy.vocab_size], -1)
            mask = torch.tensor(seq.loss_mask[1:], dtype=torch.bool)  # token t+1 is a target
            targets = ids[0, 1:]
            expected -= logp[:-1].gather(1, targets[:, None])[:, 0][mask].sum()
            tokens += int(mask.sum())
    assert mb.units == tokens > 0
    assert loss_sum.item() == pytest.approx(expected.item(), rel=1e-4)


def test_fused_and_reference_paths_give_the_same_curve(small_config, monkeypatch, tmp_path):
    import fastrlhf.ops
    from fastrlhf.ops.reference.linear_logprobs import linear_token_logprobs_reference

    def run(tag):
        cfg = small_config("sft", "train.max_steps=5", "optim.lr=3e-3", f"run_dir={tmp_path / tag}")
        train(SFTStage(cfg), cfg)
        rows = [json.loads(x) for x in (tmp_path / tag / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if r["split"] == "train"]

    def reference(hidden, weight, labels, bias=None, vocab_size=None, validate=True):
        return linear_token_logprobs_reference(
            hidden, weight, labels, bias=bias, vocab_size=vocab_size
        )

    ours = run("fused")
    monkeypatch.setattr(fastrlhf.ops, "linear_token_logprobs", reference)
    ref = run("reference")
    assert len(ours) == 5 and ours[-1] < ours[0]  # it learns
    assert ours == pytest.approx(ref, rel=2e-4)


def test_run_directory_contents(small_config, tmp_path):
    cfg = small_config(
        "sft", "train.max_steps=2", "checkpoint.save_final=true", "logging.plots=true",
        "train.eval_every=1", "checkpoint.save_every=1", "checkpoint.keep_last=1",
        "train.peak_tflops=0.5",
    )  # fmt: skip
    stage = SFTStage(cfg)
    result = train(stage, cfg)
    run_dir = tmp_path / "sft"
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "plots" / "train.png").is_file() and (
        run_dir / "plots" / "eval.png"
    ).is_file()
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_gb", "mfu"):
        assert key in train_rows[0]
    # MFU = 6 * matmul params * tokens/s / peak (tied embeddings counted once)
    n = sum(p.numel() for p in stage.policy.parameters())
    row = train_rows[-1]
    assert row["mfu"] == pytest.approx(6 * n * row["tokens_per_s"] / 0.5e12, rel=1e-6)
    assert {r["step"] for r in rows if r["split"] == "eval"} == {1, 2}
    assert set(result.eval_metrics) == {"loss", "ppl"}
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_00000002"]
    # the final model loads with plain transformers
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(result.final_dir))
    assert torch.equal(
        m.lm_head.weight, result_weight(result.final_dir, "model.embed_tokens.weight")
    )


def result_weight(path, key):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))[key]
