"""Dataset records -> tokenized SFT sequences, preference pairs and RL prompts.

Record formats (one dict per example, from ``load_records``):

- SFT:         {prompt, response}  or  {messages: [{role, content}, ...]} (the last
               message is the assistant's response; only it carries loss)
- preference:  {prompt, chosen, rejected} with text or message-list values, or
               Anthropic HH-RLHF {chosen, rejected}: two full "\\n\\nHuman: ...
               \\n\\nAssistant: ..." transcripts whose shared prefix up to the last
               common "\\n\\nAssistant:" is the prompt (``split_hh_transcripts``)
- prompts:     {prompt [, answer]} or {messages [, answer]}

Text is tokenized as  prompt -> tokenizer(prompt) (with the tokenizer's own BOS) and
response -> tokenizer(response, no specials) + EOS. Message lists go through the
tokenizer's chat template (a plain "Role: content" layout when it has none); with
``chat_template="always"`` text prompts are wrapped as one user message first.

Malformed rows (unparseable lines, missing keys, non-string content, empty responses,
chosen == rejected before or after tokenization, unsplittable transcripts) are reported
with their file and line; ``on_malformed`` "skip" drops them and logs one warning with
the counts per reason (and, with ``DataSettings.malformed_file``, appends every one as
{"where", "kind", "reason"} to that JSONL file), "error" raises ``MalformedRecordError``
at the first one. A source with no usable row at all is a ``DataError``. Never silently.

Truncation: prompts longer than ``max_prompt_length`` lose tokens on the
``truncation`` side ("left" keeps the end of the prompt, next to the response, and
the leading BOS); responses are cut to fit ``max_length`` on ``response_truncation``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastrlhf.data.batch import PreferencePair, PromptItem, TokenizedSeq
from fastrlhf.data.loading import LOC_KEY, MALFORMED_KEY, MalformedRecordError
from fastrlhf.errors import DataError

logger = logging.getLogger("fastrlhf.data")

HH_ASSISTANT = "\n\nAssistant:"


@dataclass
class DataSettings:
    max_length: int = 1024  # prompt + response tokens
    max_prompt_length: int = 512
    truncation: str = "left"  # prompts: "left" | "right"
    response_truncation: str = "right"  # responses: "left" | "right"
    on_malformed: str = "skip"  # "skip" | "error"
    chat_template: str = "auto"  # "auto" (message lists only) | "always" | "never"
    add_eos: bool = True
    prompt_key: str = "prompt"
    response_key: str = "response"
    chosen_key: str = "chosen"
    rejected_key: str = "rejected"
    messages_key: str = "messages"
    answer_key: str = "answer"
    # every skipped row is appended here as JSON (<run_dir>/malformed.jsonl); None: only
    # the warning
    malformed_file: str | None = None

    def __post_init__(self) -> None:
        for name in ("truncation", "response_truncation"):
            if getattr(self, name) not in ("left", "right"):
                raise ValueError(f"{name} must be 'left' or 'right', got {getattr(self, name)!r}")
        if self.on_malformed not in ("skip", "error"):
            raise ValueError(f"on_malformed must be 'skip' or 'error', got {self.on_malformed!r}")
        if self.chat_template not in ("auto", "always", "never"):
            raise ValueError(
                f"chat_template must be 'auto', 'always' or 'never', got {self.chat_template!r}"
            )
        if not 0 < self.max_prompt_length < self.max_length:
            raise ValueError(
                f"need 0 < max_prompt_length ({self.max_prompt_length}) < max_length "
                f"({self.max_length}) so every response keeps at least one token"
            )


class _Malformed(Exception):
    """One bad record; the reason is the message."""


@dataclass
class MalformedReport:
    """Bad rows seen while tokenizing: ``problems`` holds (where, reason) pairs."""

    kind: str
    problems: list[tuple[str, str]] = field(default_factory=list)

    def add(self, record: dict, reason: str, on_malformed: str) -> None:
        where = record.get(LOC_KEY, "<unknown location>")
        if on_malformed == "error":
            raise MalformedRecordError(f"malformed {self.kind} record at {where}: {reason}")
        self.problems.append((str(where), reason))

    def counts(self) -> Counter:
        """Problems per reason, with the specifics (quoted names kept) as the reason."""
        return Counter(_reason_class(r) for _, r in self.problems)

    def log(self, total: int, malformed_file: str | None = None) -> None:
        if not self.problems:
            return
        reasons = "; ".join(f"{n} x {r}" for r, n in self.counts().most_common())
        if malformed_file:
            self._append(malformed_file)
            where = f"every row in {malformed_file}"
        else:
            shown = ", ".join(w for w, _ in self.problems[:5])
            where = f"first rows: {shown}" + (", ..." if len(self.problems) > 5 else "")
        logger.warning(
            "skipped %d of %d %s records: %s (%s)",
            len(self.problems),
            total,
            self.kind,
            reasons,
            where,
        )

    def _append(self, path: str) -> None:
        """Append every problem once (a resumed run re-tokenizes the same rows)."""
        if os.environ.get("RANK", "0") != "0":  # torchrun: every rank sees the same rows
            return
        target = os.path.abspath(path)
        seen = set()
        if os.path.isfile(target):
            with open(target, encoding="utf-8") as f:
                for line in f:
                    try:
                        row = json.loads(line)
                        seen.add((row["where"], row["kind"], row["reason"]))
                    except (ValueError, KeyError, TypeError):
                        continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "a", encoding="utf-8") as f:
            for where, reason in self.problems:
                if (where, self.kind, reason) not in seen:
                    row = {"where": where, "kind": self.kind, "reason": reason}
                    f.write(json.dumps(row) + "\n")


def _reason_class(reason: str) -> str:
    # "not a JSON object (Expecting value: line 1 column 2 (char 1))" -> "not a JSON object"
    return re.sub(r"\s*\(.*\)$", "", reason)


# ----------------------------------------------------------------------------- helpers


def _text(record: dict, key: str, *, allow_empty: bool = False) -> str:
    if key not in record or record[key] is None:
        raise _Malformed(f"missing key {key!r} (keys: {sorted(k for k in record if k[0] != '_')})")
    value = record[key]
    if not isinstance(value, str):
        raise _Malformed(f"{key!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise _Malformed(f"{key!r} is empty")
    return value


def _messages(value: Any, key: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise _Malformed(f"{key!r} must be a non-empty list of messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _Malformed(f"{key}[{i}] must be a dict with a string 'role'")
        if not isinstance(m.get("content"), str):
            got = type(m.get("content")).__name__
            raise _Malformed(f"{key}[{i}]['content'] must be a string, got {got}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _encode(tokenizer, text: str, specials: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=specials)["input_ids"])


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    # no template: a plain transcript, the layout HH-RLHF uses
    text = "".join(f"\n\n{m['role'].capitalize()}: {m['content']}" for m in messages)
    return text + ("\n\nAssistant:" if generation_prompt else "")


def _bos_ids(tokenizer) -> list[int]:
    """What the tokenizer prepends on its own (e.g. [bos] for Llama, [] for Qwen)."""
    return _encode(tokenizer, "", specials=True)


def _chat_ids(tokenizer, prompt_msgs: list[dict], response_msgs: list[dict] | None):
    """(prompt ids, response ids) of a conversation rendered with the chat template."""
    prompt_text = _render(tokenizer, prompt_msgs, generation_prompt=True)
    has_template = bool(getattr(tokenizer, "chat_template", None))
    # a template writes its own BOS; a plain transcript gets the tokenizer's
    prompt_ids = _encode(tokenizer, prompt_text, specials=not has_template)
    if response_msgs is None:
        return prompt_ids, None
    full_text = _render(tokenizer, prompt_msgs + response_msgs, generation_prompt=False)
    if not full_text.startswith(prompt_text):
        # templates that render a conversation differently from its prefix: fall back
        # to the response messages' own text after the generation prompt
        full_text = prompt_text + "".join(m["content"] for m in response_msgs)
    response_ids = _encode(tokenizer, full_text[len(prompt_text) :], specials=False)
    if not has_template and tokenizer.eos_token_id is not None:
        response_ids.append(tokenizer.eos_token_id)
    return prompt_ids, response_ids


def _text_ids(tokenizer, prompt: str, cfg: DataSettings) -> list[int]:
    if cfg.chat_template == "always":
        return _chat_ids(tokenizer, [{"role": "user", "content": prompt}], None)[0]
    return _encode(tokenizer, prompt, specials=True)


def _response_ids(tokenizer, response: str, cfg: DataSettings) -> list[int]:
    ids = _encode(tokenizer, response, specials=False)
    if cfg.add_eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


def _truncate_prompt(ids: list[int], cfg: DataSettings, bos: list[int]) -> list[int]:
    limit = cfg.max_prompt_length
    if len(ids) <= limit:
        return ids
    if cfg.truncation == "right":
        return ids[:limit]
    keep_bos = bos and ids[: len(bos)] == bos
    head = bos if keep_bos else []
    return head + ids[len(ids) - (limit - len(head)) :]


def _truncate_response(ids: list[int], budget: int, cfg: DataSettings) -> list[int]:
    if len(ids) <= budget:
        return ids
    return ids[:budget] if cfg.response_truncation == "right" else ids[len(ids) - budget :]


def split_hh_transcripts(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen response, rejected response) of two HH-RLHF transcripts.

    The prompt is their common prefix, cut just after its last "\\n\\nAssistant:";
    each response is the rest of its transcript (leading space included).
    """
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(HH_ASSISTANT)
    if cut < 0:
        raise _Malformed("chosen and rejected share no '\\n\\nAssistant:' prefix to split on")
    prompt = common[: cut + len(HH_ASSISTANT)]
    return prompt, chosen[len(prompt) :], rejected[len(prompt) :]


def _run(records: Iterable[dict], kind: str, cfg: DataSettings, fn) -> list:
    report = MalformedReport(kind)
    out, total = [], 0
    for record in records:
        total += 1
        try:
            if not isinstance(record, dict):
                raise _Malformed(f"a record must be a dict, got {type(record).__name__}")
            if MALFORMED_KEY in record:  # an unparseable line, kept by load_records
                raise _Malformed(str(record[MALFORMED_KEY]))
            out.append(fn(record))
        except _Malformed as e:
            report.add(record if isinstance(record, dict) else {}, str(e), cfg.on_malformed)
    report.log(total, cfg.malformed_file)
    if total and not out:
        first = report.problems[0][0] if report.problems else "?"
        reasons = "; ".join(f"{n} x {r}" for r, n in report.counts().most_common(3))
        raise DataError(f"no usable {kind} record among {total} (first: {first}; {reasons})")
    return out


def _meta(record: dict) -> dict:
    # "group": the ranking a preference row came from (rm.loss=ranking trains a group's
    # pairs together)
    return {k: v for k, v in record.items() if k in (LOC_KEY, "id", "group")}


# ----------------------------------------------------------------------------- public


def tokenize_sft(
    records: Sequence[dict], tokenizer, cfg: DataSettings | None = None
) -> list[TokenizedSeq]:
    """SFT records -> sequences with loss on the response tokens."""
    cfg = cfg or DataSettings()
    bos = _bos_ids(tokenizer)

    def one(r: dict) -> TokenizedSeq:
        if cfg.messages_key in r and r[cfg.messages_key] is not None:
            msgs = _messages(r[cfg.messages_key], cfg.messages_key)
            if msgs[-1]["role"] != "assistant" or not msgs[-1]["content"].strip():
                raise _Malformed(f"{cfg.messages_key!r} must end with a non-empty assistant turn")
            if len(msgs) < 2:
                raise _Malformed(f"{cfg.messages_key!r} has no prompt before the response")
            prompt, response = _chat_ids(tokenizer, msgs[:-1], msgs[-1:])
        else:
            prompt = _text_ids(tokenizer, _text(r, cfg.prompt_key), cfg)
            response = _response_ids(tokenizer, _text(r, cfg.response_key), cfg)
        prompt = _truncate_prompt(prompt, cfg, bos)
        response = _truncate_response(response, cfg.max_length - len(prompt), cfg)
        return TokenizedSeq(prompt + response, [0] * len(prompt) + [1] * len(response), _meta(r))

    return _run(records, "sft", cfg, one)


def tokenize_preferences(
    records: Sequence[dict], tokenizer, cfg: DataSettings | None = None
) -> list[PreferencePair]:
    """Preference records (text, message lists or HH-RLHF transcripts) -> pairs."""
    cfg = cfg or DataSettings()
    bos = _bos_ids(tokenizer)

    def one(r: dict) -> PreferencePair:
        for key in (cfg.chosen_key, cfg.rejected_key):
            if r.get(key) is None:
                raise _Malformed(f"missing key {key!r}")
        chosen, rejected = r[cfg.chosen_key], r[cfg.rejected_key]
        if chosen == rejected:
            raise _Malformed("chosen == rejected")
        if isinstance(chosen, list) or isinstance(rejected, list):
            prompt, c_ids, r_ids = _message_pair(r, cfg, tokenizer)
        else:
            prompt_text = r.get(cfg.prompt_key)
            c_text = _text(r, cfg.chosen_key, allow_empty=True)
            r_text = _text(r, cfg.rejected_key, allow_empty=True)
            if prompt_text is None:  # HH-RLHF: the prompt is inside both transcripts
                prompt_text, c_text, r_text = split_hh_transcripts(c_text, r_text)
            else:
                prompt_text = _text(r, cfg.prompt_key)
                # some datasets repeat the prompt inside chosen / rejected
                if c_text.startswith(prompt_text) and r_text.startswith(prompt_text):
                    c_text, r_text = c_text[len(prompt_text) :], r_text[len(prompt_text) :]
            for key, text in ((cfg.chosen_key, c_text), (cfg.rejected_key, r_text)):
                if not text.strip():
                    raise _Malformed(f"{key!r} response is empty")
            prompt = _text_ids(tokenizer, prompt_text, cfg)
            c_ids = _response_ids(tokenizer, c_text, cfg)
            r_ids = _response_ids(tokenizer, r_text, cfg)
        prompt = _truncate_prompt(prompt, cfg, bos)
        budget = cfg.max_length - len(prompt)
        c_ids = _truncate_response(c_ids, budget, cfg)
        r_ids = _truncate_response(r_ids, budget, cfg)
        if c_ids == r_ids:  # nothing to prefer: the pair would only add noise
            raise _Malformed("chosen == rejected after tokenization and truncation")
        return PreferencePair(prompt, c_ids, r_ids, _meta(r))

    return _run(records, "preference", cfg, one)


def _message_pair(r: dict, cfg: DataSettings, tokenizer):
    chosen = _messages(r[cfg.chosen_key], cfg.chosen_key)
    rejected = _messages(r[cfg.rejected_key], cfg.rejected_key)
    prompt = r.get(cfg.prompt_key)
    if isinstance(prompt, str):
        prompt_msgs = [{"role": "user", "content": prompt}]
    elif prompt is not None:
        prompt_msgs = _messages(prompt, cfg.prompt_key)
    else:
        prompt_msgs = []
    # chosen / rejected may repeat the prompt messages (UltraFeedback-style)
    n = len(prompt_msgs)
    if prompt_msgs and chosen[:n] == prompt_msgs and rejected[:n] == prompt_msgs:
        chosen, rejected = chosen[n:], rejected[n:]
    elif not prompt_msgs:
        while len(chosen) > 1 and len(rejected) > 1 and chosen[0] == rejected[0]:
            prompt_msgs.append(chosen.pop(0))
            rejected = rejected[1:]
    if not prompt_msgs:
        raise _Malformed("no prompt: give 'prompt' or a shared first message")
    for key, msgs in ((cfg.chosen_key, chosen), (cfg.rejected_key, rejected)):
        if not msgs or any(m["role"] != "assistant" for m in msgs):
            raise _Malformed(f"{key!r} must end in assistant message(s) after the prompt")
        if not "".join(m["content"] for m in msgs).strip():
            raise _Malformed(f"{key!r} response is empty")
    prompt_ids, c_ids = _chat_ids(tokenizer, prompt_msgs, chosen)
    _, r_ids = _chat_ids(tokenizer, prompt_msgs, rejected)
    return prompt_ids, c_ids, r_ids


def tokenize_prompts(
    records: Sequence[dict], tokenizer, cfg: DataSettings | None = None
) -> list[PromptItem]:
    """RL prompt records -> prompt ids + text + optional reference answer."""
    cfg = cfg or DataSettings()
    bos = _bos_ids(tokenizer)

    def one(r: dict) -> PromptItem:
        if cfg.messages_key in r and r[cfg.messages_key] is not None:
            msgs = _messages(r[cfg.messages_key], cfg.messages_key)
            if msgs[-1]["role"] == "assistant":
                msgs = msgs[:-1]  # a demonstration's answer is not part of the prompt
            if not msgs:
                raise _Malformed(f"{cfg.messages_key!r} has no prompt message")
            text = _render(tokenizer, msgs, generation_prompt=True)
            ids = _chat_ids(tokenizer, msgs, None)[0]
        else:
            text = _text(r, cfg.prompt_key)
            ids = _text_ids(tokenizer, text, cfg)
        answer = r.get(cfg.answer_key)
        if answer is not None and not isinstance(answer, str):
            answer = str(answer)
        return PromptItem(_truncate_prompt(ids, cfg, bos), text, answer, _meta(r))

    return _run(records, "prompt", cfg, one)
