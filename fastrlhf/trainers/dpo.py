"""Direct preference optimisation and its reference-free relatives.

For a pair (prompt x, chosen y_c, rejected y_r), with sequence log-probs summed over the
response tokens, logp(y|x) = sum_t log pi(y_t | x, y_<t), from the fused lm_head op:

    sigmoid  -(1-ls) log s(b h) - ls log s(-b h),   h = (logp_c - ref_c) - (logp_r - ref_r)
    ipo      (h - 1/(2b))^2
    hinge    max(0, 1 - b h)
    simpo    the sigmoid loss on b (avg_c - avg_r) - gamma    (avg = logp / response length)
    orpo     -avg_c - b log s(log odds(avg_c) - log odds(avg_r))
    tdpo1/2  TDPO: the sigmoid loss on b h - (b D_r - b D_c) (tdpo2: a (b D_r - sg(b D_c))),
             D = the sequential KL(pi_ref || pi_theta) of a response, from
             ``ops.linear_vocab_kl`` on the policy's and the reference's hidden states

(the formulas live in ``fastrlhf.ops.dpo_loss``; this file only feeds it). simpo and orpo
need no reference model, so none is loaded. Otherwise reference log-probs come either
from one pass over the data before training (``dpo.reference=precompute``: the reference
model is freed afterwards and the numbers are cached in the run directory) or from a
no-grad forward of the reference each step (``online``). With a LoRA policy and no
``dpo.ref_model``, the reference is the same module with its adapter disabled. The TDPO
kinds always run the reference online: they need its hidden states at every response
token ([R, H] per step), which are recomputed by a no-grad forward instead of cached.

Metrics per pair: rewards r = b (logp - ref) (b avg for the reference-free kinds),
chosen and rejected rewards, their margin and the reward accuracy P(r_c > r_r).

Legend: P = pairs, B = 2P sequences (2i chosen, 2i+1 rejected), n = response tokens.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fastrlhf.config import RunConfig
from fastrlhf.data.batch import collate_pairs
from fastrlhf.distributed import DistContext, barrier
from fastrlhf.trainers.data_order import pack_indices
from fastrlhf.trainers.loading import (
    load_policy_for,
    load_reference,
    model_path,
    reference_model,
)
from fastrlhf.trainers.logprobs import loss_index, move_index, response_logprobs, sequence_sums
from fastrlhf.trainers.loop import TrainResult, train
from fastrlhf.trainers.optim import matmul_params
from fastrlhf.trainers.records import data_settings, stage_records
from fastrlhf.trainers.reporting import progress
from fastrlhf.trainers.supervised import MicroBatch, SupervisedStage

REFERENCE_FREE = ("simpo", "orpo")
TDPO = ("tdpo1", "tdpo2")


class DPOStage(SupervisedStage):
    name = "dpo"

    def __init__(
        self, cfg: RunConfig, *, resume: bool = False, ctx: DistContext | None = None
    ) -> None:
        from fastrlhf.data.formats import tokenize_preferences

        super().__init__(cfg, ctx)
        path = model_path(cfg.model, cfg.run_dir)
        self.policy = load_policy_for(cfg, path, self.device, trainable=True)
        tok = self.policy.tokenizer
        train_records, eval_records = stage_records(cfg.data, "pairs")
        settings = data_settings(cfg.data, cfg.run_dir)
        self.train_pairs = tokenize_preferences(train_records, tok, settings)
        self.eval_pairs = tokenize_preferences(eval_records, tok, settings)
        if not self.train_pairs:
            raise ValueError(f"data.source={cfg.data.source!r} gave no preference pairs")

        self.needs_ref = cfg.dpo.kind not in REFERENCE_FREE
        self.ref_tables: dict[str, torch.Tensor] = {}  # split -> [P, 2] (chosen, rejected)
        self.ref_name = cfg.dpo.ref_model or path
        # a frozen PolicyModel, or None (the adapter-off policy, or no reference at all)
        self.ref = load_reference(
            cfg, self.policy, cfg.dpo.ref_model, path, self.device, needed=self.needs_ref
        )
        if not resume and self.ctx.is_main:
            # the cache is for resuming this run; a fresh run may have a retrained reference
            for stale in Path(cfg.run_dir).glob("reference_logps_*.safetensors"):
                stale.unlink()
        barrier(self.ctx)  # no rank reads a cache that is being removed
        if self.needs_ref and cfg.dpo.reference == "precompute" and cfg.dpo.kind not in TDPO:
            self.ref_tables = {
                "train": self._reference_table("train", self.train_pairs),
                "eval": self._reference_table("eval", self.eval_pairs),
            }
            self.ref = None  # freed: training never runs the reference again
        self._setup_training(self.policy)

    # --- log-probs -------------------------------------------------------------------

    def _micro(self, pairs, indices: list[int], split: str) -> MicroBatch:
        batch = collate_pairs(pairs)
        lens = torch.tensor(
            [[len(p.chosen_ids), len(p.rejected_ids)] for p in pairs], dtype=torch.float32
        )  # [P, 2] response lengths (SimPO / ORPO normalisation)
        return MicroBatch(
            batch=batch.to(self.device),
            indices=indices,
            units=len(pairs),
            num_tokens=batch.num_tokens,
            extra={
                "index": move_index(loss_index(batch), self.device),
                "lengths": lens.to(self.device),
                "split": split,
            },
        )

    def _seq_logps(self, model, mb: MicroBatch) -> torch.Tensor:
        """[P, 2] summed response log-probs (chosen, rejected) under ``model``."""
        logp = response_logprobs(model, mb.batch, mb.extra["index"])  # [n]
        return sequence_sums(logp, mb.extra["index"], mb.batch.num_seqs).view(-1, 2)

    def _tdpo_terms(self, mb: MicroBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[P, 2] policy log-probs, reference log-probs and sequential KL(ref || policy).

        One policy forward (with grad) and one no-grad reference forward; the KL goes
        through ``linear_vocab_kl`` on the [R, H] hidden states, never [R, V] logits.
        """
        from fastrlhf.ops import linear_vocab_kl

        index, b = mb.extra["index"], mb.batch

        def hidden_and_logps(model):
            hidden = model(b.input_ids, b.position_ids, b.cu_seqlens, b.max_seqlen)
            h = hidden.index_select(0, index.positions)  # [R, H]
            seq = sequence_sums(model.token_logprobs(h, index.labels), index, b.num_seqs)
            return h, seq.view(-1, 2)

        h, logps = hidden_and_logps(self.policy)
        with torch.no_grad(), reference_model(self.policy, self.ref) as ref:
            with self.forward_context():
                h_r, ref_logps = hidden_and_logps(ref)
            w_r, b_r = _head(ref, h_r)
        w, bias = _head(self.policy, h)
        t = self.policy.head
        kl = linear_vocab_kl(
            h, w, h_r.to(h.dtype), w_r.to(h.dtype), bias=bias,
            ref_bias=b_r.to(h.dtype) if b_r is not None else None,
            softcap=t.softcap, logit_scale=t.scale, validate=False,
        )  # fmt: skip
        seq_kl = sequence_sums(kl, index, b.num_seqs).view(-1, 2)
        return logps, ref_logps, seq_kl

    def _reference_logps(self, mb: MicroBatch) -> torch.Tensor:
        """[P, 2] reference log-probs: from the precomputed table, or a no-grad forward."""
        table = self.ref_tables.get(mb.extra["split"])
        if table is not None:
            return table[mb.indices].to(self.device)
        with torch.no_grad(), reference_model(self.policy, self.ref) as ref:
            with self.forward_context():
                return self._seq_logps(ref, mb)

    def _reference_table(self, split: str, pairs) -> torch.Tensor:
        """[P, 2] reference log-probs of every pair, cached in the run dir (keyed by the
        reference and the data) so that a resumed run does not recompute them."""
        if not pairs:
            return torch.zeros(0, 2)
        digest = hashlib.sha256(repr(self.ref_name).encode())
        for p in pairs:
            digest.update(repr((p.prompt_ids, p.chosen_ids, p.rejected_ids)).encode())
        key = digest.hexdigest()[:16]
        cache = Path(self.cfg.run_dir) / f"reference_logps_{split}_{key}.safetensors"
        if cache.is_file():
            return load_file(str(cache))["logps"]
        out = torch.zeros(len(pairs), 2)
        lengths = [2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs]
        groups = pack_indices(list(range(len(pairs))), lengths, self.cfg.train.micro_batch_tokens)
        with torch.no_grad(), reference_model(self.policy, self.ref) as model:
            model.eval()
            desc = f"reference log-probs ({split})"
            for g in progress(groups, desc, self.cfg.train.progress_bar):
                with self.forward_context():
                    logps = self._seq_logps(model, self._micro([pairs[i] for i in g], g, split))
                out[g] = logps.float().cpu()
        self.policy.train()
        if self.ctx.is_main:  # every rank computed the same table; one writes it
            Path(self.cfg.run_dir).mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            save_file({"logps": out}, str(tmp))
            tmp.replace(cache)
        return out

    # --- the Stage interface -----------------------------------------------------------

    def example_lengths(self) -> list[int]:
        return [
            2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids)
            for p in self.train_pairs
        ]

    def micro_batch(self, indices: list[int]) -> MicroBatch:
        return self._micro([self.train_pairs[i] for i in indices], indices, "train")

    def _loss_and_rewards(self, mb: MicroBatch):
        from fastrlhf.ops import dpo_loss

        d = self.cfg.dpo
        lens = mb.extra["lengths"]  # [P, 2]
        seq_kl = None
        if d.kind in TDPO:
            logps, ref, seq_kl = (x.float() for x in self._tdpo_terms(mb))
        else:
            logps = self._seq_logps(self.policy, mb).float()  # [P, 2]
            ref = self._reference_logps(mb).float() if self.needs_ref else None
        loss, _ = dpo_loss(
            logps[:, 0],
            logps[:, 1],
            ref[:, 0] if ref is not None else None,
            ref[:, 1] if ref is not None else None,
            beta=d.beta,
            kind=d.kind,
            label_smoothing=d.label_smoothing,
            chosen_lengths=lens[:, 0],
            rejected_lengths=lens[:, 1],
            gamma=d.gamma,
            chosen_seq_kl=seq_kl[:, 0] if seq_kl is not None else None,
            rejected_seq_kl=seq_kl[:, 1] if seq_kl is not None else None,
            alpha=d.alpha,
        )
        with torch.no_grad():
            rewards = d.beta * (logps - ref if ref is not None else logps / lens)  # [P, 2]
        sums = _reward_sums(rewards)
        if seq_kl is not None:
            sums["seq_kl_chosen"] = seq_kl[:, 0].detach().sum()
            sums["seq_kl_rejected"] = seq_kl[:, 1].detach().sum()
        return loss * mb.units, sums  # the op's mean over the P pairs -> their sum

    def loss_sum(self, mb: MicroBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self._loss_and_rewards(mb)

    def evaluate(self) -> dict[str, float]:
        if not self.eval_pairs:
            return {}
        pairs = self.eval_pairs
        lengths = [2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs]
        total: dict[str, float] = {}
        budget = self.cfg.train.micro_batch_tokens
        groups = pack_indices(list(range(len(pairs))), lengths, budget)
        for g in progress(groups, "dpo eval", self.cfg.train.progress_bar):
            mb = self._micro([pairs[i] for i in g], g, "eval")
            with self.forward_context():
                loss, metric_sums = self._loss_and_rewards(mb)
            sums = {"loss": loss.detach(), **metric_sums}
            for k, v in sums.items():
                total[k] = total.get(k, 0.0) + float(v)
        return {k: v / len(pairs) for k, v in total.items()}

    def flops_per_token(self) -> float:
        n = matmul_params(self.policy)
        online = self.needs_ref and not self.ref_tables  # (always so for the TDPO kinds)
        return (6.0 + (2.0 if online else 0.0)) * n

    def save_model(self, path: Path) -> None:
        self.policy.save_pretrained(path)


def _head(model, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's lm_head (weight [V, H], bias [V]) over its vocabulary in use, cast to
    the hidden states' dtype as the model's own token_logprobs does."""
    v = model.vocab_size
    weight, bias = model.lm_head_weight[:v], model.lm_head_bias
    bias = bias[:v].to(hidden.dtype) if bias is not None else None
    return weight.to(hidden.dtype), bias


def _reward_sums(rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sums over pairs of the DPO reward metrics from rewards [P, 2] (chosen, rejected)."""
    margin = rewards[:, 0] - rewards[:, 1]
    return {
        "reward_accuracy": (margin > 0).float().sum(),
        "reward_chosen": rewards[:, 0].sum(),
        "reward_rejected": rewards[:, 1].sum(),
        "reward_margin": margin.sum(),
    }


def run(cfg: RunConfig, *, resume: bool = False, ctx: DistContext | None = None) -> TrainResult:
    return train(DPOStage(cfg, resume=resume, ctx=ctx), cfg, resume=resume)
