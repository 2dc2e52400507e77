"""What the launchers of fastrlhf.kernels ask of the GPU, checked without one.

The kernels' ``run`` is replaced by a recorder and the launchers are called with
``meta`` tensors as on a GPU (interpreter off): the recorded arguments, grids and
autotune keys are what a GPU launch would get. Nothing executes.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import triton

from fastrlhf.kernels import linear_logprobs as kll
from fastrlhf.kernels import logprobs as klp


@contextlib.contextmanager
def _recorded(monkeypatch, *kernels):
    """Launches of ``kernels`` as (kernel, args, kwargs, grid), with the interpreter off."""
    calls = []
    monkeypatch.setattr(kll, "interpreting", lambda: False)
    monkeypatch.setattr(klp, "interpreting", lambda: False)
    for k in kernels:

        def run(*args, _k=k, grid=None, warmup=False, **kwargs):
            calls.append((_k, args, kwargs, grid))

        monkeypatch.setattr(k, "run", run, raising=False)
    yield calls


def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(shape, dtype=dtype, device="meta")


def test_linear_autotune_key_buckets_the_row_count(monkeypatch):
    """The tile is chosen per power-of-two bucket of N, not frozen at the first N."""
    assert kll._fwd_kernel.keys[0] == "N_BUCKET" and kll._dlogits_kernel.keys[0] == "N_BUCKET"
    buckets = {}
    with _recorded(monkeypatch, kll._fwd_kernel) as calls:
        for n in (100, 128, 129, 8192):
            h, w = _meta(n, 64), _meta(4096, 64)
            kll.linear_logprobs_fwd(h, w, _meta(n, dtype=torch.long), None, 1.0, 4096, False,
                                    sm_count=132)  # fmt: skip
            args = calls[-1][1]
            buckets[n] = dict(zip(kll._fwd_kernel.arg_names, args))["N_BUCKET"]
    assert buckets == {100: 128, 128: 128, 129: 256, 8192: 8192}


@pytest.mark.parametrize("n", [512, 8192, 65536])
@pytest.mark.parametrize("sms", [108, 132])
def test_vocab_split_follows_the_tile(n, sms, monkeypatch):
    """The grid is sized for the tile the autotuner tries (not for 128-row tiles
    whatever it picks): at least two waves, the last one nearly full."""
    v = 151936
    with _recorded(monkeypatch, kll._fwd_kernel) as calls:
        kll.linear_logprobs_fwd(_meta(n, 64), _meta(v, 64), _meta(n, dtype=torch.long), None,
                                1.0, v, True, sm_count=sms)  # fmt: skip
    (_, args, _, grid) = calls[0]
    s_alloc = dict(zip(kll._fwd_kernel.arg_names, args))["S_ALLOC"]
    for cfg in kll._fwd_kernel.configs:
        (programs,) = grid(cfg.kwargs)
        blocks = triton.cdiv(n, cfg.kwargs["BLOCK_N"])
        splits = programs // blocks
        assert programs == blocks * splits and 1 <= splits <= s_alloc
        waves = triton.cdiv(programs, sms)
        assert programs >= min(2 * sms, blocks * triton.cdiv(v, 2048))
        assert programs / (waves * sms) >= 0.9 or splits == triton.cdiv(v, 2048), (cfg, programs)
        # the kernel's slice width gives exactly `splits` non-empty slices
        width = triton.cdiv(triton.cdiv(v, splits), 2048) * 2048
        assert triton.cdiv(v, width) == splits


def test_inplace_backward_is_not_autotuned(monkeypatch):
    """In place, autotuning would have to restore (clone) the [N, V] logits per trial:
    the launcher reuses the forward's (or the out-of-place backward's) choice instead."""
    assert not any(getattr(obj, "restore_value", None) for obj in vars(klp).values()), (
        "an autotuner restores a buffer per trial"
    )
    n, v = 8, 1000
    logits = _meta(n, v)
    labels, vec = _meta(n, dtype=torch.long), _meta(n, dtype=torch.float32)
    layout = (n, 0, v)
    # what a forward on these logits chose (other tests' choices must not leak in)
    chosen = {("fwd", v, torch.bfloat16): triton.Config({"BLOCK_V": 4096}, num_warps=8)}
    monkeypatch.setattr(klp, "_chosen", chosen)
    kernels = (klp._token_logprobs_bwd_kernel, klp._bwd_autotuned)
    with _recorded(monkeypatch, *kernels) as calls:
        klp.token_logprobs_bwd(logits, layout, logits, layout, labels, vec, None, vec, None,
                               1.0, -100, v)  # fmt: skip
    (kernel, _, kwargs, _) = calls[0]
    assert kernel is klp._token_logprobs_bwd_kernel  # the plain kernel, no autotuner
    assert kwargs["BLOCK_V"] == 4096 and kwargs["num_warps"] == 8


def test_launches_run_on_the_tensors_device(monkeypatch):
    """Every launcher enters its tensors' device (cuda:1 tensors while cuda:0 is
    current must not launch on cuda:0); recorded through the guard helper."""
    import fastrlhf.kernels._launch as launch
    from fastrlhf.kernels import losses as kls

    entered = []

    @contextlib.contextmanager
    def guard(t):
        entered.append(t.device)
        yield

    for mod in (kll, klp, kls):
        monkeypatch.setattr(mod, "device_of", guard)
    kernels = [kll._fwd_kernel, kll._dlogits_kernel, klp._token_logprobs_fwd_kernel,
               klp._bwd_autotuned, klp._token_logprobs_bwd_kernel, kls._kl_fwd_kernel,
               kls._ppo_fwd_kernel]  # fmt: skip
    with _recorded(monkeypatch, *kernels) as calls:
        monkeypatch.setattr(kls, "interpreting", lambda: False)
        n, v = 16, 512
        h, w, lab, f = _meta(n, 32), _meta(v, 32), _meta(n, dtype=torch.long), _meta(n)
        kll.linear_logprobs_fwd(h, w, lab, None, 1.0, v, False, sm_count=4)
        kll.linear_logprobs_dlogits(h, w, lab, None, f, f, f, None, 1.0, v, 0, v, _meta(n, v))
        klp.token_logprobs_fwd(_meta(n, v), (n, 0, v), lab, 1.0, -100, v, False)
        x = _meta(n, v)
        klp.token_logprobs_bwd(x, (n, 0, v), _meta(n, v), (n, 0, v), lab, f, None, f, None,
                               1.0, -100, v)  # fmt: skip
        klp.token_logprobs_bwd(x, (n, 0, v), x, (n, 0, v), lab, f, None, f, None, 1.0, -100, v)
        kls.kl_penalty_fwd(f, f, 0, False)
        mask = _meta(n, dtype=torch.uint8)
        kls.ppo_fwd(f, f, f, mask, None, None, None, 4, 4, 0.2, 0.2, None, 0.0, 3, False, 0.0, 0)
    assert len(calls) == 7 and len(entered) == 7
    assert calls[3][0] is klp._bwd_autotuned and calls[4][0] is klp._token_logprobs_bwd_kernel
    assert all(d == torch.device("meta") for d in entered)
    # the guard itself: a CUDA tensor's device becomes current; CPU tensors need nothing
    assert isinstance(launch.device_of(torch.zeros(1)), contextlib.nullcontext)
