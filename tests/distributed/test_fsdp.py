"""FSDP2 data parallelism on CPU (gloo): 2 processes vs 1 on the same global batch.

The 1-process run happens inside pytest (no process group: the trivial context, the
model unsharded); the 2-process run is ``worker.py`` under torchrun. Both execute
``sft_steps`` on the embedded tiny Llama (tied embeddings) in float32:

- the loss curves agree within 1e-5 and the weights after 3 steps closely;
- a checkpoint written by 1 process loads into 2 (in the worker) and one written by 2
  loads into 1 (here): identical tensors, and the resumed step matches the
  uninterrupted run;
- the HF export loads in transformers with identical weights and generates what the
  sharded model generated under ``gathered_params``; the ValueModel export too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastrlhf.distributed import (
    DistContext,
    all_gather_varlen,
    all_reduce_sum,
    gathered_params,
    global_masked_whiten,
    global_token_count,
    init_distributed,
    load_sharded,
    rank_micro_batches,
    save_sharded,
    shard_for_rank,
    shard_model,
)
from tests.distributed import sft_steps

WORKER = Path(__file__).with_name("worker.py")
SINGLE = DistContext()  # no process group: what a plain `python -m fastrlhf` gets


def _launch(nproc: int, out: Path, *args: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc_per_node={nproc}", str(WORKER), "--out", str(out), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    (out / "worker.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if "Loading weights" not in ln]
        pytest.fail(
            f"torchrun worker failed ({proc.returncode}), log in {out / 'worker.log'}:\n"
            + "\n".join(lines[-80:])
        )
    return json.loads((out / "result.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 1-process run (here) and the 2-process run (torchrun), with their artefacts."""
    from fastrlhf.data.embedded import embedded_model

    root = tmp_path_factory.mktemp("dist")
    model_dir = embedded_model(root / "model", seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        policy, optimizer, seqs = sft_steps.build(model_dir, SINGLE)
        single = {"steps": [], "dir": root / "single"}
        for step in range(sft_steps.STEPS):
            single["steps"].append(sft_steps.train_step(step, policy, optimizer, seqs, SINGLE))
            if step == 1:
                save_sharded(single["dir"] / "ckpt_step2", policy, optimizer, {"step": 2}, SINGLE)
                single["weights_step2"] = sft_steps.weights(policy, SINGLE)
        single["weights_step3"] = sft_steps.weights(policy, SINGLE)
    finally:
        torch.set_num_threads(threads)
    out2 = root / "two"
    out2.mkdir()
    result = _launch(
        2, out2, "--model", model_dir, "--resume-from", str(single["dir"] / "ckpt_step2")
    )
    two = {"dir": out2, **result}
    for name in ("weights_step2", "weights_step3", "resumed_loaded", "resumed_step3"):
        two[name] = torch.load(out2 / f"{name}.pt", weights_only=True)
    return {"model": model_dir, "single": single, "two": two}


def _assert_weights(ours: dict, ref: dict, atol: float, what: str) -> None:
    assert ours.keys() == ref.keys(), f"{what}: different parameter names"
    for name in ref:
        if atol == 0:
            assert torch.equal(ours[name], ref[name]), f"{what}: {name} differs"
        else:
            diff = (ours[name] - ref[name]).abs()
            assert diff.max() <= atol, (
                f"{what}: {name} differs by up to {diff.max():.3e} > {atol:.1e} "
                f"({int((diff > atol).sum())} of {diff.numel()} elements)"
            )


def _assert_trained_alike(ours: dict, ref: dict, steps: int, what: str) -> None:
    """Weights after ``steps`` AdamW steps from the same start, gradients equal up to
    float32 summation order. Adam divides by sqrt(v): an element whose gradient is at
    rounding level moves by up to lr either way per step, so a few elements may differ
    by O(lr); all others must agree to 1e-6."""
    assert ours.keys() == ref.keys(), f"{what}: different parameter names"
    bound = 2 * sft_steps.LR * steps
    loose = total = 0
    for name in ref:
        diff = (ours[name] - ref[name]).abs()
        assert diff.max() <= bound, f"{what}: {name} differs by {diff.max():.3e} > {bound}"
        loose += int((diff > 1e-6).sum())
        total += diff.numel()
    assert loose <= 1e-3 * total, f"{what}: {loose} of {total} elements differ by > 1e-6"


def test_two_processes_match_one(runs):
    one, two = runs["single"]["steps"], runs["two"]["steps"]
    assert runs["two"]["world_size"] == 2
    # the packing differs (2 micro-batches per rank vs 4 in one process), the update must not
    assert [s["micro_batches"] for s in two] != [s["micro_batches"] for s in one]
    for k, (a, b) in enumerate(zip(one, two)):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, f"step {k}: loss {a['loss']} vs {b['loss']}"
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * a["grad_norm"], f"step {k}"
    assert one[-1]["loss"] < one[0]["loss"]  # it trains
    # clipping was active (grad norm > 1) and still agrees
    assert one[0]["grad_norm"] > sft_steps.MAX_GRAD_NORM
    _assert_trained_alike(runs["two"]["weights_step3"], runs["single"]["weights_step3"], 3, "final")


def test_checkpoint_one_to_two(runs):
    """Written without a process group, loaded by 2 FSDP ranks: identical tensors, and
    the resumed step 3 equals the uninterrupted 1-process step 3 (optimizer state too)."""
    two = runs["two"]
    assert two["resumed_extra"] == {"step": 2}
    # published atomically: the final directory, no temporary left behind
    for run in (runs["single"]["dir"], two["dir"]):
        assert (run / "ckpt_step2" / "dcp" / ".metadata").is_file()
        assert not list(run.glob(".tmp-*")) and not list(run.glob(".old-*"))
    _assert_weights(two["resumed_loaded"], runs["single"]["weights_step2"], 0, "loaded")
    resumed = two["resumed_step3_metrics"]["loss"]
    assert abs(resumed - runs["single"]["steps"][2]["loss"]) <= 1e-5
    _assert_trained_alike(two["resumed_step3"], runs["single"]["weights_step3"], 3, "resumed")


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_checkpoint_two_to_one(runs, one_thread):
    """Written by 2 FSDP ranks, loaded by an unsharded single-process model."""
    policy, optimizer, seqs = sft_steps.build(runs["model"], SINGLE)
    extra = load_sharded(runs["two"]["dir"] / "ckpt_step2", policy, optimizer, SINGLE)
    assert extra == {"step": 2}
    _assert_weights(sft_steps.weights(policy, SINGLE), runs["two"]["weights_step2"], 0, "loaded")
    step3 = sft_steps.train_step(2, policy, optimizer, seqs, SINGLE)
    assert abs(step3["loss"] - runs["two"]["steps"][2]["loss"]) <= 1e-5
    _assert_trained_alike(sft_steps.weights(policy, SINGLE), runs["two"]["weights_step3"], 3, "3")


def test_export_hf_loads_in_transformers(runs):
    from transformers import AutoModelForCausalLM

    from fastrlhf.models import load_policy
    from tests.distributed.worker import PROMPTS, greedy, prompt_logits

    export = runs["two"]["dir"] / "hf_export"
    hf = AutoModelForCausalLM.from_pretrained(str(export), dtype=torch.float32)
    ref = runs["two"]["weights_step3"]
    loaded = {f"model.{k}": v for k, v in hf.state_dict().items()}
    assert loaded.keys() == ref.keys()
    _assert_weights(loaded, ref, 0, "export")
    assert hf.get_output_embeddings().weight is hf.get_input_embeddings().weight  # still tied
    # the unsharded export generates what the sharded model generated, gathered
    policy = load_policy(str(export), dtype="float32").eval()
    with torch.no_grad():
        assert greedy(policy, PROMPTS) == runs["two"]["generated"]
        logits = prompt_logits(policy)  # [T, V]
    gathered = torch.load(runs["two"]["dir"] / "gathered_logits.pt", weights_only=True)
    torch.testing.assert_close(gathered, logits, rtol=1e-5, atol=1e-5)
    assert all(len(g) == 6 for g in runs["two"]["generated"])


def test_lora_policy_sharded(runs):
    # checked inside the worker (sharded step == unsharded replica, adapter export loads)
    assert runs["two"]["lora_checked"] > 0
    assert runs["two"]["collectives_checked"]


def test_value_model_export(runs):
    from fastrlhf.models import ValueModel, load_value_model

    exported = ValueModel.from_pretrained(runs["two"]["dir"] / "value_export", dtype="float32")
    fresh = load_value_model(runs["model"], dtype="float32", seed=1)  # what the worker sharded
    assert exported.score.weight.dtype == torch.float32
    _assert_weights(exported.state_dict(), fresh.state_dict(), 0, "value export")


# ---------------------------------------------------------------------------------------
# the single-process context: every helper is the identity, bad input gets clear errors


def test_single_process_context(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ctx = init_distributed(device="cpu")
    assert (ctx.rank, ctx.world_size, ctx.distributed, ctx.is_main) == (0, 1, False, True)
    x = torch.randn(7, dtype=torch.float64)
    mask = torch.rand(7) < 0.6
    assert all_reduce_sum(x, ctx) is x
    assert global_token_count(torch.tensor(13), ctx) == 13
    gathered, lengths = all_gather_varlen(x, ctx)
    assert gathered is x and lengths == [7]
    from fastrlhf.ops.advantages import masked_whiten

    assert torch.equal(global_masked_whiten(x, mask, ctx), masked_whiten(x, mask))
    module = torch.nn.Linear(3, 2)
    assert shard_model(module, ctx) is module
    with gathered_params(module) as m:
        assert m is module


def test_rank_micro_batches_cover_the_step():
    lengths = [5, 9, 3, 7, 11, 2, 8, 6, 4, 10]
    indices = [9, 0, 3, 7, 1, 5]
    per_rank = [
        rank_micro_batches(indices, lengths, 16, DistContext(rank=r, world_size=2))
        for r in range(2)
    ]
    flat = sorted(i for mbs in per_rank for mb in mbs for i in mb)
    assert flat == sorted(indices)
    assert all(sum(lengths[i] for i in mb) <= 16 for mbs in per_rank for mb in mbs)
    # token-balanced (Karmarkar-Karp): 19 and 20 of the 39 tokens here
    totals = sorted(sum(lengths[i] for mb in mbs for i in mb) for mbs in per_rank)
    assert totals == [19, 20]
    one = rank_micro_batches(indices, lengths, 16, SINGLE)
    assert sorted(i for mb in one for i in mb) == sorted(indices)
    # an example over the budget gets a micro-batch of its own, as with one process
    assert rank_micro_batches([0, 1], [3, 9], 4, SINGLE) == [[0], [1]]


def test_bad_input_errors(monkeypatch):
    with pytest.raises(ValueError, match="cannot be split evenly over 2 ranks"):
        shard_for_rank([[0], [1], [2]], DistContext(rank=0, world_size=2))
    with pytest.raises(ValueError, match="device must be"):
        init_distributed(device="tpu")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="launch with torchrun"):
        init_distributed(device="cpu")
    with pytest.raises(FileNotFoundError, match="not a sharded checkpoint"):
        load_sharded("/nonexistent/ckpt", torch.nn.Linear(2, 2), None, SINGLE)


# ---------------------------------------------------------------------------------------
# CUDA: NCCL, one process per GPU, bf16 mixed precision over fp32 master weights


@pytest.mark.gpu
def test_cuda_mixed_precision_matches_fp32(tmp_path):
    """All GPUs as FSDP ranks (bf16 compute, fp32 reduce and master weights) against one
    unsharded fp32 process: the same curve up to bf16 rounding; checkpoints load exactly
    (fp32 master weights) and the export holds the fp32 master weights."""
    from fastrlhf.data.embedded import embedded_model

    model_dir = embedded_model(tmp_path / "model", seed=0)
    cuda = DistContext(device=torch.device("cuda"))
    policy, optimizer, seqs = sft_steps.build(model_dir, cuda)
    one = []
    for step in range(sft_steps.STEPS):
        one.append(sft_steps.train_step(step, policy, optimizer, seqs, cuda))
        if step == 1:
            save_sharded(tmp_path / "ckpt_step2", policy, optimizer, {"step": 2}, cuda)
            weights_step2 = sft_steps.weights(policy, cuda)
    out = tmp_path / "gpus"
    out.mkdir()
    nproc = torch.cuda.device_count()
    result = _launch(
        nproc, out, "--model", model_dir, "--resume-from", str(tmp_path / "ckpt_step2")
    )
    assert result["world_size"] == nproc
    for k, (a, b) in enumerate(zip(one, result["steps"])):
        assert abs(a["loss"] - b["loss"]) <= 2e-2 * a["loss"], f"step {k}: {a} vs {b}"
    loaded = torch.load(out / "resumed_loaded.pt", weights_only=True)
    _assert_weights(loaded, {k: v.cpu() for k, v in weights_step2.items()}, 0, "loaded")
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(out / "hf_export"), dtype=torch.float32)
    ref = torch.load(out / "weights_step3.pt", weights_only=True)
    assert next(iter(ref.values())).dtype == torch.float32
    _assert_weights({f"model.{k}": v for k, v in hf.state_dict().items()}, ref, 0, "export")


def test_torchrun_one_process(runs, tmp_path):
    """FSDP over a 1-rank group (torchrun --nproc_per_node=1): the same curve as the
    unsharded run, and the 2-rank checkpoint loads into it exactly."""
    out = tmp_path / "one"
    out.mkdir()
    ckpt = runs["two"]["dir"] / "ckpt_step2"
    result = _launch(1, out, "--model", runs["model"], "--resume-from", str(ckpt))
    assert result["world_size"] == 1
    for a, b in zip(runs["single"]["steps"], result["steps"]):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 and a["micro_batches"] == b["micro_batches"]
    loaded = torch.load(out / "resumed_loaded.pt", weights_only=True)
    _assert_weights(loaded, runs["two"]["weights_step2"], 0, "loaded 2 -> 1")
    step3 = torch.load(out / "resumed_step3.pt", weights_only=True)
    _assert_trained_alike(step3, runs["two"]["weights_step3"], 3, "resumed 2 -> 1")
