"""The compiled decode step (torch.compile fullgraph; CUDA graphs on CUDA) against the eager
one: same tokens for the same keys, log-probs within 1e-5 of the training forward, EOS
stops inside a power-of-two bucket, reuse without recompiling, and the eager fallback.

Compiling the tiny model takes tens of seconds on a CPU, so the CPU tests share two
compiled specialisations: greedy without EOS, and keyed sampling with EOS (5 rows, bucket 8,
cache capacity 64). test_memory.py reuses the greedy one.
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

from fastrlhf.rollout import (
    GenerationConfig,
    ReusableKVCache,
    decode,
    generate,
    pack_prompts,
    sequence_keys,
)
from tests.helpers import assert_close
from tests.rollout.tiny import random_prompts, tiny_lm

LENGTHS = (5, 1, 9, 3, 7)  # 5 rows: bucket 8, three rows of bucket padding
GREEDY = dict(max_new_tokens=10, temperature=0.0)  # the shared greedy specialisation
SAMPLED = dict(max_new_tokens=12, temperature=0.8, top_k=20, top_p=0.9)


def _gen(model, prompts, compile, kv=None, keys=None, **cfg):
    ids, cu = pack_prompts(prompts)
    config = GenerationConfig(compile=compile, **cfg)
    return generate(model, ids, cu, config, kv_cache=kv, sample_keys=keys)


def _unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _assert_same_tokens(a, b):
    for name in ("input_ids", "position_ids", "cu_seqlens", "response_mask"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(a.response_lens, b.response_lens)
    assert torch.equal(a.finished, b.finished)
    assert_close(a.logprobs, b.logprobs, atol=1e-5, name="compiled vs eager log-probs")


def _training_logprobs(model, rollout, temperature):
    """The training forward in float32: one packed forward, log_softmax(logits / T)."""
    batch = rollout.to_training_batch()
    with torch.no_grad():
        logits = model(
            input_ids=batch.input_ids[None], position_ids=batch.position_ids[None], use_cache=False
        ).logits[0]
    lp = torch.log_softmax(logits / temperature, -1)
    lp = lp.gather(-1, batch.labels.clamp(min=0)[:, None])[:, 0]
    return batch.old_logprobs, lp, batch.loss_mask


def test_compiled_greedy_equals_eager_and_the_training_forward():
    model = tiny_lm()
    prompts = random_prompts(LENGTHS)
    eager = _gen(model, prompts, "off", **GREEDY)
    compiled = _gen(model, prompts, "on", **GREEDY)
    _assert_same_tokens(compiled, eager)
    assert int(compiled.response_lens.min()) == 10  # no EOS: every row decodes R tokens
    old, lp, m = _training_logprobs(model, compiled, 1.0)
    assert_close(old[m], lp[m], atol=1e-5, name="compiled greedy vs training forward")


def test_compiled_keyed_sampling_equals_eager_with_eos_inside_the_bucket():
    model = tiny_lm()
    prompts = random_prompts(LENGTHS)
    keys = sequence_keys(7, 3, torch.arange(len(LENGTHS)))
    free = _gen(model, prompts, "off", keys=keys, **SAMPLED)
    # EOS ids taken from the free run: rows stop at different steps, some never
    resp = free.responses()
    eos = (int(resp[0][2]), int(resp[3][6]))
    cfg = dict(SAMPLED, eos_token_id=eos, eos_check_interval=3)
    kv = ReusableKVCache()
    eager = _gen(model, prompts, "off", keys=keys, **cfg)
    compiled = _gen(model, prompts, "on", kv=kv, keys=keys, **cfg)
    _assert_same_tokens(compiled, eager)
    lens = compiled.response_lens
    assert bool(compiled.finished.any()) and int(lens.min()) < int(lens.max())
    old, lp, m = _training_logprobs(model, compiled, SAMPLED["temperature"])
    assert_close(old[m], lp[m], atol=1e-5, name="compiled keyed vs training forward")

    # another rollout in the same bucket and capacity: the cache, the decode state and the
    # compiled code are reused (reset, not reallocated; nothing recompiles)
    ptrs = [t.data_ptr() for t in kv.buffers() + kv.decode_state("cpu").tensors()]
    graphs = _unique_graphs()
    prompts2 = random_prompts((2, 8, 4, 6, 3, 5), seed=9)
    keys2 = sequence_keys(7, 4, torch.arange(6))
    again = _gen(model, prompts2, "on", kv=kv, keys=keys2, **cfg)
    assert _unique_graphs() == graphs and kv.allocations == 1
    assert [t.data_ptr() for t in kv.buffers() + kv.decode_state("cpu").tensors()] == ptrs
    _assert_same_tokens(again, _gen(model, prompts2, "off", keys=keys2, **cfg))


@pytest.mark.parametrize("error", ["TorchDynamoException", "FailOnRecompileLimitHit"])
def test_compile_failure_falls_back_to_eager_with_one_warning(monkeypatch, caplog, error):
    def broken(*args):
        raise getattr(torch._dynamo.exc, error)("no tracing today")

    monkeypatch.setattr(decode, "_compiled", broken)
    monkeypatch.setattr(decode, "_broken", None)
    monkeypatch.setattr(decode, "_logged", set())
    model = tiny_lm()
    prompts = random_prompts(LENGTHS)
    eager = _gen(model, prompts, "off", max_new_tokens=6, temperature=0.0)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        first = _gen(model, prompts, "on", max_new_tokens=6, temperature=0.0)
        second = _gen(model, prompts, "on", max_new_tokens=6, temperature=0.0)
    ours = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(ours) == 1 and "no tracing today" in str(ours[0].message)
    assert decode.compile_broken() == f"{error}: no tracing today"
    # the failed call did not run: the rollout continued eagerly from the same state
    _assert_same_tokens(first, eager)
    _assert_same_tokens(second, eager)
    paths = [r.getMessage() for r in caplog.records if r.name == "fastrlhf.rollout"]
    reason = f"{error}: no tracing today"
    assert paths == [f"rollout decode: eager decode step (compile failed: {reason})"], paths


def test_eager_path_is_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(decode, "_logged", set())
    model = tiny_lm()
    with caplog.at_level(logging.INFO, logger="fastrlhf.rollout"):
        for _ in range(2):
            _gen(model, random_prompts((3, 4)), "auto", max_new_tokens=2)
    paths = [r.getMessage() for r in caplog.records if r.name == "fastrlhf.rollout"]
    assert paths == ["rollout decode: eager decode step"]


def test_compile_setting_and_buckets():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not decode.resolve_compile("auto", cpu) and decode.resolve_compile("auto", cuda)
    assert decode.resolve_compile("on", cpu) and not decode.resolve_compile("off", cuda)
    with pytest.raises(ValueError, match="compile must be one of"):
        decode.resolve_compile("yes", cpu)
    with pytest.raises(ValueError, match="compile must be one of"):
        GenerationConfig(compile="yes").validate()
    assert [decode.bucket_rows(b) for b in (1, 2, 3, 5, 8, 9, 64, 65)] == [
        1, 2, 4, 8, 8, 16, 64, 128,
    ]  # fmt: skip
    with pytest.raises(ValueError, match="batch must be >= 1"):
        decode.bucket_rows(0)


@pytest.mark.gpu
def test_cuda_graphs_are_captured_once_per_bucket_and_replayed_across_rollouts():
    model = tiny_lm().cuda()
    prompts = [p.cuda() for p in random_prompts(LENGTHS)]
    keys = sequence_keys(1, 0, torch.arange(len(LENGTHS), device="cuda"))
    kv = ReusableKVCache()
    cfg = dict(SAMPLED, max_new_tokens=20)
    compiled = _gen(model, prompts, "auto", kv=kv, keys=keys, **cfg)
    _assert_same_tokens(compiled, _gen(model, prompts, "off", keys=keys, **cfg))
    (graph,) = kv.graphs.values()
    assert graph.graph is not None and not graph.failed
    captured = graph.graph
    again = _gen(model, prompts, "auto", kv=kv, keys=keys, **cfg)
    _assert_same_tokens(again, compiled)
    assert kv.graphs[next(iter(kv.graphs))].graph is captured  # replayed, not re-captured
    assert kv.held_bytes() > kv.nbytes()
    kv.release()
    assert kv.graphs == {} and kv.held_bytes() == 0


def test_rollout_compile_config_key():
    from fastrlhf.config import ConfigError, parse_overrides, run_config_from_dict

    def key(value):
        return run_config_from_dict(parse_overrides([f"rollout.compile={value}"])).rollout.compile

    assert run_config_from_dict({}).rollout.compile == "auto"
    # YAML makes a bare on/off a bool; both spellings mean the same
    for value, on in (("on", True), ("off", False), ("auto", False), ("'on'", True)):
        setting = key(value)
        GenerationConfig(compile=setting).validate()
        assert decode.resolve_compile(setting, torch.device("cpu")) is on, value
    with pytest.raises(ConfigError, match="rollout.compile: 'maybe' is not one of"):
        key("maybe")
    with pytest.raises(ValueError, match="compile must be one of"):
        GenerationConfig(compile=1).validate()
