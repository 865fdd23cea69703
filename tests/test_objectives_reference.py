"""Straightforward float64 NumPy references for the objectives tests (written independently of
``dcd_jax.objectives``: explicit per-position / per-sequence loops, the padding columns sliced
off, the tail mass summed over the complement of the top-k ids)."""

from __future__ import annotations

import math

import numpy as np

B, T, D, V, VT, K = 2, 12, 8, 37, 33, 4  # V = 37 columns, of which 33 are the true vocabulary


def make_case(seed: int = 0) -> dict:
    """Random packed batch with prompts, padding and NaN/garbage filler outside the loss mask."""
    rng = np.random.default_rng(seed)
    hidden = (0.7 * rng.normal(size=(B, T, D))).astype(np.float32)
    unembed = (0.7 * rng.normal(size=(D, V))).astype(np.float32)
    ref_hidden = (hidden + 0.3 * rng.normal(size=hidden.shape)).astype(np.float32)
    ref_unembed = (unembed + 0.3 * rng.normal(size=unembed.shape)).astype(np.float32)
    segment_ids = np.array(
        [[1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 0, 0], [1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 3]], np.int32
    )
    loss_mask = np.array(
        [[0, 0, 1, 1, 1, 0, 1, 1, 1, 1, 1, 0], [0, 1, 1, 0, 0, 1, 1, 0, 1, 1, 1, 1]], np.float32
    )  # position [0, 10] is padding with loss_mask=1: segment id 0 must still exclude it
    valid = (loss_mask > 0) & (segment_ids > 0)
    targets = rng.integers(0, VT, size=(B, T)).astype(np.int32)
    targets[~valid] = -7  # filler
    teacher_logprobs = np.log(rng.uniform(0.02, 0.9, size=(B, T))).astype(np.float32)
    teacher_logprobs[~valid] = np.nan
    t_logits = 2.0 * rng.normal(size=(B, T, VT))
    t_logp = t_logits - np.log(np.exp(t_logits).sum(-1, keepdims=True))
    order = np.argsort(-t_logp, axis=-1)[..., :K]
    topk_ids = order.astype(np.int32)
    topk_lp = np.take_along_axis(t_logp, order, -1).astype(np.float32)
    topk_ids[~valid] = 999  # out-of-range filler
    topk_lp[~valid] = np.nan
    batch = dict(
        targets=targets,
        loss_mask=loss_mask,
        segment_ids=segment_ids,
        positions=np.tile(np.arange(T, dtype=np.int32), (B, 1)),
        teacher_logprobs=teacher_logprobs,
        teacher_topk_ids=topk_ids,
        teacher_topk_logprobs=topk_lp,
    )
    return dict(hidden=hidden, unembed=unembed, ref_hidden=ref_hidden, ref_unembed=ref_unembed, batch=batch)


def log_softmax(hidden, unembed, vt=VT):
    z = np.asarray(hidden, np.float64) @ np.asarray(unembed, np.float64)
    z = z[..., :vt]
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def sequences(batch):
    """[(row, [positions of response tokens in order])] for every sequence with response tokens."""
    out = []
    seg, mask = batch["segment_ids"], batch["loss_mask"]
    for b in range(seg.shape[0]):
        for s in sorted(set(seg[b].tolist()) - {0}):
            pos = [t for t in range(seg.shape[1]) if seg[b, t] == s and mask[b, t] > 0]
            if pos:
                out.append((b, pos))
    return out


def kl_entries(logp_bt, ids, a, tail):
    """Teacher probs P, student probs Q over the compared outcomes at one position."""
    p_all = np.exp(logp_bt)
    q_top = p_all[ids]
    p_top = np.exp(np.asarray(a, np.float64))
    if tail == "bucket":
        outside = np.ones(len(p_all), bool)
        outside[ids] = False
        return np.append(p_top, max(0.0, 1.0 - p_top.sum())), np.append(q_top, p_all[outside].sum())
    return p_top / p_top.sum(), q_top / q_top.sum()


def objective(cfg, hidden, unembed, batch, *, step, ref_hidden=None, ref_unembed=None, frozen=None):
    """(loss, aux) in float64. ``frozen``: aux of the base point, to hold weights/alphas fixed
    (they are stop-gradient), so finite differences give the reference gradient."""
    logp = log_softmax(hidden, unembed)
    seg, mask = batch["segment_ids"], batch["loss_mask"]
    valid = (mask > 0) & (seg > 0)
    pos = [(b, t) for b in range(seg.shape[0]) for t in range(seg.shape[1]) if valid[b, t]]
    lp = np.zeros(seg.shape)
    ent = np.zeros(seg.shape)
    for b, t in pos:
        lp[b, t] = logp[b, t, batch["targets"][b, t]]
        ent[b, t] = -(np.exp(logp[b, t]) * logp[b, t]).sum()

    # per-token loss
    loss = np.zeros(seg.shape)
    alphas = {}
    for b, t in pos:
        if cfg.loss == "ce":
            loss[b, t] = -lp[b, t]
            continue
        ids, a = batch["teacher_topk_ids"][b, t], batch["teacher_topk_logprobs"][b, t]
        P, Q = kl_entries(logp[b, t], ids, a, cfg.kl.tail)
        fwd = np.where(P > 0, P * np.log(np.where(P > 0, P, 1.0) / Q), 0.0)
        if cfg.loss == "todi":
            Pf = np.maximum(P, cfg.todi.min_prob)
            al = frozen["alpha"][(b, t)] if frozen else sigmoid(cfg.todi.beta * (np.log(Pf) - np.log(Q)))
            alphas[(b, t)] = al
            loss[b, t] = (al * fwd + (1 - al) * Q * np.log(Q / Pf)).sum()
        else:
            loss[b, t] = fwd.sum()

    # weights
    clipped = np.zeros(seg.shape, bool)
    lam = 1.0
    if frozen is not None:
        w = frozen["w"]
    else:
        w = np.ones(seg.shape)
        if cfg.weighting in ("dcd", "dcd_prefix", "dcd_sequence"):
            d = cfg.dcd
            l = lp - batch["teacher_logprobs"].astype(np.float64)
            if cfg.weighting == "dcd_prefix":  # l_t -> mean of l over the sequence's response tokens up to t
                running = np.zeros(seg.shape)
                for b, ts in sequences(batch):
                    for i, t in enumerate(ts):
                        running[b, t] = np.mean([l[b, u] for u in ts[: i + 1]])
                l = running
            if cfg.weighting == "dcd_sequence":  # l_t -> mean of l over all of the sequence's response tokens
                whole = np.zeros(seg.shape)
                for b, ts in sequences(batch):
                    for t in ts:
                        whole[b, t] = np.mean([l[b, u] for u in ts])
                l = whole
            w = np.where(valid, sigmoid((np.where(valid, l, 0) - d.b) / d.tau), 1.0)
            if d.normalize:
                w = w / w[valid].mean()
            lo = -np.inf if d.clip_min is None else d.clip_min
            hi = np.inf if d.clip_max is None else d.clip_max
            clipped = valid & ((w < lo) | (w > hi))
            w = np.clip(w, lo, hi)
            s = cfg.lam
            frac = 1.0 if s.kind == "constant" or s.warmup_steps == 0 else min(1.0, step / s.warmup_steps)
            if s.kind == "cosine" and s.warmup_steps > 0:
                frac = 0.5 * (1 - math.cos(math.pi * frac))
            lam = s.max * frac
            w = (1 - lam) + lam * w
        elif cfg.weighting == "dft":
            w = np.exp(lp)
        elif cfg.weighting == "idft":
            c = cfg.idft
            ramp = lam = 1.0 if c.warmup_steps == 0 else min(1.0, step / c.warmup_steps)
            alpha = ramp * (c.alpha_min + (c.alpha_max - c.alpha_min) * (1 - ent / math.log(VT)))
            w = np.exp(lp) ** alpha
        elif cfg.weighting == "iw_sft":
            ref_logp = log_softmax(ref_hidden, ref_unembed)
            r = np.zeros(seg.shape)
            for b, t in pos:
                r[b, t] = lp[b, t] - ref_logp[b, t, batch["targets"][b, t]]
            c = cfg.iw_sft
            if c.level == "token":
                raw = np.exp(r)
                clipped = valid & ((raw < c.lo) | (raw > c.hi))
                w = np.clip(raw, c.lo, c.hi)
            else:
                for b, p in sequences(batch):
                    raw = math.exp(c.kappa * np.mean([r[b, t] for t in p]))
                    for t in p:
                        w[b, t] = min(raw, c.c)
                        clipped[b, t] = raw > c.c
        w = np.where(valid, w, 1.0)

    seqs = sequences(batch)
    if cfg.reduction == "token":
        total = sum(w[b, t] * loss[b, t] for b, t in pos)
        den = len(pos)
    else:
        total = sum(np.mean([w[b, t] * loss[b, t] for t in p]) for b, p in seqs)
        den = len(seqs)
    aux = dict(w=w, alpha=alphas, clipped=clipped, lp=lp, ent=ent, loss=loss, lam=lam, valid=valid,
               total=total, den=den, seqs=seqs)
    return total / den, aux


def finite_difference_grads(cfg, case, *, step, eps=1e-6, entries=64, seed=0):
    """Central differences of the float64 reference w.r.t. hidden and unembed, weights frozen.

    Returns ``[(index arrays, values)]`` for ``entries`` random entries of each (all if fewer);
    the unembedding entries include padding columns (expected gradient 0)."""
    b = case["batch"]
    kw = dict(step=step, ref_hidden=case["ref_hidden"], ref_unembed=case["ref_unembed"])
    _, base = objective(cfg, case["hidden"], case["unembed"], b, **kw)
    h0 = case["hidden"].astype(np.float64)
    w0 = case["unembed"].astype(np.float64)
    grads = []
    rng = np.random.default_rng(seed)
    for which, x0 in ((0, h0), (1, w0)):
        flat = rng.permutation(x0.size)[:entries]
        if which == 1:  # always probe a padding column too
            flat = np.append(flat, np.ravel_multi_index((0, x0.shape[1] - 1), x0.shape))
        picked = np.unravel_index(flat, x0.shape)
        g = np.zeros(len(flat))
        for i, idx in enumerate(zip(*picked)):
            vals = []
            for sgn in (1, -1):
                x = x0.copy()
                x[idx] += sgn * eps
                args = (x, w0) if which == 0 else (h0, x)
                vals.append(objective(cfg, *args, b, frozen=base, **kw)[0])
            g[i] = (vals[0] - vals[1]) / (2 * eps)
        grads.append((picked, g))
    return grads


def diagnostics(aux, teacher_logprobs=None):
    """Expected summary metrics from a reference run's aux."""
    w, valid = aux["w"], aux["valid"]
    wv = w[valid]
    out = dict(
        weight_mean=wv.mean(),
        weight_std=wv.std(),
        weight_min=wv.min(),
        weight_max=wv.max(),
        frac_clipped=aux["clipped"][valid].mean(),
        ess_token=wv.sum() ** 2 / (wv**2).sum(),
        tokens=valid.sum(),
        sequences=len(aux["seqs"]),
        nll=-aux["lp"][valid].mean(),
        entropy=aux["ent"][valid].mean(),
    )
    seq_w = np.array([np.mean([w[b, t] for t in p]) for b, p in aux["seqs"]])
    out["ess_seq"] = seq_w.sum() ** 2 / (seq_w**2).sum()
    bins_sum, bins_n = np.zeros(10), np.zeros(10)
    for b, p in aux["seqs"]:
        for rank, t in enumerate(p):
            k = min(9, (10 * rank) // len(p))
            bins_sum[k] += w[b, t]
            bins_n[k] += 1
    for i in range(10):
        if bins_n[i]:
            out[f"weight_pos{i}"] = bins_sum[i] / bins_n[i]
    if teacher_logprobs is not None:
        out["log_ratio_mean"] = (aux["lp"] - teacher_logprobs.astype(np.float64))[valid].mean()
    return out
