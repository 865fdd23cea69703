"""Peak memory of loss + gradient: chunked (memory-light) vs unchunked objective, 150k vocabulary.

Compiles ``jax.value_and_grad(compute_objective(...).loss)`` w.r.t. (hidden, unembed) for a
Qwen-sized vocabulary (151936 columns, 151665 real tokens) and reads XLA's buffer assignment
(``compiled.memory_analysis()``): ``temp`` is the scratch memory the step needs on top of its
arguments and outputs, ``peak`` = temp + arguments + outputs. Nothing is executed unless
``--run`` is given (then the chunked variants are also timed), so it finishes in well under
2 minutes on a laptop CPU.

    python bench/loss_memory.py [--batch 4 --seq 1024 --dim 512 --chunks 0,128,256,512 --run]

Writes a table to stdout and JSON to bench/results/loss_memory_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dcd_jax.objectives import ObjectiveConfig, compute_objective  # noqa: E402

VOCAB, TRUE_VOCAB, TOPK = 151936, 151665, 20
MIB = 1024 * 1024


def make_inputs(b: int, t: int, d: int, rng: np.random.Generator):
    hidden = jax.ShapeDtypeStruct((b, t, d), jnp.bfloat16)
    unembed = jax.ShapeDtypeStruct((d, VOCAB), jnp.float32)
    batch = {
        "targets": jax.ShapeDtypeStruct((b, t), jnp.int32),
        "loss_mask": jax.ShapeDtypeStruct((b, t), jnp.float32),
        "segment_ids": jax.ShapeDtypeStruct((b, t), jnp.int32),
        "teacher_logprobs": jax.ShapeDtypeStruct((b, t), jnp.float32),
        "teacher_topk_ids": jax.ShapeDtypeStruct((b, t, TOPK), jnp.int32),
        "teacher_topk_logprobs": jax.ShapeDtypeStruct((b, t, TOPK), jnp.float32),
    }
    return hidden, unembed, batch


def concrete(shapes, rng: np.random.Generator):
    hidden, unembed, batch = shapes
    b, t, d = hidden.shape
    h = jnp.asarray(rng.normal(size=hidden.shape), jnp.bfloat16)
    w = jnp.asarray(0.02 * rng.normal(size=unembed.shape), jnp.float32)
    ids = np.stack([rng.choice(TRUE_VOCAB, TOPK, replace=False) for _ in range(b * t)]).reshape(b, t, TOPK)
    lp = np.log(np.full((b, t, TOPK), 0.6 / TOPK))
    data = {
        "targets": rng.integers(0, TRUE_VOCAB, (b, t)).astype(np.int32),
        "loss_mask": np.ones((b, t), np.float32),
        "segment_ids": np.ones((b, t), np.int32),
        "teacher_logprobs": np.log(rng.uniform(0.05, 1, (b, t))).astype(np.float32),
        "teacher_topk_ids": ids.astype(np.int32),
        "teacher_topk_logprobs": lp.astype(np.float32),
    }
    return h, w, data


def step_fn(cfg: ObjectiveConfig):
    def loss(h, w, batch):
        return compute_objective(cfg, h, w, batch, step=1000, true_vocab_size=TRUE_VOCAB).loss

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--chunks", default="0,128,256,512", help="comma-separated chunk sizes (0 = unchunked)")
    ap.add_argument("--run", action="store_true", help="also execute and time the chunked variants")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "loss_memory_cpu.json")
    args = ap.parse_args(argv)

    rng = np.random.default_rng(0)
    shapes = make_inputs(args.batch, args.seq, args.dim, rng)
    objectives = {
        "ce/none (SFT)": dict(loss="ce", weighting="none"),
        "ce/dcd": dict(loss="ce", weighting="dcd"),
        f"kl/dcd (top-{TOPK})": dict(loss="kl", weighting="dcd"),
    }
    chunks = [int(c) for c in args.chunks.split(",")]
    data = concrete(shapes, rng) if args.run else None
    rows = []
    for name, kw in objectives.items():
        for chunk in chunks:
            cfg = ObjectiveConfig(chunk_size=chunk, **kw)
            t0 = time.perf_counter()
            compiled = step_fn(cfg).lower(*shapes).compile()
            compile_s = time.perf_counter() - t0
            mem = compiled.memory_analysis()
            row = {
                "objective": name,
                "chunk_size": chunk,
                "temp_mib": mem.temp_size_in_bytes / MIB,
                "argument_mib": mem.argument_size_in_bytes / MIB,
                "output_mib": mem.output_size_in_bytes / MIB,
                "peak_mib": (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
                             - mem.alias_size_in_bytes) / MIB,
                "compile_s": compile_s,
            }
            if args.run and chunk > 0:
                out = compiled(*data)
                jax.block_until_ready(out)
                t0 = time.perf_counter()
                jax.block_until_ready(compiled(*data))
                row["step_s"] = time.perf_counter() - t0
                row["loss"] = float(out[0])
            rows.append(row)
            print(f"  compiled {name:<20} chunk={chunk:<5} temp={row['temp_mib']:9.1f} MiB", file=sys.stderr)

    full_logits_mib = args.batch * args.seq * VOCAB * 4 / MIB
    print(f"\nloss+grad peak memory, B={args.batch} T={args.seq} D={args.dim} V={VOCAB} "
          f"(one fp32 [B,T,V] logits array = {full_logits_mib:.0f} MiB), backend={jax.default_backend()}")
    print(f"{'objective':<20} {'chunk':>6} {'temp MiB':>10} {'peak MiB':>10} {'vs unchunked':>13}")
    base = {r["objective"]: r["peak_mib"] for r in rows if r["chunk_size"] == 0}
    for r in rows:
        ratio = base.get(r["objective"])
        rel = f"{r['peak_mib'] / ratio:.1%}" if ratio else "-"
        r["peak_vs_unchunked"] = r["peak_mib"] / ratio if ratio else None
        print(f"{r['objective']:<20} {r['chunk_size'] or 'none':>6} {r['temp_mib']:>10.1f} {r['peak_mib']:>10.1f} {rel:>13}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "config": {"batch": args.batch, "seq": args.seq, "dim": args.dim, "vocab": VOCAB, "true_vocab": TRUE_VOCAB,
                   "topk": TOPK, "hidden_dtype": "bfloat16", "unembed_dtype": "float32"},
        "full_logits_fp32_mib": full_logits_mib,
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "machine": platform.platform(),
        "rows": rows,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
