"""The decode step: one token for every row, run eagerly, compiled, or replayed as a CUDA graph.

Shapes: Bb = rows of the step (the batch, or its power-of-two bucket when compiled),
S = KV cache capacity, V = vocabulary.

Decoding is launch-bound: one eager step of a 24-layer decoder is ~1000 ATen ops, each a
kernel launch (a few µs on CUDA, a few µs of dispatch on CPU), against a fraction of a
millisecond of weight reads. ``decode_step`` is ONE function for everything a step does
after the token is known, so that ``torch.compile(fullgraph=True)`` sees all of it:

    forward of the last token of each row through the decoder (writes the static KV cache)
    -> fp32 logits from the policy's own lm_head -> the draw (greedy, keyed uniforms or
    exponential noise; ``sampling.draw_tokens``) and the log-prob of the drawn token
    -> bookkeeping: finished rows emit the pad token and log-prob 0, the token and its
    log-prob are written into the response buffers, response lengths and EOS flags advance.

All of it reads and writes the tensors of one ``DecodeState`` in place; the step returns
nothing. The state's buffers, the KV cache's buffers and the weights keep their addresses
across steps and across rollouts, so on CUDA the compiled step is captured once per
(bucket, sampling settings) into a ``torch.cuda.CUDAGraph`` and later steps are a single
``replay()``. Randomness is an input, not an RNG call inside the graph: keyed uniforms are
a pure hash of (key, t) computed in the graph from the in-place step counter
(``sampling.keyed_uniform_at``, the same bits as the eager ``keyed_uniform``); the
torch.Generator path draws its Exp(1) noise eagerly into the state's noise buffer (the
same draws as eager decoding, in the same order). The "all rows finished?" check every
``eos_check_interval`` steps is a host sync and stays outside the graph.

Static shapes: the batch is padded to a power of two (``bucket_rows``) with rows that are
finished from the start (a single pad-token prompt, outputs discarded), and the cache
capacity is fixed by ``ReusableKVCache`` (rounded up to its granule). A rollout with the
same bucket and capacity reuses the compiled code and the graph; another shape compiles
once more (Inductor's code cache makes a repeat of a known shape cheap).

Memory policy (what lives where between generate and train). The graphs and the state are
owned by the ``ReusableKVCache`` whose buffers they were captured against, and they live
and die with it: ``ReusableKVCache.release()`` drops the cache buffers, the state buffers
and every graph with its private memory pool, so after the memory manager's release
(``HybridMemoryManager(release_kv_cache=True)``, the default) training holds none of it;
the next rollout re-allocates the cache and re-captures (two warm-up steps and one
capture per graph; the compiled code is reused, nothing recompiles). With
``release_kv_cache=False`` cache, state and graphs stay reserved through training and the
next rollout replays at once; ``ReusableKVCache.held_bytes()`` reports what is held. A
graph is also dropped and re-captured when the weights' addresses changed (a sharded
policy gathered into new buffers, a model moved): replaying it would read freed memory.

Compile failures (a model dynamo cannot trace, a backend error) switch the process to
the eager step with one warning naming the reason; the failing call did not run, so the
rollout continues eagerly from the same state.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastrlhf.rollout.sampling import draw_tokens, keyed_uniform_at

logger = logging.getLogger("fastrlhf.rollout")

COMPILE_SETTINGS = ("auto", "on", "off")
WARMUP_STEPS = 2  # compiled steps run eagerly (on a side stream) before a CUDA graph capture


def check_compile_setting(setting: object) -> None:
    """ValueError unless ``setting`` is "auto", "on", "off" or a bool (True = "on")."""
    if not isinstance(setting, bool) and setting not in COMPILE_SETTINGS:
        raise ValueError(
            f"compile must be one of {list(COMPILE_SETTINGS)} (or a bool), got {setting!r}"
        )


def resolve_compile(setting: str | bool, device: torch.device) -> bool:
    """``GenerationConfig.compile`` -> whether the compiled step is used on ``device``.

    "auto" compiles on CUDA only: there the step is launch-bound and CUDA graphs remove
    the launches; on CPU Inductor's gain is smaller and a compile costs tens of seconds.
    A bool (what YAML makes of a bare on/off) means "on" / "off".
    """
    check_compile_setting(setting)
    if setting == "auto":
        return device.type == "cuda"
    return setting is True or setting == "on"


def bucket_rows(batch: int) -> int:
    """The power of two >= ``batch``: compiled steps and graphs exist per bucket."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    return 1 << (batch - 1).bit_length()


def logits_fp32(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """hidden [B, H] @ weight[V, H].T (+ bias) as float32 [B, V], without rounding to bf16.

    Rounding logits to bf16 would move a log-prob by up to ~|logit| * 2^-8; the training
    pass keeps them in fp32, so generation must too.
    """
    if hidden.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.linear(hidden, weight, bias)
    low = (torch.float16, torch.bfloat16)
    if hidden.is_cuda and hidden.dtype in low and weight.dtype == hidden.dtype:
        # fp32 accumulation written straight to an fp32 output (CUDA-only overload)
        logits = torch.mm(hidden, weight.t(), out_dtype=torch.float32)
    else:  # CPU low precision (tests, debugging) or mixed dtypes: upcast, slower but exact
        logits = hidden.float() @ weight.float().t()
    return logits if bias is None else logits + bias.float()


@dataclass(frozen=True)
class StepSpec:
    """The Python constants of a step (a compiled step is specialised on them)."""

    temperature: float
    top_k: int
    top_p: float
    greedy: bool
    keyed: bool  # keyed uniforms; else Exp(1) noise from the state (unless greedy)
    pad_token_id: int
    eos: tuple[int, ...]
    # the family's post-head transform (models.heads.HeadTransform: scale, then soft-cap),
    # applied to the fp32 logits as training applies it
    logit_scale: float = 1.0
    softcap: float | None = None

    @property
    def uses_noise(self) -> bool:
        return not self.greedy and not self.keyed

    def head_logits(self, hidden, weight, bias) -> torch.Tensor:
        """fp32 logits of the policy's head, post-head transform included."""
        logits = logits_fp32(hidden, weight, bias)
        if self.logit_scale != 1.0:
            logits = logits * self.logit_scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


class DecodeState:
    """The static buffers of one (rows, capacity): step inputs and the state it advances.

    Column ``width + t`` of ``out_tokens`` / ``out_logprobs`` holds response token t
    (``width`` = P, the first response column of the left-padded canvas, as in the cache).
    """

    def __init__(self, rows: int, capacity: int, device: torch.device) -> None:
        long = dict(dtype=torch.long, device=device)
        self.rows, self.capacity = rows, capacity
        self.token = torch.zeros(rows, **long)  # last token of each row, the step's input
        self.t = torch.zeros((), **long)  # response position of ``token``
        self.lens = torch.ones(rows, **long)  # prompt lengths: position of response token 0
        self.prompt_mask = torch.zeros(rows, capacity, dtype=torch.bool, device=device)
        self.width = torch.zeros((), **long)  # P: columns >= P are response columns
        self.keys = torch.zeros(rows, **long)
        self.finished = torch.zeros(rows, dtype=torch.bool, device=device)
        self.response_lens = torch.zeros(rows, **long)
        self.out_tokens = torch.zeros(rows, capacity, **long)
        self.out_logprobs = torch.zeros(rows, capacity, dtype=torch.float32, device=device)
        self.noise: torch.Tensor | None = None  # [rows, V] float32, on first use

    def noise_buffer(self, vocab: int) -> torch.Tensor:
        if self.noise is None or self.noise.shape[1] != vocab:
            # pad rows keep 1.0: a finite race for rows whose draws are discarded
            self.noise = torch.ones(self.rows, vocab, device=self.token.device)
        return self.noise

    def tensors(self) -> list[torch.Tensor]:
        out = [v for v in vars(self).values() if isinstance(v, torch.Tensor)]
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def record_token(
    st: DecodeState, token: torch.Tensor, logprob: torch.Tensor, t: torch.Tensor, spec: StepSpec
) -> None:
    """Write response token ``t`` (drawn for every row) into ``st``; finished rows get the
    pad token and log-prob 0, and a row that draws an EOS is finished after it."""
    alive = ~st.finished  # [Bb]
    token = torch.where(alive, token, spec.pad_token_id)
    col = (st.width + t).expand(st.rows, 1)  # [Bb, 1]
    st.out_tokens.scatter_(1, col, token[:, None])
    st.out_logprobs.scatter_(1, col, torch.where(alive, logprob, 0.0)[:, None])
    st.response_lens.add_(alive.long())
    hit = torch.zeros_like(alive)
    for e in spec.eos:  # a handful of ids: an unrolled compare, no id tensor to guard on
        hit |= token == e
    st.finished.logical_or_(alive & hit)
    st.token.copy_(token)
    st.t.copy_(t)


def decode_step(
    decoder: torch.nn.Module,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cache,
    st: DecodeState,
    spec: StepSpec,
) -> None:
    """Feed ``st.token`` (response token t) and draw response token t + 1 for every row."""
    cols = torch.arange(st.capacity, device=st.token.device)
    # prompt columns holding real tokens, and every response column: those past the
    # current one are still hidden by causality (the cache's own write position)
    attn = (st.prompt_mask | (cols >= st.width)).long()  # [Bb, S]
    hidden = decoder(
        input_ids=st.token[:, None],
        attention_mask=attn,
        position_ids=(st.lens + st.t)[:, None],
        past_key_values=cache,
        use_cache=True,
    ).last_hidden_state[:, -1]  # [Bb, H]
    t = st.t + 1
    uniforms = keyed_uniform_at(st.keys, t) if spec.keyed and not spec.greedy else None
    token, logprob = draw_tokens(
        spec.head_logits(hidden, weight, bias),
        spec.temperature,
        spec.top_k,
        spec.top_p,
        greedy=spec.greedy,
        noise=st.noise if spec.uses_noise else None,
        uniforms=uniforms,
    )
    record_token(st, token, logprob, t, spec)


# ---------------------------------------------------------------- compiled path
_compiled = None  # torch.compile(decode_step), built on first use (no import side effects)
_broken: str | None = None  # why compiling failed in this process, once it did
_logged: set[str] = set()


def _log_once(path: str) -> None:
    if path not in _logged:
        _logged.add(path)
        logger.info("rollout decode: %s", path)


def _compiled_step():
    global _compiled
    if _compiled is None:
        # static shapes: one specialisation per (bucket, capacity, sampling settings)
        _compiled = torch.compile(decode_step, fullgraph=True, dynamic=False)
    return _compiled


def compile_broken() -> str | None:
    """The reason compiling failed in this process (None while it works)."""
    return _broken


def _fall_back(err: Exception) -> None:
    global _broken
    _broken = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err) else ''}"
    warnings.warn(
        f"rollout: compiling the decode step failed ({_broken}); decoding eagerly from "
        "now on in this process (set rollout.compile=off to skip the attempt)",
        RuntimeWarning,
        stacklevel=3,
    )
    _log_once(f"eager decode step (compile failed: {_broken})")


class _StepGraph:
    """One CUDA graph of the compiled step, with the addresses it was captured against."""

    def __init__(self, weights: tuple[int, ...]) -> None:
        self.weights = weights
        self.graph: torch.cuda.CUDAGraph | None = None
        self.warm = 0
        self.pool_bytes = 0
        self.failed = False  # capture failed once: this step runs compiled, without a graph


class StepRunner:
    """Runs ``decode_step`` for one rollout: eagerly, compiled, or as a CUDA graph replay.

    ``graphs`` is the dict (owned by the ``ReusableKVCache``) that keeps graphs across
    rollouts, keyed by the step's ``StepSpec``.
    """

    def __init__(self, compiled: bool, parts, cache, st: DecodeState, spec: StepSpec, graphs):
        self.parts, self.cache, self.st, self.spec = parts, cache, st, spec
        self.compiled = compiled and _broken is None
        device = st.token.device
        self.graph: _StepGraph | None = None
        if self.compiled and device.type == "cuda":
            ptrs = _weight_ptrs(parts)
            graph = graphs.get(spec)
            if graph is None or graph.weights != ptrs:
                graph = graphs[spec] = _StepGraph(ptrs)  # (re)capture against these weights
            self.graph = None if graph.failed else graph
        if not self.compiled:
            _log_once("eager decode step" + (f" (compile failed: {_broken})" if _broken else ""))

    def _log_compiled(self) -> None:
        # once the first compiled step has run: a failure logs the eager path instead
        graphs = "one CUDA graph per batch bucket" if self.graph else "Inductor, no CUDA graphs"
        _log_once(f"compiled decode step (torch.compile fullgraph, {graphs})")

    def _args(self):
        p = self.parts
        return p.decoder, p.weight, p.bias, self.cache, self.st, self.spec

    def __call__(self) -> None:
        if not self.compiled:
            decode_step(*self._args())
            return
        try:
            if self.graph is None:
                _compiled_step()(*self._args())
            else:
                self._graph_step()
            self._log_compiled()
        except _compile_errors() as err:
            # raised while tracing or compiling, before the step ran: redo it eagerly
            _fall_back(err)
            self.compiled, self.graph = False, None
            decode_step(*self._args())

    def _graph_step(self) -> None:
        g = self.graph
        if g.graph is not None:
            g.graph.replay()
            return
        fn = _compiled_step()
        if g.warm < WARMUP_STEPS:
            # real steps, on a side stream as capture requires of the work before it
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn(*self._args())
            torch.cuda.current_stream().wait_stream(side)
            g.warm += 1
            return
        graph = torch.cuda.CUDAGraph()
        reserved = torch.cuda.memory_reserved()
        try:
            with torch.cuda.graph(graph):  # records the step without running it ...
                fn(*self._args())
        except Exception as err:  # noqa: BLE001 - any capture error: keep the compiled step
            warnings.warn(
                f"rollout: capturing the compiled decode step in a CUDA graph failed "
                f"({type(err).__name__}: {err}); running it without graphs",
                RuntimeWarning,
                stacklevel=3,
            )
            g.failed, self.graph = True, None
            fn(*self._args())
            return
        g.pool_bytes = torch.cuda.memory_reserved() - reserved
        g.graph = graph
        graph.replay()  # ... so run it


# Tracing/backend failures, and the recompile limit of a fullgraph function (dynamo's
# recompile_limit specialisations of (bucket, capacity, sampling settings) per process).
def _compile_errors() -> tuple[type[Exception], ...]:
    from torch._dynamo import exc  # dynamo is heavy: imported when a step is compiled

    return exc.TorchDynamoException, exc.FailOnRecompileLimitHit


def _weight_ptrs(parts) -> tuple[int, ...]:
    """Addresses a captured step reads: every parameter and buffer of the decoder, the head."""
    ptrs = [t.data_ptr() for t in parts.decoder.parameters()]
    ptrs += [t.data_ptr() for t in parts.decoder.buffers()]
    ptrs.append(parts.weight.data_ptr())
    if parts.bias is not None:
        ptrs.append(parts.bias.data_ptr())
    return tuple(ptrs)
