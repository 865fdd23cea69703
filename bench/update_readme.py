"""Regenerate the README's results section from the committed JSON in ``bench/results/``.

    python bench/update_readme.py          # rewrite README.md between the results markers
    python bench/update_readme.py --check  # exit 1 if README.md is not what the JSON says

Nothing in that section is typed by hand: every number comes from a results file written by the
command shown next to it (``tests/test_readme_results.py`` runs ``--check``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def _fmt(v, digits=3):
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _load(name: str) -> dict | None:
    """A results file's JSON, or None when that benchmark has not been run."""
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else None


def demo_section() -> str | None:
    d = _load("demo_small.json")
    if d is None:
        return None
    cols = ["accuracy", "length_mean", "truncation_rate", "repetition_rate", "format_failure_rate", "weight_ess"]
    rows = [[r["method"], *[r.get(c) for c in cols]] for r in d["rows"]]
    return (
        f"### The demo (`{d['command']}`, {d['machine']}, {d['wall_minutes']:.1f} min)\n\n"
        f"Teacher traces kept after rejection sampling: {d['traces_kept']} of {d['traces_sampled']}. "
        "Greedy accuracy on held-out problems; `weight_ess` = ESS of DCD's token weights / tokens "
        "(1 = uniform, i.e. SFT).\n\n" + _table(["method", *cols], rows) + "\n\n![demo](bench/results/demo_small.png)\n"
    )


def experiment_section() -> str | None:
    d = _load("experiment.json")
    if d is None:
        return None
    cols = ["accuracy", "avg@8", "length_mean", "truncation_rate", "repetition_rate", "exaccerr_pct"]

    def cell(m, c):
        v = d["methods"][m].get(c)
        return "n/a" if v is None else f"{v['mean']:.3f} ± {v['std']:.3f}"

    rows = [[m, *[cell(m, c) for c in cols]] for m in d["methods"]]
    sweep = [[s["tau"], s["b"], s.get("accuracy"), s.get("avg@8"), s.get("exaccerr_pct")] for s in d.get("sweep", [])]
    ranked = sorted(d["methods"], key=lambda m: -d["methods"][m]["accuracy"]["mean"])
    ranking = ", ".join(f"{m} {d['methods'][m]['accuracy']['mean']:.3f}" for m in ranked)
    text = (
        f"### DCD vs. the offline baselines (`{d['command']}`)\n\n"
        f"{len(d['seeds'])} seeds (data order), {d['student_steps']} student steps each, same data "
        f"({d['teacher_traces']} teacher traces). Mean ± sd over seeds. `avg@8`: mean accuracy of 8 samples "
        "at temperature 1. `exaccerr_pct`: %ExAccErr (Arora et al., 2022) against the teacher at the longest "
        "prefix length both reach, 100·(R≤l − l·ε≤l)/(l·ε≤l); below 0 means less accumulated error than the "
        "linear bound; a Monte-Carlo estimate from 64 prompts, so noisy.\n\n"
        f"Ranked by mean greedy accuracy: {ranking}.\n\n"
        + _table(["method", *cols], rows)
        + "\n\n![experiment](bench/results/experiment.png)\n"
    )
    if sweep:
        text += ("\nDCD-CE sensitivity (seed 0; the main table uses tau 1, b 0):\n\n"
                 + _table(["tau", "b", "accuracy", "avg@8", "exaccerr_pct"], sweep) + "\n")
    return text


def compute_section() -> str | None:
    """SFT vs DCD vs online GKD: accuracy next to what each run spent (``experiment_compute.json``)."""
    d = _load("experiment_compute.json")
    if d is None:
        return None
    rows = [[m, f"{v['accuracy']:.3f} ± {v['accuracy_std']:.3f}", round(v["steps"]), v["wall_seconds"],
             round(v["generated_tokens"]), f"{v['teacher_forward_flops']:.2e}"] for m, v in d["methods"].items()]
    paired = [[k, f"{v['mean']:+.3f}", f"[{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}]",
               sum(x > 0 for x in v["per_seed"]), sum(x < 0 for x in v["per_seed"])] for k, v in d["paired"].items()]
    g = d["gkd"]
    ranking = ", ".join(f"{m} {v['accuracy']:.3f}" for m, v in
                        sorted(d["methods"].items(), key=lambda kv: -kv[1]["accuracy"]))
    return (
        f"### Offline DCD vs online GKD per unit of compute (`{d['command']}`)\n\n"
        f"The demo's teacher, traces and random-init student; {len(d['seeds'])} seeds (data order), "
        f"{d['student_steps']} steps for SFT, DCD-CE and GKD; GKD-wall: GKD with the steps its full run had "
        f"finished when SFT's ended (same wall time, compile included). GKD: lmbda {g['lmbda']} (share of "
        f"batches the student regenerates), beta {g['beta']}, the live teacher scoring every batch over the "
        "full vocabulary; SFT and DCD read the teacher's cached scores (one offline scoring pass, not counted "
        "here). Greedy accuracy on the held-out problems (mean ± sd over seeds); cost per run from "
        "`metrics.jsonl` (wall seconds on this 2-core host).\n\n"
        + _table(["method", "accuracy", "steps", "wall s", "generated tokens", "teacher FLOPs"], rows)
        + "\n\nPaired per-seed differences (95% bootstrap CI over seeds; seeds better / worse):\n\n"
        + _table(["difference", "mean", "95% CI", "better", "worse"], paired)
        + f"\n\nRanked by mean accuracy: {ranking}. This is the miniature where DCD already loses to SFT "
        "(random-init student, ~20-token traces; see above), not the paper's regime, so it says what each "
        "method costs here, not which wins on long reasoning traces."
        + "\n\n![compute](bench/results/experiment_compute.png)\n"
    )


def train_step_section() -> str | None:
    files = sorted(p for p in RESULTS.glob("train_step_*.json") if "quick" not in p.name and "gkd" not in p.name)
    if not files:
        return None
    parts = []
    for path in files:
        d = json.loads(path.read_text())
        rows = []
        for r in d["runs"]:
            res, ratios = r.get("results", {}), r.get("ratios", {})
            get = lambda name, key: (res.get(name) or {}).get(key)
            rows.append([r["model"], f"{r['num_params'] / 1e6:.1f}M", f"{r['batch']}x{r['seq']}",
                         get("ours SFT", "tokens_per_s"), get("torch SFT", "tokens_per_s"),
                         ratios.get("ours_vs_torch_tokens_per_s"), ratios.get("ours_vs_torch_cpu_time_throughput"),
                         ratios.get("dcd_ce_over_sft_step_time"), ratios.get("dcd_kl_over_sft_step_time"),
                         get("ours SFT", "sys_s"), get("ours SFT", "peak_mib"), get("ours SFT", "mfu")])
        text = (
            f"### Train step (`python bench/train_step.py`, {path.name}: {d['device']['device_kind']}, "
            f"{d['device'].get('cpu_count', '?')} cores{_load_note(d.get('load_average_1_5_15', {}).get('start'))})\n\n"
            + "ours/torch: tokens/s over wall time; CPU-time: the same over process CPU seconds per step (what a "
            "step costs when other jobs share the cores, where wall time also counts waiting for them); ours sys s: "
            "the kernel's share of our step's CPU time (page faults on the step's freshly mapped buffers).\n\n"
            + _table(["model", "params", "BxT", "ours tok/s", "torch tok/s", "ours/torch", "ours/torch CPU-time",
                      "DCD-CE/SFT time", "DCD-KL/SFT time", "ours sys s", "ours peak MiB", "MFU"], rows)
        )
        profile = _train_step_profile(d)
        if profile:
            text += "\n\n" + profile
        parts.append(text)
    return "\n\n".join(parts) + "\n"


def gkd_step_section() -> str | None:
    """GKD's step time and memory next to SFT and DCD (``train_step_gkd_<device>.json``)."""
    files = sorted(p for p in RESULTS.glob("train_step_gkd_*.json") if "quick" not in p.name)
    if not files:
        return None
    names = ("SFT", "DCD-CE", "DCD-KL", "GKD-l0", "GKD-l1")
    parts = []
    for path in files:
        d = json.loads(path.read_text())
        rows = []
        for r in d["runs"]:
            res = r.get("results", {})
            sft = (res.get("ours SFT") or {}).get("step_s")
            for name in names:
                got = res.get(f"ours {name}") or {}
                if "step_s" in got:
                    rows.append([r["model"], f"{r['batch']}x{r['seq']}", name, got["step_s"],
                                 got["step_s"] / sft if sft else None, got.get("peak_mib")])
        parts.append(
            f"### GKD vs SFT and DCD per step (`{d.get('command', 'python bench/train_step.py')}`, {path.name}: "
            f"{d['device']['device_kind']}, {d['device'].get('cpu_count', '?')} cores)\n\n"
            "Same student, batch and optimizer; timed steps interleaved in one process. GKD-l0: the live teacher "
            "scores the data batch (full-vocabulary JSD); GKD-l1: the student first regenerates the batch "
            "(T/4 new tokens per row), then the teacher scores it; a run with `lmbda` costs about "
            "(1 - lmbda) GKD-l0 + lmbda GKD-l1. Teachers: " + ", ".join(
                f"{r['model']} -> {r['gkd_teacher_params'] / 1e6:.1f}M" for r in d["runs"] if "gkd_teacher_params" in r)
            + f". Absolute times were taken under a 1-min load average of {d['load_average_1_5_15']['start'][0]:.1f} "
            "(a shared machine); the ratios are side by side.\n\n"
            + _table(["model", "BxT", "method", "step s", "vs SFT", "peak MiB (XLA)"], rows)
        )
    return "\n\n".join(parts) + "\n"


def _load_note(load) -> str:
    """The host's 1-minute load average when the run started (other jobs share the cores)."""
    return f", 1-min load average {load[0]:.1f} at start" if load else ""


def _train_step_profile(d: dict) -> str | None:
    """Where our step's time goes (bench/op_profile.py) and its FLOP/s vs XLA's matmul, same run."""
    classes = ["matmul", "attention", "loss", "optimizer", "other"]
    rows = []
    for r in d["runs"]:
        matmul = next((p["xla_matmul"] for p in r.get("jax_processes", []) if "xla_matmul" in p), None)
        for label, res in r.get("results", {}).items():
            prof = res.get("profile")
            if not prof:
                continue
            shares = [f"{prof['by_class_fraction'].get(c, 0.0):.0%}" for c in classes]
            rows.append([r["model"], label, prof["wall_s"], prof["host_s"], *shares,
                         f"{res['achieved_flops_per_s'] / 1e9:.1f}",
                         f"{matmul['flops_per_s'] / 1e9:.1f}" if matmul else None, res.get("fraction_of_xla_matmul")])
    if not rows:
        return None
    return ("Time by op class of our step (a `jax.profiler` trace; share of XLA's summed thunk time; host = call "
            "wall time − executable time) and the step's achieved FLOP/s (model FLOPs, causal attention at half) "
            "against an fp32 4096×512 @ 512×2048 XLA matmul timed between the same steps:\n\n"
            + _table(["model", "run", "wall s", "host s", *classes, "GFLOP/s", "XLA matmul GFLOP/s", "fraction"], rows))


def sampler_section() -> str | None:
    files = sorted(RESULTS.glob("sampler_*.json"))
    if not files:
        return None
    parts = []
    for path in files:
        d = json.loads(path.read_text())
        rows = [[r["batch"], r.get("dcd_jax_decode_tok_s"), r.get("hf_decode_tok_s"), r.get("speedup"),
                 r.get("host_bandwidth_roofline_fraction", r.get("hbm_roofline_fraction"))] for r in d["rows"]]
        parts.append(
            f"### Sampler decode ({path.name}: {d['device_kind']}, {d['model']['params'] / 1e6:.1f}M Qwen2 shape"
            f"{_load_note(d.get('load_average_1m_before_after'))})\n\n"
            + _table(["batch", "dcd-jax tok/s", "transformers tok/s", "ratio", "bandwidth roofline (batch 1)"], rows)
        )
    return "\n\n".join(parts) + "\n"


def loss_memory_section() -> str | None:
    d = _load("loss_memory_cpu.json")
    if d is None:
        return None
    rows = [[r["objective"], r["chunk_size"] or "none", r["peak_mib"], r["peak_vs_unchunked"]] for r in d["rows"]]
    c = d["config"]
    return (
        f"### Loss memory (`python bench/loss_memory.py`, B={c['batch']}, T={c['seq']}, V={c['vocab']}; "
        "XLA's compiled peak, loss + gradient)\n\n" + _table(["objective", "chunk", "peak MiB", "vs unchunked"], rows) + "\n"
    )


def data_scale_section() -> str | None:
    d = _load("data_scale_cpu.json")
    if d is None:
        return None
    rows = []
    for r in d["rows"]:
        full = r.get("stream_full_4")
        shares = [m["bytes_read"] / r["stream_full_1"]["bytes_read"] for m in full] if full else r["planned_share_4"]
        rows.append([r["traces"], f"{r['corpus_bytes'] / 2**20:.0f}", f"{r['bounded']['data_rss_mib']:.0f}",
                     f"{r['stream_full_1']['data_rss_mib']:.0f}" if full else "n/a",
                     f"{r['eager_full']['data_rss_mib']:.0f}" if full else "n/a",
                     " / ".join(f"{x:.2f}" for x in shares) + ("" if full else " (plan)")])
    long, h = d["long"], d["hash_cost"]
    ratios = ", ".join(f"{k} {v:.2f}x" for k, v in d["summary"]["pipeline_over_consumption"].items())
    return (
        f"### Data at corpus scale (`{d['command']}`, {d['machine']}, {d['wall_minutes']:.0f} min)\n\n"
        f"Streamed data path (`data.streaming: true`), traces + top-{d['config']['topk']} scores. Host memory held "
        "by the data path (peak resident memory during the pass minus before it, MiB): for the same first "
        f"{d['config']['bounded_blocks']} blocks of a growing corpus, and for whole passes, streamed vs eager "
        "(`data.streaming: false`, the reference). Byte shares: bytes each of 4 processes read over the bytes one "
        "process reads for the whole corpus (measured; from the block plan where no full pass was run).\n\n"
        + _table(["traces", "corpus MiB", "RSS, same work", "RSS full pass, streamed", "RSS full pass, eager",
                  "4-process byte shares"], rows)
        + f"\n\nPipeline throughput (one process, one core of this machine; traces of "
        f"{long['mean_tokens_per_trace']:.0f} tokens, top-20, seq_len 4096): "
        f"{long['tokens_per_s']:,.0f} tokens/s; with 2 read workers "
        f"{long['read_workers_2']['steady_tokens_per_s']:,.0f}. Over what one v5e-8 host consumes at 100% MFU "
        f"(8 x 197 TFLOP/s over the training FLOPs per token, an upper bound): {ratios}; the 5x target for "
        f"qwen2.5-1.5b-dcd is {'met' if d['summary']['pipeline_over_consumption']['qwen2.5-1.5b-dcd'] >= 5 else 'NOT met'} "
        "here (a TPU host has many more cores for `data.read_workers`; not measured). "
        f"Content hashing of {h['examples']} demo traces costs {h['hash_over_forward']:.1e} of the teacher's "
        "forward pass over them.\n"
    )


def plan_section() -> str | None:
    files = sorted(RESULTS.glob("plan_*.json"))
    if not files:
        return None
    gib = 2**30
    rows = []
    for path in files:
        d = json.loads(path.read_text())
        p, ref = d["plan"], d["reference_einsum"]
        rows.append([
            f"`{d['config']}`", d["topology"], f"{p['attention']}, remat {p['remat']}, accum {p['grad_accum']}",
            p["peak_bytes"] / gib, p["memory_budget"] / gib, f"{p['headroom']:.1%}", ref["peak_bytes"] / gib,
            d["peak_vs_einsum"], p["roofline_step_seconds"], p["roofline_tokens_per_second_per_chip"],
        ])
    return (
        "### TPU plans of the ready configs (`JAX_PLATFORMS=cpu python bench/plan.py`: `dcd-jax plan`, "
        "compiled ahead of time for each slice on a CPU host)\n\n"
        "Per-chip peak memory of the compiled train step (arguments + outputs + temporaries, GiB) against "
        "the HBM the TPU compiler may allocate per chip, next to the same step with the einsum attention "
        "kernel compiled in the same run (a peak from the TPU compiler's refusal when it does not fit). "
        "Roofline: the step-time lower bound "
        "from model FLOPs at peak bf16 FLOP/s and HBM traffic at peak bandwidth, and the tokens/s per chip "
        "it allows.\n\n"
        + _table(["config", "slice", "step", "peak GiB", "HBM GiB", "headroom", "einsum peak GiB", "peak ratio",
                  "roofline s/step", "roofline tok/s/chip"], rows) + "\n"
    )


def render() -> str:
    sections = [f() for f in (demo_section, experiment_section, compute_section, train_step_section, gkd_step_section, sampler_section,
                              loss_memory_section, data_scale_section, plan_section)]
    body = "\n".join(s for s in sections if s)
    header = ("Regenerated from `bench/results/*.json` by `python bench/update_readme.py`; "
              "each subsection names the command that wrote its data.\n\n")
    return f"{BEGIN}\n{header}{body}{END}"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    readme = (ROOT / "README.md").read_text()
    start, end = readme.index(BEGIN), readme.index(END) + len(END)
    new = readme[:start] + render() + readme[end:]
    if args.check:
        if new != readme:
            print("README.md results section is out of date: run python bench/update_readme.py", file=sys.stderr)
            return 1
        return 0
    (ROOT / "README.md").write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
