"""``dcd-jax`` command line: one subcommand per stage of the offline distillation pipeline."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

EPILOG = """\
pipeline:  generate (teacher traces) -> score-teacher (cached teacher log-probs)
           -> train (SFT / DCD / baselines) -> eval (math benchmarks)
start with `dcd-jax demo`, which runs all of it on an embedded task with no download.
"""


def _parse_mesh(text: str | None):
    if not text:
        return None
    from dcd_jax.sharding import make_mesh

    try:
        data, fsdp, tensor = (int(x) for x in text.split(","))
    except ValueError:
        raise SystemExit(f"--mesh expects three integers data,fsdp,tensor (e.g. 1,-1,1), got {text!r}") from None
    return make_mesh(data, fsdp, tensor)


def cmd_convert_hf_to_flax(args: argparse.Namespace) -> int:
    from dcd_jax.convert import load_hf_params, open_hf_checkpoint, resolve_model_dir, save_model_dir
    from dcd_jax.models.config import ModelConfig

    directory = resolve_model_dir(args.hf)
    ckpt = open_hf_checkpoint(directory)
    cfg = ModelConfig.from_hf_config(ckpt.hf_config, source=str(directory / "config.json"), param_dtype=args.dtype)
    params = load_hf_params(ckpt, cfg, _parse_mesh(args.mesh))
    save_model_dir(args.out, params, cfg, ckpt.hf_config, side_files_from=directory)
    print(f"converted {directory} ({cfg.model_type}, {cfg.num_params / 1e6:.1f}M params) -> {args.out}")
    return 0


def cmd_convert_flax_to_hf(args: argparse.Namespace) -> int:
    from dcd_jax.convert import load_model_dir, save_hf
    from dcd_jax.convert.model_dir import SIDE_DIR

    cfg, hf_config, params, meta_dir = load_model_dir(args.ckpt)
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
    try:
        result = train(cfg, TrainHooks())
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    print(f"{result.status} at step {result.step}: {result.out_dir}")
    return 0


def cmd_data_inspect(args: argparse.Namespace) -> int:
    from dcd_jax.convert.model_dir import load_pretrained_tokenizer
    from dcd_jax.data import inspect_data

    cfg = _load_run_config(args)
    tokenizer = load_pretrained_tokenizer(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    print(inspect_data(cfg.data, tokenizer))
    return 0


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, action="append", default=None,
                   help="run config YAML (see configs/base.yaml); repeat to merge several, left to right")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=1e-5 data.seq_len=2048")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dcd-jax",
        description="Distribution-corrected offline distillation of reasoning into small LMs (JAX/Flax).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    convert = sub.add_parser("convert", help="convert checkpoints between Hugging Face and dcd-jax formats")
    conv_sub = convert.add_subparsers(dest="direction", required=True, metavar="DIRECTION")
    h2f = conv_sub.add_parser("hf-to-flax", help="HF checkpoint dir (or hub id) -> dcd-jax model dir")
    h2f.add_argument("--hf", required=True, help="local HF model directory, or a hub id such as Qwen/Qwen2.5-0.5B")
    h2f.add_argument("--out", required=True, type=Path, help="output dcd-jax model directory")
    h2f.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameter dtype to store")
    h2f.add_argument("--mesh", default=None, help="data,fsdp,tensor mesh to load onto (default: one device)")
    h2f.set_defaults(func=cmd_convert_hf_to_flax)
    f2h = conv_sub.add_parser("flax-to-hf", help="dcd-jax model dir or training checkpoint -> HF directory")
    f2h.add_argument("--ckpt", required=True, type=Path, help="model dir, run dir, or checkpoints/<step> dir")
    f2h.add_argument("--out", required=True, type=Path, help="output HF model directory")
    f2h.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="cast weights (default: as stored)")
    f2h.set_defaults(func=cmd_convert_flax_to_hf)

    tr = sub.add_parser("train", help="distill a student (SFT / DCD / baselines); resumes from out_dir",
                        description="Train a student. Rerunning with the same train.out_dir resumes from its latest "
                        "checkpoint; SIGTERM/SIGINT saves at the next step boundary and exits 0.")
    _add_config_args(tr)
    tr.set_defaults(func=cmd_train)

    data = sub.add_parser("data", help="inspect the training data the way the student will see it")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    inspect = data_sub.add_parser("inspect", help="counts, token-length percentiles, packing, rendered examples with the loss mask")
    _add_config_args(inspect)
    inspect.set_defaults(func=cmd_data_inspect)

    demo = sub.add_parser("demo", help="run the whole pipeline in miniature on the embedded task (no download)")
    demo.add_argument("--out", type=Path, default=Path("demo_out"), help="working directory (stages are cached here)")
    demo.add_argument("--scale", default="small", choices=["micro", "small", "full"], help="model/data sizes")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from dcd_jax.config import ConfigError
    from dcd_jax.convert import CheckpointError
    from dcd_jax.models.config import UnsupportedModelError

    try:
        return int(args.func(args) or 0)
    except (ConfigError, CheckpointError, UnsupportedModelError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
