"""``dcd-jax plan``: will this config fit that TPU slice, and what will a step cost? - without one.

The planner builds the *exact* jitted program of a config from abstract shapes (no weights are
loaded): the train step (:func:`dcd_jax.train.step.jit_train_step`, the run's own, with the run's objective,
optimizer, remat, accumulation and mesh), the sampler's generate loop, or the teacher scorer. It
compiles it ahead of time for a TPU topology described by libtpu
(``jax.experimental.topologies.get_topology_desc``, works on a CPU-only host) or for ``cpu:N``
fake devices, and reads XLA's own numbers per chip:

  peak      = arguments + outputs not aliased to them + temporaries + code of the program on
              one chip (XLA's memory analysis), against the chip's HBM; headroom = 1 - peak / HBM
  flops     = model FLOPs per token (6N + attention, ModelConfig.flops_per_token) x tokens / chips.
              XLA's own cost analysis counts each loop body once (the layer scan, the loss chunks,
              the accumulation scan), so its FLOPs and bytes are reported but are per-iteration
  intensity = XLA FLOPs / XLA bytes accessed (FLOP per byte of HBM traffic, per loop iteration)
  roofline  = max(model FLOPs / peak FLOP/s, HBM traffic / bandwidth), traffic = the larger of
              XLA's bytes and the weight reads a step cannot avoid (once per decoded token when
              sampling): every term is a lower bound, so no step can be faster than this

When a train config does not fit (or has less than ``min_headroom``), it compiles candidate
changes, smallest first (a stronger remat policy, more accumulation steps, then both, then all
devices on fsdp), and reports the first that fits.

Pitfalls handled here: with libtpu installed and no TPU, eager ops under a topology mesh fail,
so shardings are computed outside ``jax.set_mesh`` and only tracing/lowering runs under it (and
the CLI sets ``JAX_PLATFORMS=cpu``); several processes may load libtpu for compiling only
(``ALLOW_MULTIPLE_LIBTPU_LOAD``: none of them owns a TPU).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dcd_jax.config import ConfigError
from dcd_jax.config import replace as replace_config
from dcd_jax.models import ModelConfig, abstract_model
from dcd_jax.models.config import resolve_attention
from dcd_jax.objectives import check_batch_fields
from dcd_jax.sharding import tree_shardings
from dcd_jax.train.batch import abstract_train_batch, check_batch_split
from dcd_jax.train.config import RunConfig
from dcd_jax.train.flops import peak_flops_per_device
from dcd_jax.train.optimizer import learning_rate_schedule, make_optimizer
from dcd_jax.train.state import init_train_state, state_shardings
from dcd_jax.train.step import jit_train_step

GIB = 1024**3
# Public config.json facts of hub models, for planning without network (configs/architectures/README.md).
ARCHITECTURES_DIR = Path(__file__).resolve().parents[2] / "configs" / "architectures"
REMAT_ORDER = ("none", "dots_saveable", "full")  # less memory (and more recompute) to the right
WHAT = ("train", "sample", "score")


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    """One TPU generation: HBM per chip, HBM bandwidth; peak bf16 FLOP/s comes from
    :data:`dcd_jax.train.flops.PEAK_BF16_FLOPS` (one table for MFU and the roofline)."""

    name: str
    hbm_bytes: float
    hbm_bandwidth: float  # bytes/s
    chip_config: str  # libtpu chip config: "megacore" = the two TensorCores of a chip as one device


# HBM: what the TPU compiler may allocate per chip, as libtpu 0.0.42 reports it when it refuses a
# program ("exceeds available HBM (15.75G)"); the published capacities are 32 / 16 / 95 / 32 GiB.
# Bandwidth: Google Cloud TPU system architecture pages (cloud.google.com/tpu/docs/v4, /v5e, /v5p,
# /v6e). Peak FLOP/s: dcd_jax/train/flops.py.
CHIPS: dict[str, ChipSpec] = {
    "v4": ChipSpec("v4", 30.75 * GIB, 1228e9, "megacore"),
    "v5e": ChipSpec("v5e", 15.75 * GIB, 819e9, "default"),
    "v5p": ChipSpec("v5p", 95.74 * GIB, 2765e9, "megacore"),
    "v6e": ChipSpec("v6e", 31.25 * GIB, 1640e9, "default"),
}
_TOPOLOGY = re.compile(r"^(?P<chip>v4|v5e|v5p|v6e):(?P<shape>\d+(x\d+){1,2})$|^cpu:(?P<cpus>\d+)$")


@dataclasses.dataclass(frozen=True)
class Target:
    """Devices to compile for: a TPU topology (no TPU needed) or ``cpu:N`` host devices."""

    name: str
    devices: tuple[Any, ...]
    chip: ChipSpec | None  # None: CPU devices (memory budget = host RAM / N, no roofline)

    @property
    def platform(self) -> str:
        return self.devices[0].platform

    @property
    def memory_budget(self) -> float:
        if self.chip is not None:
            return self.chip.hbm_bytes
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / len(self.devices)


def parse_topology(text: str) -> tuple[str, str | None, int]:
    """``"v5e:2x4"`` -> ("v5e", "v5e:2x4", 8); ``"cpu:8"`` -> ("cpu", None, 8). Raises ConfigError."""
    m = _TOPOLOGY.match(text.strip())
    if not m:
        raise ConfigError(
            f"--topology {text!r}: expected <chip>:<AxB[xC]> with chip one of {sorted(CHIPS)} "
            f"(e.g. v5e:2x4, v4:2x2x1) or cpu:<N>"
        )
    if m["cpus"]:
        return "cpu", None, int(m["cpus"])
    return m["chip"], text.strip(), math.prod(int(x) for x in m["shape"].split("x"))


def prepare_compile_host(topology: str) -> None:
    """Compile on this host's CPU backend (a TPU topology needs libtpu, not a TPU); for ``cpu:N``,
    with N fake host devices. Call before anything starts a JAX backend."""
    if (topology.startswith("cpu:") and topology[4:].isdigit()
            and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", "")):
        # XLA reads the count when the CPU backend starts (not yet at this point). Restored right
        # after the backend starts, so processes this one spawns are not affected.
        flags = os.environ.get("XLA_FLAGS")
        os.environ["XLA_FLAGS"] = f"{flags or ''} --xla_force_host_platform_device_count={topology[4:]}"
        jax.config.update("jax_platforms", "cpu")
        jax.devices()
        if flags is None:
            del os.environ["XLA_FLAGS"]
        else:
            os.environ["XLA_FLAGS"] = flags
    jax.config.update("jax_platforms", "cpu")


def topology_target(text: str) -> Target:
    kind, name, count = parse_topology(text)
    if kind == "cpu":
        devices = jax.devices("cpu")
        if count > len(devices):
            raise ConfigError(
                f"--topology {text}: only {len(devices)} CPU devices (set XLA_FLAGS="
                f"--xla_force_host_platform_device_count={count} before JAX starts; the CLI does)"
            )
        return Target(text, tuple(devices[:count]), None)
    from jax.experimental import topologies

    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    chip = CHIPS[kind]
    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name=name, chip_config_name=chip.chip_config)
    except Exception as e:  # no libtpu, or a shape libtpu does not know
        raise ConfigError(f"--topology {text}: libtpu cannot describe it ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200]}); install the tpu extra: pip install -e '.[tpu]'") from None
    return Target(text, tuple(topo.devices), chip)


def attached_target() -> Target:
    """The devices this process runs on (the train-time check on a real TPU)."""
    devices = tuple(jax.devices())
    kind = devices[0].device_kind.lower()
    chip = next((CHIPS[k] for k, tag in (("v6e", "v6 lite"), ("v5e", "v5 lite"), ("v5p", "v5"), ("v4", "v4"))
                 if tag in kind), None)
    return Target(f"{devices[0].device_kind} x{len(devices)}", devices, chip)


# ---------------------------------------------------------------------------------------------
# Model architecture without weights
# ---------------------------------------------------------------------------------------------


def architecture_file(path: str) -> Path:
    return ARCHITECTURES_DIR / (path.replace("/", "--") + ".json")


def plan_model_config(cfg: RunConfig, platform: str, *, path: str | None = None, download: bool = False,
                      dtype: str | None = None) -> ModelConfig:
    """The run's ModelConfig (runtime options included) from ``model.path``'s architecture only:
    a local HF dir's config.json, a dcd-jax model dir's model.json, or for a hub id the shipped
    ``configs/architectures/<org>--<name>.json`` (``download``: else fetch its config from the hub)."""
    from dcd_jax.convert.model_dir import MODEL_META, read_model_meta

    path = path or cfg.model.path
    if not path:
        raise ConfigError("model.path is required (the planner reads the architecture from it)")
    runtime = dict(dtype=dtype or cfg.model.dtype, param_dtype=dtype or cfg.model.param_dtype, remat=cfg.model.remat,
                   attention=resolve_attention(cfg.model.attention, platform))
    local = Path(path)
    if local.is_dir() and (local / "config.json").is_file() and not (local / MODEL_META).is_file():
        source = local / "config.json"
    elif local.exists():
        return read_model_meta(local, **runtime)[0]
    elif architecture_file(path).is_file():
        source = architecture_file(path)
    elif download:
        from dcd_jax.convert.hf_to_flax import resolve_model_dir

        source = resolve_model_dir(path) / "config.json"
    else:
        raise ConfigError(
            f"model.path={path}: not a local directory, and no {architecture_file(path)} with its architecture "
            f"(the planner needs the model's config.json facts only; see configs/architectures/README.md)"
        )
    try:
        hf = json.loads(source.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{source}: invalid JSON ({e})") from None
    model_cfg = ModelConfig.from_hf_config(hf, source=str(source), **runtime)
    if source.parent != ARCHITECTURES_DIR:  # a checkpoint's dir: its tokenizer, as the run will see it
        from dcd_jax.convert.hf_to_flax import true_vocab_size_of

        vocab = true_vocab_size_of(source.parent, model_cfg, cfg.model.trust_remote_code)
        model_cfg = dataclasses.replace(model_cfg, true_vocab_size=vocab)
    return model_cfg


# ---------------------------------------------------------------------------------------------
# Compiling the programs
# ---------------------------------------------------------------------------------------------


def _with_sharding(shapes: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def shard_bytes(abstract: Any) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
    total = 0
    for leaf in jax.tree.leaves(abstract):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
    return total


def _train_program(cfg: RunConfig, model_cfg: ModelConfig, mesh):
    """(jitted step, abstract args, per-chip bytes of its parts, tokens per step)."""
    graphdef, shapes, axes = abstract_model(model_cfg)
    tx = make_optimizer(cfg.optim, cfg.train.steps, shapes)
    init = lambda p: init_train_state(p, tx, cfg.train.seed, cfg.objective.needs_reference_model)
    abstract_state = jax.eval_shape(init, shapes)
    shardings = state_shardings(mesh, axes, abstract_state, tx)  # outside set_mesh (see module doc)
    state = _with_sharding(abstract_state, shardings)
    batch = abstract_train_batch(cfg, mesh)
    step = jit_train_step(graphdef, cfg.objective, tx, learning_rate_schedule(cfg.optim, cfg.train.steps),
                          model_cfg.tokenizer_vocab_size, shardings, mesh)
    parts = {"params": shard_bytes(state["params"]), "opt_state": shard_bytes(state["opt_state"]),
             "batch": shard_bytes(batch)}
    if "ref_params" in state:
        parts["ref_params"] = shard_bytes(state["ref_params"])
    return step, (state, batch), parts, cfg.data.batch_size * cfg.data.seq_len


def _params_abstract(model_cfg: ModelConfig, mesh):
    graphdef, shapes, axes = abstract_model(model_cfg)
    return graphdef, _with_sharding(shapes, tree_shardings(mesh, axes, shapes))


def _sample_program(cfg: RunConfig, model_cfg: ModelConfig, mesh, batch: int, prompt_len: int):
    from dcd_jax.infer.sampler import SamplingConfig, _generate_jit, _spec_of
    from dcd_jax.sharding import named_sharding

    graphdef, params = _params_abstract(model_cfg, mesh)
    sampling = SamplingConfig(max_new_tokens=cfg.eval.max_new_tokens, temperature=1.0, batch_size=batch)
    spec = _spec_of(dataclasses.replace(sampling, eos_token_ids=(0,)), (), 0)
    rows = lambda dtype, *shape, axes=("batch", "length"): jax.ShapeDtypeStruct(
        (batch, *shape), dtype, sharding=named_sharding(mesh, axes, (batch, *shape)))
    args = (params, rows(jnp.int32, prompt_len), rows(jnp.int32, prompt_len),
            rows(jnp.uint32, 2, axes=("batch", None)), np.float32(1.0), np.float32(1.0))
    fn = jax.jit(lambda *a: _generate_jit(graphdef, *a, spec=spec))
    return fn, args, {"params": shard_bytes(params)}, batch * cfg.eval.max_new_tokens


def _score_program(cfg: RunConfig, model_cfg: ModelConfig, mesh, batch: int):
    from dcd_jax.infer.scorer import make_scorer
    from dcd_jax.teacher.scoring import ScoreConfig
    from dcd_jax.sharding import named_sharding

    graphdef, params = _params_abstract(model_cfg, mesh)
    score = ScoreConfig()
    scorer = make_scorer(graphdef, model_cfg.tokenizer_vocab_size, cfg.data.topk or score.topk, score.chunk_size)
    rows = jax.ShapeDtypeStruct((batch, cfg.data.seq_len), jnp.int32,
                                sharding=named_sharding(mesh, ("batch", "length"), (batch, cfg.data.seq_len)))
    return scorer, (params, rows, rows), {"params": shard_bytes(params)}, batch * cfg.data.seq_len


@dataclasses.dataclass(frozen=True)
class PlanReport:
    """What one compiled program needs per chip, and what a step costs at best."""

    what: str
    topology: str
    chips: int
    model: str
    attention: str
    remat: str
    grad_accum: int
    mesh: dict[str, int]
    batch_size: int
    seq_len: int
    tokens_per_step: int
    bytes_per_chip: dict[str, int]  # params / opt_state / batch / ref_params (sharded sizes), argument,
    # output, alias, temp, code, peak (XLA)
    memory_budget: float  # HBM per chip (CPU: host RAM / N)
    model_flops_per_token: float  # 6N + attention (ModelConfig.flops_per_token); 2N + attention for inference
    xla_flops_per_chip: float | None  # XLA cost analysis: loop bodies counted once (None: did not compile)
    bytes_accessed_per_chip: float | None  # likewise
    weight_bytes_per_step: float  # HBM reads of the weights a step cannot avoid (per chip)
    peak_flops: float | None
    hbm_bandwidth: float | None
    overrides: tuple[str, ...] = ()
    compiled: bool = True  # False: the TPU compiler refused it (temporaries > HBM); sizes from its message
    # With compile_plan(keep_executable=True), not in the JSON: the compiled program and the model
    # config it was built for (a run on the attached chips calls it instead of compiling again).
    executable: Any = dataclasses.field(default=None, repr=False, compare=False)
    model_config: Any = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def peak(self) -> int:
        return self.bytes_per_chip["peak"]

    @property
    def headroom(self) -> float:
        return 1.0 - self.peak / self.memory_budget

    @property
    def fits(self) -> bool:
        return self.compiled and self.peak <= self.memory_budget

    @property
    def flops_per_chip(self) -> float:
        return self.model_flops_per_token * self.tokens_per_step / self.chips

    @property
    def arithmetic_intensity(self) -> float | None:
        if self.xla_flops_per_chip is None:
            return None
        return self.xla_flops_per_chip / max(self.bytes_accessed_per_chip, 1.0)

    @property
    def roofline_seconds(self) -> float | None:
        """max(compute time, HBM time) at the chip's peaks: no step can be faster."""
        if self.peak_flops is None or self.hbm_bandwidth is None:
            return None
        traffic = max(self.bytes_accessed_per_chip or 0.0, self.weight_bytes_per_step)
        return max(self.flops_per_chip / self.peak_flops, traffic / self.hbm_bandwidth)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(dataclasses.replace(self, executable=None, model_config=None))
        del out["executable"], out["model_config"]
        out["overrides"] = list(self.overrides)
        roof = self.roofline_seconds
        out.update(peak_bytes=self.peak, headroom=self.headroom, fits=self.fits, flops_per_chip=self.flops_per_chip,
                   arithmetic_intensity=self.arithmetic_intensity, roofline_step_seconds=roof,
                   roofline_tokens_per_second_per_chip=None if not roof else self.tokens_per_step / roof / self.chips)
        return out


def compile_plan(cfg: RunConfig, target: Target, what: str = "train", *, batch_size: int | None = None,
                 prompt_len: int = 512, model_path: str | None = None, overrides: Sequence[str] = (),
                 download: bool = False, keep_executable: bool = False) -> PlanReport:
    """Compile ``what`` (train | sample | score) of ``cfg`` for ``target`` and read its needs per chip
    (``keep_executable``: the report also holds the compiled program, to be called)."""
    if what not in WHAT:
        raise ConfigError(f"--what {what!r}: expected one of {WHAT}")
    mesh = cfg.mesh.make(devices=list(target.devices))
    if what == "train":
        check_batch_split(cfg, mesh)
        check_batch_fields(cfg.objective, cfg.data.batch_fields())
        model_cfg = plan_model_config(cfg, target.platform, path=model_path, download=download)
        fn, args, parts, tokens = _train_program(cfg, model_cfg, mesh)
        batch = cfg.data.batch_size
    else:  # inference weights in the compute dtype (as `eval --dtype bfloat16` / `score-teacher --dtype`)
        model_cfg = plan_model_config(cfg, target.platform, path=model_path, download=download, dtype=cfg.model.dtype)
        if what == "sample":
            batch = batch_size or cfg.eval.batch_size
            fn, args, parts, tokens = _sample_program(cfg, model_cfg, mesh, batch, prompt_len)
        else:
            from dcd_jax.teacher.scoring import ScoreConfig

            batch = batch_size or ScoreConfig().batch_size
            fn, args, parts, tokens = _score_program(cfg, model_cfg, mesh, batch)
    with jax.set_mesh(mesh):
        lowered = fn.lower(*args)
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        # The TPU compiler refuses a program whose temporaries exceed HBM; its message has the size.
        temp = _refused_temporaries(str(e))
        if temp is None:
            raise
        arguments = sum(parts.values())
        sizes = {"argument": arguments, "output": 0, "alias": 0, "temp": temp, "code": 0, "peak": arguments + temp}
        cost = {}
    else:
        mem = compiled.memory_analysis()
        sizes = {
            "argument": mem.argument_size_in_bytes, "output": mem.output_size_in_bytes,
            "alias": mem.alias_size_in_bytes, "temp": mem.temp_size_in_bytes, "code": mem.generated_code_size_in_bytes,
        }
        sizes["peak"] = sizes["argument"] + sizes["output"] - sizes["alias"] + sizes["temp"] + sizes["code"]
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return PlanReport(
        what=what, topology=target.name, chips=len(target.devices), model=model_path or cfg.model.path,
        attention=model_cfg.attention, remat=model_cfg.remat, grad_accum=cfg.train.grad_accum,
        mesh=dict(mesh.shape), batch_size=batch, seq_len=cfg.data.seq_len if what != "sample" else prompt_len,
        tokens_per_step=tokens, bytes_per_chip={**parts, **{k: int(v) for k, v in sizes.items()}},
        memory_budget=float(target.memory_budget),
        model_flops_per_token=_model_flops_per_token(model_cfg, what, cfg.data.seq_len, prompt_len, cfg.eval.max_new_tokens),
        xla_flops_per_chip=cost.get("flops"), bytes_accessed_per_chip=cost.get("bytes accessed"),
        # every decoded token streams the weights once; other programs read them at least once
        weight_bytes_per_step=float(parts["params"] * (cfg.eval.max_new_tokens if what == "sample" else 1)),
        peak_flops=peak_flops_per_device(target.devices[0]) if target.chip else None,
        hbm_bandwidth=target.chip.hbm_bandwidth if target.chip else None, overrides=tuple(overrides),
        compiled=bool(cost), executable=compiled if cost and keep_executable else None, model_config=model_cfg,
    )


_REFUSED = re.compile(r"required for HLO temporaries \(([\d.]+)([KMGT])\) exceeds available HBM")


def _refused_temporaries(message: str) -> int | None:
    """Bytes of temporaries from the TPU compiler's out-of-memory refusal, or None if not one."""
    m = _REFUSED.search(message)
    if not m:
        return None
    return int(float(m[1]) * 1024 ** ("KMGT".index(m[2]) + 1))


def _model_flops_per_token(model_cfg: ModelConfig, what: str, seq_len: int, prompt_len: int, max_new: int) -> float:
    """Training: 6N + attention at seq_len. Inference (forward only): a third of that, at the
    mean context of a generated token (sample) or at seq_len (score)."""
    if what == "train":
        return model_cfg.flops_per_token(seq_len)
    context = prompt_len + max_new // 2 if what == "sample" else seq_len
    return model_cfg.flops_per_token(context) / 3.0


# ---------------------------------------------------------------------------------------------
# The smallest change that fits
# ---------------------------------------------------------------------------------------------


def _apply(cfg: RunConfig, changes: dict[str, Any]) -> RunConfig:
    model, train, mesh = cfg.model, cfg.train, cfg.mesh
    if "model.remat" in changes:
        model = dataclasses.replace(model, remat=changes["model.remat"])
    if "train.grad_accum" in changes:
        train = replace_config(train, grad_accum=changes["train.grad_accum"])
    if "mesh" in changes:
        mesh = dataclasses.replace(mesh, **changes["mesh"])
    return dataclasses.replace(cfg, model=model, train=train, mesh=mesh)


def _override_strings(changes: dict[str, Any]) -> tuple[str, ...]:
    out = []
    for key, value in changes.items():
        if key == "mesh":
            out += [f"mesh.{k}={v}" for k, v in value.items()]
        else:
            out.append(f"{key}={value}")
    return tuple(out)


def train_candidates(cfg: RunConfig, chips: int) -> list[dict[str, Any]]:
    """Changes to try, smallest first: one knob (stronger remat; 2x, 4x, ... accumulation while a
    micro-batch still covers every batch shard), then remat + accumulation, then all-fsdp mesh."""
    remats = [r for r in REMAT_ORDER[REMAT_ORDER.index(cfg.model.remat) + 1:]]
    shards = chips // max(cfg.mesh.tensor, 1)
    accums, a = [], cfg.train.grad_accum * 2
    while cfg.data.batch_size % a == 0 and (cfg.data.batch_size // a) % shards == 0:
        accums.append(a)
        a *= 2
    out: list[dict[str, Any]] = [{"model.remat": r} for r in remats]
    out += [{"train.grad_accum": a} for a in accums]
    out += [{"model.remat": r, "train.grad_accum": a} for r in remats for a in accums]
    if (cfg.mesh.data, cfg.mesh.tensor) != (1, 1):
        out.append({"mesh": {"data": 1, "fsdp": -1, "tensor": 1}})
    return out


def suggest_fit(cfg: RunConfig, target: Target, *, min_headroom: float = 0.10, log=None) -> PlanReport | None:
    """Compile :func:`train_candidates` in order; the first with ``min_headroom`` left, or None."""
    for changes in train_candidates(cfg, len(target.devices)):
        try:
            report = compile_plan(_apply(cfg, changes), target, "train", overrides=_override_strings(changes))
        except ConfigError:
            continue
        if log is not None:
            log(report)
        if report.headroom >= min_headroom:
            return report
    return None


def check_fits_before_training(cfg: RunConfig, log=None) -> PlanReport | None:
    """On a TPU, compile the run's train step for the attached chips before any weight is loaded
    and refuse (ConfigError) a config that cannot fit, naming the smallest change that does
    (``log`` receives each candidate's report). Returns the fitting plan, whose executable the run
    then uses (None off a TPU)."""
    if jax.default_backend() != "tpu":
        return None
    target = attached_target()
    if target.chip is None:
        return None
    report = compile_plan(cfg, target, "train", download=True, keep_executable=True)
    if report.fits:
        return report
    better = suggest_fit(cfg, target, log=log)
    hint = f"; it fits with: {' '.join(better.overrides)}" if better else "; no remat/accumulation/mesh change fits"
    raise ConfigError(
        f"this config needs {report.peak / GIB:.2f} GiB per chip, the {target.name} chips have "
        f"{report.memory_budget / GIB:.2f} GiB{hint} (dcd-jax plan shows the details)"
    )


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _gib(x: float) -> str:
    return f"{x / GIB:9.3f} GiB"


def format_plan(report: PlanReport) -> str:
    b = report.bytes_per_chip
    lines = [
        f"plan: {report.what} of {report.model} on {report.topology} ({report.chips} chips, mesh "
        f"{'x'.join(f'{k}={v}' for k, v in report.mesh.items())})",
        f"  attention={report.attention} remat={report.remat} grad_accum={report.grad_accum} "
        f"batch={report.batch_size} seq={report.seq_len} tokens/step={report.tokens_per_step:,}",
        "  memory per chip:",
    ]
    for key in ("params", "ref_params", "opt_state", "batch"):
        if key in b:
            lines.append(f"    {key:<22}{_gib(b[key])}")
    lines += [
        f"    {'arguments (all)':<22}{_gib(b['argument'])}",
        f"    {'outputs (not aliased)':<22}{_gib(b['output'] - b['alias'])}",
        f"    {'temporaries':<22}{_gib(b['temp'])}",
        f"    {'peak':<22}{_gib(report.peak)}  of {report.memory_budget / GIB:.2f} GiB "
        f"({'fits' if report.fits else 'DOES NOT FIT'}, headroom {report.headroom:+.1%})",
        f"  flops: {report.model_flops_per_token:.3e} per token (model: {'6N' if report.what == 'train' else '2N'} "
        f"+ attention), {report.flops_per_chip:.3e} per chip per step",
    ]
    if not report.compiled:
        lines.append("  the TPU compiler refused the program (temporaries exceed HBM): no cost analysis")
    else:
        lines.append(f"  XLA cost analysis (each loop body once): {report.xla_flops_per_chip:.3e} FLOPs, "
                     f"{report.bytes_accessed_per_chip:.3e} bytes per chip; intensity "
                     f"{report.arithmetic_intensity:.1f} FLOP/byte")
    roof = report.roofline_seconds
    if roof is not None:
        lines.append(
            f"  roofline: step >= {roof:.3f} s ({report.peak_flops / 1e12:.0f} TFLOP/s, "
            f"{report.hbm_bandwidth / 1e9:.0f} GB/s per chip) -> <= {report.tokens_per_step / roof:,.0f} tokens/s"
        )
    if report.overrides:
        lines.append(f"  with: {' '.join(report.overrides)}")
    return "\n".join(lines)
