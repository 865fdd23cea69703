"""Data path at corpus scale: host memory, bytes read per process and tokens/s of the streamed pipeline.

Generates synthetic corpora (traces as Parquet, one row group per block, plus teacher scores in
``score-teacher``'s block layout with top-k), block by block (never whole in memory), and measures
each configuration in a fresh subprocess (peak RSS sampled every 2 ms):

* **growing corpus** (10k / 100k / 1M traces, tokenized records, top-4): the streamed iterator of
  process 0 of 1 stops after ``--bounded-blocks`` blocks (equal work: peak RSS must not grow with
  the corpus); full passes by 1 process (up to ``--full-max`` traces; the eager path,
  ``data.streaming: false``, side by side as the reference) and by each of 4 processes (up to
  ``--full4-max`` traces, 1M by default): bytes each read over the bytes all 4 read, and each one's
  peak RSS;
* **throughput**: traces of ~0.7k tokens with top-20 scores and seq_len 4096, streamed by one
  process, tokenizer and Arrow on one thread (``TOKENIZERS_PARALLELISM=false``): the code of
  ``--reference`` (the streamed path before the block-vectorized join) on text traces, this code
  on the same text traces, this code on the same traces as tokenized records, and the latter with
  2 read workers; runs interleaved, ``--repeats`` times, medians. Tokens/s are real (non-padding)
  tokens of the batches after the first one, by wall clock and per CPU-second of the process
  (the machine is shared: CPU time is what a dedicated core would need). They are set next to what
  one host of the ready TPU configs consumes: ``tokens_per_step / roofline_step_seconds`` of
  ``bench/results/plan_<config>.json`` (``dcd-jax plan``).

The corpora repeat 4096 unique traces (distinct ids) so that scores with correct content hashes
can be written without tokenizing a million records; reading, validation, tokenization (text
traces), hashing, the score join and packing still run for every record read.

    nice -n 10 python bench/data_scale.py [--sizes 10000,100000,1000000] [--reference b1b7f73]

Prints a table; writes bench/results/data_scale_cpu.json (docs/results.md table: bench/update_readme.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

TOKENIZER = ROOT / "tests" / "fixtures" / "data" / "synthetic_tokenizer"
UNIQUE = 4096
TPU_CONFIGS = ("qwen2.5-0.5b-dcd", "qwen2.5-1.5b-dcd", "llama3.2-1b-dcd")
REFERENCE = "b1b7f73"  # main before this bench's rerun: the streamed path with per-record score checks


# --------------------------------------------------------------------------- corpus generation


def _unique_traces(tok, n: int, topk: int, response_repeats: int, seed: int):
    """``n`` unique traces as text and as tokenized records, their fake scores (correct content hashes), as
    Arrow tables, and their token count."""
    import numpy as np
    import pyarrow as pa

    from dcd_jax.data import DataConfig, content_hash, iter_examples, tokenizer_fingerprint
    from dcd_jax.data.synthetic import SyntheticTaskConfig, generate_problems, write_jsonl

    short = {"terse": 1.0, "compressed": 1.0, "answer_only": 1.0}
    problems = generate_problems(SyntheticTaskConfig(seed=seed, n_examples=n, style_mix=short if response_repeats == 1
                                                     else {"careful": 1.0}))
    rows = [{"id": p["id"], "prompt": p["prompt"], "response": " ".join([p["response"]] * response_repeats),
             "answer": p["answer"]} for p in problems]
    with tempfile.TemporaryDirectory() as d:
        path = write_jsonl(rows, Path(d) / "u.jsonl")
        examples = list(iter_examples(DataConfig(path=str(path)), tok, apply_length=False))
    rng = np.random.default_rng(seed)
    lens = np.array([ex.num_response_tokens for ex in examples])
    offsets = pa.array(np.concatenate([[0], np.cumsum(lens)]).astype(np.int32))
    total = int(lens.sum())
    lp = -rng.random(total, dtype=np.float32) * 3
    columns = {
        "content_hash": pa.array([content_hash(ex.input_ids, ex.response_mask) for ex in examples]),
        "teacher_logprobs": pa.ListArray.from_arrays(offsets, pa.array(lp)),
    }
    if topk:
        inner = pa.array(np.arange(0, total * topk + 1, topk).astype(np.int32))
        ids = rng.integers(0, len(tok), total * topk).astype(np.int32)
        lps = np.sort(-rng.random(total * topk, dtype=np.float32) * 5, axis=None).reshape(total, topk)[:, ::-1]
        columns["teacher_topk_ids"] = pa.ListArray.from_arrays(offsets, pa.ListArray.from_arrays(inner, pa.array(ids)))
        columns["teacher_topk_logprobs"] = pa.ListArray.from_arrays(
            offsets, pa.ListArray.from_arrays(inner, pa.array(np.ascontiguousarray(lps).reshape(-1))))
    traces = pa.Table.from_pylist(rows)
    tokenized = pa.table({
        "id": traces.column("id"),
        "input_ids": pa.array([ex.input_ids for ex in examples], pa.list_(pa.int32())),
        "response_mask": pa.array([ex.response_mask.astype(np.int8) for ex in examples], pa.list_(pa.int8())),
        "tokenizer_fingerprint": pa.array([tokenizer_fingerprint(tok)] * len(examples)),
        "answer": traces.column("answer"),
    })
    return {"text": traces, "tokenized": tokenized}, pa.table(columns), int(sum(ex.num_tokens for ex in examples))


def write_corpus(out: Path, n: int, block: int, tok, unique, topk: int, kinds=("text",)) -> dict:
    """Traces (Parquet, a row group per block; one file per kind of record) and their scores in score-teacher's
    block layout, written block by block. The scores serve every kind (same ids, order and tokens)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dcd_jax.data import DataConfig, ScoresProvenance, tokenizer_fingerprint
    from dcd_jax.data.shards import plan_blocks
    from dcd_jax.data.teacher_scores import LAYOUT_KEY

    traces_u, scores_u, _ = unique
    out.mkdir(parents=True, exist_ok=True)
    paths = {kind: out / f"{kind}.parquet" for kind in kinds}
    for kind, path in paths.items():
        writer = None
        for start in range(0, n, block):
            idx = np.arange(start, min(start + block, n)) % len(traces_u[kind])
            t = traces_u[kind].take(idx).set_column(0, "id", pa.array([f"r{i}" for i in range(start, start + len(idx))]))
            writer = writer or pq.ParquetWriter(path, t.schema)
            writer.write_table(t)
        writer.close()
    scores_path = out / "scores.parquet"
    plan = plan_blocks(DataConfig(path=str(paths[kinds[0]])), block)
    provenance = ScoresProvenance("synthetic", "w-synthetic", "float32", topk, tokenizer_fingerprint(tok))
    rows = [b.num_records for b in plan.blocks]
    layout = {"block_records": block, "block_rows": rows, "plan": plan.to_json()}
    meta = {**provenance.to_metadata(), LAYOUT_KEY: json.dumps(layout).encode()}
    writer = None
    for b in plan.blocks:
        idx = np.arange(b.start_record, b.start_record + b.num_records) % len(scores_u)
        ids = pa.array([f"r{i}" for i in range(b.start_record, b.start_record + b.num_records)])
        s = scores_u.take(idx)
        s = pa.table({"id": ids, **{c: s.column(c) for c in s.column_names},
                      "tokenizer_fingerprint": pa.array([provenance.tokenizer_fingerprint] * len(idx))})
        s = s.replace_schema_metadata(meta)
        writer = writer or pq.ParquetWriter(scores_path, s.schema)
        writer.write_table(s)
    writer.close()
    return {"traces": {kind: str(path) for kind, path in paths.items()}, "scores": str(scores_path),
            "blocks": len(plan.blocks), "bytes": {kind: path.stat().st_size + scores_path.stat().st_size
                                                  for kind, path in paths.items()}}


# --------------------------------------------------------------------------- measurement (subprocess)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _PeakRss:
    """Samples this process's resident memory every 2 ms in a thread; ``peak`` is the largest seen."""

    def __init__(self):
        import threading

        self.peak, self._stop = _rss_mib(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss_mib())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _rss_mib())


def worker(spec: dict) -> dict:
    """Run in a fresh process: iterate the data as one process of ``spec['processes']``; report.

    ``spec['code']`` (optional) is a directory holding another version of ``dcd_jax`` to measure.
    ``data_rss_mib`` is the peak resident memory during the data pass minus the resident memory
    just before it (libraries and tokenizer loaded): what the data path itself holds.
    """
    if spec.get("code"):
        sys.path.insert(0, spec["code"])
    from transformers import AutoTokenizer

    from dcd_jax.data import DataConfig, build_train_iterator

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    tok("warm up the tokenizer")
    base_rss = _rss_mib()
    sampler = _PeakRss()
    fields = dict(path=spec["traces"], teacher_scores=spec["scores"], topk=spec["topk"], seq_len=spec["seq_len"],
                  batch_size=spec["batch"] * spec["processes"], streaming=spec["streaming"], num_epochs=1,
                  block_records=spec["block"], cache_dir=str(Path(spec["traces"]).parent / "hf_cache"))
    if spec.get("read_workers"):
        fields["read_workers"] = spec["read_workers"]
    cfg = DataConfig(**fields)
    t0 = time.perf_counter()
    it = build_train_iterator(cfg, tok, process_index=spec["process"], process_count=spec["processes"])
    bounded = spec.get("bounded_blocks", 0) * spec["block"]  # stop once that many records (blocks) were read
    first_tokens, t_first, cpu_first = 0, None, None
    for batch in it:
        if t_first is None:  # steady state starts after the first batch (read workers started, first block read)
            t_first, cpu_first = time.perf_counter(), time.process_time()
            first_tokens = int((batch["segment_ids"] > 0).sum())
        if bounded and it.stats.records_read >= bounded:
            break
    seconds = time.perf_counter() - t0
    steady = time.perf_counter() - t_first if t_first is not None else float("nan")
    steady_cpu = time.process_time() - cpu_first if cpu_first is not None else float("nan")
    peak = sampler.stop()
    s = it.stats
    return {"code": spec.get("code") or "this", "data_rss_mib": peak - base_rss, "peak_rss_mib": peak,
            "base_rss_mib": base_rss, "bytes_read": s.bytes_read, "records": s.records_read,
            "real_tokens": s.real_tokens, "batches": s.batches, "seconds": seconds,
            "steady_tokens_per_s": (s.real_tokens - first_tokens) / steady if steady > 0 else None,
            # CPU time of this process only: not a per-core figure once read workers do the reading
            "steady_tokens_per_cpu_s": (s.real_tokens - first_tokens) / steady_cpu
            if steady_cpu > 0 and not spec.get("read_workers") else None}


def measure(**spec) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}  # one thread: the figure is per core
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                          env=env)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def export_code(ref: str, into: Path) -> str:
    """``dcd_jax`` as of git ``ref``, extracted under ``into`` (the reference measured side by side)."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "dcd_jax"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return str(into)


def hash_cost(n: int = 512) -> dict:
    """Content hashing vs the teacher forward pass of score-teacher, on demo-like traces, side by side.

    The teacher is the demo's (``small`` size, random weights: the cost does not depend on them),
    top-8 as in configs/demo.yaml; the forward pass is timed after its compilation.
    """
    from dcd_jax.convert.model_dir import load_pretrained
    from dcd_jax.data import DataConfig, content_hash, iter_examples
    from dcd_jax.data.synthetic import SyntheticTaskConfig, build_tokenizer, generate_problems, write_jsonl
    from dcd_jax.tiny_models import make_tiny_student
    from dcd_jax.teacher.scoring import ScoreConfig, make_scorer, score_examples
    from dcd_jax.models import abstract_model

    with tempfile.TemporaryDirectory() as d:
        tok = build_tokenizer()
        teacher_dir = make_tiny_student(Path(d) / "teacher", tok, size="small")
        traces = write_jsonl(generate_problems(SyntheticTaskConfig(n_examples=n)), Path(d) / "train.jsonl")
        teacher = load_pretrained(str(teacher_dir))
        tok = teacher.tokenizer()
        examples = list(iter_examples(DataConfig(path=str(traces)), tok, apply_length=False))
        cfg = ScoreConfig(teacher=str(teacher_dir), topk=8, batch_size=16)
        scorer = make_scorer(abstract_model(teacher.cfg)[0], teacher.cfg.tokenizer_vocab_size, cfg.topk, cfg.chunk_size)
        score_examples(scorer, teacher.params, examples, cfg)  # compile every length bucket
        times = {"hash": [], "forward": []}
        for _ in range(3):
            t0 = time.perf_counter()
            for ex in examples:
                content_hash(ex.input_ids, ex.response_mask)
            times["hash"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            score_examples(scorer, teacher.params, examples, cfg)
            times["forward"].append(time.perf_counter() - t0)
    hash_s, forward_s = min(times["hash"]), min(times["forward"])
    return {"examples": len(examples), "tokens": int(sum(ex.num_tokens for ex in examples)),
            "teacher_params": teacher.cfg.num_params, "hash_seconds": hash_s, "forward_seconds": forward_s,
            "hash_over_forward": hash_s / forward_s}


def consumption() -> dict:
    """Tokens/s one host consumes for each ready TPU config: ``tokens_per_step / roofline_step_seconds`` of its plan."""
    out = {}
    for name in TPU_CONFIGS:
        path = ROOT / "bench" / "results" / f"plan_{name}.json"
        plan = json.loads(path.read_text())["plan"]
        hosts = max(1, plan["chips"] // 8)  # v5e: 8 chips per host up to v5e-8 (v5litepod-8)
        out[name] = {"plan": str(path.relative_to(ROOT)), "topology": plan["topology"],
                     "tokens_per_step": plan["tokens_per_step"], "roofline_step_seconds": plan["roofline_step_seconds"],
                     "host_tokens_per_s": plan["tokens_per_step"] / plan["roofline_step_seconds"] / hosts}
    return out


def _median(values: list) -> float:
    import statistics

    return statistics.median(values)


THROUGHPUT_RUNS = {  # name -> (code: reference or this, traces, read_workers)
    "reference_text": ("reference", "text", 0),
    "text": ("this", "text", 0),
    "tokenized": ("this", "tokenized", 0),
    "tokenized_2_workers": ("this", "tokenized", 2),
}


def throughput(work: Path, tok, reference_code: str, n_traces: int, repeats: int) -> dict:
    """Long traces (top-20, seq_len 4096), one process: every run of :data:`THROUGHPUT_RUNS`, interleaved."""
    unique = _unique_traces(tok, 256, topk=20, response_repeats=12, seed=1)
    corpus = write_corpus(work / "long", n_traces, 64, tok, unique, topk=20, kinds=("text", "tokenized"))
    runs: dict[str, list] = {name: [] for name in THROUGHPUT_RUNS}
    for _ in range(repeats):
        for name, (code, kind, workers) in THROUGHPUT_RUNS.items():
            runs[name].append(measure(traces=corpus["traces"][kind], scores=corpus["scores"], topk=20, seq_len=4096,
                                      batch=8, block=64, streaming=True, process=0, processes=1, read_workers=workers,
                                      code=reference_code if code == "reference" else None))
    out = {"mean_tokens_per_trace": unique[2] / 256, "traces": n_traces, "topk": 20, "seq_len": 4096,
           "repeats": repeats, "runs": runs}
    for name, ms in runs.items():
        per_cpu = [m["steady_tokens_per_cpu_s"] for m in ms]
        out[name] = {"tokens_per_s": _median([m["steady_tokens_per_s"] for m in ms]),
                     "tokens_per_cpu_s": None if None in per_cpu else _median(per_cpu),
                     "data_rss_mib": _median([m["data_rss_mib"] for m in ms])}
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--full-max", type=int, default=100_000, help="largest corpus given a 1-process full pass")
    parser.add_argument("--full4-max", type=int, default=1_000_000, help="largest corpus given 4-process full passes")
    parser.add_argument("--block", type=int, default=1024)
    parser.add_argument("--bounded-blocks", type=int, default=8)
    parser.add_argument("--long-traces", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reference", default=REFERENCE, help="git ref of the code measured side by side")
    parser.add_argument("--hash-cost", action="store_true", help="also time content hashing vs the teacher forward")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "data_scale_cpu.json"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    from transformers import AutoTokenizer

    started = time.time()
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="data_scale_"))
    sizes = [int(s) for s in args.sizes.split(",")]
    common = dict(topk=4, seq_len=256, batch=8, block=args.block)
    rows = []
    try:
        reference_code = export_code(args.reference, work / "reference")
        long = throughput(work, tok, reference_code, args.long_traces, args.repeats)
        print(json.dumps({k: v for k, v in long.items() if k != "runs"}), flush=True)
        shutil.rmtree(work / "long")
        unique = _unique_traces(tok, UNIQUE, topk=4, response_repeats=1, seed=0)
        for n in sizes:
            corpus = write_corpus(work / f"n{n}", n, args.block, tok, unique, topk=4, kinds=("tokenized",))
            row = {"traces": n, "corpus_bytes": corpus["bytes"]["tokenized"], "blocks": corpus["blocks"]}
            spec = dict(traces=corpus["traces"]["tokenized"], scores=corpus["scores"], **common)
            row["bounded"] = measure(**spec, streaming=True, process=0, processes=1,
                                     bounded_blocks=args.bounded_blocks)
            if n <= args.full_max:
                row["eager_full"] = measure(**spec, streaming=False, process=0, processes=1)
                row["stream_full_1"] = measure(**spec, streaming=True, process=0, processes=1)
            if n <= args.full4_max:
                row["stream_full_4"] = [measure(**spec, streaming=True, process=p, processes=4) for p in range(4)]
                total = sum(m["bytes_read"] for m in row["stream_full_4"])
                row["byte_shares_4"] = [m["bytes_read"] / total for m in row["stream_full_4"]]
            rows.append(row)
            print(json.dumps(row), flush=True)
            shutil.rmtree(work / f"n{n}")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    consume = consumption()
    small, large = rows[0], rows[-1]
    full4 = [r for r in rows if "stream_full_4" in r]
    summary = {
        "bounded_peak_rss_ratio_largest_vs_smallest": large["bounded"]["peak_rss_mib"] / small["bounded"]["peak_rss_mib"],
        "speedup_vs_reference": {name: long[name]["tokens_per_s"] / long["reference_text"]["tokens_per_s"]
                                 for name in THROUGHPUT_RUNS},
        "speedup_vs_reference_per_cpu_s": {
            name: long[name]["tokens_per_cpu_s"] / long["reference_text"]["tokens_per_cpu_s"]
            for name in THROUGHPUT_RUNS if name != "tokenized_2_workers"},
        "pipeline_over_consumption": {name: {k: long[name]["tokens_per_s"] / v["host_tokens_per_s"]
                                             for k, v in consume.items()} for name in THROUGHPUT_RUNS},
        "pipeline_per_cpu_s_over_consumption": {
            name: {k: long[name]["tokens_per_cpu_s"] / v["host_tokens_per_s"] for k, v in consume.items()}
            for name in THROUGHPUT_RUNS if name != "tokenized_2_workers"},
    }
    if full4:
        first, last = full4[0], full4[-1]
        summary["full_pass_4_byte_shares"] = {r["traces"]: r["byte_shares_4"] for r in full4}
        summary["full_pass_4_peak_rss_ratio_largest_vs_smallest"] = (
            max(m["peak_rss_mib"] for m in last["stream_full_4"]) / max(m["peak_rss_mib"] for m in first["stream_full_4"]))
    full = [r for r in rows if "stream_full_1" in r]
    if full:
        summary["full_pass_peak_rss_stream_vs_eager"] = full[-1]["stream_full_1"]["peak_rss_mib"] / \
            full[-1]["eager_full"]["peak_rss_mib"]
    result = {
        "command": "nice -n 10 python bench/data_scale.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared with 3 other engineers' jobs; this run at "
                   f"nice 10), {platform.python_version()}",
        "config": {**common, "bounded_blocks": args.bounded_blocks, "unique_traces": UNIQUE,
                   "reference": args.reference, "rows_records": "tokenized"},
        "rows": rows, "long": long, "consumption_host": consume, "summary": summary,
        "wall_minutes": (time.time() - started) / 60,
        "notes": "Side by side in one run: reference (git " + args.reference + ") and this code on the same corpus, "
                 "runs interleaved, medians of " + str(args.repeats) + ". One pipeline process, one thread "
                 "(TOKENIZERS_PARALLELISM=false, Arrow use_threads=False) unless read workers are named (2 worker "
                 "processes + the main one, on this 2-core host). tokens_per_cpu_s: the same tokens over the CPU "
                 "seconds of the pipeline process (what one dedicated core needs; the host is shared and busy). "
                 "Consumption: tokens_per_step / roofline_step_seconds of dcd-jax plan (bench/results/plan_*.json), "
                 "per 8-chip host.",
    }
    if args.hash_cost:
        result["hash_cost"] = hash_cost()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\n{'traces':>9} {'blocks':>6} {'bounded peak/data MiB':>21} {'stream full':>11} {'eager full':>10} "
          f"{'4-proc peak MiB':>15} {'4-proc byte shares':>26}")
    nan = float("nan")
    for r in rows:
        shares = r.get("byte_shares_4", [])
        peak4 = max((m["peak_rss_mib"] for m in r.get("stream_full_4", [])), default=nan)
        print(f"{r['traces']:>9} {r['blocks']:>6} {r['bounded']['peak_rss_mib']:>14.0f}/{r['bounded']['data_rss_mib']:<6.0f} "
              f"{r.get('stream_full_1', {}).get('data_rss_mib', nan):>11.0f} "
              f"{r.get('eager_full', {}).get('data_rss_mib', nan):>10.0f} {peak4:>15.0f} "
              f"{' '.join(f'{s:.3f}' for s in shares):>26}")
    print(f"\nthroughput (traces of {long['mean_tokens_per_trace']:.0f} tokens, top-20, seq_len 4096), medians of "
          f"{args.repeats}:")
    for name in THROUGHPUT_RUNS:
        per_cpu = long[name]["tokens_per_cpu_s"]
        print(f"  {name:>20}: {long[name]['tokens_per_s']:>10,.0f} tok/s  {per_cpu or float('nan'):>10,.0f} "
              f"tok/CPU-s  x{summary['speedup_vs_reference'][name]:.2f} vs reference  "
              + "  ".join(f"{k} {v:.2f}x" for k, v in summary["pipeline_over_consumption"][name].items()))
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
