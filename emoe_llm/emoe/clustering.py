"""Balanced k-means over the L2-normalised gate rows of an MLP (``emoe_llm.arch``: the gate projection's weight).

EMoE splits the d_ff neurons of a SwiGLU MLP into N experts of *exactly* d_ff/N neurons each, by clustering the
neurons' keys (rows of W_gate, L2-normalised). The paper uses ``k_means_constrained`` (a min-cost-flow solver), which
takes minutes to hours on 30B shapes. Here the size-constrained assignment step is solved by vectorised rounds of
proposals instead, in pure torch, so it runs on CPU or CUDA and clusters a 17920x6656 layer in seconds.

One Lloyd iteration:
  1. cost[i, j] = ||x_i - c_j||^2 = 1 + ||c_j||^2 - 2 x_i.c_j  (rows are unit vectors)
  2. balanced assignment: every unassigned point proposes to its cheapest cluster that still has room; each cluster
     accepts its best proposers (highest regret first, then lowest cost) up to its remaining capacity; repeat until
     every point is placed. Exactly n/N points per cluster by construction.
  3. centroids = mean of their members (not re-normalised, as in the paper).
Restarts (``n_init``) use different k-means++ seeds; the lowest inertia wins.

Lloyd stops at a partition where no point wants another centroid, but the k-means objective can still drop by
*swapping* two points between clusters, because a swap also moves both centroids (Hartigan's criterion). For p in A
and q in B (clusters of m points) the exact change of the inertia is

    delta = D_p(B) + D_q(A) - 2 ||p - q||^2 / m,      D_p(B) = ||p - c_B||^2 - ||p - c_A||^2,

i.e. the fixed-centroid (Lloyd) gain plus a term that always favours the swap. A swap keeps every cluster at exactly m
points. ``swap_rounds`` rounds of such swaps refine the winning restart (see ``_swap_refine``); each round costs about
one Lloyd iteration and applies hundreds of swaps. On real SmolLM2-135M gate weights this takes the result from
up to 0.66% above k-means-constrained (n_init 10) to 0.3-1.8% below it (BENCHMARKS.md section 2c).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F


ASSIGN_METHODS = ("fast", "exact")
_SEED_DIM = 128
SWAP_ROUNDS = 10  # default rounds of the final swap refinement (balanced_kmeans(swap_rounds=...))
_ROW_CHUNK = 4096  # rows per temporary in the O(n*d) element-wise steps: bounds peak memory on 30B-wide layers


@dataclass
class ClusterResult:
    labels: torch.Tensor  # (n,) int64 in [0, n_clusters), exactly n / n_clusters of each
    inertia: float  # sum of squared distances of the (normalised) points to their centroid
    iterations: int  # Lloyd iterations of the winning restart
    seconds: float  # wall time of the whole call
    swaps: int = 0  # point swaps applied by the final swap refinement

    def stats(self) -> dict:
        return {"inertia": round(self.inertia, 6), "iterations": self.iterations, "swaps": self.swaps,
                "seconds": round(self.seconds, 3)}


def balanced_kmeans(
    points: torch.Tensor,
    n_clusters: int,
    *,
    seed: int = 0,
    n_init: int = 3,
    max_iter: int = 30,
    tol: float = 1e-4,
    normalize: bool = True,
    assign: str = "fast",
    swap_rounds: int = SWAP_ROUNDS,
    device: str | torch.device | None = None,
) -> ClusterResult:
    """Cluster ``points`` (n, d) into ``n_clusters`` groups of exactly n / n_clusters points.

    Args:
        points: (n, d) tensor; for EMoE the (d_ff, d) gate weight. Any dtype; computed in fp32.
        n_clusters: N. Must divide n.
        seed: makes the result deterministic (same seed, same device, same input -> same labels).
        n_init: k-means++ restarts; the one with the lowest inertia is kept.
        max_iter: Lloyd iterations per restart.
        tol: stop a restart when the relative inertia improvement falls below this.
        normalize: L2-normalise rows first (EMoE does; cosine geometry).
        assign: the balanced assignment step of every Lloyd iteration. "fast": vectorised proposal rounds (seconds
            on a 30B layer; not always the optimal assignment). "exact": the optimal one (min-cost flow, as
            k-means-constrained), by negative-cycle cancelling warm-started from the previous iteration; exact at
            any size, but minutes per layer at 30B width (see BENCHMARKS.md).
        swap_rounds: rounds of inertia-decreasing point swaps between clusters applied to the winning restart
            (``_swap_refine``; each round about one Lloyd iteration). 0 turns the refinement off. The refinement never
            increases the inertia and keeps the clusters exactly balanced.
        device: where to compute (default: the points' device).

    Returns:
        ClusterResult with labels of shape (n,).
    """
    start = time.perf_counter()
    if points.dim() != 2:
        raise ValueError(f"balanced_kmeans expects a 2-D (n, d) tensor, got shape {tuple(points.shape)}")
    n = points.shape[0]
    if n_clusters < 1 or n % n_clusters != 0:
        raise ValueError(f"n_clusters={n_clusters} must be >= 1 and divide the number of points {n}")
    if assign not in ASSIGN_METHODS:
        raise ValueError(f"assign must be one of {ASSIGN_METHODS}, got {assign!r}")
    if n_init < 1 or max_iter < 1:
        raise ValueError(f"n_init ({n_init}) and max_iter ({max_iter}) must be >= 1")
    if swap_rounds < 0:
        raise ValueError(f"swap_rounds must be >= 0, got {swap_rounds}")
    device = torch.device(device) if device is not None else points.device
    x = points.detach().to(device=device, dtype=torch.float32)
    if normalize:
        if x.data_ptr() == points.data_ptr():  # .to() made no copy: never modify the caller's tensor
            x = F.normalize(x, p=2, dim=-1)
        else:  # our own copy: normalise in place (the same ops as F.normalize, bit-identical, one n*d copy less)
            x.div_(x.norm(p=2, dim=-1, keepdim=True).clamp_min_(1e-12))
    size = n // n_clusters
    if n_clusters == 1 or size == 1:
        # Degenerate: one cluster, or one point per cluster (any bijection is balanced; keep k-means++ order).
        labels = torch.zeros(n, dtype=torch.long) if n_clusters == 1 else torch.arange(n)
        centroids = _centroids(x, labels.to(device), n_clusters)
        inertia = float(((x - centroids[labels.to(device)]) ** 2).sum())
        return ClusterResult(labels.cpu(), inertia, 0, time.perf_counter() - start)

    sq_norms = torch.cat([(c * c).sum(-1) for c in x.split(_ROW_CHUNK)])  # 1 for normalised rows; kept general
    # k-means++ needs one pass over all points per centroid (memory bound: 256 passes over a 30B layer take ~6 s),
    # so it runs on a random projection to 128 dims, which preserves distances well enough to pick seeds.
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if x.shape[1] > _SEED_DIM:
        proj = torch.randn(x.shape[1], _SEED_DIM, generator=gen).to(device) / _SEED_DIM**0.5
        x_seed = x @ proj
    else:
        x_seed = x
    seed_norms = (x_seed * x_seed).sum(-1)
    best: tuple[float, torch.Tensor, int] | None = None
    for restart in range(n_init):
        gen = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + restart + 1)
        centroids = x[_kmeans_plus_plus(x_seed, seed_norms, n_clusters, gen)]
        prev_inertia = float("inf")
        labels = None
        it = 0
        for it in range(1, max_iter + 1):
            cost = _sq_distances(x, sq_norms, centroids)
            proposal = _balanced_assign(cost, size)
            if assign == "exact":  # warm start: the better of the proposals and the last iteration's labels
                if labels is not None and _total(cost, labels) < _total(cost, proposal):
                    proposal = labels
                proposal, _ = refine_assignment(cost, proposal, size)
            labels = proposal
            inertia = float(cost.gather(1, labels[:, None]).sum())
            centroids = _centroids(x, labels, n_clusters)
            if prev_inertia < float("inf") and prev_inertia - inertia <= tol * prev_inertia:
                break
            prev_inertia = inertia
        # inertia of the final labels against the final centroids
        final = _inertia(x, labels, centroids)
        if best is None or final < best[0]:
            best = (final, labels, it)
    inertia, labels, iterations = best
    swaps = 0
    if swap_rounds:
        labels, swaps = _swap_refine(x, sq_norms, labels, n_clusters, x_seed, max_rounds=swap_rounds)
        if swaps:
            inertia = _inertia(x, labels, _centroids(x, labels, n_clusters))
    return ClusterResult(labels.cpu(), inertia, iterations, time.perf_counter() - start, swaps)


def _inertia(x: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor) -> float:
    return sum(
        float(((c - centroids[lab]) ** 2).sum()) for c, lab in zip(x.split(_ROW_CHUNK), labels.split(_ROW_CHUNK))
    )


def _swap_refine(x: torch.Tensor, sq_norms: torch.Tensor, labels: torch.Tensor, n_clusters: int, x_dot: torch.Tensor,
                 *, max_rounds: int,
                 candidates: int = 4, pairs_per_cluster: int = 8, rtol: float = 1e-6) -> tuple[torch.Tensor, int]:
    """Lower the inertia of a balanced partition by swapping points between clusters; returns (labels, swaps).

    One round:
      1. D[p, b] = ||p - c_b||^2 - ||p - c_label(p)||^2 for every point and cluster (one n x N matmul).
      2. For every ordered cluster pair (a, b), the ``candidates`` members of a with the lowest D[., b]; the cluster
         pairs whose best candidates could give delta < 0 (at most ``pairs_per_cluster`` * N pairs, most promising
         first) get every candidate combination scored, with p.q from ``x_dot`` (a 128-d random projection of the
         rows on wide layers: cheap, approximate), and keep their best swap.
      3. Greedily (most improving first) take swaps that share no point; recompute each one's delta exactly and drop
         those that do not improve. Swaps touching the same cluster interact slightly (the cluster's centroid moves
         twice), so the exact inertia change of the whole batch is computed from the cluster sums; if it is not
         negative, the batch is halved (best half kept) until it is. A single exactly improving swap always is.
    Stops after ``max_rounds`` rounds, or when a round finds no improving swap or gains less than ``rtol`` of the
    inertia. Deterministic (stable sorts, no randomness); every round lowers the inertia; sizes never change.
    """
    n, d = x.shape
    size = n // n_clusters
    device = x.device
    labels = labels.clone()
    # cluster sums, kept in fp64 across rounds (updated by the swaps' fp32 differences)
    sums = torch.zeros(n_clusters, d, dtype=x.dtype, device=device).index_add_(0, labels, x).double()
    inertia = float(sq_norms.double().sum()) - float((sums * sums).sum()) / size
    t = min(candidates, size)
    bound = 8.0 * float(sq_norms.max()) / size  # 2 max ||p - q||^2 / m: no swap can gain more than this over D
    swaps = 0
    for _ in range(max_rounds):
        centroids = (sums / size).to(x.dtype)
        cost = (centroids * centroids).sum(-1)[None, :] - 2.0 * (x @ centroids.T)  # ||p||^2 cancels in D
        order = torch.argsort(labels, stable=True)
        move = (cost - cost.gather(1, labels[:, None]))[order].view(n_clusters, size, n_clusters)  # [a, i, b]
        vals, idx = move.topk(t, dim=1, largest=False, sorted=True)  # (N, t, N): a's best leavers towards b
        rows = order.view(n_clusters, size).gather(1, idx.reshape(n_clusters, t * n_clusters))
        rows = rows.view(n_clusters, t, n_clusters)
        est = vals[:, 0, :] + vals[:, 0, :].T  # best fixed-centroid gain of an (a, b) swap
        est = torch.where(torch.ones_like(est, dtype=torch.bool).triu(1), est, torch.full_like(est, float("inf")))
        k = min(pairs_per_cluster * n_clusters, int((est < bound).sum()))
        if k == 0:
            break
        pair = est.flatten().topk(k, largest=False, sorted=True).indices
        a, b = pair // n_clusters, pair % n_clusters
        p_rows, q_rows = rows[a, :, b], rows[b, :, a]  # (k, t)
        dots = torch.bmm(x_dot[p_rows], x_dot[q_rows].transpose(1, 2))
        delta = (vals[a, :, b][:, :, None] + vals[b, :, a][:, None, :]
                 - 2.0 * (sq_norms[p_rows][:, :, None] + sq_norms[q_rows][:, None, :] - 2.0 * dots) / size)
        best, arg = delta.view(k, t * t).min(dim=1)
        keep = best < 0
        if not bool(keep.any()):
            break
        sel = keep.nonzero().squeeze(1)
        sel = sel[torch.argsort(best[sel], stable=True)]
        p = p_rows[sel].gather(1, (arg[sel] // t)[:, None]).squeeze(1)
        q = q_rows[sel].gather(1, (arg[sel] % t)[:, None]).squeeze(1)
        used, chosen = set(), []
        for s, (pi, qi) in enumerate(zip(p.tolist(), q.tolist())):
            if pi not in used and qi not in used:
                used.add(pi)
                used.add(qi)
                chosen.append(s)
        chosen = torch.tensor(chosen, dtype=torch.long, device=device)
        p, q, a, b = p[chosen], q[chosen], a[sel][chosen], b[sel][chosen]
        xp, xq = x.index_select(0, p), x.index_select(0, q)
        exact = (cost[p, b] - cost[p, a] + cost[q, a] - cost[q, b]
                 - 2.0 * (sq_norms[p] + sq_norms[q] - 2.0 * (xp * xq).sum(-1)) / size)
        good = (exact < 0).nonzero().squeeze(1)
        good = good[torch.argsort(exact[good], stable=True)]
        diff = xq.sub_(xp)  # row s: what cluster a gains (and b loses) by swap s
        change = 0.0
        while good.numel():
            d_sums = torch.zeros(n_clusters, d, dtype=x.dtype, device=device)
            d_sums = d_sums.index_add_(0, a[good], diff[good]).index_add_(0, b[good], diff[good], alpha=-1).double()
            change = -float(2.0 * (sums * d_sums).sum() + (d_sums * d_sums).sum()) / size
            if change < 0:
                break
            good = good[: good.numel() // 2]
        if not good.numel():
            break
        sums += d_sums
        labels[p[good]] = b[good]
        labels[q[good]] = a[good]
        swaps += good.numel()
        inertia += change
        if -change <= rtol * inertia:
            break
    return labels, swaps


def _sq_distances(x: torch.Tensor, sq_norms: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    # (n, N) squared Euclidean distances; clamp tiny negatives from cancellation.
    c_norms = (centroids * centroids).sum(-1)
    return (sq_norms[:, None] + c_norms[None, :] - 2.0 * (x @ centroids.T)).clamp_min_(0.0)


def _kmeans_plus_plus(x: torch.Tensor, sq_norms: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Standard k-means++ seeding (D^2 sampling); returns the (k,) indices of the chosen points.

    Randomness comes from a CPU generator so the choice does not depend on the compute device."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=gen))
    chosen = [first]
    closest = (sq_norms + sq_norms[first] - 2.0 * (x @ x[first])).clamp_min_(0.0)
    for j in range(1, k):
        probs = closest.double().cpu()
        total = probs.sum()
        if total <= 0:  # all points coincide with chosen centroids
            idx = int(torch.randint(n, (1,), generator=gen))
        else:
            idx = int(torch.multinomial(probs / total, 1, generator=gen))
        chosen.append(idx)
        dist = (sq_norms + sq_norms[idx] - 2.0 * (x @ x[idx])).clamp_min_(0.0)
        closest = torch.minimum(closest, dist)
    return torch.tensor(chosen, dtype=torch.long, device=x.device)


def _balanced_assign(cost: torch.Tensor, size: int) -> torch.Tensor:
    """Assign each row of ``cost`` (n, N) to one column so that every column gets exactly ``size`` rows.

    Rounds of proposals: each unassigned row proposes to its cheapest open column; columns accept proposers by
    descending regret (second-cheapest minus cheapest open cost: rows that lose most by waiting go first), up to
    their remaining room. A column that fills up is closed for everybody. Every round places at least one row and
    closes every column it fills, so it terminates in at most N + 1 rounds (usually ~10).
    """
    n, n_clusters = cost.shape
    device = cost.device
    labels = torch.full((n,), -1, dtype=torch.long, device=device)
    room = torch.full((n_clusters,), size, dtype=torch.long, device=device)
    open_cols = torch.ones(n_clusters, dtype=torch.bool, device=device)
    pending = torch.arange(n, device=device)
    inf = torch.tensor(float("inf"), device=device)
    while pending.numel() > 0:
        c = torch.where(open_cols[None, :], cost[pending], inf)
        if int(open_cols.sum()) >= 2:
            two = c.topk(2, dim=1, largest=False)
            choice, best_cost = two.indices[:, 0], two.values[:, 0]
            regret = two.values[:, 1] - best_cost
        else:
            best_cost, choice = c.min(dim=1)
            regret = torch.zeros_like(best_cost)
        # Order proposers by (column, regret desc, cost asc) with stable sorts, last key first.
        order = torch.argsort(best_cost, stable=True)
        order = order[torch.argsort(-regret[order], stable=True)]
        order = order[torch.argsort(choice[order], stable=True)]
        sorted_choice = choice[order]
        counts = torch.bincount(sorted_choice, minlength=n_clusters)
        group_start = torch.cumsum(counts, 0) - counts
        rank = torch.arange(order.numel(), device=device) - group_start[sorted_choice]
        accepted = rank < room[sorted_choice]
        winners = order[accepted]
        labels[pending[winners]] = choice[winners]
        room -= torch.bincount(choice[winners], minlength=n_clusters)
        open_cols = room > 0
        keep = torch.ones(pending.numel(), dtype=torch.bool, device=device)
        keep[winners] = False
        pending = pending[keep]
    return labels


def _total(cost: torch.Tensor, labels: torch.Tensor) -> float:
    return float(cost.gather(1, labels[:, None]).double().sum())


def _move_weights(cost: torch.Tensor, labels: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w[a, b]: the cheapest change of cost from moving one member of cluster a to cluster b, and that member's row.

    The rows of a balanced assignment grouped by cluster form an (N, size, N) block, so this is one O(n N) pass."""
    n_clusters = cost.shape[1]
    order = torch.argsort(labels, stable=True)
    delta = cost[order] - cost[order].gather(1, labels[order][:, None])
    w, idx = delta.view(n_clusters, size, n_clusters).min(dim=1)
    rows = order.view(n_clusters, size).gather(1, idx)
    return w, rows


def _negative_cycle(w: torch.Tensor, tol: float) -> list[int] | None:
    """A cycle of clusters a0 -> a1 -> ... -> a0 whose move weights sum below -tol (Bellman-Ford), or None."""
    n_clusters = w.shape[0]
    dist = torch.zeros(n_clusters, dtype=w.dtype, device=w.device)
    pred = torch.full((n_clusters,), -1, dtype=torch.long, device=w.device)
    changed = None
    for _ in range(n_clusters + 1):
        cand, arg = (dist[:, None] + w).min(dim=0)
        improved = cand < dist - tol
        if not bool(improved.any()):
            return None
        dist = torch.where(improved, cand, dist)
        pred = torch.where(improved, arg, pred)
        changed = int(improved.nonzero()[0])
    node = changed
    for _ in range(n_clusters):  # step back into the cycle
        node = int(pred[node])
    cycle, cur = [node], int(pred[node])
    while cur != node:
        cycle.append(cur)
        cur = int(pred[cur])
    cycle.reverse()  # pred points backwards along the edges
    return cycle if float(sum(w[a, b] for a, b in zip(cycle, cycle[1:] + cycle[:1]))) < -tol else None


def refine_assignment(cost: torch.Tensor, labels: torch.Tensor, size: int, *, max_rounds: int | None = None,
                      tol: float = 1e-6) -> tuple[torch.Tensor, bool]:
    """Improve a balanced assignment by cancelling negative cycles of moves until it is optimal (or ``max_rounds``).

    A balanced assignment is optimal for the transportation problem exactly when no cycle of clusters a -> b -> ...
    -> a exists along which moving one member each way lowers the cost (min-cost-flow optimality). Each round applies
    every improving swap between disjoint cluster pairs, or, when there is none, the longer negative cycle Bellman-Ford
    finds. Returns (labels, optimal); with ``max_rounds=None`` the result is an exact balanced assignment.
    """
    cost = cost.double()
    labels = labels.clone()
    rounds = 0
    while max_rounds is None or rounds < max_rounds:
        rounds += 1
        w, rows = _move_weights(cost, labels, size)
        pair = w + w.T
        pair.fill_diagonal_(float("inf"))
        neg = (pair < -tol).triu(1).nonzero()
        if neg.numel():
            vals = pair[neg[:, 0], neg[:, 1]]
            used = set()
            new_labels = labels.clone()
            for a, b in neg[torch.argsort(vals)].tolist():  # most improving first, disjoint cluster pairs
                if a in used or b in used:
                    continue
                used.update((a, b))
                new_labels[rows[a, b]] = b
                new_labels[rows[b, a]] = a
            labels = new_labels
            continue
        cycle = _negative_cycle(w, tol)
        if cycle is None:
            return labels, True
        moves = [(int(rows[a, b]), b) for a, b in zip(cycle, cycle[1:] + cycle[:1])]
        for row, b in moves:
            labels[row] = b
    return labels, False


def exact_balanced_assign(cost: torch.Tensor, size: int) -> torch.Tensor:
    """The optimal balanced assignment (min total cost, every column exactly ``size`` rows): the fast proposal
    rounds, then negative-cycle cancelling to optimality."""
    labels, optimal = refine_assignment(cost, _balanced_assign(cost, size), size)
    assert optimal
    return labels


def _centroids(x: torch.Tensor, labels: torch.Tensor, n_clusters: int) -> torch.Tensor:
    sums = torch.zeros(n_clusters, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, labels, x)
    counts = torch.bincount(labels, minlength=n_clusters).clamp_min(1).to(x.dtype)
    return sums / counts[:, None]


def random_balanced_labels(n: int, n_clusters: int, *, seed: int = 0) -> torch.Tensor:
    """The paper's "random split" ablation: a random equal-size partition."""
    if n_clusters < 1 or n % n_clusters != 0:
        raise ValueError(f"n_clusters={n_clusters} must be >= 1 and divide {n}")
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)
    labels = torch.empty(n, dtype=torch.long)
    labels[perm] = torch.arange(n) // (n // n_clusters)
    return labels
