"""fastrlhf.data: records -> tokenized examples -> packed, padding-free batches.

- ``batch``: ``TokenizedSeq``, ``PreferencePair``, ``PromptItem``, ``PackedBatch`` and
  ``collate_packed`` / ``collate_pairs`` (labels already shifted, -100 off the response).
- ``loading``: ``load_records`` from .jsonl / .json / .parquet / datasets folders / hub
  ids / ``embedded:<sft|preference|rl>``; each record tagged with its file and line.
- ``formats``: ``DataSettings`` and ``tokenize_sft`` / ``tokenize_preferences`` /
  ``tokenize_prompts`` (text, chat messages, HH-RLHF transcripts), malformed-row reports.
- ``packing``: ``pack_sequences`` (numba first-fit decreasing / Karmarkar–Karp across
  ranks) and its pure-Python reference ``pack_sequences_reference``.
- ``embedded``: the built-in tokenizer, tiny Llama and ``ArithmeticTask`` (no download).

Additions to the contract (no deviations): ``PackedBatch.num_tokens``, ``IGNORE_INDEX``,
``cu_seqlens_from_lengths`` / ``position_ids_from_lengths``, ``pair_to_seqs``,
``load_records(..., on_malformed=)``, ``split_hh_transcripts``, ``MalformedRecordError``,
``DataSettings`` fields beyond the contract's (response_truncation, chat_template,
add_eos, record keys). Records carry their origin under the key ``"_loc"``.
"""

from __future__ import annotations

import importlib

from fastrlhf.data.batch import (
    IGNORE_INDEX,
    PackedBatch,
    PreferencePair,
    PromptItem,
    TokenizedSeq,
    collate_packed,
    collate_pairs,
    cu_seqlens_from_lengths,
    pair_to_seqs,
    position_ids_from_lengths,
)
from fastrlhf.data.formats import (
    DataSettings,
    split_hh_transcripts,
    tokenize_preferences,
    tokenize_prompts,
    tokenize_sft,
)
from fastrlhf.data.loading import LOC_KEY, MalformedRecordError, load_records

__all__ = [
    "LOC_KEY",
    "DataSettings",
    "MalformedRecordError",
    "load_records",
    "pack_sequences",
    "pack_sequences_reference",
    "split_hh_transcripts",
    "tokenize_preferences",
    "tokenize_prompts",
    "tokenize_sft",
    "IGNORE_INDEX",
    "PackedBatch",
    "PreferencePair",
    "PromptItem",
    "TokenizedSeq",
    "collate_packed",
    "collate_pairs",
    "cu_seqlens_from_lengths",
    "pair_to_seqs",
    "position_ids_from_lengths",
]

# numba is imported (and the packers compiled) only when packing is first used
_LAZY = {"pack_sequences": "packing", "pack_sequences_reference": "packing"}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fastrlhf.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"fastrlhf.data.{module}"), name)
    globals()[name] = value
    return value
