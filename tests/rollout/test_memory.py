"""The generate -> score -> train memory state machine: order, grads, KV cache, offload."""

from __future__ import annotations

import copy

import pytest
import torch

from fastrlhf.rollout import GenerationConfig, HybridMemoryManager, Phase, generate, pack_prompts
from tests.rollout.tiny import random_prompts, tiny_lm


def _mlp(seed: int) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        m = torch.nn.Sequential(
            torch.nn.Linear(7, 13), torch.nn.LayerNorm(13), torch.nn.Linear(13, 3)
        )
    m.register_buffer("running", torch.randn(5))  # a buffer travels with the parameters
    return m


def _train_step(model, opt, x):
    opt.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    opt.step()


def _state_snapshot(opt):
    return [{k: v.clone() for k, v in s.items()} for s in opt.state.values()]


def test_phase_order_is_enforced():
    mm = HybridMemoryManager(_mlp(0))
    assert mm.phase is Phase.IDLE
    for bad in ("score", "train", "idle"):
        with pytest.raises(RuntimeError, match=f"cannot enter phase '{bad}' from 'idle'"):
            mm.enter(bad)
    mm.generate()
    with pytest.raises(RuntimeError, match="from 'generate'; allowed next: score"):
        mm.train()  # skipping score
    with pytest.raises(RuntimeError, match="allowed next: score"):
        mm.generate()
    mm.score()
    with pytest.raises(RuntimeError, match="allowed next: train"):
        mm.generate()
    mm.train()
    mm.generate()  # the next step
    assert mm.step == 2
    mm.score()
    mm.train()
    mm.finish()
    assert mm.phase is Phase.IDLE
    with pytest.raises(ValueError):
        mm.enter("warmup")


def test_grads_are_none_after_entering_generation():
    policy, critic = _mlp(0), _mlp(1)
    opt = torch.optim.AdamW(list(policy.parameters()) + list(critic.parameters()), lr=1e-2)
    mm = HybridMemoryManager(policy, [opt], {"critic": critic})
    x = torch.randn(4, 7)
    (policy(x).sum() + critic(x).sum()).backward()
    assert all(p.grad is not None for p in policy.parameters())
    mm.generate()
    assert all(p.grad is None for p in policy.parameters())
    assert all(p.grad is None for p in critic.parameters())


def test_kv_cache_released_after_generation_and_train_refuses_a_live_cache():
    model = tiny_lm()
    mm = HybridMemoryManager(model)
    ids, cu = pack_prompts(random_prompts((3, 5)))
    cfg = GenerationConfig(max_new_tokens=3)
    mm.generate()
    generate(model, ids, cu, cfg, kv_cache=mm.kv_cache)
    assert mm.kv_cache.alive and mm.kv_cache.nbytes() > 0
    mm.score()
    assert not mm.kv_cache.alive
    generate(model, ids, cu, cfg, kv_cache=mm.kv_cache)  # a stray generation while scoring
    with pytest.raises(RuntimeError, match="KV cache is alive"):
        mm.train()
    mm.kv_cache.release()
    mm.train()


def test_kv_cache_kept_across_steps_when_release_is_off():
    model = tiny_lm()
    mm = HybridMemoryManager(model, release_kv_cache=False)
    ids, cu = pack_prompts(random_prompts((3, 5)))
    ptrs = None
    for _ in range(2):
        mm.generate()
        generate(model, ids, cu, GenerationConfig(max_new_tokens=3), kv_cache=mm.kv_cache)
        ptrs = ptrs or [t.data_ptr() for t in mm.kv_cache.buffers()]
        assert [t.data_ptr() for t in mm.kv_cache.buffers()] == ptrs
        mm.score()
        mm.train()  # allowed: the cache is deliberately kept
    assert mm.kv_cache.allocations == 1


def test_optimizer_state_offload_roundtrip_is_exact_and_training_continues_identically():
    policy = _mlp(0)
    twin = copy.deepcopy(policy)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    opt_twin = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    xs = torch.randn(6, 4, 7)
    for x in xs[:2]:
        _train_step(policy, opt, x)
        _train_step(twin, opt_twin, x)
    before = _state_snapshot(opt)
    # Hold the original state tensors: a freed storage's address could be handed to the
    # next host buffer of the same size, and the pointer check below would misfire.
    originals = [s["exp_avg"] for s in opt.state.values()]
    ptrs = [t.data_ptr() for t in originals]
    mm = HybridMemoryManager(policy, [opt], offload_optimizer=True)
    for x in xs[2:]:
        mm.generate()
        assert mm.optimizer_offloaded
        # the states now live in separate host buffers holding the same values
        for s, ref in zip(opt.state.values(), before):
            assert s["exp_avg"].device.type == "cpu"
            assert torch.equal(s["exp_avg"], ref["exp_avg"])
        assert all(s["exp_avg"].data_ptr() not in ptrs for s in opt.state.values())
        mm.score()
        mm.train()
        opt.zero_grad(set_to_none=True)
        policy(x).square().mean().backward()
        assert mm.optimizer_offloaded  # forward/backward ran without the optimizer states
        mm.prepare_optimizer_step()
        assert not mm.optimizer_offloaded
        for s, ref in zip(opt.state.values(), before):
            for k in ref:
                assert torch.equal(s[k], ref[k]) and s[k].dtype == ref[k].dtype, k
        opt.step()
        before = _state_snapshot(opt)
        _train_step(twin, opt_twin, x)
    # bitwise the same training trajectory as the never-offloaded twin
    for p, q in zip(policy.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    for s, t in zip(opt.state.values(), opt_twin.state.values()):
        for k in s:
            assert torch.equal(s[k], t[k]), k


def test_prepare_optimizer_step_only_in_train():
    mm = HybridMemoryManager(_mlp(0), [torch.optim.SGD(_mlp(0).parameters(), lr=0.1)])
    with pytest.raises(RuntimeError, match="'train' phase"):
        mm.prepare_optimizer_step()


def test_models_are_offloaded_between_uses_with_exact_values():
    policy, critic, reward = _mlp(0), _mlp(1), _mlp(2)
    opt = torch.optim.SGD(critic.parameters(), lr=0.1)
    values = {k: v.clone() for k, v in critic.state_dict().items()}
    params = list(critic.parameters())
    live = list(critic.state_dict().values())  # held, so no address is recycled below
    live_ptrs = {t.data_ptr() for t in live}
    mm = HybridMemoryManager(
        policy, [opt], {"critic": critic, "reward": reward}, offload_models=["critic"]
    )
    assert not mm.is_offloaded("critic")  # nothing moves before the first phase
    mm.generate()
    assert mm.is_offloaded("critic") and not mm.is_offloaded("reward")
    host_ptrs = {t.data_ptr() for t in critic.state_dict().values()}
    assert not host_ptrs & live_ptrs  # host copies, not the same storage
    mm.score()
    x = torch.randn(3, 7)
    with mm.use("critic") as c:
        assert c is critic and not mm.is_offloaded("critic")
        for k, v in critic.state_dict().items():
            assert torch.equal(v, values[k]), k
        out_score = c(x)
        with pytest.raises(RuntimeError, match="already inside use"):
            with mm.use("critic"):
                pass
        with pytest.raises(RuntimeError, match="inside use"):
            mm.train()  # cannot change phase with a model checked out
    assert mm.is_offloaded("critic")
    # the host copies are reused, not reallocated, on every trip
    assert {t.data_ptr() for t in critic.state_dict().values()} == host_ptrs
    mm.train()
    with mm.use("critic") as c:
        c(x).square().mean().backward()
        opt.step()  # the optimizer still holds the same Parameter objects
    assert [p is q for p, q in zip(critic.parameters(), params)] == [True] * len(params)
    with mm.use("critic") as c:
        assert not torch.equal(c(x), out_score)  # the update is kept across the trip
    with mm.use("reward"):  # not offloaded: a plain pass-through
        pass
    with pytest.raises(KeyError, match="no model named 'reference'"):
        with mm.use("reference"):
            pass
    with pytest.raises(ValueError, match="not in models"):
        HybridMemoryManager(policy, models={"critic": critic}, offload_models=["reference"])


def test_phase_memory_records_on_cpu():
    model = tiny_lm()
    mm = HybridMemoryManager(model)
    ids, cu = pack_prompts(random_prompts((4, 6)))
    mm.generate()
    generate(model, ids, cu, GenerationConfig(max_new_tokens=4), kv_cache=mm.kv_cache)
    mm.score()
    mm.train()
    mm.finish()
    assert [(r.step, r.phase) for r in mm.records] == [
        (1, "generate"),
        (1, "score"),
        (1, "train"),
    ]
    for r in mm.records:
        assert r.peak_bytes is None  # no resettable peak on CPU
        assert isinstance(r.rss_delta_bytes, int)  # Linux /proc/self/statm
        assert r.seconds >= 0
    summary = mm.summary()
    assert set(summary) == {
        f"{kind}/{p}_{s}"
        for p in ("generate", "score", "train")
        for kind, s in (("memory", "peak_bytes"), ("memory", "rss_delta_bytes"), ("time", "s"))
    }


def test_one_ppo_like_step_loop_on_cpu():
    """Two steps of generate (policy's own weights) -> score (offloaded reference) ->
    train (loss on generation-time log-probs, optimizer states offloaded meanwhile)."""
    policy = tiny_lm(seed=0)
    reference = copy.deepcopy(policy)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    mm = HybridMemoryManager(
        policy, [opt], {"reference": reference}, offload_optimizer=True,
        offload_models=["reference"],
    )  # fmt: skip
    ids, cu = pack_prompts(random_prompts((4, 2, 6)))
    g = torch.Generator().manual_seed(0)
    for step in range(2):
        mm.generate()
        rollout = generate(
            policy, ids, cu, GenerationConfig(max_new_tokens=5), kv_cache=mm.kv_cache, generator=g
        )
        batch = rollout.to_training_batch()
        mm.score()
        with mm.use("reference") as ref, torch.no_grad():
            logits = ref(input_ids=batch.input_ids[None], position_ids=batch.position_ids[None],
                         use_cache=False).logits[0]  # fmt: skip
            ref_lp = torch.log_softmax(logits.float(), -1)
            ref_lp = ref_lp.gather(-1, batch.labels.clamp(min=0)[:, None])[:, 0]
        m = batch.loss_mask
        if step == 0:  # identical weights before the first update
            torch.testing.assert_close(ref_lp[m], batch.old_logprobs[m], atol=1e-4, rtol=0)
        mm.train()
        logits = policy(input_ids=batch.input_ids[None], position_ids=batch.position_ids[None],
                        use_cache=False).logits[0]  # fmt: skip
        lp = torch.log_softmax(logits.float(), -1).gather(-1, batch.labels.clamp(min=0)[:, None])
        ratio = torch.exp(lp[:, 0] - batch.old_logprobs)[m]
        (-ratio.mean()).backward()
        mm.prepare_optimizer_step()
        opt.step()
    mm.finish()
    assert mm.kv_cache.allocations == 2  # released after each generation
    assert mm.is_offloaded("reference") and mm.optimizer_offloaded is False


@pytest.mark.gpu
def test_cuda_offload_frees_device_memory_into_pinned_host_buffers():
    dev = torch.device("cuda")
    policy = torch.nn.Linear(1024, 1024, device=dev)
    critic = torch.nn.Linear(4096, 4096, device=dev)  # 64 MiB of fp32 weights
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    policy(torch.randn(8, 1024, device=dev)).sum().backward()
    opt.step()
    values = critic.weight.detach().cpu()  # references kept off the device
    exp_avg = opt.state[policy.weight]["exp_avg"].cpu()
    mm = HybridMemoryManager(
        policy, [opt], {"critic": critic}, offload_optimizer=True, offload_models=["critic"]
    )
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    mm.generate()
    freed = before - torch.cuda.memory_allocated()
    # critic weight+bias, both Adam moments of the policy, the policy grads
    assert freed >= 4096 * 4096 * 4 + 2 * 1024 * 1024 * 4
    assert critic.weight.device.type == "cpu" and critic.weight.is_pinned()
    assert opt.state[policy.weight]["exp_avg"].is_pinned()
    mm.score()
    with mm.use("critic") as c:
        assert c.weight.is_cuda and torch.equal(c.weight.cpu(), values)
        c(torch.randn(2, 4096, device=dev))
    mm.train()
    mm.prepare_optimizer_step()
    assert torch.equal(opt.state[policy.weight]["exp_avg"].cpu(), exp_avg)
    assert opt.state[policy.weight]["exp_avg"].is_cuda
    mm.finish()
    peaks = {r.phase: r.peak_bytes for r in mm.records}
    assert all(isinstance(v, int) and v > 0 for v in peaks.values())
    # the critic was resident only inside use(): the generate peak never held it
    assert peaks["generate"] < peaks["score"]


# ---- the compiled decode step's state and graphs (policy: fastrlhf.rollout.decode) ----
# 5 rows (bucket 8), greedy, no EOS: the specialisation test_compiled_decode.py compiles too
COMPILED = dict(max_new_tokens=4, temperature=0.0, compile="on")


def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def test_compiled_decode_state_and_graphs_go_with_the_released_cache():
    model = tiny_lm()
    mm = HybridMemoryManager(model)
    ids, cu = pack_prompts(random_prompts((3, 5, 2, 6, 4)))
    kv, compiled = mm.kv_cache, None
    for _ in range(2):
        mm.generate()
        generate(model, ids, cu, GenerationConfig(**COMPILED), kv_cache=kv)
        # the decode state is held on top of the K/V buffers while generating
        assert kv.held_bytes() > kv.nbytes() > 0
        # released and re-allocated every step, the compiled code is kept: no recompile
        compiled = compiled or _compiled_graphs()
        assert _compiled_graphs() == compiled
        mm.score()
        assert not kv.alive and kv.held_bytes() == 0 and kv.graphs == {}
        mm.train()  # nothing of the rollout is held in training
    assert kv.allocations == 2


def test_compiled_decode_state_kept_reserved_when_release_is_off():
    model = tiny_lm()
    mm = HybridMemoryManager(model, release_kv_cache=False)
    ids, cu = pack_prompts(random_prompts((3, 5, 2, 6, 4)))
    kv, held, ptrs = mm.kv_cache, None, None
    for _ in range(2):
        mm.generate()
        generate(model, ids, cu, GenerationConfig(**COMPILED), kv_cache=kv)
        now = [t.data_ptr() for t in kv.buffers() + kv.decode_state("cpu").tensors()]
        ptrs, held = ptrs or now, held or kv.held_bytes()
        assert now == ptrs and kv.held_bytes() == held  # same buffers, nothing new
        mm.score()
        mm.train()  # allowed: cache, state (and on CUDA the graphs) deliberately kept
    assert kv.allocations == 1


@pytest.mark.gpu
def test_cuda_graphs_and_their_pool_are_freed_before_training():
    model = tiny_lm().cuda()
    mm = HybridMemoryManager(model)
    prompts = [p.cuda() for p in random_prompts((3, 5, 2, 6, 4))]
    ids, cu = pack_prompts(prompts)
    cfg = GenerationConfig(max_new_tokens=16, temperature=0.0, compile="auto")
    mm.generate()
    generate(model, ids, cu, cfg, kv_cache=mm.kv_cache)
    (graph,) = mm.kv_cache.graphs.values()
    assert graph.graph is not None
    buffers = mm.kv_cache.held_bytes() - graph.pool_bytes  # K/V + decode state
    del graph
    torch.cuda.synchronize()
    allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    mm.score()
    assert mm.kv_cache.held_bytes() == 0 and mm.kv_cache.graphs == {}
    # the buffers go back to the allocator, and with the graph its private pool
    assert allocated - torch.cuda.memory_allocated() >= buffers
    torch.cuda.empty_cache()
    assert torch.cuda.memory_reserved() < reserved
    mm.train()
