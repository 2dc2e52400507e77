"""``fastrlhf feedback demo``: the feedback loop end to end, with simulated annotators.

    SFT policy (trained here on the embedded arithmetic task, or --policy DIR)
      -> sample 2 responses per prompt with the rollout engine (feedback.sample)
      -> items in a fresh database; the true order of each pair is known (exact answer
         first, then the numerically closer one), a few items carry it as gold
      -> a labeling server in a child process; simulated annotators of known accuracy
         and tie rate vote through its HTTP API, concurrently
      -> agreement statistics, compared with what the accuracies imply
      -> export (majority per pair) -> the project's RM stage trains on the export
      -> held-out accuracy of that reward model on pairs labelled by the truth.

Everything printed is measured in this run; "theory" is the value the simulated
accuracies imply, with its binomial standard error.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class FeedbackDemoSettings:
    run_dir: str = "runs/feedback_demo"
    accuracies: list[float] = field(default_factory=lambda: [0.9, 0.8, 0.7])
    tie_rate: float = 0.1
    items: int = 600  # labelled items (response pairs)
    held_out: int = 200  # truth-labelled pairs the reward model is evaluated on
    gold: int = 20  # labelled items that carry their true order as gold
    overlap: float = 1.0  # fraction of items labelled by overlap_annotators people
    overlap_annotators: int = 3
    policy: str | None = None  # an SFT model directory; None trains one here
    sft_steps: int = 800
    rm_steps: int = 400
    seed: int = 0
    max_new_tokens: int = 6

    def __post_init__(self) -> None:
        if not self.accuracies or any(not 0.0 <= p <= 1.0 for p in self.accuracies):
            raise ValueError(f"accuracies must be in [0, 1], got {self.accuracies}")
        if not 0.0 <= self.tie_rate < 1.0:
            raise ValueError(f"tie_rate must be in [0, 1), got {self.tie_rate}")
        if self.items < 2 or self.held_out < 1 or not 0 <= self.gold < self.items:
            raise ValueError("need items >= 2, held_out >= 1 and 0 <= gold < items")


def _quality(task, prompt: str, response: str) -> float:
    """Exact answer 1; otherwise minus the distance to it; unreadable -inf."""
    if task.gold_score(prompt, response) == 1.0:
        return 1.0
    try:
        return -abs(int(response.strip()) - task.answer(prompt))
    except ValueError:
        return -math.inf


def _train_sft(configs, steps: int) -> str:
    from fastrlhf.trainers import run_stage
    from fastrlhf.trainers.loading import model_path

    cfg = configs["sft"]
    init = model_path(cfg.model, Path(cfg.run_dir).parent)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name_or_path=init))
    result = run_stage(cfg)
    return str(result.final_dir)


def _pairs(task, policy: str, s: FeedbackDemoSettings):
    """(labelled items, held-out items, truth) from sampled pairs with a strict true order.

    Held-out pairs are correct-vs-wrong ones where the policy gives enough of them (the
    reward model's job: prefer the right answer); labelled items are any strictly
    ordered pairs (a wrong answer closer to the right one is better).
    """
    from fastrlhf.feedback.sample import SampleSettings, sample_items

    need = s.items + s.held_out
    pool = list({r["prompt"]: r for r in task.rl_prompts(40 * need)}.values())
    ordered, clear, truth, start = [], [], {}, 0
    while len(ordered) < need and start < len(pool):
        chunk = pool[start : start + 2 * need]
        rows = [{"id": f"q{start + n}", "prompt": r["prompt"]} for n, r in enumerate(chunk)]
        start += len(chunk)
        sampled = sample_items(
            policy,
            rows,
            SampleSettings(k=2, max_new_tokens=s.max_new_tokens, seed=s.seed, batch_size=64),
        )
        for it in sampled:
            q = [_quality(task, it.prompt, r) for r in it.responses]
            # an empty response (EOS first) is no preference row the RM stage can read
            if q[0] != q[1] and max(q) > -math.inf and all(r.strip() for r in it.responses):
                best = 0 if q[0] > q[1] else 1
                truth[it.id] = [best, 1 - best]
                ordered.append(it)
                if max(q) == 1.0:
                    clear.append(it)
    if len(ordered) < need:
        raise RuntimeError(
            f"the policy gave only {len(ordered)} pairs with a strict true order; need "
            f"{need} (train it longer, or ask for fewer --items / --held-out)"
        )
    # only when that leaves right-vs-wrong pairs to learn from as well
    held = clear[: s.held_out] if len(clear) >= 2 * s.held_out else []
    held_ids = {it.id for it in held}
    rest = [it for it in ordered if it.id not in held_ids]
    held += rest[: s.held_out - len(held)]
    return rest[-s.items :], held, truth


def _theory_agreement(p: float, q: float, t: float) -> float:
    return t * t + (1 - t) ** 2 * (p * q + (1 - p) * (1 - q))


def run_feedback_demo(s: FeedbackDemoSettings) -> dict:
    from fastrlhf.config.demo_settings import default_demo_config, load_demo_config
    from fastrlhf.feedback.agreement import agreement_stats, format_report, kappa_heatmap
    from fastrlhf.feedback.export import export_rows, write_rows
    from fastrlhf.feedback.simulate import ServerProcess, SimulatedAnnotator, label_queue
    from fastrlhf.feedback.store import add_annotator, add_items, connect
    from fastrlhf.trainers import run_stage
    from fastrlhf.trainers.records import embedded_task

    run_dir = Path(s.run_dir)
    t_start = time.perf_counter()
    overrides = [
        f"demo.run_dir={run_dir}",
        f"sft.train.max_steps={s.sft_steps}",
        f"rm.train.max_steps={s.rm_steps}",
        f"rm.train.eval_every={s.rm_steps}",
    ]
    _, configs = load_demo_config(default_demo_config(), overrides)
    policy = s.policy
    if policy is None:
        print(f"== feedback demo: SFT policy ({s.sft_steps} steps)", flush=True)
        policy = _train_sft(configs, s.sft_steps)
    task = embedded_task(configs["sft"].data, seed=s.seed + 4242)

    print("== sampling response pairs from the policy", flush=True)
    labelled, held_out, truth = _pairs(task, policy, s)
    clear = sum(task.gold_score(it.prompt, it.responses[truth[it.id][0]]) for it in held_out)
    for it in labelled[: s.gold]:
        it.gold = truth[it.id]

    db = run_dir / "feedback.db"
    run_dir.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-wal", "-shm"):  # a fresh database each run
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    conn = connect(db, create=True)
    add_items(conn, labelled)
    anns = [SimulatedAnnotator(f"sim{p:.2f}", add_annotator(conn, f"sim{p:.2f}"), p,
                               s.tie_rate, seed=s.seed) for p in s.accuracies]  # fmt: skip
    texts = {it.id: [it.responses[i] for i in truth[it.id]] for it in labelled}

    print(f"== {len(anns)} simulated annotators label {len(labelled)} items over HTTP", flush=True)
    args = ["--overlap", s.overlap, "--overlap-annotators", s.overlap_annotators,
            "--gold-rate", 0.1 if s.gold else 0.0, "--seed", s.seed]  # fmt: skip
    errors: list[BaseException] = []
    t0 = time.perf_counter()
    with ServerProcess(db, args=args, log=str(run_dir / "server.log")) as server:

        def work(ann):
            try:
                label_queue(server.url, ann, texts.__getitem__)
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(a,)) for a in anns]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    label_seconds = time.perf_counter() - t0

    stats = agreement_stats(conn, min_overlap=10)
    (run_dir / "agreement.json").write_text(json.dumps(stats, indent=2) + "\n")
    kappa_heatmap(stats, run_dir / "kappa.png")
    acc = {a.name: a.accuracy for a in anns}
    checks = []
    kappa = {(c["a"], c["b"]): c["kappa"] for c in stats["cohen_kappa"]}
    for c in stats["pair_agreement"]:
        th = _theory_agreement(acc[c["a"]], acc[c["b"]], s.tie_rate)
        se = math.sqrt(th * (1 - th) / c["n"])
        checks.append({"pair": f"{c['a']}/{c['b']}", "measured": c["agreement"], "theory": th,
                       "se": se, "n": c["n"], "kappa": kappa.get((c["a"], c["b"]))})  # fmt: skip
    for a in stats["annotators"]:
        p = acc[a["name"]]
        n_votes = a["votes"]
        a["tie_theory"] = s.tie_rate
        a["tie_se"] = math.sqrt(s.tie_rate * (1 - s.tie_rate) / n_votes)
        a["gold_theory"] = (1 - s.tie_rate) * p

    prefs = run_dir / "prefs"
    report = export_rows(conn)
    write_rows(report.rows, prefs / "train.jsonl")
    label_acc = sum(r["chosen_index"] == truth[r["item_id"]][0] for r in report.rows)
    label_acc /= max(1, len(report.rows))
    test_rows = [{"prompt": it.prompt, "chosen": it.responses[truth[it.id][0]],
                  "rejected": it.responses[truth[it.id][1]]} for it in held_out]  # fmt: skip
    write_rows(test_rows, prefs / "test.jsonl")

    print(f"== reward model on the export ({len(report.rows)} pairs, {s.rm_steps} steps)")
    rm = configs["rm"]
    rm = dataclasses.replace(
        rm,
        model=dataclasses.replace(rm.model, name_or_path=policy),
        data=dataclasses.replace(rm.data, source=str(prefs), num_eval=len(test_rows)),
    )
    if Path(rm.run_dir).exists():
        shutil.rmtree(rm.run_dir)  # this run's RM, not a resumed one
    result = run_stage(rm)
    summary = {
        "settings": dataclasses.asdict(s),
        "policy": policy,
        "items": len(labelled),
        "votes": stats["votes"],
        "label_seconds": label_seconds,
        "agreement": stats,
        "agreement_vs_theory": checks,
        "export": {
            "pairs": len(report.rows),
            "dropped": dict(report.dropped),
            "majority_label_accuracy": label_acc,
        },  # fmt: skip
        "rm_held_out": {k: result.eval_metrics.get(k) for k in ("accuracy", "auc", "margin")},
        "held_out_correct_vs_wrong": int(clear),
        "rm_model": str(result.final_dir),
        "seconds": time.perf_counter() - t_start,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print()
    print(format_report(stats))
    print(_format_checks(checks, stats, summary, len(test_rows)))
    return summary


def _format_checks(checks, stats, summary, n_test: int) -> str:
    lines = ["", "agreement of each annotator pair vs. t^2 + (1-t)^2 (pq + (1-p)(1-q)):"]
    for c in checks:
        z = (c["measured"] - c["theory"]) / c["se"] if c["se"] else 0.0
        lines.append(f"  {c['pair']:<18} measured {c['measured']:.3f}  theory {c['theory']:.3f}"
                     f" +- {c['se']:.3f}  (n={c['n']}, z={z:+.1f})")  # fmt: skip
    lines.append("tie rate and gold accuracy vs. theory (t, and (1-t) p):")
    for a in stats["annotators"]:
        gold = "-" if a["gold_accuracy"] is None else f"{a['gold_accuracy']:.3f}"
        lines.append(f"  {a['name']:<18} ties {a['tie_rate']:.3f} (theory {a['tie_theory']:.3f}"
                     f" +- {a['tie_se']:.3f})  gold {gold} (theory {a['gold_theory']:.3f}, "
                     f"{a['gold_pairs']} gold pairs)")  # fmt: skip
    e, rm = summary["export"], summary["rm_held_out"]
    lines.append(f"export: {e['pairs']} pairs (dropped {e['dropped']}); the majority label is "
                 f"the true order for {e['majority_label_accuracy']:.3f} of them")  # fmt: skip
    lines.append(f"reward model trained on the export, held-out accuracy vs. the truth: "
                 f"{rm['accuracy']:.3f} (AUC {rm['auc']:.3f}, {n_test} pairs, "
                 f"{summary['held_out_correct_vs_wrong']} right vs. wrong answer)")  # fmt: skip
    lines.append(f"total {summary['seconds']:.0f}s; reward model: {summary['rm_model']}")
    return "\n".join(lines)
