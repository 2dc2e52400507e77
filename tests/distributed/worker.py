"""torchrun worker for tests/distributed/test_fsdp.py (float32, gloo on CPU, NCCL on CUDA).

    torchrun --standalone --nproc_per_node=R tests/distributed/worker.py \
        --model DIR --out DIR [--resume-from CKPT]

1. trains ``sft_steps.STEPS`` steps from scratch; per step the global loss and gradient
   norm; full weights after steps 2 and 3; a sharded checkpoint after step 2
2. with --resume-from: a fresh model + optimizer loads that checkpoint (written by another
   world size), records the loaded weights, runs step 3 and records loss and weights
   (run after 3., with the trained policy's export already written)
3. exports the trained policy in HF format; greedy generation and the logits of one
   padded forward under gathered_params
4. a ValueModel: sharded forward == unsharded forward; exported
5. a LoRA policy: one sharded step == the step of an unsharded replica; adapter export
6. all_gather_varlen / global_masked_whiten on rank-dependent lengths

Rank 0 writes ``result.json`` and ``*.pt`` under --out; any failed check raises (the
test then shows this process's output).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

from fastrlhf.distributed import (  # noqa: E402
    all_gather_varlen,
    export_hf,
    gathered_params,
    global_masked_whiten,
    init_distributed,
    load_sharded,
    save_sharded,
    shard_model,
    teardown,
)
from tests.distributed import sft_steps  # noqa: E402

PROMPTS = ["12+7=", "3-1=", "20+19="]


def train_and_checkpoint(args, ctx, out: Path, result: dict) -> tuple:
    policy, optimizer, seqs = sft_steps.build(args.model, ctx)
    result["steps"] = []
    for step in range(sft_steps.STEPS):
        result["steps"].append(sft_steps.train_step(step, policy, optimizer, seqs, ctx))
        if step == 1:
            save_sharded(out / "ckpt_step2", policy, optimizer, {"step": 2}, ctx)
            w = sft_steps.weights(policy, ctx)
            if ctx.is_main:
                torch.save(w, out / "weights_step2.pt")
    w = sft_steps.weights(policy, ctx)
    if ctx.is_main:
        torch.save(w, out / "weights_step3.pt")
    return policy, seqs


def resume(args, ctx, out: Path, result: dict) -> None:
    policy, optimizer, seqs = sft_steps.build(args.model, ctx)
    extra = load_sharded(args.resume_from, policy, optimizer, ctx)
    result["resumed_extra"] = {k: int(v) for k, v in extra.items()}
    w = sft_steps.weights(policy, ctx)
    if ctx.is_main:
        torch.save(w, out / "resumed_loaded.pt")
    result["resumed_step3_metrics"] = sft_steps.train_step(2, policy, optimizer, seqs, ctx)
    w = sft_steps.weights(policy, ctx)
    if ctx.is_main:
        torch.save(w, out / "resumed_step3.pt")


def greedy(policy, prompts: list[str], new_tokens: int = 6) -> list[list[int]]:
    """Greedy continuations of exactly ``new_tokens`` tokens (EOS suppressed, so a model
    that learned to stop early still produces tokens to compare)."""
    from fastrlhf.models import padded_attention

    out = []
    device = policy.lm_head_weight.device
    with padded_attention(policy.causal_lm):
        for ids in policy.tokenizer(prompts)["input_ids"]:
            x = torch.tensor([ids], device=device)  # [1, T]
            gen = policy.model.generate(
                input_ids=x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
            )
            out.append(gen[0, x.shape[1] :].tolist())
    return out


def prompt_logits(policy) -> torch.Tensor:
    """[T, V] logits of a padded (HF) forward of the first prompt: every weight counts."""
    from fastrlhf.models import padded_attention

    ids = policy.tokenizer(PROMPTS[:1])["input_ids"]
    ids = torch.tensor(ids, device=policy.lm_head_weight.device)  # [1, T]
    with padded_attention(policy.causal_lm):
        return policy.causal_lm(input_ids=ids).logits[0].float().cpu()


def generate(policy, ctx, out: Path, result: dict) -> None:
    from torch.distributed.tensor import DTensor

    policy.eval()
    with torch.no_grad(), gathered_params(policy):
        assert not isinstance(policy.lm_head_weight, DTensor), "not gathered"
        result["generated"] = greedy(policy, PROMPTS)
        logits = prompt_logits(policy)
    if ctx.is_main:
        torch.save(logits, out / "gathered_logits.pt")
    policy.train()
    if ctx.distributed:
        assert isinstance(policy.lm_head_weight, DTensor), "not resharded after generation"


def value_model(args, ctx, out: Path) -> None:
    from fastrlhf.data.batch import collate_packed
    from fastrlhf.models import load_value_model

    plain = load_value_model(args.model, dtype="float32", device=ctx.device, seed=1)
    sharded = shard_model(
        load_value_model(args.model, dtype="float32", device=ctx.device, seed=1), ctx
    )
    seqs = sft_steps.examples(plain.tokenizer)[ctx.rank :: ctx.world_size][:3]
    batch = collate_packed(seqs).to(ctx.device)
    with torch.no_grad():
        ref = plain(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen)
        ours = sharded(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen)
    # fp32 on CPU; on CUDA the sharded backbone computes in bf16 (mixed precision)
    tol = 1e-5 if ctx.device.type == "cpu" else 5e-2
    torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)
    export_hf(out / "value_export", sharded, ctx)


def lora(args, ctx, out: Path, result: dict) -> None:
    """A LoRA policy (frozen base, trainable adapters in the same FSDP units): one sharded
    step == the same step of an unsharded replica on the whole global batch (run here,
    on every rank); the export is the adapter, and it loads back."""
    from fastrlhf.distributed import DistContext, full_state_dict
    from fastrlhf.models import load_policy

    def build(sharded: bool):
        torch.manual_seed(5)  # the same adapter init for both copies
        policy = load_policy(args.model, dtype="float32", device=ctx.device, lora_rank=4)
        if sharded:
            shard_model(policy, ctx)
        params = [p for p in policy.parameters() if p.requires_grad]
        return policy, torch.optim.AdamW(params, lr=sft_steps.LR, foreach=True)

    seqs = sft_steps.examples(load_policy(args.model, device=ctx.device).tokenizer)
    policy, optimizer = build(True)
    replica, replica_opt = build(False)
    local = DistContext(device=ctx.device)
    ours = sft_steps.train_step(0, policy, optimizer, seqs, ctx)
    ref = sft_steps.train_step(0, replica, replica_opt, seqs, local)
    # Adam's first step moves an element by ~lr * sign(grad): where the gradient is at
    # rounding level the sign can differ between the two reduction orders (and between
    # bf16 and fp32 compute on CUDA), so elements may differ by up to 2 lr; on CPU only a
    # handful may, all others agree to 1e-6
    cpu = ctx.device.type == "cpu"
    loss_tol = 1e-5 if cpu else 2e-2
    assert abs(ours["loss"] - ref["loss"]) <= loss_tol * max(1.0, abs(ref["loss"])), (ours, ref)
    full = full_state_dict(policy, ctx)
    export_hf(out / "lora_export", policy, ctx)
    if ctx.is_main:
        trained = {n: p for n, p in replica.named_parameters() if p.requires_grad}
        assert trained and all("lora_" in n for n in trained), sorted(trained)[:4]
        loose = total = 0
        for name, p in trained.items():
            diff = (full[name] - p.detach().cpu()).abs()
            assert diff.max() <= 2.5 * sft_steps.LR, (name, float(diff.max()))
            loose += int((diff > 1e-6).sum())
            total += diff.numel()
        assert not cpu or loose <= 1e-3 * total, f"{loose} of {total} LoRA elements differ"
        back = load_policy(str(out / "lora_export"), dtype="float32")
        back_params = dict(back.named_parameters())
        for name in trained:
            assert torch.equal(back_params[name].detach(), full[name]), name
        result["lora_checked"] = len(trained)


def collectives(ctx, result: dict) -> None:
    from fastrlhf.ops.advantages import masked_whiten

    # rank r holds 3 + 2r values: every rank can rebuild all ranks' tensors
    def part(r: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(100 + r)
        x = torch.randn(3 + 2 * r, generator=g, dtype=torch.float64)
        mask = torch.rand(3 + 2 * r, generator=g) < 0.7
        return x, mask

    x, mask = part(ctx.rank)
    gathered, lengths = all_gather_varlen(x.to(ctx.device), ctx)
    expected = torch.cat([part(r)[0] for r in range(ctx.world_size)])
    assert lengths == [3 + 2 * r for r in range(ctx.world_size)], lengths
    assert torch.equal(gathered.cpu(), expected), "all_gather_varlen mismatch"
    ours = global_masked_whiten(x.to(ctx.device), mask.to(ctx.device), ctx).cpu()
    masks = torch.cat([part(r)[1] for r in range(ctx.world_size)])
    start = sum(lengths[: ctx.rank])
    ref = masked_whiten(expected, masks)[start : start + lengths[ctx.rank]]
    # float64; on CUDA the sums run in another order than the CPU reference's
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    result["collectives_checked"] = True


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--resume-from", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    # the policy returns a view of HF's output; the trainers never modify it in place
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module")
    ctx = init_distributed()
    out = Path(args.out)
    result: dict = {"world_size": ctx.world_size}

    def stage(name: str) -> None:  # progress in the log the test prints on failure
        print(f"[rank {ctx.rank}] {name}", file=sys.stderr, flush=True)

    try:
        stage("train")
        policy, _ = train_and_checkpoint(args, ctx, out, result)
        stage("export")
        export_hf(out / "hf_export", policy, ctx)
        stage("generate")
        generate(policy, ctx, out, result)
        if args.resume_from:
            stage("resume")
            resume(args, ctx, out, result)
        stage("value model")
        value_model(args, ctx, out)
        stage("lora")
        lora(args, ctx, out, result)
        stage("collectives")
        collectives(ctx, result)
        if ctx.is_main:
            (out / "result.json").write_text(json.dumps(result, indent=1))
        stage("teardown")
    finally:
        teardown(ctx)
    stage("done")


if __name__ == "__main__":
    main()
