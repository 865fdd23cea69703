"""``dcd-jax`` command line: one subcommand per stage of the offline distillation pipeline."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from dcd_jax import host_memory, storage  # plain modules: importing them costs nothing
from dcd_jax.errors import ConfigError, UserError

EPILOG = """\
pipeline:  generate (teacher traces) -> score-teacher (cached teacher log-probs)
           -> train (SFT / DCD / baselines) -> eval (math benchmarks)
start with `dcd-jax demo`, which runs all of it on an embedded task with no download.
"""


def _parse_mesh(text: str | None):
    """``--mesh data,fsdp,tensor`` -> the jax mesh (None: one device), through :class:`MeshConfig`."""
    if not text:
        return None
    from dcd_jax.train.config import MeshConfig

    return MeshConfig.parse(text).make()


# Sugar flags of the commands configured by dcd_jax.train.commands: argparse dest -> the config key
# it sets (exactly as `key=value` would; dataclass defaults apply when a flag is not given, so every
# flag has default=None). Flags that need a conversion (--mesh, --model, --path) are in _flag_values.
FLAG_KEYS: dict[str, dict[str, str]] = {
    "eval": {
        "out": "out", "dtype": "dtype", "benchmarks": "eval.benchmarks", "split": "eval.split",
        "limit": "eval.limit", "max_new_tokens": "eval.max_new_tokens", "batch_size": "eval.batch_size",
        "n": "eval.n_samples", "temperature": "eval.temperature", "template": "eval.template",
        "system_prompt": "eval.system_prompt", "ifeval": "eval.ifeval", "exaccerr_teacher": "eval.exaccerr_teacher",
        "seed": "eval.seed",
    },
    "generate": {
        "teacher": "generate.teacher", "benchmark": "generate.benchmark", "prompts": "generate.prompts",
        "out": "generate.out", "keep": "generate.keep", "split": "generate.split", "limit": "generate.limit",
        "max_new_tokens": "generate.max_new_tokens", "batch_size": "generate.batch_size", "n": "generate.n",
        "temperature": "generate.temperature", "template": "generate.template",
        "system_prompt": "generate.system_prompt", "seed": "generate.seed",
    },
    "score-teacher": {
        "teacher": "score.teacher", "out": "score.out", "topk": "score.topk", "batch_size": "score.batch_size",
        "dtype": "score.dtype",
    },
}
MESH_KEY = {"eval": "mesh", "generate": "mesh", "score-teacher": "teacher_mesh"}


def mesh_flag_keys(text: str, prefix: str = "mesh") -> dict[str, int]:
    """``--mesh 1,-1,1`` -> ``{"mesh.data": 1, "mesh.fsdp": -1, "mesh.tensor": 1}``."""
    from dcd_jax.train.config import MeshConfig

    mesh = MeshConfig.parse(text)
    return {f"{prefix}.data": mesh.data, f"{prefix}.fsdp": mesh.fsdp, f"{prefix}.tensor": mesh.tensor}


def _flag_values(args: argparse.Namespace, command: str) -> dict:
    """The dotted config keys set by ``command``'s flags (only the flags given)."""
    out = {key: getattr(args, dest) for dest, key in FLAG_KEYS[command].items() if getattr(args, dest) is not None}
    if command == "eval":
        if args.benchmarks is not None:
            out["eval.benchmarks"] = [b for b in args.benchmarks.split(",") if b]
        if args.model:
            out["models"] = _key_values(args.model, "--model")
        if args.path:
            out["eval.paths"] = _key_values(args.path, "--path")
    if args.mesh:
        out.update(mesh_flag_keys(args.mesh, MESH_KEY[command]))
    return out


def load_command_config(args: argparse.Namespace, command: str):
    """The config of ``eval`` / ``generate`` / ``score-teacher``: ``--config`` files, then the flags,
    then ``key=value`` overrides, through the one loader (:func:`dcd_jax.config.load_config`)."""
    from dcd_jax.config import load_config
    from dcd_jax.train.commands import EvalCommandConfig, GenerateCommandConfig, ScoreCommandConfig

    cls = {"eval": EvalCommandConfig, "generate": GenerateCommandConfig, "score-teacher": ScoreCommandConfig}[command]
    return load_config(cls, args.config, args.overrides, flags=_flag_values(args, command))


def cmd_convert_hf_to_flax(args: argparse.Namespace) -> int:
    from dcd_jax.convert import load_hf_params, open_hf_checkpoint, resolve_model_dir, save_model_dir
    from dcd_jax.convert.hf_to_flax import model_config_of

    directory = resolve_model_dir(storage.localize(args.hf) if storage.is_remote(args.hf) else args.hf)
    ckpt = open_hf_checkpoint(directory)
    cfg = model_config_of(ckpt, directory, param_dtype=args.dtype)
    params = load_hf_params(ckpt, cfg, _parse_mesh(args.mesh))
    save_model_dir(args.out, params, cfg, ckpt.hf_config, side_files_from=directory)
    print(f"converted {directory} ({cfg.model_type}, {cfg.num_params / 1e6:.1f}M params) -> {args.out}")
    return 0


def cmd_convert_flax_to_hf(args: argparse.Namespace) -> int:
    from dcd_jax.convert import load_model_dir, save_hf
    from dcd_jax.convert.model_dir import SIDE_DIR

    cfg, hf_config, params, meta_dir = load_model_dir(storage.localize(args.ckpt))
    out = save_hf(params, cfg, hf_config, args.out, side_files_from=meta_dir / SIDE_DIR, dtype=args.dtype)
    print(f"exported {args.ckpt} -> {out} (loadable with transformers.AutoModelForCausalLM.from_pretrained)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from dcd_jax.demo import run_demo

    run_demo(args.out, scale=args.scale)
    return 0


def _load_run_config(args: argparse.Namespace):
    from dcd_jax.config import load_config
    from dcd_jax.train.config import RunConfig

    return load_config(RunConfig, args.config, args.overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from dcd_jax.train.loop import NonFiniteLossError, TrainHooks, train

    cfg = _load_run_config(args)
    hooks = TrainHooks()
    if cfg.eval.every_steps:
        from dcd_jax.eval.runner import train_eval_hook

        hooks = TrainHooks(evaluate=train_eval_hook(cfg.eval, cfg.data, cfg.train.out_dir))
    try:
        result = train(cfg, hooks)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    print(f"{result.status} at step {result.step}: {result.out_dir}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """Compile the config's step for a topology (no TPU, no weights) and report what it needs per chip."""
    import json

    from dcd_jax.train.plan import compile_plan, format_plan, prepare_compile_host, suggest_fit, topology_target

    prepare_compile_host(args.topology)
    cfg = _load_run_config(args)
    target = topology_target(args.topology)
    report = compile_plan(cfg, target, args.what, batch_size=args.batch_size, prompt_len=args.prompt_len,
                          model_path=args.model)
    candidates, suggestion = [], None
    if not args.json:
        print(format_plan(report))
    if args.what == "train" and report.headroom < args.min_headroom and not args.no_suggest:
        def log(candidate):
            candidates.append(candidate)
            if not args.json:
                print(f"  try {' '.join(candidate.overrides)}: peak {candidate.peak / 2**30:.2f} GiB "
                      f"(headroom {candidate.headroom:+.1%})")

        suggestion = suggest_fit(cfg, target, min_headroom=args.min_headroom, log=log)
        if not args.json:
            print(f"smallest change with >= {args.min_headroom:.0%} headroom: "
                  + (" ".join(suggestion.overrides) if suggestion else "none found"))
    if args.json:
        print(json.dumps({"plan": report.to_dict(), "candidates": [c.to_dict() for c in candidates],
                          "suggestion": suggestion.to_dict() if suggestion else None}, indent=1))
    return 0 if report.fits else 1


def _config_and_student_tokenizer(args: argparse.Namespace):
    from dcd_jax.convert.model_dir import load_pretrained_tokenizer

    cfg = _load_run_config(args)
    cfg.require_model()
    return cfg, load_pretrained_tokenizer(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)


def cmd_data_inspect(args: argparse.Namespace) -> int:
    from dcd_jax.data import inspect_data

    cfg, tokenizer = _config_and_student_tokenizer(args)
    print(inspect_data(cfg.data, tokenizer, limit=args.limit, processes=args.processes))
    return 0


def cmd_data_tokenize(args: argparse.Namespace) -> int:
    from dcd_jax.data.pretokenize import write_tokenized_records

    cfg, tokenizer = _config_and_student_tokenizer(args)
    stats = write_tokenized_records(cfg.data, tokenizer, args.out)
    skipped = sum(stats.skipped.values())
    print(f"{stats.examples} tokenized records ({stats.tokens} tokens, {skipped} skipped) -> {args.out}  "
          f"(train with data.path={args.out}; teacher scores of the text stay valid)")
    return 0


def cmd_data_select(args: argparse.Namespace) -> int:
    import dataclasses

    from dcd_jax.teacher.scoring import ScoreConfig, score_teacher
    from dcd_jax.teacher.selection import select_traces

    if (args.keep_fraction is None) == (args.min_log_ratio is None):
        raise ConfigError("data select: give exactly one of --keep-fraction and --min-log-ratio")
    if args.keep_fraction is not None and not 0.0 < args.keep_fraction <= 1.0:
        raise ConfigError(f"data select: --keep-fraction must be in (0, 1], got {args.keep_fraction}")
    cfg = _load_run_config(args)
    cfg.require_model()
    traces = cfg.data.path or ""
    if not traces.endswith(".jsonl") or not storage.path(traces).is_file():
        raise ConfigError(f"data select: data.path must be a JSONL file of traces, got {traces!r}")
    if not cfg.data.teacher_scores:
        raise ConfigError("data select: data.teacher_scores is required (the teacher's cached log-probs of the traces; "
                          "make them with `dcd-jax score-teacher`)")
    student_scores = args.student_scores or f"{args.out}.student.parquet"
    if not storage.exists(student_scores) or args.student_scores is None:  # resumable: score-teacher resumes it
        score_teacher(dataclasses.replace(cfg.data, teacher_scores=None, topk=0),
                      ScoreConfig(teacher=cfg.model.path, out=str(student_scores), topk=0, dtype=cfg.model.dtype))
    report = select_traces(traces, student_scores, cfg.data.teacher_scores, args.out, keep_fraction=args.keep_fraction,
                           min_log_ratio=args.min_log_ratio)
    print(f"kept {report['kept']} of {report['traces']} traces -> {args.out}  (train on them with data.path={args.out}; "
          f"data.teacher_scores stays valid; per-trace log-ratios in {args.out}.selection.json)")
    return 0


def cmd_score_teacher(args: argparse.Namespace) -> int:
    from dcd_jax.distributed import initialize_distributed
    from dcd_jax.teacher.scoring import score_teacher
    from dcd_jax.train.config import make_mesh_or_one_device

    cfg = load_command_config(args, "score-teacher")
    initialize_distributed(cfg.distributed)
    out = score_teacher(cfg.data, cfg.score, mesh=make_mesh_or_one_device(cfg.teacher_mesh))
    print(f"teacher scores -> {out}  (train with data.teacher_scores={out} data.topk={cfg.score.topk} "
          f"data.teacher={cfg.score.teacher})")
    return 0


def _key_values(pairs: Sequence[str] | None, what: str) -> dict[str, str]:
    out = {}
    for pair in pairs or ():
        if "=" not in pair:
            raise ConfigError(f"{what} expects NAME=VALUE, got {pair!r}")
        k, v = pair.split("=", 1)
        out[k] = v
    return out


def cmd_eval(args: argparse.Namespace) -> int:
    from dcd_jax.eval.runner import run_eval, summary_table
    from dcd_jax.train.config import make_mesh_or_one_device

    cfg = load_command_config(args, "eval")
    full = run_eval(dict(cfg.models), cfg.eval, cfg.out, mesh=make_mesh_or_one_device(cfg.mesh), dtype=cfg.dtype)
    print(summary_table(full["results"], ["pass@1", "pass@1_ci", "length_mean", "truncation_rate", "repetition_rate",
                                          "format_failure_rate"]))
    print(f"results: {cfg.out}/summary.json, {cfg.out}/chart.png, {cfg.out}/generations/")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from dcd_jax.teacher.generate import generate_traces
    from dcd_jax.train.config import make_mesh_or_one_device

    cfg = load_command_config(args, "generate")
    stats = generate_traces(cfg.generate, mesh=make_mesh_or_one_device(cfg.mesh))
    print(f"{stats['kept']} traces kept of {stats['generated']} generated for {stats['prompts']} prompts "
          f"({stats['skipped_done']} already done) -> {cfg.generate.out}")
    return 0


def _add_generation_args(p: argparse.ArgumentParser, section: str) -> None:
    # default=None everywhere: the defaults are the dataclass's, stated once (configs/commands/*.yaml)
    n_key = "n_samples" if section == "eval" else "n"
    p.add_argument("--max-new-tokens", type=int, default=None, help=f"generation budget per response ({section}.max_new_tokens)")
    p.add_argument("--batch-size", type=int, default=None, help=f"rows per generation batch ({section}.batch_size)")
    p.add_argument("--n", type=int, default=None, help=f"sampled responses per prompt ({section}.{n_key})")
    p.add_argument("--temperature", type=float, default=None, help=f"sampling temperature ({section}.temperature)")
    p.add_argument("--template", default=None, choices=["auto", "plain", "raw"],
                   help="prompt rendering: the tokenizer's chat template (as in training), plain, or raw text "
                   f"({section}.template)")
    p.add_argument("--system-prompt", default=None, help=f"system message for chat rendering ({section}.system_prompt)")
    p.add_argument("--limit", type=int, default=None, help=f"first N prompts ({section}.limit)")
    p.add_argument("--split", default=None, help=f"split of the prompt set / benchmarks ({section}.split)")
    p.add_argument("--seed", type=int, default=None, help=f"sampling seed ({section}.seed)")
    p.add_argument("--mesh", default=None, help="data,fsdp,tensor mesh = mesh.data/fsdp/tensor (default: one device)")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, action="append", default=None,
                   help="config YAML (see configs/base.yaml, configs/commands/); repeat to merge several, left to right; "
                   "flags and key=value overrides apply on top")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=1e-5 data.seq_len=2048")


class _Parser(argparse.ArgumentParser):
    """Usage errors end with a hint to the help text (argparse's own exit status 2 is kept)."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(2, f"error: {message}\nhint: `{self.prog} --help` lists the commands and options\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dcd-jax",
        description="Distribution-corrected offline distillation of reasoning into small LMs (JAX/Flax).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of user errors too (same as DCD_JAX_DEBUG=1)")
    # Not required here: a missing command and an unknown option then get their own messages.
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    convert = sub.add_parser("convert", help="convert checkpoints between Hugging Face and dcd-jax formats")
    conv_sub = convert.add_subparsers(dest="direction", required=True, metavar="DIRECTION")
    h2f = conv_sub.add_parser("hf-to-flax", help="HF checkpoint dir (or hub id) -> dcd-jax model dir")
    h2f.add_argument("--hf", required=True, help="local HF model directory, or a hub id such as Qwen/Qwen2.5-0.5B")
    h2f.add_argument("--out", required=True, help="output dcd-jax model directory (local or gs://)")
    h2f.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameter dtype to store")
    h2f.add_argument("--mesh", default=None, help="data,fsdp,tensor mesh to load onto (default: one device)")
    h2f.set_defaults(func=cmd_convert_hf_to_flax)
    f2h = conv_sub.add_parser("flax-to-hf", help="dcd-jax model dir or training checkpoint -> HF directory")
    f2h.add_argument("--ckpt", required=True, help="model dir, run dir, or checkpoints/<step> dir (local or gs://)")
    f2h.add_argument("--out", required=True, help="output HF model directory (local or gs://)")
    f2h.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="cast weights (default: as stored)")
    f2h.set_defaults(func=cmd_convert_flax_to_hf)

    tr = sub.add_parser("train", help="distill a student (SFT / DCD / baselines); resumes from out_dir",
                        description="Train a student. Rerunning with the same train.out_dir resumes from its latest "
                        "checkpoint; SIGTERM/SIGINT saves at the next step boundary and exits 0.")
    _add_config_args(tr)
    tr.set_defaults(func=cmd_train)

    sc = sub.add_parser(
        "score-teacher", help="cache the teacher's per-token and top-k log-probs of the traces (resumable)",
        description="Run the teacher once over the traces of the config's data section (tokenized exactly as "
        "training will) and write its log-probs to a Parquet file for data.teacher_scores.",
    )
    sc.add_argument("--teacher", default=None, help="teacher model: HF dir, hub id or dcd-jax model dir (score.teacher; required)")
    sc.add_argument("--out", default=None, help="output Parquet (score.out; default: <data>.teacher.parquet next to the data)")
    sc.add_argument("--topk", type=int, default=None, help="top-k log-probs per response token, for loss: kl / todi (score.topk)")
    sc.add_argument("--batch-size", type=int, default=None, help="sequences per forward pass (score.batch_size)")
    sc.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="teacher compute dtype (score.dtype)")
    sc.add_argument("--mesh", default=None, help="data,fsdp,tensor mesh for the teacher = teacher_mesh.data/fsdp/tensor "
                    "(default: one device; the config's mesh: is the training mesh and is not used)")
    _add_config_args(sc)
    sc.set_defaults(func=cmd_score_teacher)

    gen = sub.add_parser("generate", help="teacher traces for a prompt set, keeping correct ones (resumable)")
    gen.add_argument("--teacher", default=None, help="teacher model: HF dir, hub id or dcd-jax model dir (generate.teacher; required)")
    gen.add_argument("--benchmark", default=None, help="prompt-set adapter, embedded = {id, prompt, answer} JSONL (generate.benchmark)")
    gen.add_argument("--prompts", default=None, help="local prompt file or dir in that adapter's schema (generate.prompts)")
    gen.add_argument("--out", default=None, help="output JSONL of traces; a rerun resumes it (generate.out)")
    gen.add_argument("--keep", default=None, choices=["correct", "all"], help="rejection filtering on the gold answer (generate.keep)")
    _add_generation_args(gen, "generate")
    _add_config_args(gen)
    gen.set_defaults(func=cmd_generate)

    ev = sub.add_parser("eval", help="evaluate checkpoints on math benchmarks (pass@1, avg@k, stability)")
    ev.add_argument("--model", action="append", metavar="NAME=PATH", help="checkpoint to evaluate, repeatable (models.NAME)")
    ev.add_argument("--benchmarks", default=None, help="comma-separated: embedded, gsm8k, math, math500, amc23, "
                    "aime24, aime25, olympiadbench, omni_math (eval.benchmarks)")
    ev.add_argument("--path", action="append", metavar="BENCH=PATH", help="local file/dir of a benchmark, repeatable (eval.paths.BENCH)")
    ev.add_argument("--out", default=None, help="results folder (out)")
    ev.add_argument("--ifeval", action="store_const", const=True, default=None,
                    help="also run the IFEval-style instruction check (eval.ifeval)")
    ev.add_argument("--exaccerr-teacher", default=None, help="teacher model for ExAccErr, opt-in (eval.exaccerr_teacher)")
    ev.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="compute dtype (dtype)")
    _add_generation_args(ev, "eval")
    _add_config_args(ev)
    ev.set_defaults(func=cmd_eval)

    pl = sub.add_parser(
        "plan", help="will this config fit that TPU slice? compile its step ahead of time (no TPU, no weights)",
        description="Compile the config's exact train step (or sampler / teacher scorer) for a TPU topology "
        "from abstract shapes and print per-chip memory against HBM, FLOPs, arithmetic intensity and a roofline "
        "step-time bound; when it does not fit, the smallest remat / accumulation / mesh change that does. "
        "Exit status 1 when it does not fit.",
    )
    pl.add_argument("--topology", required=True, help="v4:2x2x1, v5e:2x4, v5p:2x2x1, v6e:2x2, ... (libtpu: the "
                    "tpu extra) or cpu:N (N host devices)")
    pl.add_argument("--what", default="train", choices=["train", "sample", "score"],
                    help="train step, sampler (eval.batch_size x eval.max_new_tokens) or teacher scoring")
    pl.add_argument("--model", default=None, help="plan another model than model.path (e.g. the teacher to score with)")
    pl.add_argument("--batch-size", type=int, default=None, help="rows for --what sample/score "
                    "(default: eval.batch_size / score-teacher's default)")
    pl.add_argument("--prompt-len", type=int, default=512, help="prompt tokens per row for --what sample")
    pl.add_argument("--min-headroom", type=float, default=0.10, help="HBM fraction a suggestion must leave free")
    pl.add_argument("--no-suggest", action="store_true", help="do not search for a change that fits")
    pl.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_config_args(pl)
    pl.set_defaults(func=cmd_plan)

    data = sub.add_parser("data", help="inspect, tokenize or select the training data")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    inspect = data_sub.add_parser("inspect", help="counts, token-length percentiles, packing, rendered examples with the loss mask")
    inspect.add_argument("--limit", type=int, default=None, help="stream only the first N records (a quick look)")
    inspect.add_argument("--processes", type=int, default=1,
                         help="read as P processes would (streamed; reports the bytes each reads)")
    _add_config_args(inspect)
    inspect.set_defaults(func=cmd_data_inspect)
    tokenize = data_sub.add_parser(
        "tokenize", help="tokenize the traces once with the student tokenizer (the fastest records to stream)",
        description="Write the config's data.path as tokenized records (input_ids, response_mask, "
        "tokenizer_fingerprint), rendered and tokenized exactly as training would, at full length. Training "
        "on them skips rendering and tokenization (bench/data_scale.py: the text path's main cost) and gives "
        "bit for bit the batches of the text; teacher scores of the text stay valid.")
    tokenize.add_argument("--out", required=True, help="output .jsonl or .parquet, local or gs:// (written atomically)")
    _add_config_args(tokenize)
    tokenize.set_defaults(func=cmd_data_tokenize)
    select = data_sub.add_parser(
        "select", help="keep the teacher traces the student fits best (mean student/teacher log-ratio per trace)",
        description="Score data.path's traces once with the student (model.path), take each trace's mean "
        "per-token log-ratio r = log p_student - log p_teacher against data.teacher_scores, and write the "
        "traces with the largest r (--keep-fraction) or with r >= --min-log-ratio, in their order, to --out; "
        "every trace's r goes to <out>.selection.json. Train on the kept traces with data.path=<out> (SFT or "
        "any objective; the teacher scores stay valid). Pick the fraction on a validation split "
        "(docs/objectives.md, 'Which objective to pick').")
    select.add_argument("--out", required=True, help="output JSONL of the kept traces, local or gs:// (written atomically)")
    select.add_argument("--keep-fraction", type=float, default=None, help="share of traces to keep, in (0, 1]")
    select.add_argument("--min-log-ratio", type=float, default=None, help="keep traces with r >= this (nats/token)")
    select.add_argument("--student-scores", default=None,
                        help="the student's scores of the traces if already made (default: <out>.student.parquet, "
                        "written and resumed here)")
    _add_config_args(select)
    select.set_defaults(func=cmd_data_select)

    demo = sub.add_parser("demo", help="run the whole pipeline in miniature on the embedded task (no download)")
    demo.add_argument("--out", type=Path, default=Path("demo_out"), help="working directory (stages are cached here)")
    demo.add_argument("--scale", default="small", choices=["micro", "small", "full"], help="model/data sizes")
    demo.set_defaults(func=cmd_demo)
    parser.command_names = list(sub.choices)
    return parser


@contextlib.contextmanager
def _cli_logging(debug: bool):
    """INFO lines of ``dcd_jax.*`` on stderr through our own handler, whatever absl did to the root
    logger (it installs its own handler on import, so ``logging.basicConfig`` would do nothing).
    Undone on exit, so an in-process ``main()`` leaves the caller's logging as it was."""
    logger = logging.getLogger("dcd_jax")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    saved = (logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    logger.propagate = False  # the root's (absl) handler would print each line a second time
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.level, logger.propagate = saved


def _user_os_error(e: OSError) -> str | None:
    """The message for an OSError on a user's path (it names the file); None for anything else."""
    import errno

    if e.errno == errno.ENOSPC:
        return f"no space left on device{f': {e.filename}' if e.filename else ''}"
    if e.filename is not None and e.errno in (errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EISDIR,
                                              errno.ENOTDIR, errno.EEXIST, errno.ENOTEMPTY):
        return f"{e.filename}: {e.strerror}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. User errors print ``error: ...`` (and a ``hint:``) and return 2; with
    ``--debug`` or ``DCD_JAX_DEBUG=1`` they raise with their traceback. Bugs always raise."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.error(f"no command given; choose one of: {', '.join(parser.command_names)}")
    debug = args.debug or os.environ.get("DCD_JAX_DEBUG", "").lower() in ("1", "true", "yes")

    with _cli_logging(debug):
        logging.getLogger(__name__).debug("host allocator: %s", host_memory.active())
        try:
            return int(args.func(args) or 0)
        except UserError as e:
            if debug:
                raise
            print(f"error: {e}", file=sys.stderr)
            if e.hint:
                print(f"hint: {e.hint}", file=sys.stderr)
            return 2
        except OSError as e:
            message = _user_os_error(e)
            if message is None or debug:
                raise
            print(f"error: {message}", file=sys.stderr)
            return 2


def run() -> None:
    """The ``dcd-jax`` console script (and ``python -m dcd_jax.cli``): restarts itself once with
    huge pages for large host buffers (:mod:`dcd_jax.host_memory`; ``DCD_JAX_HUGEPAGE_MALLOC=0``
    to skip), then runs :func:`main`. In-process callers use :func:`main` and keep their allocator."""
    host_memory.reexec_with_hugepage_malloc()
    sys.exit(main())


if __name__ == "__main__":
    run()
