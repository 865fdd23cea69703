"""Data path at corpus scale: host memory, bytes read per process and tokens/s of the streamed pipeline.

Generates synthetic corpora (traces as Parquet, one row group per block, plus teacher scores in
``score-teacher``'s block layout with top-k) of growing size and measures, each in a fresh
subprocess (peak RSS is the process's ``ru_maxrss``):

* **equal work, growing corpus**: the streamed iterator of process 0 of 1 stops once it has read
  ``--bounded-blocks`` blocks (of ``--block`` records) of a 10k / 100k / 1M-trace corpus; peak RSS must not grow with the
  corpus (the eager path, ``data.streaming: false``, is measured side by side as the reference);
* **full passes** (10k and 100k traces) for 1 and 4 processes: bytes each process read and its
  share of all bytes; for 1M traces, the share by the plan (its blocks' row-group sizes);
* **hashing cost**: :func:`dcd_jax.data.content_hash` of demo-like traces next to the teacher
  forward pass ``score-teacher`` runs on them (the demo's ``small`` teacher, top-8);
* **throughput**: a corpus of longer traces (~0.7k tokens, top-20 scores, seq_len 4096) streamed
  by one process (and with 2 read workers), in real tokens/s after the first batch, next to the tokens/s one host of the ready TPU configs consumes
  (v5e-8: 8 chips x 197 TFLOP/s bf16 at 100% MFU over ``flops_per_token`` of
  ``dcd_jax/train/flops.py``'s formula - an upper bound on consumption; ``dcd-jax plan``'s roofline
  step time is not used yet).

The corpora repeat 4096 unique traces (distinct ids) so that scores with correct content hashes
can be written without tokenizing a million records; reading, validation, tokenization, hashing
and packing still run for every record read.

    python bench/data_scale.py [--sizes 10000,100000,1000000] [--quick]

Prints a table; writes bench/results/data_scale_cpu.json (README table: bench/update_readme.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
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
V5E_PEAK, CHIPS_PER_HOST = 197e12, 8
# name -> (config, HF config.json architecture fields of its student)
TPU_CONFIGS = {
    "qwen2.5-0.5b-dcd": dict(vocab_size=151936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                             num_key_value_heads=2, intermediate_size=4864, tie_word_embeddings=True),
    "qwen2.5-1.5b-dcd": dict(vocab_size=151936, hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                             num_key_value_heads=2, intermediate_size=8960, tie_word_embeddings=True),
    "llama3.2-1b-dcd": dict(vocab_size=128256, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                            num_key_value_heads=8, intermediate_size=8192, tie_word_embeddings=True),
}


# --------------------------------------------------------------------------- corpus generation


def _unique_traces(tok, n: int, topk: int, response_repeats: int, seed: int):
    """``n`` unique traces and their fake scores (correct content hashes), as Arrow tables."""
    import numpy as np
    import pyarrow as pa

    from dcd_jax.data import DataConfig, content_hash, iter_examples
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
    return traces, pa.table(columns), int(sum(ex.num_tokens for ex in examples))


def write_corpus(out: Path, n: int, block: int, tok, unique, topk: int) -> dict:
    """Traces (Parquet, a row group per block) and their scores in score-teacher's block layout."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dcd_jax.data import DataConfig, ScoresProvenance, tokenizer_fingerprint
    from dcd_jax.data.shards import plan_blocks
    from dcd_jax.data.teacher_scores import LAYOUT_KEY

    traces_u, scores_u, _ = unique
    out.mkdir(parents=True, exist_ok=True)
    traces_path, scores_path = out / "traces.parquet", out / "scores.parquet"
    writer = None
    for start in range(0, n, block):
        idx = np.arange(start, min(start + block, n)) % len(traces_u)
        t = traces_u.take(idx).set_column(0, "id", pa.array([f"r{i}" for i in range(start, start + len(idx))]))
        writer = writer or pq.ParquetWriter(traces_path, t.schema)
        writer.write_table(t)
    writer.close()
    plan = plan_blocks(DataConfig(path=str(traces_path)), block)
    provenance = ScoresProvenance("synthetic", "w-synthetic", "float32", topk, tokenizer_fingerprint(tok))
    rows = [b.num_records for b in plan.blocks]
    layout = {"block_records": block, "block_rows": rows, "plan": plan.to_json()}
    meta = {**provenance.to_metadata(), LAYOUT_KEY: json.dumps(layout).encode()}
    writer = None
    for b in plan.blocks:
        idx = np.arange(b.start_record, b.start_record + b.num_records) % len(traces_u)
        ids = pa.array([f"r{i}" for i in range(b.start_record, b.start_record + b.num_records)])
        s = scores_u.take(idx)
        s = pa.table({"id": ids, **{c: s.column(c) for c in s.column_names},
                      "tokenizer_fingerprint": pa.array([provenance.tokenizer_fingerprint] * len(idx))})
        s = s.replace_schema_metadata(meta)
        writer = writer or pq.ParquetWriter(scores_path, s.schema)
        writer.write_table(s)
    writer.close()
    return {"traces": str(traces_path), "scores": str(scores_path), "blocks": len(plan.blocks),
            "bytes": traces_path.stat().st_size + scores_path.stat().st_size}


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

    ``data_rss_mib`` is the peak resident memory during the data pass minus the resident memory
    just before it (libraries and tokenizer loaded): what the data path itself holds.
    """
    from transformers import AutoTokenizer

    from dcd_jax.data import DataConfig, build_train_iterator

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    tok("warm up the tokenizer")
    base_rss = _rss_mib()
    sampler = _PeakRss()
    cfg = DataConfig(path=spec["traces"], teacher_scores=spec["scores"], topk=spec["topk"], seq_len=spec["seq_len"],
                     batch_size=spec["batch"] * spec["processes"], streaming=spec["streaming"], num_epochs=1,
                     block_records=spec["block"], cache_dir=str(Path(spec["traces"]).parent / "hf_cache"),
                     read_workers=spec.get("read_workers", 0))
    t0 = time.perf_counter()
    it = build_train_iterator(cfg, tok, process_index=spec["process"], process_count=spec["processes"])
    bounded = spec.get("bounded_blocks", 0) * spec["block"]  # stop once that many records (blocks) were read
    first_tokens, t_first = 0, None
    for batch in it:
        if t_first is None:  # steady state starts after the first batch (read workers started, first block read)
            t_first, first_tokens = time.perf_counter(), int((batch["segment_ids"] > 0).sum())
        if bounded and it.stats.records_read >= bounded:
            break
    seconds = time.perf_counter() - t0
    steady = time.perf_counter() - t_first if t_first is not None else float("nan")
    peak = sampler.stop()
    s = it.stats
    return {"data_rss_mib": peak - base_rss, "peak_rss_mib": peak, "base_rss_mib": base_rss,
            "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "bytes_read": s.bytes_read, "records": s.records_read, "real_tokens": s.real_tokens,
            "batches": s.batches, "seconds": seconds,
            "steady_tokens_per_s": (s.real_tokens - first_tokens) / steady if steady > 0 else None}


def measure(**spec) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def planned_share(corpus: dict, processes: int) -> list[float]:
    """Fraction of all traces + scores bytes in each process's blocks (row-group sizes, from footers)."""
    import pyarrow.parquet as pq

    shares = [0] * processes
    total = 0
    for path in (corpus["traces"], corpus["scores"]):
        meta = pq.ParquetFile(path).metadata
        for g in range(meta.num_row_groups):  # one row group per block in both files
            size = sum(meta.row_group(g).column(c).total_compressed_size for c in range(meta.num_columns))
            shares[g % processes] += size
            total += size
    return [s / total for s in shares]


def hash_cost(n: int = 512) -> dict:
    """Content hashing vs the teacher forward pass of score-teacher, on demo-like traces, side by side.

    The teacher is the demo's (``small`` size, random weights: the cost does not depend on them),
    top-8 as in configs/demo.yaml; the forward pass is timed after its compilation.
    """
    from dcd_jax.convert.model_dir import load_pretrained
    from dcd_jax.data import DataConfig, content_hash, iter_examples
    from dcd_jax.data.synthetic import SyntheticTaskConfig, build_tokenizer, generate_problems, write_jsonl
    from dcd_jax.tiny_models import make_tiny_student
    from dcd_jax.eval.scoring import ScoreConfig, make_scorer, score_examples
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
    """Tokens/s one v5e-8 host consumes for each ready TPU config at 100% MFU (an upper bound)."""
    import yaml

    from dcd_jax.models.config import ModelConfig

    out = {}
    for name, arch in TPU_CONFIGS.items():
        cfg = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
        seq = (cfg.get("data") or {}).get("seq_len") or yaml.safe_load(
            (ROOT / "configs" / cfg["base"]).read_text())["data"]["seq_len"]
        model = ModelConfig.from_hf_config({"model_type": "qwen2" if "qwen" in name else "llama", "rms_norm_eps": 1e-6,
                                            "rope_theta": 1e6, "max_position_embeddings": 32768, **arch})
        fpt = model.flops_per_token(seq)
        out[name] = {"seq_len": seq, "flops_per_token": fpt, "host_tokens_per_s": CHIPS_PER_HOST * V5E_PEAK / fpt}
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--full-max", type=int, default=100_000, help="largest corpus given full passes")
    parser.add_argument("--block", type=int, default=1024)
    parser.add_argument("--bounded-blocks", type=int, default=8)
    parser.add_argument("--long-traces", type=int, default=1000)
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
    unique = _unique_traces(tok, UNIQUE, topk=4, response_repeats=1, seed=0)
    rows = []
    try:
        for n in sizes:
            corpus = write_corpus(work / f"n{n}", n, args.block, tok, unique, topk=4)
            row = {"traces": n, "corpus_bytes": corpus["bytes"], "blocks": corpus["blocks"]}
            spec = dict(traces=corpus["traces"], scores=corpus["scores"], **common)
            row["bounded"] = measure(**spec, streaming=True, process=0, processes=1,
                                     bounded_blocks=args.bounded_blocks)
            row["planned_share_4"] = planned_share(corpus, 4)
            if n <= args.full_max:
                row["eager_full"] = measure(**spec, streaming=False, process=0, processes=1)
                row["stream_full_1"] = measure(**spec, streaming=True, process=0, processes=1)
                row["stream_full_4"] = [measure(**spec, streaming=True, process=p, processes=4) for p in range(4)]
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items()}), flush=True)
            shutil.rmtree(work / f"n{n}")
        long_unique = _unique_traces(tok, 256, topk=20, response_repeats=12, seed=1)
        corpus = write_corpus(work / "long", args.long_traces, 64, tok, long_unique, topk=20)
        long = {"mean_tokens_per_trace": long_unique[2] / 256, "traces": args.long_traces, "topk": 20, "seq_len": 4096}
        for workers in (0, 2):
            m = measure(traces=corpus["traces"], scores=corpus["scores"], topk=20, seq_len=4096, batch=8, block=64,
                        streaming=True, process=0, processes=1, read_workers=workers)
            long[f"read_workers_{workers}"] = m
        long["tokens_per_s"] = long["read_workers_0"]["steady_tokens_per_s"]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    small, large = rows[0], rows[-1]
    consume = consumption()
    hashing = hash_cost()
    summary = {
        "bounded_peak_rss_ratio_largest_vs_smallest": large["bounded"]["peak_rss_mib"] / small["bounded"]["peak_rss_mib"],
        "bounded_data_rss_mib": {r["traces"]: r["bounded"]["data_rss_mib"] for r in rows},
        "pipeline_over_consumption": {k: long["tokens_per_s"] / v["host_tokens_per_s"] for k, v in consume.items()},
    }
    full = [r for r in rows if "stream_full_4" in r]
    if full:
        r = full[-1]
        summary["full_pass_4_process_byte_shares"] = [m["bytes_read"] / r["stream_full_1"]["bytes_read"]
                                                      for m in r["stream_full_4"]]
        summary["full_pass_peak_rss_stream_vs_eager"] = r["stream_full_1"]["peak_rss_mib"] / r["eager_full"]["peak_rss_mib"]
        summary["full_pass_data_rss_mib"] = {x["traces"]: {"stream": x["stream_full_1"]["data_rss_mib"],
                                                           "eager": x["eager_full"]["data_rss_mib"]} for x in full}
    result = {
        "command": "python bench/data_scale.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared, busy), {platform.python_version()}",
        "config": {**common, "bounded_blocks": args.bounded_blocks, "unique_traces": UNIQUE},
        "rows": rows, "long": long, "consumption_v5e8_host": consume, "summary": summary, "hash_cost": hashing,
        "wall_minutes": (time.time() - started) / 60,
        "notes": "consumption = 8 chips x 197 TFLOP/s / flops_per_token (dcd_jax/train/flops.py formula) at 100% MFU, "
                 "an upper bound; dcd-jax plan's roofline step time not used yet. Pipeline: one process, one thread.",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\n{'traces':>9} {'blocks':>6} {'bounded peak/data MiB':>21} {'stream full':>11} {'eager full':>10} "
          f"{'4-proc byte shares':>26}")
    for r in rows:
        shares = [m["bytes_read"] / r["stream_full_1"]["bytes_read"] for m in r["stream_full_4"]] \
            if "stream_full_4" in r else r["planned_share_4"]
        print(f"{r['traces']:>9} {r['blocks']:>6} {r['bounded']['peak_rss_mib']:>14.0f}/{r['bounded']['data_rss_mib']:<6.0f} "
              f"{r.get('stream_full_1', {}).get('data_rss_mib', float('nan')):>11.0f} "
              f"{r.get('eager_full', {}).get('data_rss_mib', float('nan')):>10.0f} "
              f"{' '.join(f'{s:.3f}' for s in shares):>26}")
    print(f"\npipeline {long['tokens_per_s']:,.0f} tok/s (long traces, top-20, one process; "
          f"{long['read_workers_2']['steady_tokens_per_s']:,.0f} with 2 read workers) vs one v5e-8 host at 100% MFU:")
    for k, v in consume.items():
        print(f"  {k}: {v['host_tokens_per_s']:,.0f} tok/s  -> pipeline / consumption = "
              f"{summary['pipeline_over_consumption'][k]:.2f}")
    print(f"\ncontent hashing {hashing['hash_seconds'] * 1e3:.1f} ms vs teacher forward {hashing['forward_seconds']:.2f} s "
          f"for {hashing['examples']} demo traces: ratio {hashing['hash_over_forward']:.4f}")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
