"""The embedded default: a tokenizer, a tiny Llama and a synthetic arithmetic task.

Everything here is built locally (no download) and is small enough to train on a CPU
in minutes; it is what ``make demo`` runs on, and what tests use as a "real" model.

- ``embedded_tokenizer()``: a character-level HF fast tokenizer (digits, operators,
  letters, punctuation, plus <pad>/<bos>/<eos>/<unk> and two chat-role markers) built
  with the ``tokenizers`` library. Encoding prepends <bos> like Llama's tokenizers do.
  The same tokenizer is shipped in HF format under ``fastrlhf/data/assets/tokenizer``
  (``build_tokenizer_files`` rewrites it; a test checks the shipped files equal a
  fresh build).
- ``tiny_llama_config(vocab_size)``: a ~0.9M-parameter Llama (4 layers, hidden 128,
  4 query heads sharing 2 key/value heads, tied embeddings).
- ``embedded_model(dir, seed)``: a randomly initialized tiny Llama + the tokenizer,
  saved in HF format so ``load_policy(dir)`` treats it exactly like a real checkpoint.
- ``ArithmeticTask(seed)``: prompts like ``"27+15="`` (operands zero-padded to the
  width of ``max_operand``: ``"07+15="``) whose answer is ``"42"`` (then EOS), with
  demonstrators who systematically forget carries, annotators who compare answers
  with some label noise, RL prompts with reference answers, and a gold checker
  (exact answer) the policy never sees during PPO. See the class docstring for why
  the noise is shaped this way: it is what lets RLHF beat SFT on this task.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
TOKENIZER_DIR = ASSETS_DIR / "tokenizer"

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>", "<|user|>", "<|assistant|>"]
_CHARS = (
    "0123456789"
    + "+-*/=()<>.,:;?!'\"%$#&_ \n"
    + "abcdefghijklmnopqrstuvwxyz"
    + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
)
# A tiny chat template: role markers as special tokens, <eos> closes each assistant turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}{{ eos_token }}"
    "{% else %}<|user|>{{ m['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _build_tokenizer():
    """A character-level ``PreTrainedTokenizerFast`` (BPE with an empty merge list)."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + list(_CHARS))}
    # BPE with no merges maps every character to its own id and unknowns to <unk>;
    # no pre-tokenizer, so spaces and newlines are ordinary characters and decoding
    # (Fuse) is the exact inverse of encoding.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
        padding_side="left",  # generation pads prompts on the left
    )


def build_tokenizer_files(out_dir: str | Path = TOKENIZER_DIR) -> Path:
    """Write the embedded tokenizer in HF format to ``out_dir`` (default: the shipped copy)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _build_tokenizer().save_pretrained(str(out))
    return out


def embedded_tokenizer():
    """The shipped embedded tokenizer, loaded with ``AutoTokenizer`` from the package assets."""
    from transformers import AutoTokenizer

    if not (TOKENIZER_DIR / "tokenizer.json").exists():
        raise FileNotFoundError(
            f"the embedded tokenizer is missing under {TOKENIZER_DIR}; rebuild it with "
            "fastrlhf.data.embedded.build_tokenizer_files()"
        )
    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def tiny_llama_config(vocab_size: int, **overrides):
    """A LlamaConfig of about a million parameters (fewer with a small vocab)."""
    from transformers import LlamaConfig

    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA, as in every recent Llama
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        initializer_range=0.02,
        bos_token_id=SPECIAL_TOKENS.index("<bos>"),
        eos_token_id=SPECIAL_TOKENS.index("<eos>"),
        pad_token_id=SPECIAL_TOKENS.index("<pad>"),
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def embedded_model(out_dir: str | Path, seed: int = 0, **config_overrides) -> str:
    """Write a random-init tiny Llama + the embedded tokenizer to ``out_dir``; return the path."""
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    tokenizer = embedded_tokenizer()
    config = tiny_llama_config(len(tokenizer), **config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return str(out)


_PROMPT_RE = re.compile(r"^\s*(\d+)\s*([+\-*])\s*(\d+)\s*=\s*$")


def parse_prompt(prompt: str) -> tuple[int, str, int]:
    """``"07+15="`` -> ``(7, "+", 15)``; padded or not, surrounding spaces allowed."""
    m = _PROMPT_RE.match(prompt)
    if m is None:
        raise ValueError(f"not an arithmetic prompt: {prompt!r}")
    return int(m.group(1)), m.group(2), int(m.group(3))


def needs_carry(a: int, op: str, b: int) -> bool:
    """Whether ``a op b`` carries (``+``: units sum >= 10) or borrows (``-``: units of ``a``
    below units of ``b``) from the units column into the tens; ``*`` never counts."""
    if op == "+":
        return a % 10 + b % 10 >= 10
    if op == "-":
        return a % 10 < b % 10
    return False


def forgot_carry(a: int, op: str, b: int) -> int:
    """The answer a demonstrator gets by forgetting the carry / borrow: the units digit is
    right, the tens digit misses the 1 (``27+15`` -> 32, ``42-15`` -> 37)."""
    if op not in "+-" or not needs_carry(a, op, b):
        raise ValueError(f"forgot_carry: {a}{op}{b} has no carry or borrow to forget")
    value = a + b if op == "+" else a - b
    return value - 10 if op == "+" else value + 10


class ArithmeticTask:
    """Deterministic synthetic arithmetic with noisy human data and a gold checker.

    Problems are ``a op b =`` with ``0 <= a, b <= max_operand`` and ``op`` in ``ops``;
    subtraction keeps ``a >= b`` so every answer is a non-negative integer. Every public
    method draws from its own generator seeded by (seed, method), so results do not
    depend on call order.

    The human data is noisy the way real RLHF data is, and the noise is what makes RLHF
    beat SFT here (comparing is easier than generating; annotators err differently from
    demonstrators):

    - Demonstrators (``sft_records``) make SYSTEMATIC, prompt-dependent mistakes: on a
      problem that needs a carry (``+``) or a borrow (``-``) from the units into the tens,
      they forget it with probability ``carry_forget_rate`` (the answer is then off by
      exactly 10: ``27+15=32``, ``42-15=37``); easy problems are demonstrated correctly.
      Above 0.5 the most likely demonstration of a carry problem is wrong, so a policy
      that imitates well (greedy SFT) learns the wrong rule there: SFT accuracy is capped
      by the demonstrators, not only by model capacity. Of the other demonstrations,
      ``mistake_rate`` carry a random slip (off by one, off by ten, two digits swapped).
    - Annotators (``preference_records``) compare a correct answer with a wrong one and
      pick the correct one except for ``label_noise`` of the pairs. On carry problems the
      wrong answer is the demonstrators' typical mistake with probability
      ``carry_pair_rate``, so the pairs teach a reward model exactly the distinction the
      SFT policy gets wrong; otherwise it is a slip of the units digit (off by one, or
      digits swapped), so the reward model must check the units digit too.
    - ``gold_score`` is exact match, never seen in training by the policy or the RM.
    """

    def __init__(
        self,
        seed: int = 0,
        *,
        max_operand: int = 20,
        ops: str = "+-",
        carry_forget_rate: float = 0.7,
        mistake_rate: float = 0.05,
        label_noise: float = 0.1,
        carry_pair_rate: float = 0.5,
        pad_operands: bool = True,
    ) -> None:
        if max_operand < 1:
            raise ValueError(f"max_operand must be >= 1, got {max_operand}")
        if not ops or any(o not in "+-*" for o in ops):
            raise ValueError(f"ops must be a non-empty subset of '+-*', got {ops!r}")
        rates = dict(
            carry_forget_rate=carry_forget_rate,
            mistake_rate=mistake_rate,
            label_noise=label_noise,
            carry_pair_rate=carry_pair_rate,
        )
        for name, rate in rates.items():
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {rate}")
        self.seed = seed
        self.max_operand = max_operand
        self.ops = ops
        self.carry_forget_rate = carry_forget_rate
        self.mistake_rate = mistake_rate
        self.label_noise = label_noise
        self.carry_pair_rate = carry_pair_rate
        self.pad_operands = pad_operands

    def _prompt(self, a: int, op: str, b: int) -> str:
        # Zero-padded operands ("07+15=") put every digit at a fixed offset from the "=",
        # which the tiny model learns to align (measured, demo SFT, 1200 steps: 48% gold
        # padded vs 7% unpadded, whose loss had not left its plateau).
        w = len(str(self.max_operand)) if self.pad_operands else 0
        return f"{a:0{w}d}{op}{b:0{w}d}="

    def _rng(self, salt: str) -> random.Random:
        return random.Random(f"{self.seed}/{salt}")

    def _problem(self, rng: random.Random) -> tuple[int, str, int]:
        op = rng.choice(self.ops)
        a, b = rng.randint(0, self.max_operand), rng.randint(0, self.max_operand)
        if op == "-" and b > a:
            a, b = b, a
        return a, op, b

    @staticmethod
    def _value(a: int, op: str, b: int) -> int:
        return a + b if op == "+" else a - b if op == "-" else a * b

    @staticmethod
    def _slip(rng: random.Random, value: int, tens: bool = True) -> int:
        """A random plausible wrong answer: off by one, off by ten (unless ``tens`` is
        False), or two digits swapped."""
        s = str(value)
        kinds = ["off_by_one"] + (["off_by_ten"] if tens else [])
        kinds += ["swap"] if len(set(s)) > 1 else []
        kind = rng.choice(kinds)
        if kind == "swap":
            i = rng.randrange(len(s) - 1)
            return int(s[:i] + s[i + 1] + s[i] + s[i + 2 :])
        step = 1 if kind == "off_by_one" else 10
        wrong = value + rng.choice([-step, step])
        return wrong if wrong >= 0 else value + step

    def answer(self, prompt: str) -> int:
        """The exact answer of a prompt of this task's form."""
        return self._value(*parse_prompt(prompt))

    def is_carry_problem(self, prompt: str) -> bool:
        """Whether the prompt needs a carry / borrow (where demonstrators go wrong)."""
        return needs_carry(*parse_prompt(prompt))

    def sft_records(self, n: int) -> list[dict]:
        """``n`` {prompt, response} demonstrations: carry problems forget the carry with
        probability ``carry_forget_rate``; any demonstration slips with ``mistake_rate``."""
        rng = self._rng("sft")
        out = []
        for _ in range(n):
            a, op, b = self._problem(rng)
            value = self._value(a, op, b)
            # both draws happen for every record so the stream does not depend on the rates
            forget, slip = rng.random() < self.carry_forget_rate, rng.random()
            if needs_carry(a, op, b) and forget:
                value = forgot_carry(a, op, b)
            elif slip < self.mistake_rate:
                value = self._slip(rng, value)
            out.append({"prompt": self._prompt(a, op, b), "response": str(value)})
        return out

    def preference_records(self, n: int) -> list[dict]:
        """``n`` {prompt, chosen, rejected}: the correct answer against a wrong one (on carry
        problems usually the forgotten carry), labels flipped for ``label_noise`` of them."""
        rng = self._rng("pref")
        out = []
        for _ in range(n):
            a, op, b = self._problem(rng)
            value = self._value(a, op, b)
            typical = rng.random() < self.carry_pair_rate
            if needs_carry(a, op, b) and typical:
                wrong = forgot_carry(a, op, b)
            else:
                # slips of the units digit: pairs that differ only in the tens digit are
                # the carry pairs above, so the units digit must be checked on its own
                wrong = self._slip(rng, value, tens=False)
            chosen, rejected = value, wrong
            if rng.random() < self.label_noise:
                chosen, rejected = rejected, chosen
            out.append(
                {"prompt": self._prompt(a, op, b), "chosen": str(chosen), "rejected": str(rejected)}
            )
        return out

    def rl_prompts(self, n: int) -> list[dict]:
        """``n`` {prompt, answer} records for RL (the answer is for evaluation only)."""
        rng = self._rng("rl")
        out = []
        for _ in range(n):
            a, op, b = self._problem(rng)
            out.append({"prompt": self._prompt(a, op, b), "answer": str(self._value(a, op, b))})
        return out

    def gold_score(self, prompt: str, response: str) -> float:
        """1.0 iff the response (special tokens stripped) is exactly the right number."""
        return 1.0 if response.strip() == str(self.answer(prompt)) else 0.0


def describe_tokenizer_files(directory: str | Path) -> dict[str, object]:
    """The JSON content of a saved tokenizer's files (for comparing two builds)."""
    out: dict[str, object] = {}
    for path in sorted(Path(directory).iterdir()):
        text = path.read_text()
        out[path.name] = json.loads(text) if path.suffix == ".json" else text
    return out
