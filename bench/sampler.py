"""Decode throughput of the eval sampler vs transformers ``generate``, same model, same hardware.

Builds a random-weight Qwen2-shaped model (default ~33M parameters: hidden 512, 8 layers, 8 heads
/ 2 KV heads, MLP 896, vocabulary 32000, tied embeddings) with transformers + torch, saves it to a
temporary directory and loads that checkpoint with ``dcd_jax.load_hf``, so both sides run the
same weights. For each batch size, both generate greedily from the same 16-token prompts with EOS
disabled, side by side in this one process.

Decode tokens/s excludes the prefill: each side is timed generating N and 1 new tokens, and
    decode tok/s = batch * (N - 1) / (t(N) - t(1)).
(t(1) is the prompt's prefill plus the first sampled token.) Timings are the median of
``--repeats`` rounds after a warm-up (which includes our compilation); each round times both
sides, their order alternating between rounds, so the ratio is measured side by side in time.
transformers runs with its best torch thread count (1 or all cores, chosen per batch size): on a
loaded 2-core machine torch's OpenMP pool can be several times slower with 2 threads than with 1.

On CPU, two host limits, each measured side by side with our decode step (``--pair-rounds``
rounds of: the reference probe, then one t(N) and one t(1) of ours; the median of the rounds'
fractions is reported, since this host's speed swings by tens of percent between seconds):
  * batch 1: (param + KV bytes) / step time as a fraction of the bandwidth a jitted matvec over
    256 MiB of fp32 weights streams on this host;
  * every batch: the matmul floor, the time of the step's matmuls alone (:func:`matmul_chain_probe`:
    the same weight shapes and decode layouts, chained, no attention / norms / sampling) over our
    whole step's time. 100% would mean everything but XLA's own dots costs nothing; the rest of a
    gap to the bandwidth or to transformers is then the speed of XLA:CPU's dot kernels here;
  * every batch: XLA's best fp32 matmul rate here (a large matmul) and the step time if every FLOP
    ran at it; with transformers, the speed ratio of the two steps' matmuls alone (ours through XLA,
    theirs through torch as its layers run them; :func:`torch_matmul_chain_probe`);
  * batch 1: the step's matrices, each streamed at the rate a chain of products of its own shape
    reaches (:func:`shape_stream_probe`), as a share of the large-matvec bandwidth.
``--eos`` times whole generate calls instead, with rows ending at different steps
(:func:`eos_rows`): transformers decodes every row until the last one ends, our loop drops
finished rows.
On GPU, batch 1 also reports the fraction of the HBM-bandwidth roofline: a decode step must read
every parameter once (the tied embedding once, as the unembedding) plus the KV cache; our loop
attends over the whole fixed-size cache (prompt + N - 1 slots) every step, so it reads all of it:
    bytes/step = param bytes + 2 * layers * cache_slots * kv_heads * head_dim * dtype bytes
    fraction   = bytes/step / step time / peak bandwidth (table PEAK_HBM_BYTES_PER_S below).

Each batch size is also profiled (``--no-profile`` to skip): one generate call under
``jax.profiler``, XLA's thunk time summed by op class (matmul, attention over the KV cache,
sampling, other) by ``bench/op_profile.py``.

    python bench/sampler.py [--quick] [--batches 1,16,64] [--new-tokens 32] [--dtype float32] [--eos]

Writes a table to stdout and JSON to bench/results/sampler_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import dcd_jax  # noqa: E402
from dcd_jax import host_memory  # noqa: E402
from dcd_jax.infer.sampler import Sampler, SamplingConfig  # noqa: E402
from dcd_jax.models.transformer import dense  # noqa: E402

# Peak HBM bandwidth (bytes/s) from vendor data sheets, matched by substring of device_kind
# (first match wins, so more specific names come first).
PEAK_HBM_BYTES_PER_S = {
    "H200": 4.8e12,
    "H100 PCIe": 2.0e12,
    "H100": 3.35e12,  # SXM (HBM3)
    "GH200": 4.0e12,
    "A100-SXM4-80GB": 2.039e12,
    "A100 80GB": 1.935e12,  # PCIe 80GB
    "A100": 1.555e12,  # 40GB
    "L40S": 0.864e12,
    "L4": 0.3e12,
    "A10G": 0.6e12,
    "V100": 0.9e12,
    "TPU v6": 1.64e12,
    "TPU v5p": 2.765e12,
    "TPU v5 lite": 0.819e12,
    "TPU v5e": 0.819e12,
    "TPU v4": 1.2e12,
}


def peak_bandwidth(device_kind: str) -> float | None:
    for name, bw in PEAK_HBM_BYTES_PER_S.items():
        if name.lower() in device_kind.lower():
            return bw
    return None


def build_checkpoint(out_dir: Path, args) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type="qwen2", vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.mlp,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        tie_word_embeddings=True, max_position_embeddings=4096, rope_theta=1e6,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(out_dir)
    return {"params": sum(p.numel() for p in model.parameters())}


def stream_bandwidth_probe(total_bytes: int = 256 << 20):
    """A probe (built and compiled once, called once per paired round) returning the bytes/s of a
    jitted matrix-vector product over ``total_bytes`` of fp32 weights (what a batch-1 decode step
    does), i.e. the memory bandwidth XLA actually reaches on this host."""
    import jax.numpy as jnp

    mats = [jnp.full((512, total_bytes // 4 // 512 // 4), float(i), jnp.float32) for i in range(4)]
    x = jnp.ones((1, 512), jnp.float32)
    f = jax.jit(lambda ms, x: sum((x @ m).sum() for m in ms))
    f(mats, x).block_until_ready()
    return lambda: sum(m.nbytes for m in mats) / median_time(lambda: f(mats, x).block_until_ready(), 10)


def decode_matrices(cfg) -> dict[str, tuple[tuple[int, int], int]]:
    """The weight matrices a decode step multiplies by, in the CPU decode layouts
    (:meth:`~dcd_jax.models.transformer.Transformer.fused_decode_weights`): name -> ([K, N], how many
    per step)."""
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q_width, kv_width = cfg.num_heads * hd, cfg.num_kv_heads * hd
    layers = cfg.num_layers
    return {"qkv": ((d, q_width + 2 * kv_width), layers), "o": ((q_width, d), layers),
            "gate_up": ((d, 2 * f), layers), "down": ((f, d), layers), "unembed": ((d, cfg.vocab_size), 1)}


def matmul_chain_probe(cfg, batch: int):
    """A probe (built and compiled once, called once per paired round) returning the seconds of
    the decode step's matmuls alone: for each layer ``[batch, D]`` against the fused
    q/k/v, o, fused gate/up and down kernels in the CPU decode layouts
    (:meth:`~dcd_jax.models.transformer.Transformer.fused_decode_weights`), then the ``[D, V]``
    unembedding; random fp32 weights, each layer product through the model's own
    :func:`~dcd_jax.models.transformer.dense` (the kernels a step runs), jitted as one chain (each
    product feeds the next, as in a step) with no attention, norms or sampling: the step's floor."""
    import jax.numpy as jnp

    rng = np.random.default_rng(3)
    f, q_width = cfg.intermediate_size, cfg.num_heads * cfg.head_dim
    matrices = decode_matrices(cfg)

    def weight(*shape):
        return jnp.asarray(rng.normal(size=shape) * 0.02, jnp.float32)

    layers = [{name: weight(*shape) for name, (shape, _) in matrices.items() if name != "unembed"}
              for _ in range(cfg.num_layers)]
    unembed = weight(*matrices["unembed"][0])
    x = weight(batch, cfg.hidden_size)

    @jax.jit
    def chain(x, layers, unembed):
        for w in layers:
            x = x + dense(dense(x, w["qkv"])[:, :q_width], w["o"])
            gate_up = dense(x, w["gate_up"])
            x = x + dense(gate_up[:, :f] * gate_up[:, f:], w["down"])
        return x @ unembed

    chain(x, layers, unembed).block_until_ready()
    return lambda: median_time(lambda: chain(x, layers, unembed).block_until_ready(), 5)


def torch_matmul_chain_probe(cfg, batch: int):
    """The same chain of a decode step's matmuls as transformers runs them (torch, fp32,
    ``F.linear`` against [out, in] weights; q, k, v and gate, up as separate products, as in its
    Qwen2 layers), at torch's current thread count: the seconds of the reference step's floor."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(3)
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q_width, kv_width = cfg.num_heads * hd, cfg.num_kv_heads * hd

    def weight(*shape):
        return torch.randn(*shape, generator=gen) * 0.02

    layers = [{"q": weight(q_width, d), "k": weight(kv_width, d), "v": weight(kv_width, d), "o": weight(d, q_width),
               "gate": weight(f, d), "up": weight(f, d), "down": weight(d, f)} for _ in range(cfg.num_layers)]
    unembed = weight(cfg.vocab_size, d)
    x0 = weight(batch, d)

    @torch.no_grad()
    def chain():
        x = x0
        for w in layers:
            q, k, v = F.linear(x, w["q"]), F.linear(x, w["k"]), F.linear(x, w["v"])
            x = x + F.linear(q + k.sum() + v.sum(), w["o"])
            x = x + F.linear(F.linear(x, w["gate"]) * F.linear(x, w["up"]), w["down"])
        return F.linear(x, unembed)

    chain()
    return lambda: median_time(chain, 5)


def shape_stream_probe(cfg, min_bytes: int = 160 << 20):
    """A probe (built and compiled once, called once per paired round) returning the seconds a
    batch-1 decode step's matmuls take if each matrix streams at the rate XLA's matvec reaches for
    matrices of *its own shape* on this host, and the per-shape rates (bytes/s) it measured.

    Per shape (:func:`decode_matrices`), a jitted chain of ``[1, K] @ [K, N]`` products (the
    layers' through the model's :func:`~dcd_jax.models.transformer.dense`, as in a step) over
    distinct matrices, ``min_bytes`` in all (more than the last-level cache, so each product reads
    memory, as in a step), each product feeding the next; then
        bound = sum over the step's matrices of bytes(shape) / rate(shape).
    A step's matrices are small (a 512 x 512 fp32 matrix is 1 MiB), and small matrices stream slower
    than the one large matvec :func:`stream_bandwidth_probe` times: the bound over that probe's rate
    is the share of the host's bandwidth a step made of these products alone reaches here."""
    import jax.numpy as jnp

    chains = {}
    for name, ((k, n), _) in decode_matrices(cfg).items():
        count = max(2, -(-min_bytes // (k * n * 4)))
        mats = [jnp.full((k, n), 1e-3 * (i + 1), jnp.float32) for i in range(count)]

        @jax.jit
        def chain(x, mats, name=name):
            total = jnp.zeros((), jnp.float32)
            for m in mats:
                total = total + (dense(x, m) if name != "unembed" else x @ m).sum()
                x = x + 1e-6 * total  # the next product waits for this one, as a layer waits for the last
            return total

        x = jnp.full((1, k), 0.01, jnp.float32)
        chain(x, mats).block_until_ready()
        chains[name] = (chain, x, mats, count * k * n * 4)

    rates: dict[str, list[float]] = {name: [] for name in chains}

    def bound_s() -> float:
        seconds = 0.0
        for name, ((k, n), per_step) in decode_matrices(cfg).items():
            chain, x, mats, nbytes = chains[name]
            rates[name].append(nbytes / median_time(lambda: chain(x, mats).block_until_ready(), 3))
            seconds += per_step * k * n * 4 / rates[name][-1]
        return seconds

    return bound_s, rates


def decode_flops_per_step(cfg, batch: int, slots: int) -> float:
    """Matmul FLOPs of one decode step: 2 x batch x parameters (every weight once, the tied
    embedding as the unembedding) plus attention over all ``slots`` cache slots (q.k and p.v)."""
    attention = 4 * batch * cfg.num_layers * cfg.num_heads * cfg.head_dim * slots
    return 2.0 * batch * cfg.num_params + attention


def paired_fractions(reference, ours_step_s, work: float, rounds: int) -> dict:
    """``rounds`` x (reference probe, our decode step time), back to back: per round, the fraction
    ``work / step_s / reference``; the median of the rounds' fractions is reported. Each round's
    two measurements see the same load, so the ratio holds on a host whose speed swings."""
    refs, steps = [], []
    for _ in range(rounds):
        refs.append(reference())
        steps.append(ours_step_s())
    fractions = [work / s / r for r, s in zip(refs, steps)]
    return {"fraction": statistics.median(fractions), "fractions": fractions, "references": refs, "step_s": steps}


def profile_generate(sampler: Sampler, prompts: list[list[int]], n_new: int) -> dict:
    """Time by op class (bench/op_profile.py) of one greedy generate call of ``n_new`` tokens."""
    from op_profile import profile_compiled

    from dcd_jax.infer.sampler import _generate_jit, _spec_of, row_keys

    b = len(prompts)
    ids = np.asarray(prompts, np.int32)
    cfg = SamplingConfig(max_new_tokens=n_new, eos_token_ids=(), batch_size=b, prompt_bucket=ids.shape[1])
    args = (sampler.graphdef, sampler.params, ids, np.ones_like(ids), row_keys(0, range(b), [0] * b),
            np.float32(1.0), np.float32(1.0), sampler.cpu_decode_weights())
    compiled = _generate_jit.lower(*args, spec=_spec_of(cfg, (), 0)).compile()
    compiled(*args)
    return profile_compiled(compiled, args, calls=2, donate=False)


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def write_result(result: dict, out: str | None, device, suffix: str = "") -> None:
    """The JSON to ``out``, else to bench/results/sampler_<device kind><suffix>.json."""
    slug = re.sub(r"[^a-z0-9]+", "_", device.device_kind.lower()).strip("_") or device.platform
    path = Path(out) if out else Path(__file__).resolve().parent / "results" / f"sampler_{slug}{suffix}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {path}")


def eos_ids_ending_rows(sampler: Sampler, prompts: list[list[int]], n_new: int) -> tuple[int, ...]:
    """EOS ids under which most rows end early at different steps (random weights have no EOS of
    their own): the fewest of the commonest greedy tokens that end at least 3/4 of the rows in the
    first half of the budget."""
    cfg = SamplingConfig(max_new_tokens=n_new, eos_token_ids=(), batch_size=len(prompts),
                         prompt_bucket=len(prompts[0]))
    free = [c[0].token_ids for c in sampler.generate(prompts, cfg)]
    counts = np.bincount([t for row in free for t in row])
    for n in range(1, 33):
        eos = tuple(int(t) for t in np.argsort(-counts, kind="stable")[:n])
        first = [min([row.index(t) for t in eos if t in row], default=n_new) for row in free]
        if sum(f < n_new // 2 for f in first) >= 0.75 * len(prompts):
            return eos
    return eos


def eos_rows(args, batches, sampler, hf, torch_device, kind, device, dtype, info) -> None:
    """``--eos``: whole greedy generate calls (prefill included) where rows end at different
    steps, both sides with the same EOS ids, side by side (alternating, median of ``--repeats``):
    transformers decodes every row until the last one ends; our loop drops finished rows."""
    import torch

    load_before = os.getloadavg()
    rng = np.random.RandomState(0)
    rows = []
    n_new = args.new_tokens
    for b in batches:
        prompts = rng.randint(0, args.vocab, (b, args.prompt_len)).tolist()
        eos = eos_ids_ending_rows(sampler, prompts, n_new)
        cfg = SamplingConfig(max_new_tokens=n_new, eos_token_ids=eos, batch_size=b, prompt_bucket=args.prompt_len)
        ours_out = sampler.generate(prompts, cfg)  # warm-up: compiles
        ids = torch.tensor(prompts, device=torch_device)

        def hf_gen():
            with torch.no_grad():
                return hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                   max_new_tokens=n_new, eos_token_id=list(eos), pad_token_id=0)

        hf_out = hf_gen()
        sides = {"ours": lambda: sampler.generate(prompts, cfg), "hf": hf_gen}
        times = {side: [] for side in sides}
        for i in range(args.repeats):
            for side in (list(sides) if i % 2 == 0 else list(sides)[::-1]):
                t0 = time.perf_counter()
                sides[side]()
                times[side].append(time.perf_counter() - t0)
        ours_tokens = [list(c[0].token_ids) for c in ours_out]  # up to and including the EOS id
        lengths = [len(t) for t in ours_tokens]

        def hf_row(row):
            row = row[args.prompt_len:].tolist()
            ends = [row.index(t) for t in eos if t in row]
            return row[:min(ends) + 1] if ends else row

        hf_rows = [hf_row(r) for r in hf_out]
        same = [h == o for h, o in zip(hf_rows, ours_tokens)]
        med = {side: statistics.median(ts) for side, ts in times.items()}
        rows.append({
            "batch": b, "new_tokens": n_new, "eos_ids": list(eos),
            "rows_ended_by_eos": sum(c[0].finished_by == "eos" for c in ours_out),
            "generated_tokens": sum(lengths), "row_lengths": lengths,
            "dcd_jax_generate_s": med["ours"], "hf_generate_s": med["hf"],
            "dcd_jax_tok_s": sum(lengths) / med["ours"], "hf_tok_s": sum(lengths) / med["hf"],
            "speedup": med["hf"] / med["ours"], "greedy_rows_identical_to_hf": float(np.mean(same)),
            "times_s": times,
        })
        print(f"batch {b}: done", file=sys.stderr, flush=True)
    from op_profile import host_cpu

    result = {
        "bench": "sampler_generate_eos", "device_kind": kind, "platform": device.platform,
        "cpu": host_cpu(), "cpu_count": os.cpu_count(),
        "load_average_1m_before_after": [load_before[0], os.getloadavg()[0]],
        "host_allocator": host_memory.active(), "jax_version": jax.__version__, "torch_version": torch.__version__,
        "model": {"family": "qwen2", "params": info["params"], "hidden": args.hidden, "layers": args.layers,
                  "heads": args.heads, "kv_heads": args.kv_heads, "mlp": args.mlp, "vocab": args.vocab, "dtype": dtype},
        "prompt_len": args.prompt_len, "new_tokens": n_new,
        "method": "whole greedy generate calls (prefill included), same EOS ids on both sides; tokens/s = generated "
                  "tokens (to each row's EOS) / call time; median of repeats, sides alternating",
        "rows": rows,
    }
    print(f"\n{'batch':>5} | {'rows ended':>10} | {'tokens':>6} | {'dcd-jax s':>9} | {'HF s':>7} | {'speedup':>7} | {'=HF':>4}")
    for r in rows:
        print(f"{r['batch']:>5} | {r['rows_ended_by_eos']:>10} | {r['generated_tokens']:>6} | "
              f"{r['dcd_jax_generate_s']:>9.3f} | {r['hf_generate_s']:>7.3f} | {r['speedup']:>6.2f}x | "
              f"{r['greedy_rows_identical_to_hf']:>4.2f}")
    write_result(result, args.out, device, "_eos")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="batches 1,16 and 16 new tokens")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5,
                    help="timed rounds; each times both sides' t(N) and t(1), the sides' order alternating")
    ap.add_argument("--pair-rounds", type=int, default=7,
                    help="CPU: rounds of (reference probe, our decode step) for the paired fractions")
    ap.add_argument("--dtype", default=None,
                    help="compute dtype of both sides (default: float32 on CPU, bfloat16 on GPU/TPU)")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--mlp", type=int, default=896)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--torch-threads", type=int, default=0, help="0 = the faster of 1 and all cores, per batch size")
    ap.add_argument("--no-hf", action="store_true", help="time only the dcd-jax sampler")
    ap.add_argument("--no-profile", action="store_true", help="skip the per-op-class profile of each batch")
    ap.add_argument("--prompt-len", type=int, default=16,
                    help="prompt tokens per row (the KV cache holds prompt + new tokens - 1 slots)")
    ap.add_argument("--eos", action="store_true",
                    help="rows end at different steps: EOS ids (the commonest greedy tokens) that most rows "
                         "generate early, on both sides; times whole generate calls instead (--out defaults to "
                         "sampler_<device>_eos.json)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.quick:
        args.batches, args.new_tokens = "1,16", 16
    batches = [int(b) for b in args.batches.split(",")]
    n_new = args.new_tokens

    device = jax.devices()[0]
    kind = device.device_kind
    on_cpu = device.platform == "cpu"
    dtype = args.dtype or ("float32" if on_cpu else "bfloat16")

    import torch

    torch_device = "cuda" if (not on_cpu and torch.cuda.is_available()) else "cpu"
    tmp = Path(tempfile.mkdtemp(prefix="bench_sampler_"))
    info = build_checkpoint(tmp, args)
    model = dcd_jax.load_hf(tmp, dtype=dtype)
    cfg = model.cfg
    sampler = Sampler.from_model(model)
    hf = None
    if not args.no_hf:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=getattr(torch, dtype)).eval().to(torch_device)

    load_before = os.getloadavg()
    host_bw = None
    rng = np.random.RandomState(0)
    rows = []
    if args.eos:
        return eos_rows(args, batches, sampler, hf, torch_device, kind, device, dtype, info)
    for b in batches:
        prompts = rng.randint(0, args.vocab, (b, args.prompt_len)).tolist()
        configs = {n: SamplingConfig(max_new_tokens=n, eos_token_ids=(), batch_size=b, prompt_bucket=args.prompt_len)
                   for n in (n_new, 1)}
        compile_s = {}
        for n, sc in configs.items():
            t0 = time.perf_counter()
            out = sampler.generate(prompts, sc)  # warm-up: compiles
            compile_s[n] = time.perf_counter() - t0
            if n == n_new:
                our_tokens = [c[0].token_ids for c in out]
        sides = {"ours": lambda n: sampler.generate(prompts, configs[n])}
        row = {"batch": b, "new_tokens": n_new}
        if hf is not None:
            ids = torch.tensor(prompts, device=torch_device)
            mask = torch.ones_like(ids)
            hf_outs = []

            def hf_gen(n):
                with torch.no_grad():
                    out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                                      min_new_tokens=n, pad_token_id=0)
                if torch_device == "cuda":
                    torch.cuda.synchronize()
                if n == n_new:
                    hf_outs.append(out)
                return out

            # torch's OpenMP pool is very sensitive to other load on the cores: give HF its best
            # thread count (1 or all cores, whichever decodes a few tokens faster).
            best, probes = None, {}
            for threads in sorted({1, os.cpu_count() or 1} if args.torch_threads == 0 else {args.torch_threads}):
                torch.set_num_threads(threads)
                hf_gen(2)  # warm-up
                t = median_time(lambda: hf_gen(4), 1)
                probes[threads] = t
                if best is None or t < best[1]:
                    best = (threads, t)
            torch.set_num_threads(best[0])
            row.update({"hf_torch_threads": best[0], "hf_4_token_generate_s_by_torch_threads": probes})
            sides["hf"] = hf_gen
        # Timed rounds: each side's t(N) and t(1) per round, the sides' order alternating, so both
        # see the same load (this host's speed drifts between seconds); medians per side.
        times = {side: {n: [] for n in configs} for side in sides}
        names = list(sides)
        for i in range(args.repeats):
            for side in names[i % len(names):] + names[:i % len(names)]:
                for n in configs:
                    t0 = time.perf_counter()
                    sides[side](n)
                    times[side][n].append(time.perf_counter() - t0)
        med = {side: {n: statistics.median(ts) for n, ts in by_n.items()} for side, by_n in times.items()}
        step_s = (med["ours"][n_new] - med["ours"][1]) / (n_new - 1)
        row.update({
            "dcd_jax_total_s": med["ours"][n_new],
            "dcd_jax_prefill_s": med["ours"][1],
            "dcd_jax_compile_s": compile_s[n_new] - med["ours"][n_new],
            "dcd_jax_step_ms": 1e3 * step_s,
            "dcd_jax_decode_tok_s": b / step_s,
        })
        if hf is not None:
            hf_step = (med["hf"][n_new] - med["hf"][1]) / (n_new - 1)
            hf_tokens = hf_outs[-1][:, args.prompt_len:].tolist()
            row.update({
                "hf_total_s": med["hf"][n_new],
                "hf_prefill_s": med["hf"][1],
                "hf_step_ms": 1e3 * hf_step,
                "hf_decode_tok_s": b / hf_step,
                "speedup": hf_step / step_s,
                "greedy_rows_identical_to_hf": float(np.mean([a == h for a, h in zip(our_tokens, hf_tokens)])),
            })
        slots = args.prompt_len + n_new - 1
        if on_cpu:
            def our_step_s(prompts=prompts, configs=configs):
                times = {n: median_time(lambda sc=sc: sampler.generate(prompts, sc), 1) for n, sc in configs.items()}
                return (times[n_new] - times[1]) / (n_new - 1)

            # Against the step's own matmuls alone (XLA, same shapes and layouts), in the same rounds:
            # floor time / step time, the share of the step that is XLA's dots at their own speed.
            chain_s = matmul_chain_probe(cfg, b)
            mm = paired_fractions(lambda: 1.0 / chain_s(), our_step_s, 1.0, args.pair_rounds)
            row["flops_per_step"] = decode_flops_per_step(cfg, b, slots)
            row["achieved_flops_per_s"] = row["flops_per_step"] / step_s
            row["matmul_floor_fraction"] = mm["fraction"]
            row["matmul_floor_rounds"] = mm
            # Against XLA's best matmul rate here (a large fp32 matmul), in the same rounds: the
            # step's FLOP/s as a share of it, and the step time if every FLOP ran at that rate.
            from op_profile import MatmulProbe

            best = MatmulProbe()

            def best_rate(best=best):
                best.measure()
                return best.flops / best.times[-1]

            bm = paired_fractions(best_rate, our_step_s, row["flops_per_step"], args.pair_rounds)
            row["best_matmul_flops_per_s"] = statistics.median(bm["references"])
            row["best_matmul_fraction"] = bm["fraction"]
            row["best_matmul_rounds"] = bm
            row["step_ms_at_best_matmul"] = 1e3 * row["flops_per_step"] / row["best_matmul_flops_per_s"]
            if hf is not None and torch_device == "cpu":
                # Both steps' matmuls alone, XLA's (ours) and torch's (transformers'), in the same
                # rounds: when both steps are mostly matmuls, their speed ratio caps our speedup.
                torch_s = torch_matmul_chain_probe(cfg, b)
                gemm = paired_fractions(lambda: 1.0 / torch_s(), chain_s, 1.0, args.pair_rounds)
                row["matmul_chain_ratio_vs_torch"] = gemm["fraction"]
                row["matmul_chain_ratio_rounds"] = gemm
        if b == 1:
            itemsize = np.dtype(jax.numpy.dtype(cfg.param_dtype)).itemsize
            kv_itemsize = np.dtype(jax.numpy.dtype(cfg.dtype)).itemsize
            kv_bytes = 2 * cfg.num_layers * slots * cfg.num_kv_heads * cfg.head_dim * kv_itemsize
            step_bytes = cfg.num_params * itemsize + kv_bytes
            row["bytes_per_step"] = step_bytes
            row["achieved_bytes_per_s"] = step_bytes / step_s
            if on_cpu:  # no HBM: compare with the streaming bandwidth XLA reaches on this host
                bw = paired_fractions(stream_bandwidth_probe(), our_step_s, step_bytes, args.pair_rounds)
                host_bw = statistics.median(bw["references"])
                row["measured_host_stream_bytes_per_s"] = host_bw
                row["host_bandwidth_roofline_fraction"] = bw["fraction"]
                row["host_bandwidth_rounds"] = bw
                # What the same matrices reach at their own shapes' matvec rates, paired with the
                # large-matvec reference: the share of the bandwidth a step of XLA's dots can reach.
                bound_s, shape_rates = shape_stream_probe(cfg)
                sb = paired_fractions(stream_bandwidth_probe(), bound_s, step_bytes, args.pair_rounds)
                row["shape_bound_step_ms"] = 1e3 * statistics.median(sb["step_s"])
                row["shape_bound_bandwidth_fraction"] = sb["fraction"]
                row["shape_bound_rounds"] = sb
                row["shape_stream_bytes_per_s"] = {
                    name: {"shape": list(decode_matrices(cfg)[name][0]), "median": statistics.median(rs)}
                    for name, rs in shape_rates.items()}
            else:
                peak = peak_bandwidth(kind)
                row["peak_hbm_bytes_per_s"] = peak
                row["hbm_roofline_fraction"] = (step_bytes / step_s / peak) if peak else None
        if not args.no_profile:
            row["profile"] = profile_generate(sampler, prompts, n_new)
        rows.append(row)
        print(f"batch {b}: done", file=sys.stderr, flush=True)

    from op_profile import host_cpu

    result = {
        "bench": "sampler_decode",
        "device_kind": kind,
        "platform": device.platform,
        "num_devices": jax.device_count(),
        "host": platform.processor() or platform.machine(),
        "cpu": host_cpu(),
        "cpu_count": os.cpu_count(),
        "load_average_1m_before_after": [load_before[0], os.getloadavg()[0]],
        "torch_device": torch_device,
        "host_allocator": host_memory.active(),
        "jax_version": jax.__version__,
        "torch_version": torch.__version__,
        "model": {
            "family": "qwen2", "params": info["params"], "hidden": args.hidden, "layers": args.layers,
            "heads": args.heads, "kv_heads": args.kv_heads, "mlp": args.mlp, "vocab": args.vocab, "dtype": dtype,
        },
        "prompt_len": args.prompt_len,
        "new_tokens": n_new,
        "method": "decode tok/s = batch*(N-1)/(t(N)-t(1)), greedy, EOS off, median of repeats after warm-up",
        "rows": rows,
    }

    print(f"\nSampler decode throughput on {kind} ({device.platform}), "
          f"qwen2-shaped {info['params'] / 1e6:.1f}M params, "
          f"{dtype}, prompt {args.prompt_len}, {n_new} new tokens\n")
    head = (f"{'batch':>5} | {'dcd-jax tok/s':>13} | {'step ms':>8} | {'HF tok/s':>9} | {'HF step ms':>10} | "
            f"{'speedup':>7} | {'=HF':>4}")
    head += f" | {'BW roofline':>11} | {'matmul floor':>12}"
    print(head)
    print("-" * len(head))
    for r in rows:
        line = f"{r['batch']:>5} | {r['dcd_jax_decode_tok_s']:>13.1f} | {r['dcd_jax_step_ms']:>8.2f}"
        if "hf_decode_tok_s" in r:
            line += (f" | {r['hf_decode_tok_s']:>9.1f} | {r['hf_step_ms']:>10.2f} | {r['speedup']:>6.1f}x"
                     f" | {r['greedy_rows_identical_to_hf']:>4.2f}")
        else:
            line += f" | {'-':>9} | {'-':>10} | {'-':>7} | {'-':>4}"
        frac = r.get("hbm_roofline_fraction", r.get("host_bandwidth_roofline_fraction"))
        line += f" | {frac:>11.1%}" if frac is not None else f" | {'-':>11}"
        floor = r.get("matmul_floor_fraction")
        line += f" | {floor:>12.1%}" if floor is not None else f" | {'-':>12}"
        print(line)
    profiled = [r for r in rows if "profile" in r]
    if profiled:
        from op_profile import DECODE_CLASSES

        print("\nTime by op class of one generate call (prefill + all decode steps; jax.profiler trace, share of XLA's "
              "summed thunk time; bench/op_profile.py):\n")
        print("| batch | wall s | host s | " + " | ".join(DECODE_CLASSES) + " |")
        print("|---:|---:|---:|" + "---:|" * len(DECODE_CLASSES))
        for r in profiled:
            p = r["profile"]
            shares = " | ".join(f"{p['by_class_fraction'].get(c, 0.0):.0%}" for c in DECODE_CLASSES)
            print(f"| {r['batch']} | {p['wall_s']:.3f} | {p['host_s']:.3f} | {shares} |")
    if on_cpu:
        bw_note = f"the {host_bw / 1e9:.1f} GB/s (median) " if host_bw else "the bandwidth "
        print(f"\n(BW roofline, batch 1: (param + KV bytes) / step time vs {bw_note}a jitted matvec streams on this "
              f"host (no HBM here); matmul floor: the step's matmuls alone (same shapes, chained) over the whole "
              f"step's time. Both paired: median over {args.pair_rounds} rounds of (probe, our "
              "step) back to back.)", end="")
    else:
        print("\n(BW roofline, batch 1: (param + KV bytes) / step time vs the chip's peak HBM bandwidth.)", end="")
    for r in rows:
        if "step_ms_at_best_matmul" in r and r["batch"] > 1:  # batch 1: the bandwidth line below
            need = f"; 2x transformers needs <= {r['hf_step_ms'] / 2:.2f} ms" if "hf_step_ms" in r else ""
            gemm = r.get("matmul_chain_ratio_vs_torch")
            gemm = f"; the step's matmuls alone run {gemm:.2f}x as fast as transformers' (paired)" if gemm else ""
            print(f"\nbatch {r['batch']}: step {r['dcd_jax_step_ms']:.2f} ms at {r['best_matmul_fraction']:.0%} of XLA's "
                  f"best matmul rate here ({r['best_matmul_flops_per_s'] / 1e9:.0f} GFLOP/s, paired); every FLOP of "
                  f"the step at that rate: {r['step_ms_at_best_matmul']:.2f} ms{need}{gemm}.", end="")
        if "shape_bound_bandwidth_fraction" in r:
            print(f"\nbatch {r['batch']}: the step's matrices, each at its own shape's matvec rate, take "
                  f"{r['shape_bound_step_ms']:.2f} ms = {r['shape_bound_bandwidth_fraction']:.0%} of the large-matvec "
                  f"bandwidth (paired); our step reaches {r['host_bandwidth_roofline_fraction']:.0%}. Rates GB/s: "
                  + ", ".join(f"{n} {'x'.join(map(str, v['shape']))} {v['median'] / 1e9:.1f}"
                              for n, v in r["shape_stream_bytes_per_s"].items()) + ".", end="")
    print("\n(=HF: share of rows whose greedy tokens equal transformers' exactly; random weights give near-flat "
          "logits, so a few ties may flip.)")

    write_result(result, args.out, device)


if __name__ == "__main__":
    host_memory.reexec_with_hugepage_malloc()  # the host allocator `dcd-jax` itself runs with
    main()
