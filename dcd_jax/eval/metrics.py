"""Accuracy metrics: pass@1 (greedy), avg@k and unbiased pass@k (sampled), bootstrap CIs.

Conventions (what the summary keys mean):

* ``pass@1`` - accuracy of one answer per problem.  With greedy decoding this is *the* number to
  compare checkpoints; with ``n`` samples per problem it is the unbiased estimate ``c / n``.
* ``avg@n`` - mean over problems of the fraction of the ``n`` samples that are correct (the same
  quantity as sampled pass@1, reported under the name used by reasoning-model papers).
* ``pass@k`` - probability that at least one of ``k`` samples is correct, estimated without bias
  from ``n >= k`` samples with the estimator of Chen et al. (2021, "Evaluating Large Language
  Models Trained on Code"): ``1 - C(n - c, k) / C(n, k)`` per problem, then averaged.
* ``*_ci`` - a percentile bootstrap confidence interval over *problems* (resampling problems with
  replacement, samples of one problem stay together), seeded so reruns give identical intervals.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["pass_at_k", "avg_at_k", "bootstrap_ci", "default_ks", "summarize"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k from ``n`` samples of which ``c`` are correct.

    ``1 - C(n-c, k) / C(n, k)``, computed as a stable running product (no huge binomials).
    """
    n, c, k = int(n), int(c), int(k)
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def avg_at_k(n: int, c: int) -> float:
    """avg@n of one problem: the fraction ``c / n`` of its samples that are correct.

    Equal to ``pass_at_k(n, c, 1)``; kept as its own name because papers report it as avg@k.
    """
    n, c = int(n), int(c)
    if n <= 0 or not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n and n > 0, got n={n}, c={c}")
    return c / n


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap ``(1 - alpha)`` confidence interval of the mean of ``values``.

    ``values`` holds one number per problem (0/1 correctness, or a per-problem pass@k).  The
    resampling is seeded, so the interval is a deterministic function of the inputs: two runs of
    the same evaluation report the same CI.  Fewer than two values give a degenerate interval at
    the mean (nothing to resample).
    """
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if x.size == 0:
        return (float("nan"), float("nan"))
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if x.size == 1 or n_boot <= 0:
        m = float(x.mean())
        return (m, m)
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot, dtype=np.float64)
    # Chunked so a 5000-problem benchmark does not allocate n_boot * n indices at once.
    chunk = max(1, min(n_boot, 2_000_000 // x.size))
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        idx = rng.integers(0, x.size, size=(stop - start, x.size))
        means[start:stop] = x[idx].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2.0, 1.0 - alpha / 2.0])
    return (float(lo), float(hi))


def default_ks(n: int) -> list[int]:
    """Powers of two up to ``n``, plus ``n`` itself: 1, 2, 4, ..., n."""
    ks = []
    k = 1
    while k <= n:
        ks.append(k)
        k *= 2
    if n >= 1 and ks[-1] != n:
        ks.append(n)
    return ks


def _field(item: Any, name: str, default: Any = None) -> Any:
    if isinstance(item, Mapping):
        return item.get(name, default)
    return getattr(item, name, default)


def _flags(value: Any) -> list[bool]:
    if value is None:
        return []
    if isinstance(value, (bool, np.bool_, int, np.integer)):
        return [bool(value)]
    return [bool(v) for v in value]


def summarize(
    items_results: Sequence[Any],
    *,
    ks: Sequence[int] | None = None,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, Any]:
    """Accuracy summary of one benchmark.

    Args:
        items_results: one entry per problem, a mapping or object with
            ``correct``: a bool or a sequence of bools, one per sample; and optionally
            ``greedy_correct``: the greedy answer's correctness, when the run did both.
        ks: the k of pass@k to report for sampled runs (default: 1, 2, 4, ..., n).
        n_boot, alpha, seed: bootstrap settings for the confidence intervals.

    Returns a flat dict: ``n_items``, ``n_samples`` and, with ``m_ci = [lo, hi]`` for each metric m,

    * a run with one sample per problem: ``pass@1`` (accuracy);
    * a run with ``n > 1`` samples per problem: ``avg@n``, and ``pass@k`` for each k <= n
      (``pass@1`` there is the sampled estimate, equal to ``avg@n``);
    * with ``greedy_correct``: ``pass@1`` is the greedy accuracy (overriding the sampled one,
      which stays available as ``avg@n``).

    Problems may have different sample counts (e.g. a crashed shard); pass@k then uses each
    problem's own n and only ks <= the smallest n are reported.
    """
    per_item = [_flags(_field(r, "correct")) for r in items_results]
    greedy = [_field(r, "greedy_correct") for r in items_results]
    out: dict[str, Any] = {"n_items": len(per_item)}
    if not per_item:
        out["n_samples"] = 0
        return out

    def add(name: str, values: Sequence[float]) -> None:
        vals = np.asarray(values, dtype=np.float64)
        out[name] = float(vals.mean())
        out[name + "_ci"] = list(bootstrap_ci(vals, n_boot=n_boot, alpha=alpha, seed=seed))

    counts = [len(f) for f in per_item]
    n_min, n_max = min(counts), max(counts)
    out["n_samples"] = n_max
    has_greedy = any(g is not None for g in greedy)
    if has_greedy and any(g is None for g in greedy):
        raise ValueError("greedy_correct must be given for every item or for none")
    if n_max > 0:
        if n_min == 0:
            raise ValueError("some items have no samples in 'correct'")
        if n_max == 1:
            add("pass@1", [f[0] for f in per_item])
        else:
            add(f"avg@{n_max}", [avg_at_k(len(f), sum(f)) for f in per_item])
            for k in ks if ks is not None else default_ks(n_min):
                if 1 <= k <= n_min:
                    add(f"pass@{k}", [pass_at_k(len(f), sum(f), k) for f in per_item])
    elif not has_greedy:
        raise ValueError("items need 'correct' (sampled) or 'greedy_correct' results")
    if has_greedy:
        add("pass@1", [float(bool(g)) for g in greedy])
    return out
