"""Time by op class of one compiled XLA:CPU executable, from a ``jax.profiler`` trace.

XLA:CPU records one trace event per executed thunk (a fusion, a dot, a copy, ...), named like the
HLO instruction. The compiled module's text (``compiled.as_text()``) carries, for every
instruction, the Python stack that built it (``stack_frame_id`` -> file, function, line). This
module joins the two: each instruction is put in one class by the innermost frame that decides it,

* ``attention``  - built in the attention core (scores, mask, softmax, probs @ V, their gradients);
* ``loss``       - built in ``dcd_jax/objectives`` (chunked unembedding + log-softmax + weights);
* ``optimizer``  - built in optax or in the step after the gradients (clipping, AdamW, apply);
* ``matmul``     - any other dot (the dense projections: QKV, O, MLP, and their gradients);
* ``sampling``   - built in the sampler's own loop (vocabulary mask, argmax / draw, bookkeeping);
* ``other``      - the rest (norms, RoPE, embedding gather, residual adds, copies, KV-cache writes).

and the trace's per-thunk durations are summed per class. ``host`` is the wall time of the timed
calls minus the union of the thunk executor's spans: dispatch, argument handling, Python, and
whatever those spans do not cover (on a loaded host, notably between a while loop's iterations). Control-flow thunks
(``while``, ``conditional``, ``call``) only wrap their bodies' thunks and are not counted twice.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import statistics
import tempfile
import time

import numpy as np

CLASSES = ("matmul", "attention", "loss", "optimizer", "other")  # the train step's
DECODE_CLASSES = ("matmul", "attention", "sampling", "other")  # the sampler's
_ATTENTION_FUNCTIONS = ("attention_mask", "cache_bias", "dot_product_attention", "blockwise_causal_attention",
                        "cached_attention")
_LOSS_FILES = ("/objectives/",)
_CONTROL_OPS = ("while", "conditional", "call")

def host_cpu(cpuinfo: str = "/proc/cpuinfo") -> dict:
    """The CPU model and its widest vector ISA (from ``/proc/cpuinfo``; empty elsewhere): XLA:CPU
    and torch pick different kernels on AVX2 and AVX-512 hosts, so a ratio measured on one class
    of machine need not hold on the other."""
    try:
        info = open(cpuinfo).read()
    except OSError:
        return {}
    model = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
    flags = set((re.search(r"^flags\s*:\s*(.+)$", info, re.M) or [None, ""])[1].split())
    isa = next((name for name, flag in (("avx512", "avx512f"), ("avx2", "avx2"), ("avx", "avx")) if flag in flags),
               "sse")
    return {"model": model[1].strip() if model else "", "vector_isa": isa}


_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = \S+(?:\{[^}]*\})? (\w[\w\-]*)\(")
_INSTR_ANY = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?\s([a-z][\w\-]*)\(")
_META_FRAME = re.compile(r"stack_frame_id=(\d+)")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")


def _tables(hlo: str):
    """FileNames, FunctionNames, FileLocations and StackFrames tables of the module text."""
    files, funcs, locs, frames = {}, {}, {}, {}
    section = None
    for line in hlo.splitlines():
        head = line.strip()
        if head in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = head
            continue
        if section is None:
            continue
        m = re.match(r"^(\d+) (.*)$", head)
        if not m:
            section = None
            continue
        key, rest = int(m.group(1)), m.group(2)
        if section == "FileNames":
            files[key] = rest.strip('"')
        elif section == "FunctionNames":
            funcs[key] = rest.strip('"')
        elif section == "FileLocations":
            f = re.search(r"file_name_id=(\d+)", rest)
            g = re.search(r"function_name_id=(\d+)", rest)
            locs[key] = (files.get(int(f.group(1)), "") if f else "", funcs.get(int(g.group(1)), "") if g else "")
        else:
            loc = re.search(r"file_location_id=(\d+)", rest)
            parent = re.search(r"parent_frame_id=(\d+)", rest)
            frames[key] = (int(loc.group(1)) if loc else 0, int(parent.group(1)) if parent else 0)
    return locs, frames


def _stack(frame_id: int, locs, frames) -> list[tuple[str, str]]:
    """(file, function) pairs, innermost first."""
    out, seen = [], set()
    while frame_id and frame_id not in seen:
        seen.add(frame_id)
        loc, parent = frames.get(frame_id, (0, 0))
        if loc in locs:
            out.append(locs[loc])
        frame_id = parent
    return out


def classify_instructions(hlo: str) -> dict[str, str]:
    """HLO instruction name -> op class (see the module docstring); control-flow ops -> 'control'."""
    locs, frames = _tables(hlo)
    # Fusions name a computation: a fusion "is a dot" when its computation holds one.
    comp_has_dot: dict[str, bool] = {}
    current = None
    for line in hlo.splitlines():
        m = re.match(r"^\s*(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if m and "=" not in line.split("{")[0]:
            current = m.group(1)
            comp_has_dot.setdefault(current, False)
            continue
        if current and re.search(r"= \S+ (dot|convolution)\(", line):
            comp_has_dot[current] = True
    out = {}
    for line in hlo.splitlines():
        m = _INSTR_ANY.match(line)
        if not m:
            continue
        name, op = m.group(1), m.group(2)
        if op in _CONTROL_OPS:
            out[name] = "control"
            continue
        frame = _META_FRAME.search(line)
        stack = _stack(int(frame.group(1)), locs, frames) if frame else []
        calls = _CALLS.search(line)
        is_dot = op in ("dot", "convolution") or (op == "fusion" and calls and comp_has_dot.get(calls.group(1), False))
        out[name] = _classify(stack, bool(is_dot))
    return out


def _classify(stack: list[tuple[str, str]], is_dot: bool) -> str:
    for file, func in stack:
        if any(f in func for f in _ATTENTION_FUNCTIONS):
            return "attention"
    for file, func in stack:
        if any(f in file for f in _LOSS_FILES):
            return "loss"
        if "/optax/" in file:
            return "optimizer"
    if stack and stack[0][0].endswith("infer/sampler.py") and not is_dot:
        return "sampling"
    for file, func in stack:  # the step's own code after the gradients: averaging, norm, update
        if file.endswith("train/step.py") and func.endswith("step_fn"):
            return "optimizer"
        if file.endswith("train/step.py"):
            break
    return "matmul" if is_dot else "other"


def _trace_events(directory: str) -> list[dict]:
    path = glob.glob(os.path.join(directory, "**", "perfetto_trace.json.gz"), recursive=True)
    if not path:
        raise FileNotFoundError(f"no perfetto trace under {directory}")
    data = json.load(gzip.open(path[0]))
    return data["traceEvents"] if isinstance(data, dict) else data


def profile_compiled(compiled, args: tuple, *, calls: int = 3, donate: bool = True) -> dict:
    """Run ``compiled(*args)`` ``calls`` times under the profiler; time per op class per call.

    With ``donate`` the first output replaces the first argument between calls (a donated train
    state). Returns ``{"wall_s", "executable_s", "host_s", "by_class_s": {class: s},
    "by_class_fraction": {...}, "top_ops": [[name, class, s], ...]}``, all per call.
    """
    import jax

    classes = classify_instructions(compiled.as_text())
    args = list(args)
    with tempfile.TemporaryDirectory(prefix="op_profile_") as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            walls = []
            for _ in range(calls):
                t0 = time.perf_counter()
                out = compiled(*args)
                jax.block_until_ready(out)
                walls.append(time.perf_counter() - t0)
                if donate:
                    args[0] = out[0]
        events = _trace_events(d)
    per_op: collections.Counter = collections.Counter()
    spans = []  # the executor's own spans (nested for loop bodies): their union is the run time
    for e in events:
        if e.get("ph") != "X":
            continue
        name, dur = e.get("name", ""), e.get("dur", 0) / 1e6
        if name.startswith("ThunkExecutor::Execute"):
            spans.append((e["ts"] / 1e6, e["ts"] / 1e6 + dur))
        if name in classes and classes[name] != "control":
            per_op[name] += dur
    executable, reach = 0.0, float("-inf")
    for start, stop in sorted(spans):
        if stop > reach:
            executable += stop - max(start, reach)
            reach = stop
    by_class = dict.fromkeys(CLASSES + DECODE_CLASSES, 0.0)
    for name, s in per_op.items():
        by_class[classes[name]] += s / calls
    wall = sum(walls) / calls
    thunks = sum(by_class.values())
    exe = executable / calls if executable else thunks
    return {
        "wall_s": wall,
        "executable_s": exe,
        "host_s": max(wall - exe, 0.0),
        "by_class_s": by_class,
        "by_class_fraction": {k: v / thunks for k, v in by_class.items()} if thunks else {},
        "top_ops": [[n, classes[n], s / calls] for n, s in per_op.most_common(8)],
        "state_returned_to_args": donate,
    }


class MatmulProbe:
    """XLA's fp32 matmul throughput on this host: [4096 x 512] @ [512 x 2048] jitted, the dense
    shape of a 25M-model layer at B*T = 4096 (XLA:CPU's best rate here). Called between the timed
    steps (train step) or decode rounds (sampler), so that it sees the same load; the median is the
    reference for the step's achieved FLOP/s."""

    M, K, N = 4096, 512, 2048

    def __init__(self):
        import jax
        import jax.numpy as jnp

        rng = np.random.default_rng(1)
        self.a = jnp.asarray(rng.normal(size=(self.M, self.K)), jnp.float32)
        self.w = jnp.asarray(rng.normal(size=(self.K, self.N)), jnp.float32)
        self.fn = jax.jit(lambda a, w: a @ w)
        self.fn(self.a, self.w).block_until_ready()
        self.times: list[float] = []

    def measure(self, calls: int = 3) -> None:
        for _ in range(calls):
            t0 = time.perf_counter()
            self.fn(self.a, self.w).block_until_ready()
            self.times.append(time.perf_counter() - t0)

    flops = 2.0 * M * K * N

    def summary(self) -> dict:
        t = statistics.median(self.times)
        return {"shape": [self.M, self.K, self.N], "dtype": "float32", "flops": self.flops, "median_s": t,
                "flops_per_s": self.flops / t, "calls": len(self.times)}
