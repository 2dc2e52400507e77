"""How exploitable is the demo's reward model? ``python -m bench.rm_probe RM_DIR [...]``

For each held-out prompt of ``examples/demo.yaml`` the reward model scores every answer
0..99 (and the correct one). Printed per model:

- how often the correct answer scores highest ("top"): where it does not, PPO can raise
  the reward by moving to a wrong answer;
- how many wrong answers outscore the correct one, on average;
- on carry problems, how often the correct answer beats the demonstrators' forgotten carry
  (the distinction the comparisons teach).

Pair accuracy on held-out comparisons says how well the RM separates the answers that
annotators compared; this says how it ranks the answers a policy could drift to.
"""

from __future__ import annotations

import sys

import torch

from fastrlhf.cli import default_demo_config
from fastrlhf.config import load_demo_config
from fastrlhf.data.batch import collate_pairs
from fastrlhf.data.embedded import forgot_carry, needs_carry, parse_prompt
from fastrlhf.data.formats import tokenize_preferences
from fastrlhf.demo import _held_out_prompts
from fastrlhf.models.value import ValueModel
from fastrlhf.trainers.records import data_settings
from fastrlhf.trainers.rewards import reward_model_scores


@torch.no_grad()
def probe(rm_dir: str, prompts: list[dict], data) -> dict[str, float]:
    rm = ValueModel.from_pretrained(rm_dir).eval()
    top = better = carry_ok = carry_n = 0
    for p in prompts:
        a, op, b = parse_prompt(p["prompt"])
        answer = int(p["answer"])
        wrong = [c for c in range(100) if c != answer]
        # one packed batch: sequence 2i = the correct answer, 2i+1 = wrong[i]
        records = [
            {"prompt": p["prompt"], "chosen": str(answer), "rejected": str(c)} for c in wrong
        ]
        batch = collate_pairs(tokenize_preferences(records, rm.tokenizer, data))
        s = reward_model_scores(
            rm, batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen
        )
        correct, others = s[0], s[1::2]  # [], [99]
        n_better = int((others > correct).sum())
        top += n_better == 0
        better += n_better
        if needs_carry(a, op, b):
            carry_n += 1
            carry_ok += bool(correct > others[wrong.index(forgot_carry(a, op, b))])
    n = len(prompts)
    return {
        "prompts": n,
        "correct_top": top / n,
        "wrong_above_correct": better / n,
        "carry_beats_forgotten": carry_ok / max(carry_n, 1),
    }


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    settings, configs = load_demo_config(default_demo_config(), [])
    prompts = _held_out_prompts(settings, configs)
    data = data_settings(configs["rm"].data)
    for rm_dir in argv:
        r = probe(rm_dir, prompts, data)
        print(
            f"{rm_dir}: {r['prompts']} held-out prompts, correct answer top-scored on "
            f"{r['correct_top']:.3f}, {r['wrong_above_correct']:.1f} wrong answers above it on "
            f"average, correct beats forgotten carry on {r['carry_beats_forgotten']:.3f}"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
