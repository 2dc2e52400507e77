"""Every HF family the installed transformers ships (tests/models/families.py) trains the
objective HF computes: tiny random models with the lm_head scaled so that logits reach
about 30 (soft-caps and scales then matter), float32.

- packed forward log-probs (our attention, our head) == HF's padded eager forward, 1e-5;
- rollout log-probs (KV-cache decode, padded attention) == the training forward, 1e-5;
- one SFT step and one GRPO iteration through the CLI exit 0 (generation and greedy eval
  included).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from fastrlhf.data.embedded import embedded_tokenizer
from fastrlhf.models import load_policy
from fastrlhf.models.heads import head_transform
from fastrlhf.rollout import GenerationConfig as RolloutConfig
from fastrlhf.rollout import generate, pack_prompts
from tests.models.families import available, make_config

FAMILIES = available()
LOGIT_SIZE = 30.0
LENGTHS = [5, 1, 11, 3, 8]  # longer than the window (4), a length-1 sequence


@pytest.fixture(scope="module", params=FAMILIES)
def family_dir(request, tmp_path_factory) -> tuple[str, str]:
    """(family, directory) of a tiny random model + the embedded tokenizer."""
    family = request.param
    tok = embedded_tokenizer()
    config = make_config(family, vocab_size=len(tok))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # scale the head so that HF's final logits reach ~LOGIT_SIZE
        ids = torch.randint(3, len(tok), (2, 16))
        raw = model.lm_head(model.base_model(input_ids=ids).last_hidden_state)
        scale = head_transform(config).scale
        model.lm_head.weight.mul_(LOGIT_SIZE / float(raw.abs().max()) / scale)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    path = tmp_path_factory.mktemp(family)
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return family, str(path)


def _sequences(vocab: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, vocab, (n,), generator=g) for n in LENGTHS]


def _hf_padded_logprobs(
    path: str, seqs: list[torch.Tensor], dtype=torch.float32
) -> tuple[torch.Tensor, float]:
    """Next-token log-probs of HF's own right-padded eager forward, packed; max |logit|."""
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=dtype)
    model.eval()
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = s
        mask[b, : len(s)] = 1
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits  # [B, T, V]
    out = [
        logits[b, : len(s) - 1].double().log_softmax(-1).gather(-1, s[1:, None]).squeeze(-1)
        for b, s in enumerate(seqs)
    ]
    return torch.cat(out), float(logits.abs().max())


def test_packed_logprobs_equal_hf_padded_forward(family_dir):
    family, path = family_dir
    policy = load_policy(path, dtype=torch.float32)  # the load-time probe runs too
    seqs = _sequences(policy.vocab_size)
    cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(LENGTHS).cumsum(0)
    positions = torch.cat([torch.arange(n) for n in LENGTHS])
    with torch.no_grad():
        hidden = policy(torch.cat(seqs), positions, cu, max(LENGTHS))  # [N, H]
        not_last = torch.ones(sum(LENGTHS), dtype=torch.bool)
        not_last[cu[1:].long() - 1] = False
        labels = torch.cat([s[1:] for s in seqs])
        ours = policy.token_logprobs(hidden[not_last], labels)
    theirs, logit_size = _hf_padded_logprobs(path, seqs)
    cap = head_transform(policy.config).softcap  # a soft-cap bounds the final logits
    reach = LOGIT_SIZE if cap is None else cap * float(torch.tanh(torch.tensor(LOGIT_SIZE / cap)))
    assert logit_size > 0.6 * reach, f"{family}: logits only reach {logit_size:.1f}"
    # At logits of ~30 float32 rounding alone moves a log-prob by ~1e-5: HF's own float32
    # forward is that far from its float64 forward. Within 1e-5 beyond that floor.
    try:
        theirs64, _ = _hf_padded_logprobs(path, seqs, torch.float64)
        floor = float((theirs - theirs64).abs().max().nan_to_num(0.0))  # sliding fp64: NaN
    except RuntimeError:  # GPT-OSS's expert matmuls take no float64: no floor, plain 1e-5
        floor = 0.0
    diff = float((ours.double() - theirs).abs().max())
    assert diff < 1e-5 + floor, (
        f"{family}: packed vs HF padded log-probs differ by {diff:.3g} (HF fp32 vs fp64: "
        f"{floor:.3g})"
    )


def test_rollout_logprobs_equal_training_forward(family_dir):
    family, path = family_dir
    policy = load_policy(path, dtype=torch.float32, logit_probe=False)
    prompts = [s[:n] for s, n in zip(_sequences(policy.vocab_size), [3, 1, 6, 2, 5])]
    prompt_ids, prompt_cu = pack_prompts(prompts)
    config = RolloutConfig(max_new_tokens=6, temperature=0.8, eos_token_id=2, pad_token_id=0)
    rollout = generate(
        policy, prompt_ids, prompt_cu, config, generator=torch.Generator().manual_seed(0)
    )
    batch = rollout.to_training_batch()
    with torch.no_grad():
        hidden = policy(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen)
        ours = policy.token_logprobs(
            hidden[batch.loss_mask], batch.labels[batch.loss_mask], rollout.temperature
        )
    recorded = batch.old_logprobs[batch.loss_mask]
    assert recorded.numel() >= len(prompts)
    diff = float((ours - recorded).abs().max())
    assert diff < 1e-5, f"{family}: rollout vs training log-probs differ by {diff:.3g}"


SMALL = [
    "data.max_length=40", "data.max_prompt_length=20", "data.num_train=16",
    "data.num_eval=2", "train.batch_size=4", "train.micro_batch_tokens=96",
    "train.max_steps=1", "train.progress_bar=false", "train.cpu_threads=1",
    "logging.plots=false", "checkpoint.save_final=false",
]  # fmt: skip


def test_one_sft_step_and_one_grpo_iteration_through_the_cli(family_dir, tmp_path):
    from fastrlhf.cli import main

    family, path = family_dir
    common = [f"model.name_or_path={path}", *SMALL]
    assert main(["sft", f"run_dir={tmp_path / 'sft'}", *common]) == 0, family
    grpo = [
        "ppo.reward_fn=fastrlhf.trainers.rewards:arithmetic_reward", "ppo.rollout_batch_size=2",
        "ppo.n_samples=2", "ppo.max_new_tokens=3", "ppo.eval_max_new_tokens=3",
    ]  # fmt: skip
    assert main(["grpo", f"run_dir={tmp_path / 'grpo'}", *common, *grpo]) == 0, family
