"""fastrlhf.feedback: collecting human preferences, the first step of RLHF.

- ``store``: the SQLite database (items, annotators, assignments, votes; WAL, every write
  committed before it is acknowledged, idempotent client vote ids).
- ``assign``: the assignment policy (overlap for agreement, gold items, per-annotator
  response order).
- ``imports``: votes from JSONL files and Label Studio pairwise exports.
- ``pairs`` / ``export``: votes -> per-pair labels -> majority-vote preference rows in the
  prompt / chosen / rejected format the RM and DPO stages read (JSONL, Parquet, datasets).
- ``agreement``: raw agreement, Cohen's / Fleiss' kappa, Krippendorff's alpha, annotator
  scores, a heat map.
- ``server``: the labeling web app (Starlette + uvicorn); ``sample``: new items from a
  policy checkpoint with the project's rollout engine; ``demo``: the loop with simulated
  annotators voting over HTTP.
- ``cli``: ``fastrlhf feedback ...``.

Nothing here is imported by ``fastrlhf`` itself; the web and statistics libraries are the
``feedback`` extra (``pip install fastrlhf[feedback]``).
"""
