"""The training loop: ``dcd-jax train --config X.yaml key=value ...``.

Order of work, so that bad input fails before compute is spent: config -> distributed init ->
mesh (checked against the device count) -> ``out_dir`` claimed (lock, writable, room for a
checkpoint; see ``run_dir.py``) -> student + tokenizer -> objective/data field checks -> data
validation and tokenization -> train state (restored from the latest usable checkpoint of
``out_dir`` if there is one; a non-finite loss on the first step after a restore falls back to the
step before) -> jitted step. Each step: host batch -> global arrays -> step -> metrics (read one step late, so
the host never stalls the device) -> checkpoint / eval / preemption at step boundaries.
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

from dcd_jax.atomic_files import atomic_write_text
from dcd_jax.config import to_dict
from dcd_jax.convert.model_dir import SIDE_DIR, Pretrained, load_pretrained, peek_model_config, write_model_meta
from dcd_jax.data import build_train_iterator
from dcd_jax.models import abstract_model
from dcd_jax.objectives import check_batch_fields, validate_batch
from dcd_jax.paths import require_local_or_hub
from dcd_jax.sharding import make_mesh
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
from dcd_jax.train.step import make_train_step

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
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    check_batch_split(cfg, mesh, jax.process_count())
    check_batch_fields(cfg.objective, cfg.data.batch_fields())
    from dcd_jax.train.plan import check_fits_before_training
    check_fits_before_training(cfg)  # on a TPU: refuse what cannot fit before loading any weight
    lock = _claim_out_dir(cfg)
    bad_steps: dict[int, str] = {}
    try:
        while True:
            try:
                return _train(cfg, hooks, mesh, bad_steps)
            except _NonFiniteAfterRestore as e:
                log.warning("checkpoint step %d is unusable (%s); falling back to the previous one", e.step, e)
                bad_steps[e.step] = str(e)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: RunConfig, hooks: TrainHooks, mesh: Mesh, bad_steps: dict[int, str]) -> TrainResult:
    is_main = jax.process_index() == 0
    out_dir = Path(cfg.train.out_dir).absolute()

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

    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / RESOLVED_CONFIG, yaml.safe_dump(to_dict(cfg), sort_keys=False))
        write_model_meta(out_dir, student.cfg, student.hf_config, student.files_dir)

    graphdef, _, param_axes = abstract_model(student.cfg)
    total_steps = cfg.train.steps
    tx = make_optimizer(cfg.optim, total_steps, student.params)
    schedule = learning_rate_schedule(cfg.optim, total_steps)
    with_ref = cfg.objective.needs_reference_model
    init = lambda p: init_train_state(p, tx, cfg.train.seed, with_ref)
    abstract_state = jax.eval_shape(init, student.params)
    shardings = state_shardings(mesh, param_axes, abstract_state, tx)
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
        step_fn = jax.jit(
            make_train_step(graphdef, cfg.objective, tx, schedule, true_vocab),
            in_shardings=(shardings, None),
            out_shardings=(shardings, None),
            donate_argnums=0,
        )
    else:
        step_fn = online.jit_gkd_step(cfg.objective, graphdef, teacher, tx, schedule, true_vocab, tokenizer, shardings)
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    cost = RunCost(0.0 if teacher is None else teacher_forward_flops_per_token(teacher.cfg, cfg.data.seq_len) * tokens_per_step)
    if restored is not None:
        cost.resume_from(out_dir / "metrics.jsonl", start_step)
    writer = MetricsWriter(out_dir, tensorboard=cfg.train.tensorboard)
    flops_per_token = student.cfg.flops_per_token(cfg.data.seq_len)
    progress = None
    if is_main and cfg.train.progress:
        from tqdm import tqdm

        progress = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    status = "completed"
    last: dict[str, float] = {}
    pending: tuple[int, dict[str, jax.Array], float] | None = None
    window_start, window_steps = time.perf_counter(), 0
    step_clock = time.perf_counter()
    last_saved = start_step if restored is not None else -1

    def finish_pending() -> None:
        """Read the previous step's metrics (by now the device has moved on), log, check finiteness."""
        nonlocal pending, last, window_start, window_steps, step_clock
        if pending is None:
            return
        step_no, metrics, _ = pending
        pending = None
        loss = float(metrics["loss"])
        if not math.isfinite(loss) and restored is not None and step_no == start_step + 1:
            raise _NonFiniteAfterRestore(start_step, loss)
        generated = float(metrics["generated_tokens"]) if "generated_tokens" in metrics else 0.0
        now = time.perf_counter()
        cost.add_step(generated, now - step_clock)
        step_clock = now
        if not math.isfinite(loss):
            raise NonFiniteLossError(
                f"loss is {loss} at step {step_no}; stopping. The last good checkpoint "
                f"({checkpointer.steps()[-1] if checkpointer.steps() else 'none'}) is kept in {checkpointer.directory}"
            )
        if step_no % cfg.train.log_every == 0 or step_no == total_steps:
            host = {k: float(v) for k, v in jax.device_get(metrics).items()}
            elapsed = time.perf_counter() - window_start
            tps = tokens_per_step * window_steps / max(elapsed, 1e-9)
            host.update({"tokens_per_second": tps, "step_seconds": elapsed / max(window_steps, 1),
                         "mfu": mfu(flops_per_token, tps), **cost.step_metrics(generated)})
            writer.write(step_no, host)
            last = host
            window_start, window_steps = time.perf_counter(), 0
            if progress is not None:
                progress.set_postfix(loss=f"{host['loss']:.4f}", tok_s=f"{tps:,.0f}")

    def save(step_no: int, metrics: dict[str, float] | None = None, force: bool = False) -> None:
        nonlocal last_saved
        if step_no == last_saved:
            return
        checkpointer.save(step_no, state, data_iter.get_state(), metrics=metrics, force=force)
        last_saved = step_no
        if hooks.after_checkpoint is not None:
            checkpointer.wait()
            hooks.after_checkpoint(step_no)

    try:
        with _PreemptionFlag() as preempt, jax.set_mesh(mesh):
            for step_no in range(start_step + 1, total_steps + 1):
                try:
                    local = next(data_iter)
                except StopIteration:
                    status = "data_exhausted"
                    log.warning("data ran out after %d steps (data.num_epochs=%s)", step_no - 1, cfg.data.num_epochs)
                    break
                if step_no == start_step + 1:
                    validate_batch(cfg.objective, local, true_vocab_size=true_vocab)
                state, metrics = step_fn(state, to_global_batch(local, mesh, cfg.train.grad_accum))
                finish_pending()
                pending = (step_no, metrics, time.perf_counter())
                window_steps += 1
                if progress is not None:
                    progress.update(1)

                eval_metrics = None
                if hooks.evaluate is not None and cfg.eval.every_steps and step_no % cfg.eval.every_steps == 0:
                    finish_pending()
                    eval_metrics = hooks.evaluate(EvalContext(step_no, graphdef, state["params"], student.cfg, tokenizer, mesh))
                    writer.write(step_no, eval_metrics)
                    last.update(eval_metrics)
                if step_no % cfg.checkpoint.every_steps == 0 or eval_metrics:
                    finish_pending()  # never checkpoint a state whose loss is not known to be finite
                    save(step_no, eval_metrics)
                if preempt.raised is not None:
                    finish_pending()
                    log.warning("signal %d: saving step %d and exiting", preempt.raised, step_no)
                    save(step_no, force=True)
                    status = "preempted"
                    break
            finish_pending()
            final_step = int(state["step"])
            if status != "preempted":
                save(final_step, force=True)
            checkpointer.wait()
    finally:
        if progress is not None:
            progress.close()
        writer.close()
        checkpointer.close()

    if cfg.train.export_hf and status != "preempted":
        from dcd_jax.convert import save_hf

        save_hf(state["params"], student.cfg, student.hf_config, out_dir / "hf", side_files_from=out_dir / SIDE_DIR,
                dtype=cfg.train.export_dtype)
    log.info("train %s at step %d; data: %s", status, final_step, data_iter.stats.summary())
    return TrainResult(status, final_step, out_dir, last)
