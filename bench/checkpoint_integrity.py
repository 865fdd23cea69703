"""Cost of the checkpoint checksums, as a ratio to the checkpoint save and restore they guard.

For each model shape, one process builds the train state (params + AdamW state, fp32, on the
default single-device mesh) and, in alternating rounds so that load from other jobs on a shared
machine hits them alike, times:

* **checksum**: :func:`dcd_jax.train.checkpoint.array_checksums` of params and opt_state (what
  every save adds; a restore adds the same once more);
* **save**: a synchronous :class:`~dcd_jax.train.checkpoint.RunCheckpointer` save of one step
  *including* its checksums (what a run pays per checkpoint);
* **restore**: restoring that step, checksum verification included.

Reported: medians of ``--rounds`` rounds (after one warm-up round: compilation is not counted)
and the ratios checksum / save and checksum / restore.

    python bench/checkpoint_integrity.py            # tiny + 25m, 5 rounds
    python bench/checkpoint_integrity.py --quick    # tiny only, 2 rounds (plumbing check)

Writes a markdown table to stdout and JSON to ``bench/results/checkpoint_integrity_cpu.json``
(``_quick`` suffix for --quick).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = {  # (hidden, layers, heads, kv_heads, mlp, vocab): the train_step benchmark's shapes
    "tiny": (64, 2, 4, 2, 192, 512),
    "25m": (512, 8, 8, 4, 1408, 8192),
}


def _state(shape):
    import jax

    from dcd_jax.models import init_params
    from dcd_jax.models.config import ModelConfig
    from dcd_jax.train.optimizer import OptimConfig, make_optimizer
    from dcd_jax.train.state import init_train_state

    hidden, layers, heads, kv, mlp, vocab = shape
    cfg = ModelConfig.from_hf_config({
        "model_type": "qwen2", "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": mlp,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
        "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 4096,
        "tie_word_embeddings": True, "use_sliding_window": False,
    })
    params = init_params(cfg, 0)
    tx = make_optimizer(OptimConfig(), 100, params)
    state = jax.jit(lambda p: init_train_state(p, tx, 0, False))(params)
    return cfg, state


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(name: str, rounds: int) -> dict:
    import jax

    from dcd_jax.train.checkpoint import CheckpointConfig, RunCheckpointer, array_checksums

    cfg, state = _state(MODELS[name])
    tmp = Path(tempfile.mkdtemp(prefix="ckpt_bench_"))
    ckpt = RunCheckpointer(tmp, CheckpointConfig(async_save=False, keep=1))
    times = {"checksum": [], "save": [], "restore": []}
    try:
        for r in range(rounds + 1):  # round 0 compiles and warms up
            step = r + 1
            t_sum = _timed(lambda: [array_checksums(state[k]) for k in ("params", "opt_state")])
            t_save = _timed(lambda: (ckpt.save(step, state, {"position": step}), ckpt.wait()))
            t_restore = _timed(lambda: jax.block_until_ready(ckpt.restore(step, state)[0]["params"]))
            if r:
                times["checksum"].append(t_sum)
                times["save"].append(t_save)
                times["restore"].append(t_restore)
    finally:
        ckpt.close()
        shutil.rmtree(tmp, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "model": name, "num_params": cfg.num_params, "rounds": rounds,
        "checksum_s": med["checksum"], "save_s": med["save"], "restore_s": med["restore"],
        "checksum_over_save": med["checksum"] / med["save"], "checksum_over_restore": med["checksum"] / med["restore"],
        "raw_s": times,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,25m")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny only, 2 rounds")
    args = parser.parse_args()
    models = ["tiny"] if args.quick else args.models.split(",")
    rounds = 2 if args.quick else args.rounds
    import jax

    rows = [measure(m, rounds) for m in models]
    print("| model | params | checksum s | save s (incl. checksum) | restore s (incl. verify) | checksum / save | checksum / restore |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['num_params'] / 1e6:.2f}M | {r['checksum_s']:.4f} | {r['save_s']:.4f} | "
              f"{r['restore_s']:.4f} | {r['checksum_over_save']:.3f} | {r['checksum_over_restore']:.3f} |")
    out = ROOT / "bench" / "results" / f"checkpoint_integrity_cpu{'_quick' if args.quick else ''}.json"
    out.write_text(json.dumps({
        "benchmark": "checkpoint_integrity", "device": str(jax.devices()[0].device_kind), "platform": platform.platform(),
        "command": "python bench/checkpoint_integrity.py" + (" --quick" if args.quick else ""), "rows": rows,
    }, indent=2) + "\n")
    print(f"-> {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
