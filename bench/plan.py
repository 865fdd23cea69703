"""Plan every ready config on the TPU slice it names (no TPU needed: libtpu compiles ahead of time).

    JAX_PLATFORMS=cpu python bench/plan.py                      # all ready configs
    JAX_PLATFORMS=cpu python bench/plan.py qwen2.5-1.5b-dcd      # one

For each config it compiles the exact train step (`dcd-jax plan --config configs/<name>.yaml
--topology <slice>`) and, side by side in the same run, the same step with the einsum attention
kernel as the reference (what the config needed before splash attention), then prints a table and
writes ``bench/results/plan_<name>.json`` (the README's TPU table is generated from those files).
Compiling the 1.5B step takes about a minute on a 2-core host.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import jax

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dcd_jax.config import load_config  # noqa: E402
from dcd_jax.train.config import RunConfig  # noqa: E402
from dcd_jax.train.plan import GIB, compile_plan, topology_target  # noqa: E402

# Ready config -> the slice its header comment names.
READY = {
    "qwen2.5-1.5b-dcd": "v5e:2x4",
    "qwen2.5-0.5b-dcd": "v5e:2x4",
    "llama3.2-1b-dcd": "v5e:2x4",
    "gemma3-1b-dcd": "v5e:2x4",
}


def plan_one(name: str, topology: str) -> dict:
    cfg = load_config(RunConfig, ROOT / "configs" / f"{name}.yaml")
    target = topology_target(topology)
    start = time.perf_counter()
    report = compile_plan(cfg, target, "train")
    compile_s = time.perf_counter() - start
    reference = compile_plan(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention="einsum")),
                             target, "train", overrides=("model.attention=einsum",))
    return {
        "config": f"configs/{name}.yaml", "topology": topology, "command":
            f"dcd-jax plan --config configs/{name}.yaml --topology {topology}",
        "objective": {"loss": cfg.objective.loss, "weighting": cfg.objective.weighting},
        "jax": jax.__version__, "host": platform.node(), "compile_seconds": compile_s,
        "plan": report.to_dict(), "reference_einsum": reference.to_dict(),
        "peak_vs_einsum": report.peak / reference.peak,
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("configs", nargs="*", default=list(READY), help=f"of {list(READY)}")
    args = parser.parse_args()
    out_dir = ROOT / "bench" / "results"
    rows = []
    for name in args.configs:
        d = plan_one(name, READY[name])
        (out_dir / f"plan_{name}.json").write_text(json.dumps(d, indent=1) + "\n")
        p, ref = d["plan"], d["reference_einsum"]
        rows.append((name, d["topology"], p["peak_bytes"] / GIB, p["memory_budget"] / GIB, p["headroom"],
                     ref["peak_bytes"] / GIB, d["peak_vs_einsum"], p["roofline_step_seconds"]))
    print(f"{'config':<20}{'slice':<10}{'peak GiB':>10}{'HBM GiB':>9}{'headroom':>10}{'einsum GiB':>12}"
          f"{'ratio':>8}{'roofline s':>12}")
    for r in rows:
        print(f"{r[0]:<20}{r[1]:<10}{r[2]:>10.2f}{r[3]:>9.2f}{r[4]:>10.1%}{r[5]:>12.2f}{r[6]:>8.3f}{r[7]:>12.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
