"""Train-step throughput: step time, tokens/s, MFU and peak memory of the jitted train step.

For each model shape and batch ``B x T`` it measures, in one invocation:

* **ours** - the training loop's own jitted step (:func:`dcd_jax.train.step.jit_train_step`)
  (state shardings on a single-device mesh, donated state), for three objectives:
  ``SFT`` (ce / none), ``DCD-CE`` (ce / dcd) and ``DCD-KL`` (kl / dcd, teacher top-20);
* **torch** - the same shape as a ``transformers`` ``Qwen2ForCausalLM`` trained eagerly
  (``loss.backward()`` + ``AdamW.step()``, same clipping, same masked CE, same batch); on CPU
  with its faster thread count (1 or all cores, one probe step each after the warm-up).

Each framework runs in its own subprocess (no two thread pools or allocators in one process).
On CPU the two processes run in lockstep (:func:`run_lockstep`): each is set up alone, then their
timed rounds alternate (ours, torch, then torch, ours, ...), so the ours / torch ratio is measured
side by side in time, not minutes apart on a host whose speed drifts.
Ours: on CPU the three objectives share one process and their timed steps are interleaved
round-robin, the order rotated every round (each objective takes each slot equally often), so
load from other jobs on a shared machine, and the matmul probe between rounds, hit them alike (``--separate`` gives
one process each); on GPU each objective gets its own process (its own peak-memory counter).
Timing: AOT compile (``lower().compile()``, reported as ``compile_s``), one excluded warm-up
call (``first_call_s``), then the median of ``--steps`` calls, each ended by
``jax.block_until_ready`` (torch: ``cuda.synchronize`` on GPU). The batch is synthetic: random
token ids, ``segment_ids = 1``, ``positions = arange``, ``targets`` = the ids shifted by one,
``loss_mask = 1`` on the last 3/4 of each row, random teacher log-probs / distinct top-20 ids.
It is placed on the device once, so host-to-device transfer is not in the step time.
tokens/s counts all ``B * T`` positions.

Profile (CPU, ``--no-profile`` to skip): after the timed steps each of our objectives runs 2 more
steps under ``jax.profiler``; :mod:`op_profile` sums XLA's per-thunk time by op class (matmul,
attention, loss, optimizer, other) and reports host time = call wall time - executable time.
Reference throughput: a jitted fp32 ``[4096 x 512] @ [512 x 2048]`` matmul timed between the same
timed steps (:class:`op_profile.MatmulProbe`); each step's achieved FLOP/s (``flops_per_token`` x tokens/s,
causal attention counted at half) is reported as a fraction of it.

Memory: for ours, XLA's buffer assignment of the compiled step (``memory_analysis()``; peak =
temp + arguments + outputs - aliased, since the donated state's buffers are reused for the new
state), on GPU also the allocator's ``peak_bytes_in_use``. For torch: on GPU
``max_memory_allocated``, on CPU the growth of peak RSS (VmHWM, reset after warm-up) over the
resident size before the model was built. MFU uses :func:`dcd_jax.train.flops.mfu` (``None`` on
CPU: no peak FLOP/s is known for CPUs).

Models: ``tiny`` (the demo student: Qwen2, hidden 64, 2 layers, 4/2 heads, mlp 192, vocab 512,
tied), ``25m`` (Qwen2, hidden 512, 8 layers, 8/4 heads, mlp 1408, vocab 8192, tied),
``qwen2.5-0.5b`` / ``qwen2.5-1.5b`` (the real configs, random weights; GPU only, at
``--gpu-seqs``). On CPU: fp32, no remat. On GPU: bf16 compute, fp32 params, remat
``dots_saveable`` (torch: bf16 autocast, fp32 params, gradient checkpointing).

    python bench/train_step.py                    # CPU default: tiny, demo, 25m; B=8 T=512, 5 steps (9-17 min on 2 cores)
    python bench/train_step.py --quick            # tiny only, B=4 T=128, 3 steps (plumbing check, < 1 min)
    python bench/train_step.py --models qwen2.5-0.5b,qwen2.5-1.5b --gpu-seqs 2048,4096   # on a GPU

Writes a markdown table to stdout and JSON to ``bench/results/train_step_<device>.json``
(``<device>`` = ``cpu`` or the GPU's name slug; ``--quick`` runs add a ``_quick`` suffix).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

# JAX must not grab 75% of the GPU up front: peak_bytes_in_use would then be meaningless, and the
# torch worker shares the card. (No effect on CPU.)
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from dcd_jax import host_memory  # noqa: E402  (a plain module: no JAX import)

MIB = 1024 * 1024
TOPK = 20
QWEN_TRUE_VOCAB = 151665  # Qwen2.5 tokenizer; the embedding has 151936 (padded) rows


def _qwen2(vocab, hidden, layers, heads, kv_heads, mlp, *, tied=True, theta=10000.0, max_pos=4096):
    return {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": mlp, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": theta,
        "max_position_embeddings": max_pos, "tie_word_embeddings": tied, "use_sliding_window": False,
        "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": False,
    }


# name -> (HF config.json dict, true vocabulary, GPU only?)
MODELS = {
    # dcd_jax.tiny_models.STUDENT_SIZES["micro"] (the test suite's student) with a 512-row vocabulary.
    "tiny": (_qwen2(512, 64, 2, 4, 2, 192), 512, False),
    # The demo's and the study's student and teacher (STUDENT_SIZES["tiny"], the demo tokenizer's 512 rows).
    "demo": (_qwen2(512, 128, 4, 4, 2, 384), 512, False),
    "25m": (_qwen2(8192, 512, 8, 8, 4, 1408), 8192, False),
    # Qwen/Qwen2.5-0.5B and Qwen/Qwen2.5-1.5B config.json (architecture fields), random weights.
    "qwen2.5-0.5b": (_qwen2(151936, 896, 24, 14, 2, 4864, theta=1e6, max_pos=32768), QWEN_TRUE_VOCAB, True),
    "qwen2.5-1.5b": (_qwen2(151936, 1536, 28, 12, 2, 8960, theta=1e6, max_pos=131072), QWEN_TRUE_VOCAB, True),
}

OBJECTIVES = {
    "SFT": dict(loss="ce", weighting="none"),
    "DCD-CE": dict(loss="ce", weighting="dcd"),
    "DCD-KL": dict(loss="kl", weighting="dcd"),
}

# Online GKD (dcd_jax.train.online): not in the default objectives; ``--objectives SFT,DCD-KL,GKD-l0,GKD-l1``.
# GKD-l0: every step's batch is the data's, scored by the live teacher (full-vocabulary JSD, beta 0.5);
# GKD-l1: every step first regenerates the batch with the student (T/4 new tokens per row, no EOS,
# temperature 1), then the teacher scores it. A run with lmbda costs about (1 - lmbda) GKD-l0 + lmbda GKD-l1.
GKD_LMBDA = {"GKD-l0": 0.0, "GKD-l1": 1.0}
# The live teacher per student shape (same vocabulary, larger): tiny -> the synthetic "tiny" size,
# demo -> the full demo's teacher (STUDENT_SIZES["small"]), 25m -> ~90M, Qwen2.5-0.5B -> Qwen2.5-1.5B,
# Qwen2.5-1.5B -> itself (self-distillation shape). Every shape in MODELS has one.
GKD_TEACHERS = {
    "tiny": _qwen2(512, 128, 4, 4, 2, 384),
    "demo": _qwen2(512, 256, 6, 8, 4, 768),
    "25m": _qwen2(8192, 768, 12, 12, 4, 2048),
    "qwen2.5-0.5b": MODELS["qwen2.5-1.5b"][0],
    "qwen2.5-1.5b": MODELS["qwen2.5-1.5b"][0],
}


# --------------------------------------------------------------------------------------------
# shared helpers (no jax / torch import)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) so that later peaks exclude e.g. XLA compilation."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def make_batch(b: int, t: int, true_vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The synthetic batch [B, T, ...] with every field any objective here reads."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, true_vocab, (b, t + 1), dtype=np.int32)
    loss_mask = np.zeros((b, t), np.float32)
    loss_mask[:, t // 4:] = 1.0  # the "response": last 3/4 of each row
    # Distinct top-k ids per position: one id from each of K disjoint stripes of the vocabulary,
    # rotated by a random offset (cheap even for a 150k vocabulary).
    stripe = true_vocab // TOPK
    offsets = rng.integers(0, true_vocab, (b, t, 1))
    within = rng.integers(0, stripe, (b, t, TOPK))
    topk_ids = ((offsets + np.arange(TOPK) * stripe + within) % true_vocab).astype(np.int32)
    # Teacher top-k distribution: a random softmax scaled to 0.9 total mass, sorted descending.
    logits = rng.normal(size=(b, t, TOPK)) * 2.0
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs = 0.9 * probs / probs.sum(-1, keepdims=True)
    topk_logprobs = np.sort(np.log(probs), axis=-1)[..., ::-1].astype(np.float32)
    return {
        "input_ids": tokens[:, :-1].copy(),
        "targets": tokens[:, 1:].copy(),
        "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
        "segment_ids": np.ones((b, t), np.int32),
        "loss_mask": loss_mask,
        "teacher_logprobs": np.log(rng.uniform(0.05, 1.0, (b, t))).astype(np.float32),
        "teacher_topk_ids": topk_ids,
        "teacher_topk_logprobs": np.ascontiguousarray(topk_logprobs),
    }


def _timing(times: list[float], usage: list[tuple[float, float, int]] | None = None) -> dict[str, float]:
    """Median / min / mean wall time; with ``usage`` (per-step process CPU seconds, system seconds,
    minor page faults) also their medians: CPU time is what a step costs when other jobs share
    the cores (wall time then includes waiting for them); system time and page faults show the
    kernel's share (e.g. fresh memory mapped for the step's buffers)."""
    out = {"step_s": statistics.median(times), "step_s_min": min(times), "step_s_mean": statistics.fmean(times),
           "step_s_all": times}
    if usage:
        out.update(cpu_s=statistics.median(u[0] for u in usage), sys_s=statistics.median(u[1] for u in usage),
                   minor_page_faults=statistics.median(u[2] for u in usage))
    return out


def _await_turn(spec: dict) -> None:
    """Lockstep mode (:func:`run_lockstep`): block until the driver says this worker's turn has
    come (one ``STEP`` line on stdin), so the jax and torch workers never time a step at once."""
    if spec.get("lockstep"):
        line = sys.stdin.readline().strip()
        if line != "STEP":
            raise SystemExit(f"lockstep: expected STEP from the driver, got {line!r}")


def _end_turn(spec: dict, marker: str = "DONE") -> None:
    if spec.get("lockstep"):
        print(marker, flush=True)


def _usage() -> tuple[float, float, int]:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime, ru.ru_stime, ru.ru_minflt


def _usage_delta(before: tuple[float, float, int]) -> tuple[float, float, int]:
    return tuple(a - b for a, b in zip(_usage(), before))


# --------------------------------------------------------------------------------------------
# workers (each runs in its own process; prints one "RESULT <json>" line)


def jax_worker(spec: dict) -> dict:
    """Compile and time the step for each of ``spec["objectives"]`` on the same model and batch.

    With several objectives, their timed steps are interleaved round-robin with the order rotated
    every round (SFT, DCD-CE, DCD-KL, then DCD-CE, DCD-KL, SFT, ...), so that load from other
    processes on a shared machine hits all of them alike and the DCD / SFT ratios stay meaningful. Returns ``{"objectives": {name: result}, "process": {...}}``.
    """
    import jax

    from dcd_jax.models import ModelConfig, abstract_model, init_params
    from dcd_jax.objectives import ObjectiveConfig, required_batch_fields
    from dcd_jax.objectives.config import LamSchedule
    from dcd_jax.sharding import make_mesh
    from dcd_jax.train.batch import to_global_batch
    from dcd_jax.train.optimizer import OptimConfig, learning_rate_schedule, make_optimizer
    from dcd_jax.train.state import init_train_state, state_shardings
    from dcd_jax.train.step import BATCH_MODEL_FIELDS, jit_train_step

    device = jax.devices()[0]
    rss0 = _rss_bytes()
    hf, true_vocab, _ = MODELS[spec["model"]]
    gpu = device.platform == "gpu"
    cfg = ModelConfig.from_hf_config(
        hf, source=spec["model"], dtype="bfloat16" if gpu else "float32", param_dtype="float32",
        remat="dots_saveable" if gpu else "none", true_vocab_size=true_vocab, attention=spec.get("attention", "einsum"),
    )
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    b, t, steps, warmup = spec["batch"], spec["seq"], spec["steps"], spec["warmup"]

    params = init_params(cfg, seed=0, mesh=mesh)
    graphdef, _, param_axes = abstract_model(cfg)
    optim = OptimConfig(lr=1e-5, schedule="constant")  # AdamW b=(0.9, 0.95), wd 0, clip 1.0
    total_steps = warmup + steps + 1
    tx = make_optimizer(optim, total_steps, params)
    schedule = learning_rate_schedule(optim, total_steps)
    host_batch = make_batch(b, t, true_vocab)

    runs = {}  # name -> dict(compiled, state, batch, out)
    with jax.set_mesh(mesh):
        for name in spec["objectives"]:
            # lam constant: the DCD weights are fully on from step 0 (the default linear warm-up
            # starts at lam = 0, which costs the same compute but reads oddly).
            objective = (ObjectiveConfig(**OBJECTIVES[name], lam=LamSchedule(kind="constant")) if name in OBJECTIVES
                         else gkd_objective(name, t))
            objective.validate()
            init = lambda p, o=objective: init_train_state(p, tx, 0, o.needs_reference_model)  # noqa: E731
            abstract_state = jax.eval_shape(init, params)
            shardings = state_shardings(mesh, param_axes, abstract_state, tx)
            state = jax.jit(init, out_shardings=shardings)(params)  # fresh buffers: params stay valid
            fields = set(BATCH_MODEL_FIELDS) | required_batch_fields(objective)
            batch = to_global_batch({k: v for k, v in host_batch.items() if k in fields}, mesh, accum=1)
            step_fn = jit_train_step(graphdef, objective, tx, schedule, true_vocab, shardings, mesh)
            if name in GKD_LMBDA:
                step_fn, batch = gkd_step(spec, cfg, graphdef, objective, tx, schedule, shardings, mesh, batch)
            out: dict = {"batch_fields": sorted(fields), "dtype": cfg.dtype, "param_dtype": cfg.param_dtype,
                         "remat": cfg.remat, "attention": cfg.attention, "chunk_size": objective.chunk_size}
            t0 = time.perf_counter()
            compiled = step_fn.lower(state, batch).compile()
            out["compile_s"] = time.perf_counter() - t0
            mem = compiled.memory_analysis()
            if mem is not None:
                out.update(
                    temp_mib=mem.temp_size_in_bytes / MIB, argument_mib=mem.argument_size_in_bytes / MIB,
                    output_mib=mem.output_size_in_bytes / MIB, alias_mib=mem.alias_size_in_bytes / MIB,
                    peak_mib=(mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
                              - mem.alias_size_in_bytes) / MIB,
                )
            t0 = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready((state, metrics))
            out["first_call_s"] = time.perf_counter() - t0
            for _ in range(warmup - 1):
                state, metrics = compiled(state, batch)
                jax.block_until_ready((state, metrics))
            runs[name] = {"compiled": compiled, "state": state, "batch": batch, "out": out, "times": []}
            print(f"   [{name}] compiled in {out['compile_s']:.1f} s", file=sys.stderr, flush=True)
        del params

        from op_profile import MatmulProbe

        probe = MatmulProbe() if not gpu else None
        rss_marks = (_peak_rss_bytes(), _rss_bytes(), _reset_peak_rss())
        names = list(runs)
        _end_turn(spec, "READY")
        for i in range(steps):
            _await_turn(spec)
            # Rotated round-robin: round i starts at objective i mod n, so every objective takes
            # every slot equally often. A fixed order is biased: the step right after the matmul
            # probe ran 4-5% faster than the others on the 2-core AVX-512 host (same step, measured).
            for name in names[i % len(names):] + names[:i % len(names)]:
                r = runs[name]
                u0, t0 = _usage(), time.perf_counter()
                r["state"], r["metrics"] = r["compiled"](r["state"], r["batch"])
                jax.block_until_ready((r["state"], r["metrics"]))
                r["times"].append(time.perf_counter() - t0)
                r.setdefault("usage", []).append(_usage_delta(u0))
            if probe is not None:  # the reference throughput, measured between the same steps
                probe.measure()
            _end_turn(spec)
        profiles = {}
        if spec.get("profile") and not gpu:
            from op_profile import profile_compiled

            for name, r in runs.items():
                profiles[name] = profile_compiled(r["compiled"], (r["state"], r["batch"]), calls=2)
                r["state"] = None  # donated into the profiled calls

    result = {"objectives": {}, "process": {"objectives": list(runs), "interleaved": len(runs) > 1}}
    if probe is not None:
        result["process"]["xla_matmul"] = probe.summary()
    for name, r in runs.items():
        out = r["out"]
        out.update(_timing(r["times"], r.get("usage")))
        out["loss"] = float(r["metrics"]["loss"])
        if name in profiles:
            out["profile"] = profiles[name]
        result["objectives"][name] = out
    stats = device.memory_stats() if gpu else None
    if stats and "peak_bytes_in_use" in stats:
        result["process"]["device_peak_mib"] = stats["peak_bytes_in_use"] / MIB
    if not gpu:
        _add_rss(result["process"], rss0, rss_marks)
    return result


def gkd_objective(name: str, seq: int):
    """The GKD objective of a bench row (``GKD_LMBDA``): beta 0.5, T/4 rollout tokens."""
    from dcd_jax.objectives import ObjectiveConfig
    from dcd_jax.objectives.config import GKDConfig

    gkd = GKDConfig(lmbda=GKD_LMBDA[name], beta=0.5, max_new_tokens=seq // 4, teacher_path="(random weights)")
    return ObjectiveConfig(loss="gkd", weighting="none", gkd=gkd)


def gkd_step(spec, cfg, graphdef, objective, tx, schedule, shardings, mesh, batch):
    """The jitted GKD step and its batch for the timing loop: ``step(state, batch)`` with the frozen
    teacher's params (random, the student's dtypes, on the same mesh) carried in ``batch`` so that
    they are arguments of the compiled step (counted in its memory), not constants."""
    import dataclasses

    import jax

    from dcd_jax.models import ModelConfig, abstract_model, init_params
    from dcd_jax.train.online import make_gkd_train_step

    _, true_vocab, _ = MODELS[spec["model"]]
    teacher_cfg = ModelConfig.from_hf_config(GKD_TEACHERS[spec["model"]], source="teacher", true_vocab_size=true_vocab)
    teacher_cfg = dataclasses.replace(teacher_cfg, dtype=cfg.dtype, param_dtype=cfg.dtype, attention=cfg.attention)
    teacher_params = init_params(teacher_cfg, seed=1, mesh=mesh)
    fn = make_gkd_train_step(graphdef, abstract_model(teacher_cfg)[0], objective, tx, schedule, true_vocab,
                             eos_ids=(), pad_id=0)

    def step(state, batch):
        batch = dict(batch)
        return fn(state, batch, batch.pop("gkd_teacher_params"))

    jitted = jax.jit(step, in_shardings=(shardings, None), out_shardings=(shardings, None), donate_argnums=0)
    return jitted, {**batch, "gkd_teacher_params": teacher_params}


def gkd_ratios(results: dict, sft_step_s: float | None) -> dict:
    return {f"{name}_over_sft_step_time": results[f"ours {name}"]["step_s"] / sft_step_s
            for name in GKD_LMBDA if sft_step_s and "step_s" in results.get(f"ours {name}", {})}


def _add_rss(out: dict, rss0: int, marks: tuple[int, int, bool]) -> None:
    """RSS growth over the pre-model baseline: peak during the timed steps (the step's footprint:
    params, optimizer state, batch, activations, plus whatever the warm-up left resident, e.g.
    XLA's compiler heap), the resident size just before them, and the whole-run peak."""
    peak_before, resident_before, reset_ok = marks
    peak = _peak_rss_bytes()
    out["rss_before_timed_mib"] = (resident_before - rss0) / MIB
    out["rss_peak_incl_warmup_mib"] = (max(peak, peak_before) - rss0) / MIB
    out["rss_delta_mib"] = (peak - rss0) / MIB if reset_ok else None


def torch_worker(spec: dict) -> dict:
    import torch
    import torch.nn.functional as F
    import transformers
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if spec["platform"] == "gpu" and not torch.cuda.is_available():
        return {"skipped": f"torch {torch.__version__} has no CUDA here; no GPU baseline"}
    dev = torch.device("cuda" if spec["platform"] == "gpu" else "cpu")
    gpu = dev.type == "cuda"
    threads = _cpu_count()
    torch.set_num_threads(threads)
    rss0 = _rss_bytes()
    hf, true_vocab, _ = MODELS[spec["model"]]
    b, t, steps, warmup = spec["batch"], spec["seq"], spec["steps"], spec["warmup"]
    torch.manual_seed(0)
    config = Qwen2Config(**{k: v for k, v in hf.items() if k not in ("architectures", "model_type")})
    model = Qwen2ForCausalLM(config).to(dev)  # fp32 parameters
    model.train()
    if gpu:
        model.gradient_checkpointing_enable()  # the counterpart of remat on GPU
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    host = make_batch(b, t, true_vocab)
    ids = torch.from_numpy(host["input_ids"]).long().to(dev)
    pos = torch.from_numpy(host["positions"]).long().to(dev)
    labels = torch.from_numpy(np.where(host["loss_mask"] > 0, host["targets"], -100)).long().to(dev)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=gpu):
            logits = model(input_ids=ids, position_ids=pos).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    def sync():
        if gpu:
            torch.cuda.synchronize()

    if gpu:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    step()
    sync()
    out: dict = {"first_call_s": time.perf_counter() - t0}
    for _ in range(warmup - 1):
        step()
    sync()
    if not gpu and threads > 1:
        # torch's OpenMP pool can be several times slower with all cores than with one when other
        # jobs share them: the reference gets its faster thread count (one probe step each).
        probes = {}
        for n in (1, threads):
            torch.set_num_threads(n)
            t0 = time.perf_counter()
            step()
            probes[n] = time.perf_counter() - t0
        threads = min(probes, key=probes.get)
        torch.set_num_threads(threads)
        out["thread_probe_step_s"] = probes
    rss_marks = (_peak_rss_bytes(), _rss_bytes(), _reset_peak_rss())
    times, usage = [], []
    _end_turn(spec, "READY")
    for _ in range(steps):
        _await_turn(spec)
        u0, t0 = _usage(), time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)
        usage.append(_usage_delta(u0))
        _end_turn(spec)
    out.update(_timing(times, usage))
    out.update(loss=float(loss), threads=threads, torch=torch.__version__, transformers=transformers.__version__,
               attn_implementation=getattr(model.config, "_attn_implementation", None),
               dtype="bfloat16 autocast" if gpu else "float32", gradient_checkpointing=gpu)
    if gpu:
        out["device_peak_mib"] = torch.cuda.max_memory_allocated() / MIB
        out["device_name"] = torch.cuda.get_device_name()
    else:
        _add_rss(out, rss0, rss_marks)
    return out


def _worker_main(kind: str, spec_json: str) -> int:
    spec = json.loads(spec_json)
    result = jax_worker(spec) if kind == "jax" else torch_worker(spec)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


class _Worker:
    """A worker process: its stdout lines arrive on a queue, its stderr is echoed live (indented)
    with the last lines kept for errors. :func:`run_worker` lets it run to its result;
    :func:`run_lockstep` drives it round by round over stdin."""

    def __init__(self, kind: str, spec: dict):
        import queue
        import threading

        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--spec", json.dumps(spec)]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.kind, self.t0, self.lines = kind, time.perf_counter(), queue.Queue()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env, cwd=ROOT)
        self.tail = []

        def pump_out():
            for line in self.proc.stdout:
                self.lines.put(line.rstrip("\n"))
            self.lines.put(None)  # EOF

        def pump_err():
            for line in self.proc.stderr:
                self.tail = (self.tail + [line.rstrip()])[-8:]
                print("      " + line.rstrip(), file=sys.stderr, flush=True)

        threading.Thread(target=pump_out, daemon=True).start()
        threading.Thread(target=pump_err, daemon=True).start()

    def wait_for(self, marker: str, deadline: float) -> str | None:
        """Read stdout lines until one starts with ``marker``; None on EOF or past the deadline."""
        import queue

        while True:
            try:
                line = self.lines.get(timeout=max(deadline - time.perf_counter(), 0.01))
            except queue.Empty:
                return None
            if line is None or line.startswith(marker):
                return line

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def error(self, why: str) -> dict:
        if self.proc.poll() is None:
            self.proc.kill()
        return {"error": f"{self.kind} worker {why}: " + " | ".join(self.tail),
                "worker_wall_s": time.perf_counter() - self.t0}

    def result(self, deadline: float) -> dict:
        """The worker's ``RESULT`` (with its wall time), or an error saying why there is none."""
        self.proc.stdin.close()
        line = self.wait_for("RESULT ", deadline)
        if line is None:  # end of output (the process is ending) or past the deadline
            try:
                code = self.proc.wait(timeout=min(max(deadline - time.perf_counter(), 0.1), 10.0))
            except subprocess.TimeoutExpired:
                return self.error(f"timed out after {time.perf_counter() - self.t0:.0f} s")
            return self.error(f"exited with {code} and no result")
        self.proc.wait()
        res = json.loads(line[len("RESULT "):])
        res["worker_wall_s"] = time.perf_counter() - self.t0
        return res


def run_worker(kind: str, spec: dict, timeout: float) -> dict:
    """Run one worker process on its own to its result (see :class:`_Worker`)."""
    return _Worker(kind, spec).result(time.perf_counter() + timeout)


def run_lockstep(specs: dict[str, dict], steps: int, timeout: float) -> dict[str, dict]:
    """The jax and torch workers timed in alternation: each is set up (compile, warm-up, torch's
    thread probe) alone, then every round runs one timed round of each, the order alternating, so
    load that comes and goes on a shared host hits both sides alike and their ratio holds. Returns
    ``{kind: result}`` as :func:`run_worker` would."""
    deadline = time.perf_counter() + timeout
    workers, out = {}, {}
    for kind, spec in specs.items():  # one at a time: setups never overlap each other or a timed step
        w = _Worker(kind, {**spec, "lockstep": True})
        if w.wait_for("READY", deadline) is None:
            out[kind] = w.error("was not ready")
            continue
        workers[kind] = w
    order = list(workers)
    for i in range(steps):
        for kind in order[i % len(order):] + order[:i % len(order)] if order else []:
            if kind in out:
                continue
            workers[kind].send("STEP")
            if workers[kind].wait_for("DONE", deadline) is None:
                out[kind] = workers[kind].error(f"stopped in timed round {i}")
    for kind, w in workers.items():
        if kind not in out:
            out[kind] = w.result(deadline)
    return out


# --------------------------------------------------------------------------------------------
# driver


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "device"


def _fmt(x, spec=".3f", none="-"):
    return none if x is None else format(x, spec)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model only, B=4 T=128, 3 timed steps")
    ap.add_argument("--models", default=None,
                    help=f"comma-separated subset of {','.join(MODELS)} (default: tiny,demo,25m on CPU, all on GPU)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per measurement (default 5 CPU, 10 GPU, 3 quick)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls after compile (>= 1; the first is reported)")
    ap.add_argument("--batch", type=int, default=None,
                    help="rows per step (default: 8 for tiny/25m, 4 with --quick; 16384 // T for the Qwen2.5 shapes)")
    ap.add_argument("--seq", type=int, default=None,
                    help="sequence length for every model (default: 512 for tiny/25m, 128 with --quick; --gpu-seqs for Qwen2.5)")
    ap.add_argument("--gpu-seqs", default="2048,4096", help="sequence lengths for the Qwen2.5 shapes (GPU only)")
    ap.add_argument("--objectives", default=",".join(OBJECTIVES), help="subset of " + ",".join(OBJECTIVES))
    ap.add_argument("--attention", choices=("einsum", "xla", "cudnn"), default="einsum",
                    help="our step's attention kernel (cudnn: cuDNN flash attention, NVIDIA GPUs only)")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    ap.add_argument("--no-profile", action="store_true",
                    help="skip the per-op-class profile of our step (CPU; bench/op_profile.py)")
    ap.add_argument("--separate", action="store_true",
                    help="one process per objective on CPU too (default on CPU: one process, interleaved timed steps)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per worker process")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/train_step_<device>.json)")
    ap.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return _worker_main(args.worker, args.spec)
    if args.warmup < 1:
        ap.error("--warmup must be >= 1 (the first call is never timed)")

    import flax
    import jax
    import optax

    from dcd_jax.models import ModelConfig
    from dcd_jax.train.flops import mfu, peak_flops_per_device

    device = jax.devices()[0]
    plat = device.platform
    gpu = plat == "gpu"
    device_name = "cpu" if plat == "cpu" else _slug(device.device_kind)
    models = (args.models or ("tiny" if args.quick else "tiny,demo,25m,qwen2.5-0.5b,qwen2.5-1.5b" if gpu else "tiny,demo,25m"))
    models = [m.strip() for m in models.split(",") if m.strip()]
    for m in models:
        if m not in MODELS:
            ap.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    objectives = [o.strip() for o in args.objectives.split(",") if o.strip()]
    for o in objectives:
        if o not in OBJECTIVES and o not in GKD_LMBDA:
            ap.error(f"unknown objective {o!r}; choose from {', '.join([*OBJECTIVES, *GKD_LMBDA])}")
    steps = args.steps or (3 if args.quick else 10 if gpu else 5)
    notes: list[str] = []
    if not gpu:
        notes.append("MFU: n/a (no peak FLOP/s for CPU)")

    # The plan: (model, B, T) triples.
    plan = []
    for m in models:
        _, _, gpu_only = MODELS[m]
        if gpu_only and not gpu:
            msg = f"{m}: skipped - the Qwen2.5 shapes run only on a GPU (platform here: {plat})"
            print(msg, file=sys.stderr)
            notes.append(msg)
            continue
        if gpu_only:
            seqs = [args.seq] if args.seq else [int(s) for s in args.gpu_seqs.split(",")]
            for t in seqs:
                plan.append((m, args.batch or max(1, 16384 // t), t))
        else:
            plan.append((m, args.batch or (4 if args.quick else 8), args.seq or (128 if args.quick else 512)))

    load_start = os.getloadavg()
    if load_start[0] > 0.5 * _cpu_count() and not gpu:
        msg = (f"1-min load average {load_start[0]:.1f} on {_cpu_count()} CPUs at start: other processes are "
               "running, timings (torch's OpenMP threads especially) will be noisy")
        print("WARNING: " + msg, file=sys.stderr)
        notes.append(msg)
    runs = []
    t_start = time.perf_counter()
    for m, b, t in plan:
        hf, true_vocab, _ = MODELS[m]
        cfg = ModelConfig.from_hf_config(hf, source=m, true_vocab_size=true_vocab)
        fpt = cfg.flops_per_token(t)
        tokens = b * t
        print(f"== {m}: {cfg.num_params:,} params, B={b} T={t} ({tokens} tokens/step), {steps} timed steps",
              file=sys.stderr, flush=True)
        spec = {"model": m, "batch": b, "seq": t, "steps": steps, "warmup": args.warmup, "platform": plat,
                "attention": args.attention, "profile": not args.no_profile}
        entry = {"model": m, "num_params": cfg.num_params, "batch": b, "seq": t, "tokens_per_step": tokens,
                 "flops_per_token": fpt, "hf_config": hf, "true_vocab_size": true_vocab, "results": {}}
        if any(o in GKD_LMBDA for o in objectives):
            entry["gkd_teacher_params"] = ModelConfig.from_hf_config(GKD_TEACHERS[m], source="teacher").num_params
        # ours: on CPU all objectives in one process, timed steps interleaved; on GPU (or with
        # --separate) one process per objective, so each gets its own peak-memory counter.
        groups = [[o] for o in objectives] if (gpu or args.separate) else [objectives]
        # On CPU the jax process and the torch reference run in lockstep, alternating timed rounds.
        lockstep = len(groups) == 1 and not args.no_torch
        if lockstep:
            both = run_lockstep({"jax": {**spec, "objectives": groups[0]}, "torch": spec}, steps, 2 * args.timeout)
        for group in groups:
            res = both["jax"] if lockstep else run_worker("jax", {**spec, "objectives": group}, args.timeout)
            if "objectives" not in res:
                for o in group:
                    entry["results"][f"ours {o}"] = res
                continue
            proc = {**res["process"], "worker_wall_s": res["worker_wall_s"]}
            entry.setdefault("jax_processes", []).append(proc)
            for o, r in res["objectives"].items():
                if len(group) == 1 and "device_peak_mib" in proc:
                    r["device_peak_mib"] = proc["device_peak_mib"]
                entry["results"][f"ours {o}"] = r
        if not args.no_torch:
            entry["results"]["torch SFT"] = both["torch"] if lockstep else run_worker("torch", spec, args.timeout)
        entry["lockstep_with_torch"] = lockstep
        for label, res in entry["results"].items():
            if "step_s" in res:
                res["tokens_per_s"] = tokens / res["step_s"]
                res["mfu"] = mfu(fpt, res["tokens_per_s"], num_devices=1)
                print(f"   {label:<12} step {res['step_s']:.3f} s  {res['tokens_per_s']:,.0f} tok/s  "
                      f"loss {res['loss']:.3f}" + (f"  (compile {res['compile_s']:.1f} s)" if "compile_s" in res else ""),
                      file=sys.stderr)
            else:
                print(f"   {label:<12} {res.get('error') or res.get('skipped')}", file=sys.stderr)
        r = entry["results"]
        matmul = next((p["xla_matmul"] for p in entry.get("jax_processes", []) if "xla_matmul" in p), None)
        for label, res in r.items():
            if label.startswith("ours") and "tokens_per_s" in res:
                res["achieved_flops_per_s"] = fpt * res["tokens_per_s"]
                res["fraction_of_xla_matmul"] = res["achieved_flops_per_s"] / matmul["flops_per_s"] if matmul else None
        sft = r.get("ours SFT", {}).get("step_s")
        torch_tps = r.get("torch SFT", {}).get("tokens_per_s")
        entry["ratios"] = {
            "ours_vs_torch_tokens_per_s": (r["ours SFT"]["tokens_per_s"] / torch_tps) if sft and torch_tps else None,
            # The same comparison in process CPU time per step (load-robust: excludes waiting for other jobs).
            "ours_vs_torch_cpu_time_throughput": (r["torch SFT"]["cpu_s"] / r["ours SFT"]["cpu_s"])
            if r.get("ours SFT", {}).get("cpu_s") and r.get("torch SFT", {}).get("cpu_s") else None,
            "dcd_ce_over_sft_step_time": (r["ours DCD-CE"]["step_s"] / sft)
            if sft and "step_s" in r.get("ours DCD-CE", {}) else None,
            "dcd_kl_over_sft_step_time": (r["ours DCD-KL"]["step_s"] / sft)
            if sft and "step_s" in r.get("ours DCD-KL", {}) else None,
            **gkd_ratios(r, sft),
            "ours_sft_flops_over_xla_matmul": r.get("ours SFT", {}).get("fraction_of_xla_matmul"),
        }
        runs.append(entry)
    total_s = time.perf_counter() - t_start

    # ---- report
    mem_col = "device peak MiB" if gpu else "peak MiB"
    print(f"\n### Train step, {device.device_kind} ({plat}), jax {jax.__version__}; {steps} timed steps (median)\n")
    print(f"| model | params | B x T | run | compile s | step s | tokens/s | MFU | {mem_col} | ratio |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|---|")
    for e in runs:
        for label, res in e["results"].items():
            if "step_s" not in res:
                why = res.get("error") or res.get("skipped")
                print(f"| {e['model']} | {e['num_params'] / 1e6:.2f}M | {e['batch']} x {e['seq']} | {label} "
                      f"| - | - | - | - | - | {why[:80]} |")
                continue
            if gpu:
                mem = _fmt(res.get("device_peak_mib"), ".0f")
                if "peak_mib" in res:
                    mem += f" (XLA {res['peak_mib']:.0f})"
            elif "peak_mib" in res:
                mem = f"{res['peak_mib']:.0f} (XLA)"
            else:
                mem = f"{_fmt(res.get('rss_delta_mib'), '.0f')} (RSS+)"
            mfu_s = "n/a" if res["mfu"] is None else f"{res['mfu']:.1%}"
            ratio = ""
            ra = e["ratios"]
            if label == "ours SFT" and ra["ours_vs_torch_tokens_per_s"]:
                ratio = f"{ra['ours_vs_torch_tokens_per_s']:.2f}x torch tok/s"
            elif label == "ours DCD-CE" and ra["dcd_ce_over_sft_step_time"]:
                ratio = f"{ra['dcd_ce_over_sft_step_time']:.2f}x SFT step time"
            elif label == "ours DCD-KL" and ra["dcd_kl_over_sft_step_time"]:
                ratio = f"{ra['dcd_kl_over_sft_step_time']:.2f}x SFT step time"
            elif ra.get(f"{label[5:]}_over_sft_step_time"):
                ratio = f"{ra[label[5:] + '_over_sft_step_time']:.2f}x SFT step time"
            print(f"| {e['model']} | {e['num_params'] / 1e6:.2f}M | {e['batch']} x {e['seq']} | {label} "
                  f"| {_fmt(res.get('compile_s'), '.1f')} | {res['step_s']:.4f} | {res['tokens_per_s']:,.0f} "
                  f"| {mfu_s} | {mem} | {ratio} |")
    print()
    profiled = [(e, label, res["profile"]) for e in runs for label, res in e["results"].items() if "profile" in res]
    if profiled:
        from op_profile import CLASSES

        print("Time by op class of our step (jax.profiler trace of 2 calls, XLA thunk time per class as a share of "
              "the summed thunk time; host = call wall time - executable time; bench/op_profile.py):\n")
        print("| model | run | wall s | host s | " + " | ".join(CLASSES) + " | achieved GFLOP/s | / XLA matmul |")
        print("|---|---|---:|---:|" + "---:|" * len(CLASSES) + "---:|---:|")
        for e, label, prof in profiled:
            res = e["results"][label]
            shares = " | ".join(f"{prof['by_class_fraction'].get(c, 0.0):.0%}" for c in CLASSES)
            print(f"| {e['model']} | {label} | {prof['wall_s']:.3f} | {prof['host_s']:.3f} | {shares} "
                  f"| {res['achieved_flops_per_s'] / 1e9:.1f} | {_fmt(res.get('fraction_of_xla_matmul'), '.2f')} |")
        for e in runs:
            mm = next((p["xla_matmul"] for p in e.get("jax_processes", []) if "xla_matmul" in p), None)
            if mm:
                print(f"\n{e['model']}: XLA fp32 matmul {mm['shape'][0]}x{mm['shape'][1]} @ {mm['shape'][1]}x"
                      f"{mm['shape'][2]} measured between the same timed steps: {mm['flops_per_s'] / 1e9:.1f} GFLOP/s "
                      f"(median of {mm['calls']}).", end="")
        print("\n")
    if not gpu:
        print("Memory on CPU: (XLA) = temp + arguments + outputs - aliased (the donated state) from "
              "compiled.memory_analysis(), the step's exact buffer footprint; (RSS+) = the torch worker's peak RSS "
              "during the timed steps minus its resident size before the model was built (params, AdamW state, "
              "activations, allocator slack). Our processes' RSS (in the JSON) also holds XLA's compiler heap.")
    if gpu:
        print("Memory on GPU: device peak = the allocator's peak_bytes_in_use in that objective's own process "
              "(torch: torch.cuda.max_memory_allocated); (XLA ...) = memory_analysis() of the compiled step.")
    if not gpu and not args.separate and len(objectives) > 1:
        print(f"Ours: {', '.join(objectives)} ran in one process with their timed steps interleaved round-robin, the order rotated every round.")
    for n in notes:
        print(f"Note: {n}")
    print(f"Total benchmark wall time: {total_s:.0f} s")

    import torch
    import transformers

    device_key = device_name + ("_quick" if args.quick else "")
    out_path = args.out or ROOT / "bench" / "results" / f"train_step_{device_key}.json"
    from op_profile import host_cpu

    result = {
        "command": "python bench/train_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": {"platform": plat, "device_kind": device.device_kind, "name": device_name,
                   "peak_bf16_flops": peak_flops_per_device(device), "cpu_count": _cpu_count(),
                   "machine": platform.platform(), "processor": platform.processor(),
                   "cpu": host_cpu()},
        "versions": {"python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
                     "optax": optax.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "numpy": np.__version__},
        "settings": {"quick": args.quick, "steps": steps, "warmup": args.warmup, "objectives": objectives,
                     "topk": TOPK, "loss_mask": "last 3/4 of each row",
                     "ours_layout": ("one process per objective" if (gpu or args.separate)
                                     else "one process, objectives' timed steps interleaved round-robin, order rotated every round"),
                     "batch_on_device": "placed once before timing (no host-to-device copy in the step time)",
                     "precision": ("bf16 compute, fp32 params, remat dots_saveable" if gpu
                                   else "fp32 compute and params, no remat"),
                     "optimizer": "AdamW lr 1e-5 constant, betas (0.9, 0.95), eps 1e-8, wd 0, clip 1.0 (both)",
                     "tokens_per_s": "B*T (all positions) / median step time"},
        "host_allocator": host_memory.active(),
        "notes": notes,
        "total_wall_s": total_s,
        "load_average_1_5_15": {"start": load_start, "end": os.getloadavg()},
        "runs": runs,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    host_memory.reexec_with_hugepage_malloc()  # the allocator `dcd-jax` runs with; both workers inherit it
    sys.exit(main())
