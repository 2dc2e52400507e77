"""fastrlhf.distributed: data-parallel training with FSDP2 under torchrun.

- ``context``: ``init_distributed() -> DistContext`` (torchrun env, NCCL on CUDA / gloo
  on CPU, one GPU per process; a trivial single-process context without torchrun),
  ``teardown``, ``barrier``, ``main_process_first``; ``all_reduce_sum``,
  ``global_token_count``, ``all_gather_varlen`` + ``rank_slice``,
  ``global_masked_whiten``, ``global_max``; ``shard_for_rank`` / ``rank_micro_batches``.
- ``fsdp``: ``shard_model`` (fully_shard per decoder layer, then the root; bf16 mixed
  precision on CUDA), ``gathered_params`` (parameters gathered once for generation),
  ``clip_grad_norm_`` (DTensor-aware), ``full_lm_head_weight``.
- ``checkpoint``: ``save_sharded`` / ``load_sharded`` (DCP, atomic, loadable with a
  different world size) and ``export_hf`` (consolidated HF-format model from rank 0).

Without torchrun every function is a no-op or the identity, so one code path serves
1 and R processes. One optimizer step with R processes, in a trainer:

    ctx = init_distributed()
    policy = shard_model(load_policy(..., device=ctx.device), ctx)
    optimizer = build_optimizer(policy, ...)          # after sharding
    mine = rank_micro_batches(step_indices, lengths, micro_batch_tokens, ctx)
    U = global_token_count(sum(units of mine), ctx)
    for mb in mine: (loss_sum(mb) / U).backward()    # gradients SUM over ranks
    norm = clip_grad_norm_(params, max_norm); optimizer.step()
    loss = all_reduce_sum(local_loss, ctx)            # for logging only
"""

from __future__ import annotations

from fastrlhf.distributed.checkpoint import export_hf, full_state_dict, load_sharded, save_sharded
from fastrlhf.distributed.context import (
    DistContext,
    all_gather_varlen,
    all_reduce_sum,
    barrier,
    global_masked_whiten,
    global_max,
    global_token_count,
    init_distributed,
    main_process_first,
    rank_micro_batches,
    rank_slice,
    shard_for_rank,
    teardown,
)
from fastrlhf.distributed.fsdp import (
    clip_grad_norm_,
    decoder_layers,
    default_mixed_precision,
    full_lm_head_weight,
    gathered_params,
    is_sharded,
    shard_model,
)

__all__ = [
    "DistContext",
    "all_gather_varlen",
    "all_reduce_sum",
    "barrier",
    "clip_grad_norm_",
    "decoder_layers",
    "default_mixed_precision",
    "export_hf",
    "full_lm_head_weight",
    "full_state_dict",
    "gathered_params",
    "global_masked_whiten",
    "global_max",
    "global_token_count",
    "init_distributed",
    "is_sharded",
    "load_sharded",
    "main_process_first",
    "rank_micro_batches",
    "rank_slice",
    "save_sharded",
    "shard_for_rank",
    "shard_model",
    "teardown",
]
