"""Packing sequences into micro-batches under a token budget (numba), with pure-Python
references that run the same algorithms step for step (tests check they agree).

``pack_sequences(lengths, max_tokens, algorithm, num_ranks)`` returns micro-batches as
lists of sequence indices:

- "ffd" (first-fit decreasing): sequences sorted by length (longest first, ties by
  index) each go into the first micro-batch with room left. "The first bin with room"
  is found with a max segment tree over the bins' free space, so packing n sequences
  costs O(n log n) instead of O(n * bins).
- "kk" (Karmarkar–Karp, largest differencing method): first splits the sequences into
  ``num_ranks`` groups with nearly equal token totals (data-parallel ranks then wait
  on each other as little as possible), then packs each group with FFD.

With ``num_ranks > 1`` every rank gets the same number of micro-batches (ranks step
together); a rank with fewer splits its most populated micro-batches in two until the
counts match. Micro-batch ``j`` of the result belongs to rank ``j % num_ranks``.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import numba
import numpy as np

# ----------------------------------------------------------------------------- FFD


@numba.njit(cache=True)
def _ffd_bins_numba(lengths: np.ndarray, order: np.ndarray, max_tokens: int) -> np.ndarray:
    """bin index of every sequence; ``order`` lists sequences longest first."""
    n = lengths.shape[0]
    size = 1
    while size < max(n, 1):
        size *= 2
    # tree[1] is the root; leaves tree[size + b] hold bin b's free tokens (unopened
    # bins are empty, i.e. fully free); internal nodes hold the max of their children
    tree = np.full(2 * size, max_tokens, dtype=np.int64)
    bins = np.empty(n, dtype=np.int64)
    for i in range(n):
        item = order[i]
        need = lengths[item]
        node = 1
        while node < size:  # descend to the leftmost leaf with room
            node = 2 * node if tree[2 * node] >= need else 2 * node + 1
        bins[item] = node - size
        tree[node] -= need
        node //= 2
        while node >= 1:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
    return bins


def ffd_bins_reference(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Pure-Python first-fit decreasing with the same segment tree (the reference)."""
    n = len(lengths)
    order = sorted(range(n), key=lambda i: (-lengths[i], i))
    size = 1
    while size < max(n, 1):
        size *= 2
    tree = [max_tokens] * (2 * size)
    bins: list[list[int]] = []
    for item in order:
        need = lengths[item]
        node = 1
        while node < size:
            node = 2 * node if tree[2 * node] >= need else 2 * node + 1
        b = node - size
        if b == len(bins):
            bins.append([])
        bins[b].append(item)
        tree[node] -= need
        node //= 2
        while node >= 1:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
    return bins


@numba.njit(cache=True)
def _order_desc(lengths: np.ndarray, max_len: int) -> np.ndarray:
    """Indices by length descending, ties by index: a stable counting sort, O(n + max_len)."""
    counts = np.zeros(max_len + 2, dtype=np.int64)
    for length in lengths:
        counts[max_len - length + 1] += 1  # longest first
    for v in range(1, counts.shape[0]):
        counts[v] += counts[v - 1]
    order = np.empty(lengths.shape[0], dtype=np.int64)
    for i in range(lengths.shape[0]):
        slot = max_len - lengths[i]
        order[counts[slot]] = i
        counts[slot] += 1
    return order


@numba.njit(cache=True)
def _bucket(keys: np.ndarray, order: np.ndarray, num_keys: int):
    """Items grouped by key (in ``order`` within a key) and the [num_keys+1] offsets."""
    offsets = np.zeros(num_keys + 1, dtype=np.int64)
    for i in range(order.shape[0]):
        offsets[keys[order[i]] + 1] += 1
    for b in range(num_keys):
        offsets[b + 1] += offsets[b]
    fill = offsets[:-1].copy()
    items = np.empty(order.shape[0], dtype=np.int64)
    for i in range(order.shape[0]):
        b = keys[order[i]]
        items[fill[b]] = order[i]
        fill[b] += 1
    return items, offsets


def _to_lists(items: np.ndarray, offsets: np.ndarray) -> list[list[int]]:
    flat = items.tolist()  # one conversion, then cheap list slices
    bounds = offsets.tolist()
    return [flat[bounds[b] : bounds[b + 1]] for b in range(len(bounds) - 1)]


def ffd_bins(lengths: np.ndarray, max_tokens: int) -> list[list[int]]:
    lengths = np.ascontiguousarray(lengths, dtype=np.int64)
    if lengths.size == 0:
        return []
    order = _order_desc(lengths, int(lengths.max()))  # longest first, ties by index
    bin_of = _ffd_bins_numba(lengths, order, int(max_tokens))
    return _to_lists(*_bucket(bin_of, order, int(bin_of.max()) + 1))


# ----------------------------------------------------------------------------- KK


@numba.njit(cache=True)
def _heap_less(key, ids, i, j) -> bool:
    # max-heap on the spread (largest - smallest sum); ties: the smaller node id first.
    # Keys live in the heap arrays themselves: no indirection, few cache misses.
    return key[i] > key[j] or (key[i] == key[j] and ids[i] < ids[j])


@numba.njit(cache=True)
def _heap_swap(key, ids, i, j) -> None:
    key[i], key[j] = key[j], key[i]
    ids[i], ids[j] = ids[j], ids[i]


@numba.njit(cache=True)
def _heap_push(key, ids, size, node, value) -> int:
    i = size
    key[i], ids[i] = value, node
    while i > 0:
        parent = (i - 1) // 2
        if not _heap_less(key, ids, i, parent):
            break
        _heap_swap(key, ids, i, parent)
        i = parent
    return size + 1


@numba.njit(cache=True)
def _heap_pop(key, ids, size):
    top = ids[0]
    size -= 1
    key[0], ids[0] = key[size], ids[size]
    i = 0
    while True:
        left, right, best = 2 * i + 1, 2 * i + 2, i
        if left < size and _heap_less(key, ids, left, best):
            best = left
        if right < size and _heap_less(key, ids, right, best):
            best = right
        if best == i:
            break
        _heap_swap(key, ids, i, best)
        i = best
    return top, size


@numba.njit(cache=True)
def _kk_take(lengths, order, q, key, ids, size):
    """Pop the node with the largest spread from (unmerged singletons, heap of merged).

    Singletons come sorted (longest first, ties by index) so they need no heap: only
    merged nodes do, which keeps the heap small and the singleton scan sequential.
    Same order as one heap over all nodes, so the reference (one heapq) agrees.
    """
    if q < order.shape[0]:
        s = order[q]
        if size == 0 or lengths[s] > key[0] or (lengths[s] == key[0] and s < ids[0]):
            return s, q + 1, size
    top, size = _heap_pop(key, ids, size)
    return top, q, size


@numba.njit(cache=True)
def _kk_numba(lengths: np.ndarray, order: np.ndarray, k: int):
    """Largest differencing method into k groups: (group, rank inside group) per item."""
    n = lengths.shape[0]
    # node t: k sums sorted descending and, per slot, a linked list of its items
    sums = np.zeros((n, k), dtype=np.int64)
    head = np.full((n, k), -1, dtype=np.int64)
    tail = np.full((n, k), -1, dtype=np.int64)
    nxt = np.full(n, -1, dtype=np.int64)
    for t in range(n):
        sums[t, 0] = lengths[t]
        head[t, 0] = t
        tail[t, 0] = t
    key = np.empty(n, dtype=np.int64)
    ids = np.empty(n, dtype=np.int64)
    size, q = 0, 0
    new_sums = np.empty(k, dtype=np.int64)
    new_head = np.empty(k, dtype=np.int64)
    new_tail = np.empty(k, dtype=np.int64)
    for _ in range(n - 1):
        a, q, size = _kk_take(lengths, order, q, key, ids, size)
        b, q, size = _kk_take(lengths, order, q, key, ids, size)
        # pair a's largest sums with b's smallest: the differences cancel
        for j in range(k):
            jb = k - 1 - j
            new_sums[j] = sums[a, j] + sums[b, jb]
            ha, ta, hb, tb = head[a, j], tail[a, j], head[b, jb], tail[b, jb]
            if ha == -1:
                new_head[j], new_tail[j] = hb, tb
            elif hb == -1:
                new_head[j], new_tail[j] = ha, ta
            else:
                nxt[ta] = hb
                new_head[j], new_tail[j] = ha, tb
        # stable insertion sort of the k slots, descending by sum
        for j in range(1, k):
            s, h, tl = new_sums[j], new_head[j], new_tail[j]
            i = j - 1
            while i >= 0 and new_sums[i] < s:
                new_sums[i + 1], new_head[i + 1], new_tail[i + 1] = (
                    new_sums[i],
                    new_head[i],
                    new_tail[i],
                )
                i -= 1
            new_sums[i + 1], new_head[i + 1], new_tail[i + 1] = s, h, tl
        sums[a, :] = new_sums
        head[a, :] = new_head
        tail[a, :] = new_tail
        size = _heap_push(key, ids, size, a, new_sums[0] - new_sums[k - 1])
    root, q, size = _kk_take(lengths, order, q, key, ids, size)
    group = np.empty(n, dtype=np.int64)
    position = np.empty(n, dtype=np.int64)  # order inside its group (linked-list order)
    for j in range(k):
        item, p = head[root, j], 0
        while item != -1:
            group[item] = j
            position[item] = p
            p += 1
            item = nxt[item]
    return group, position


def kk_groups_reference(lengths: Sequence[int], k: int) -> list[list[int]]:
    """Pure-Python largest differencing method (same tie-breaking as the numba one)."""
    nodes: dict[int, list[tuple[int, list[int]]]] = {}
    heap: list[tuple[int, int]] = []
    for t, length in enumerate(lengths):
        nodes[t] = [(length, [t])] + [(0, []) for _ in range(k - 1)]
        heapq.heappush(heap, (-length, t))
    while len(heap) > 1:
        _, a = heapq.heappop(heap)
        _, b = heapq.heappop(heap)
        na, nb = nodes.pop(a), nodes.pop(b)
        merged = [(na[j][0] + nb[k - 1 - j][0], na[j][1] + nb[k - 1 - j][1]) for j in range(k)]
        merged.sort(key=lambda slot: -slot[0])  # stable, like the insertion sort
        nodes[a] = merged
        heapq.heappush(heap, (-(merged[0][0] - merged[-1][0]), a))
    if not heap:
        return [[] for _ in range(k)]
    return [items for _, items in nodes[heap[0][1]]]


def kk_groups(lengths: np.ndarray, k: int) -> list[list[int]]:
    lengths = np.ascontiguousarray(lengths, dtype=np.int64)
    if lengths.size == 0:
        return [[] for _ in range(k)]
    order = _order_desc(lengths, int(lengths.max()))  # longest first, ties by index
    group, position = _kk_numba(lengths, order, int(k))
    by_position = np.argsort(position, kind="stable")  # items by rank inside their group
    return _to_lists(*_bucket(group, by_position, int(k)))


# ----------------------------------------------------------------------------- public


def _equalize(per_rank: list[list[list[int]]]) -> None:
    """Split micro-batches until every rank has as many as the busiest one."""
    target = max(len(bins) for bins in per_rank)
    for rank, bins in enumerate(per_rank):
        while len(bins) < target:
            j = max(range(len(bins)), key=lambda i: len(bins[i]), default=None)
            if j is None or len(bins[j]) < 2:
                raise ValueError(
                    f"cannot give rank {rank} {target} non-empty micro-batches: too few "
                    "sequences for this many ranks; lower num_ranks or raise the batch size"
                )
            half = len(bins[j]) // 2
            bins.append(bins[j][half:])
            bins[j] = bins[j][:half]


def _check(lengths, max_tokens: int, num_ranks: int, algorithm: str) -> np.ndarray:
    arr = np.asarray(lengths, dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError(f"lengths must be 1-D, got shape {arr.shape}")
    if algorithm not in ("ffd", "kk"):
        raise ValueError(f"algorithm must be 'ffd' or 'kk', got {algorithm!r}")
    if num_ranks < 1:
        raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if arr.size:
        if arr.min() < 1:
            i = int(arr.argmin())
            raise ValueError(f"lengths[{i}] = {arr[i]}: every sequence needs >= 1 token")
        if arr.max() > max_tokens:
            i = int(arr.argmax())
            raise ValueError(f"lengths[{i}] = {arr[i]} exceeds max_tokens = {max_tokens}")
    return arr


def pack_sequences(
    lengths: Sequence[int] | np.ndarray,
    max_tokens: int,
    algorithm: str = "ffd",
    num_ranks: int = 1,
) -> list[list[int]]:
    """Micro-batches (lists of sequence indices), each with at most ``max_tokens`` tokens."""
    arr = _check(lengths, max_tokens, num_ranks, algorithm)
    if arr.size == 0:
        return []
    if algorithm == "kk" and num_ranks > 1:
        groups = [np.asarray(g, dtype=np.int64) for g in kk_groups(arr, num_ranks)]
        per_rank = [[g[b].tolist() for b in ffd_bins(arr[g], max_tokens)] for g in groups]
    else:
        bins = ffd_bins(arr, max_tokens)
        if num_ranks == 1:
            return bins
        per_rank = [bins[r::num_ranks] for r in range(num_ranks)]
    _equalize(per_rank)
    # interleave: micro-batch j goes to rank j % num_ranks
    return [per_rank[r][m] for m in range(len(per_rank[0])) for r in range(num_ranks)]


def pack_sequences_reference(
    lengths: Sequence[int],
    max_tokens: int,
    algorithm: str = "ffd",
    num_ranks: int = 1,
) -> list[list[int]]:
    """``pack_sequences`` built from the pure-Python references only."""
    arr = _check(lengths, max_tokens, num_ranks, algorithm)
    lens = arr.tolist()
    if not lens:
        return []
    if algorithm == "kk" and num_ranks > 1:
        per_rank = []
        for group in kk_groups_reference(lens, num_ranks):
            sub = ffd_bins_reference([lens[i] for i in group], max_tokens)
            per_rank.append([[group[b] for b in bin_] for bin_ in sub])
    else:
        bins = ffd_bins_reference(lens, max_tokens)
        if num_ranks == 1:
            return bins
        per_rank = [bins[r::num_ranks] for r in range(num_ranks)]
    _equalize(per_rank)
    return [per_rank[r][m] for m in range(len(per_rank[0])) for r in range(num_ranks)]
