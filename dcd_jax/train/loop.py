"""The training loop: ``dcd-jax train --config X.yaml key=value ...``.

Order of work, so that bad input fails before compute is spent: config -> distributed init ->
mesh (checked against the device count) -> ``out_dir`` claimed (lock, writable, room for a
checkpoint; see ``run_dir.py``) -> :func:`build_run`: student + tokenizer -> data validation and
tokenization -> train state (restored from the latest usable checkpoint of ``out_dir`` if there is
one; a non-finite loss on the first step after a restore falls back to the step before) -> jitted
step. :func:`run_loop` then steps: host batch -> global arrays -> step, with small policy objects
at step boundaries: :class:`StepMetrics` (read one step late, so the host never stalls the device;
non-finite check; logging every ``log_every``), :class:`PeriodicEval` (every ``eval.every_steps``),
:class:`CheckpointPolicy` (every ``checkpoint.every_steps``, after an eval, at the end) and the
preemption flag (SIGTERM / SIGINT: save and exit).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import time
from pathlib import Path
from typing import Any, Callable

import jax
import yaml
from jax.sharding import Mesh

from dcd_jax import storage
from dcd_jax.atomic_files import atomic_write_text
from dcd_jax.config import to_dict
from dcd_jax.convert.model_dir import SIDE_DIR, Pretrained, load_pretrained, peek_model_config, write_model_meta
from dcd_jax.data import build_train_iterator
from dcd_jax.models import abstract_model
from dcd_jax.objectives import check_batch_fields, validate_batch
from dcd_jax.paths import require_local_or_hub
from dcd_jax.train import online
from dcd_jax.train.batch import check_batch_split, to_global_batch
from dcd_jax.train.checkpoint import RunCheckpointer
from dcd_jax.train.config import RunConfig
from dcd_jax.train.cost import RunCost, teacher_forward_flops_per_token
from dcd_jax.distributed import initialize_distributed
from dcd_jax.train.flops import mfu
from dcd_jax.train.metrics import MetricsWriter
from dcd_jax.train.optimizer import learning_rate_schedule, make_optimizer
from dcd_jax.train.run_dir import RunLock, checkpoint_bytes, claim_run_dir
from dcd_jax.train.state import init_train_state, state_shardings
from dcd_jax.train.step import jit_train_step

log = logging.getLogger("dcd_jax.train")

RESOLVED_CONFIG = "config.yaml"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/Inf; the run stopped and the last good checkpoint was kept."""


class _NonFiniteAfterRestore(Exception):
    """The first step after restoring ``step`` had a non-finite loss: that checkpoint is not usable."""

    def __init__(self, step: int, loss: float):
        super().__init__(f"loss {loss} on the first step after restoring it")
        self.step = step


@dataclasses.dataclass
class EvalContext:
    """What an evaluation hook receives."""

    step: int
    graphdef: Any
    params: Any
    model_cfg: Any
    tokenizer: Any
    mesh: Mesh


@dataclasses.dataclass
class TrainHooks:
    """Optional callbacks. ``evaluate`` returns flat metrics (e.g. ``{"eval/embedded/accuracy": 0.4}``)."""

    evaluate: Callable[[EvalContext], dict[str, float]] | None = None
    after_checkpoint: Callable[[int], None] | None = None


@dataclasses.dataclass
class TrainResult:
    status: str  # completed | preempted | data_exhausted
    step: int
    out_dir: Path
    last_metrics: dict[str, float]


class _PreemptionFlag:
    """SIGTERM / SIGINT -> save at the next step boundary, then exit cleanly."""

    def __init__(self):
        self.raised: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        self.raised = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _claim_out_dir(cfg: RunConfig) -> RunLock | None:
    """Process 0 locks ``out_dir`` and checks it is writable with room for one checkpoint (after the
    model and data paths are known to exist: a typo must not leave a fresh out_dir behind)."""
    require_local_or_hub(cfg.model.path, "model.path")
    require_local_or_hub(cfg.data.path, "data.path")
    if jax.process_index() != 0:
        return None
    model = peek_model_config(cfg.model.path)
    needed = None if model is None else checkpoint_bytes(model.num_params, jax.numpy.dtype(cfg.model.param_dtype).itemsize)
    return claim_run_dir(cfg.train.out_dir, needed_bytes=needed, stale_after_s=cfg.train.lock_stale_after_s,
                         break_lock=cfg.train.break_lock)


def train(cfg: RunConfig, hooks: TrainHooks | None = None) -> TrainResult:
    """Train (or resume) the run described by ``cfg``; see the module docstring for the order of work."""
    _setup_logging()
    cfg.require_model()
    hooks = hooks or TrainHooks()
    initialize_distributed(cfg.distributed)
    mesh = cfg.mesh.make()
    check_batch_split(cfg, mesh, jax.process_count())
    check_batch_fields(cfg.objective, cfg.data.batch_fields())
    from dcd_jax.train.plan import check_fits_before_training
    # On a TPU: refuse what cannot fit before loading any weight; the plan's executable is the step.
    plan = check_fits_before_training(cfg)
    lock = _claim_out_dir(cfg)
    bad_steps: dict[int, str] = {}
    try:
        while True:
            try:
                return run_loop(build_run(cfg, mesh, bad_steps, plan), hooks)
            except _NonFiniteAfterRestore as e:
                log.warning("checkpoint step %d is unusable (%s); falling back to the previous one", e.step, e)
                bad_steps[e.step] = str(e)
    finally:
        if lock is not None:
            lock.release()


@dataclasses.dataclass
class Run:
    """A run ready for its first step: model, data, state on the mesh, jitted step, checkpointer."""

    cfg: RunConfig
    mesh: Mesh
    out_dir: Path
    student: Pretrained  # architecture, HF config and tokenizer files (its params moved into ``state``)
    tokenizer: Any
    graphdef: Any
    true_vocab: int
    data_iter: Any
    state: dict[str, Any]
    step_fn: Callable
    checkpointer: RunCheckpointer
    start_step: int
    restored: bool
    cost: RunCost

    @property
    def is_main(self) -> bool:
        return jax.process_index() == 0


def build_run(cfg: RunConfig, mesh: Mesh, bad_steps: dict[int, str], plan=None) -> Run:
    """Load the student (and a live teacher for GKD), open the data, build the train state on the
    mesh, restore the latest usable checkpoint (skipping ``bad_steps``) and jit the step (or take
    the executable ``plan`` compiled for these chips, if it was built for this same model)."""
    out_dir = storage.absolute(cfg.train.out_dir)
    student: Pretrained = load_pretrained(
        cfg.model.path, mesh=mesh, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype,
        remat=cfg.model.remat, attention=cfg.model.attention, trust_remote_code=cfg.model.trust_remote_code,
    )
    tokenizer = student.tokenizer(cfg.model.trust_remote_code)
    true_vocab = student.cfg.tokenizer_vocab_size
    teacher = None
    if cfg.objective.loss == "gkd":  # online GKD: the live teacher, frozen, on the student's mesh
        teacher, true_vocab = online.load_teacher(cfg.objective, student, mesh, attention=cfg.model.attention,
                                                  trust_remote_code=cfg.model.trust_remote_code)
    data_iter = build_train_iterator(
        cfg.data, tokenizer, process_index=jax.process_index(), process_count=jax.process_count()
    )
    log.info("data: %s", data_iter.stats.summary())

    if jax.process_index() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / RESOLVED_CONFIG, yaml.safe_dump(to_dict(cfg), sort_keys=False))
        write_model_meta(out_dir, student.cfg, student.hf_config, student.files_dir)

    graphdef, _, param_axes = abstract_model(student.cfg)
    tx = make_optimizer(cfg.optim, cfg.train.steps, student.params)
    schedule = learning_rate_schedule(cfg.optim, cfg.train.steps)
    init = lambda p: init_train_state(p, tx, cfg.train.seed, cfg.objective.needs_reference_model)
    shardings = state_shardings(mesh, param_axes, jax.eval_shape(init, student.params), tx)
    state = jax.jit(init, out_shardings=shardings)(student.params)
    del student.params

    checkpointer = RunCheckpointer(out_dir / "checkpoints", cfg.checkpoint)
    restored = checkpointer.restore_latest(state, skip=bad_steps)
    if restored is not None:
        state, data_state = restored
        data_iter.set_state(data_state)
        log.info("resumed from %s at step %d", checkpointer.directory, int(state["step"]))
    start_step = int(state["step"])

    if teacher is None:
        if plan is not None and plan.executable is not None and plan.model_config == student.cfg:
            log.info("train step: the executable compiled by the memory check (no second compilation)")
            step_fn = plan.executable
        else:
            step_fn = jit_train_step(graphdef, cfg.objective, tx, schedule, true_vocab, shardings, mesh)
    else:
        step_fn = online.jit_gkd_step(cfg.objective, graphdef, teacher, tx, schedule, true_vocab, tokenizer, shardings)
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    cost = RunCost(0.0 if teacher is None else teacher_forward_flops_per_token(teacher.cfg, cfg.data.seq_len) * tokens_per_step)
    if restored is not None:
        cost.resume_from(out_dir / "metrics.jsonl", start_step)
    return Run(cfg, mesh, out_dir, student, tokenizer, graphdef, true_vocab, data_iter, state, step_fn,
               checkpointer, start_step, restored is not None, cost)


class StepMetrics:
    """Reads each step's metrics one step late (the host never stalls the device), refuses a
    non-finite loss, and writes the metrics every ``train.log_every`` steps."""

    def __init__(self, run: Run, writer: MetricsWriter, progress):
        self.run, self.writer, self.progress = run, writer, progress
        self.pending: tuple[int, dict[str, jax.Array]] | None = None
        self.last: dict[str, float] = {}
        self.tokens_per_step = run.cfg.data.batch_size * run.cfg.data.seq_len
        self.flops_per_token = run.student.cfg.flops_per_token(run.cfg.data.seq_len)
        self.window_start, self.window_steps = time.perf_counter(), 0
        self.step_clock = time.perf_counter()

    def push(self, step_no: int, metrics: dict[str, jax.Array]) -> None:
        """Hand over ``step_no``'s (device) metrics and read the previous step's."""
        self.flush()
        self.pending = (step_no, metrics)
        self.window_steps += 1

    def flush(self) -> None:
        """Read the pending step's metrics (by now the device has moved on), check finiteness, log."""
        if self.pending is None:
            return
        run = self.run
        step_no, metrics = self.pending
        self.pending = None
        loss = float(metrics["loss"])
        if not math.isfinite(loss) and run.restored and step_no == run.start_step + 1:
            raise _NonFiniteAfterRestore(run.start_step, loss)
        generated = float(metrics["generated_tokens"]) if "generated_tokens" in metrics else 0.0
        now = time.perf_counter()
        run.cost.add_step(generated, now - self.step_clock)
        self.step_clock = now
        if not math.isfinite(loss):
            steps = run.checkpointer.steps()
            raise NonFiniteLossError(
                f"loss is {loss} at step {step_no}; stopping. The last good checkpoint "
                f"({steps[-1] if steps else 'none'}) is kept in {run.checkpointer.directory}"
            )
        if step_no % run.cfg.train.log_every == 0 or step_no == run.cfg.train.steps:
            host = {k: float(v) for k, v in jax.device_get(metrics).items()}
            elapsed = time.perf_counter() - self.window_start
            tps = self.tokens_per_step * self.window_steps / max(elapsed, 1e-9)
            host.update({"tokens_per_second": tps, "step_seconds": elapsed / max(self.window_steps, 1),
                         "mfu": mfu(self.flops_per_token, tps), **run.cost.step_metrics(generated)})
            self.writer.write(step_no, host)
            self.last = host
            self.window_start, self.window_steps = time.perf_counter(), 0
            if self.progress is not None:
                self.progress.set_postfix(loss=f"{host['loss']:.4f}", tok_s=f"{tps:,.0f}")


class PeriodicEval:
    """Runs the evaluation hook every ``eval.every_steps`` steps; its metrics are logged."""

    def __init__(self, run: Run, evaluate: Callable[[EvalContext], dict[str, float]] | None, writer: MetricsWriter):
        self.run, self.evaluate, self.writer = run, evaluate, writer
        self.every = run.cfg.eval.every_steps if evaluate is not None else 0

    def due(self, step_no: int) -> bool:
        return bool(self.every) and step_no % self.every == 0

    def __call__(self, step_no: int) -> dict[str, float]:
        run = self.run
        metrics = self.evaluate(EvalContext(step_no, run.graphdef, run.state["params"], run.student.cfg,
                                            run.tokenizer, run.mesh))
        self.writer.write(step_no, metrics)
        return metrics


class CheckpointPolicy:
    """Saves every ``checkpoint.every_steps`` steps, after each evaluation (with its metrics, for
    best-checkpoint selection), on preemption and at the end; a step is saved once."""

    def __init__(self, run: Run, after_checkpoint: Callable[[int], None] | None,
                 sync_metrics: Callable[[], None] | None = None):
        self.run, self.after_checkpoint, self.sync_metrics = run, after_checkpoint, sync_metrics
        self.last_saved = run.start_step if run.restored else -1

    def due(self, step_no: int) -> bool:
        return step_no % self.run.cfg.checkpoint.every_steps == 0

    def save(self, step_no: int, metrics: dict[str, float] | None = None, force: bool = False) -> None:
        if step_no == self.last_saved:
            return
        run = self.run
        run.checkpointer.save(step_no, run.state, run.data_iter.get_state(), metrics=metrics, force=force)
        self.last_saved = step_no
        if self.sync_metrics is not None:
            self.sync_metrics()  # the rows up to this step outlive a kill, wherever out_dir lives
        if self.after_checkpoint is not None:
            run.checkpointer.wait()
            self.after_checkpoint(step_no)


def run_loop(run: Run, hooks: TrainHooks) -> TrainResult:
    """Steps from ``run.start_step`` to ``train.steps``, with the metrics, eval, checkpoint and
    preemption policies at step boundaries; exports the HF directory at the end if asked."""
    cfg = run.cfg
    writer = MetricsWriter(run.out_dir, tensorboard=cfg.train.tensorboard)
    progress = None
    if run.is_main and cfg.train.progress:
        from tqdm import tqdm

        progress = tqdm(total=cfg.train.steps, initial=run.start_step, desc="train", unit="step", dynamic_ncols=True)
    step_metrics = StepMetrics(run, writer, progress)
    evaluation = PeriodicEval(run, hooks.evaluate, writer)
    checkpoints = CheckpointPolicy(run, hooks.after_checkpoint, writer.sync)
    status = "completed"
    try:
        with _PreemptionFlag() as preempt, jax.set_mesh(run.mesh):
            for step_no in range(run.start_step + 1, cfg.train.steps + 1):
                try:
                    local = next(run.data_iter)
                except StopIteration:
                    status = "data_exhausted"
                    log.warning("data ran out after %d steps (data.num_epochs=%s)", step_no - 1, cfg.data.num_epochs)
                    break
                if step_no == run.start_step + 1:
                    validate_batch(cfg.objective, local, true_vocab_size=run.true_vocab)
                run.state, metrics = run.step_fn(run.state, to_global_batch(local, run.mesh, cfg.train.grad_accum))
                step_metrics.push(step_no, metrics)
                if progress is not None:
                    progress.update(1)

                eval_metrics = None
                if evaluation.due(step_no):
                    step_metrics.flush()
                    eval_metrics = evaluation(step_no)
                    step_metrics.last.update(eval_metrics)
                if checkpoints.due(step_no) or eval_metrics:
                    step_metrics.flush()  # never checkpoint a state whose loss is not known to be finite
                    checkpoints.save(step_no, eval_metrics)
                if preempt.raised is not None:
                    step_metrics.flush()
                    log.warning("signal %d: saving step %d and exiting", preempt.raised, step_no)
                    checkpoints.save(step_no, force=True)
                    status = "preempted"
                    break
            step_metrics.flush()
            final_step = int(run.state["step"])
            if status != "preempted":
                checkpoints.save(final_step, force=True)
            run.checkpointer.wait()
    finally:
        if progress is not None:
            progress.close()
        writer.close()
        run.checkpointer.close()

    if cfg.train.export_hf and status != "preempted":
        from dcd_jax.convert import save_hf

        save_hf(run.state["params"], run.student.cfg, run.student.hf_config, run.out_dir / "hf",
                side_files_from=run.out_dir / SIDE_DIR, dtype=cfg.train.export_dtype)
    log.info("train %s at step %d; data: %s", status, final_step, run.data_iter.stats.summary())
    return TrainResult(status, final_step, run.out_dir, step_metrics.last)
