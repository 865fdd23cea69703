"""One config path for every command: eval / generate / score-teacher flags are sugar for config keys.

Cheap: only argument parsing and config loading (no model runs)."""

import re
from pathlib import Path

import pytest
import yaml

from dcd_jax.cli import FLAG_KEYS, build_parser, load_command_config, main
from dcd_jax.config import ConfigError, load_config, to_dict
from dcd_jax.teacher.generate import GenerateConfig
from dcd_jax.train.commands import EvalCommandConfig, GenerateCommandConfig, ScoreCommandConfig
from dcd_jax.train.config import MeshConfig

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ROOT / "configs" / "commands"


def load(argv):
    args = build_parser().parse_args(argv)
    return load_command_config(args, args.command)


FLAG_FORMS = {
    "eval": (
        ["eval", "--model", "sft=runs/sft", "--model", "dcd=runs/dcd", "--benchmarks", "embedded,gsm8k",
         "--path", "gsm8k=data/gsm8k.jsonl", "--out", "res", "--dtype", "bfloat16", "--split", "test", "--limit", "5",
         "--max-new-tokens", "64", "--batch-size", "4", "--n", "3", "--temperature", "0.6", "--template", "plain",
         "--system-prompt", "be brief", "--ifeval", "--exaccerr-teacher", "t", "--seed", "7", "--mesh", "2,-1,1"],
        ["models.sft=runs/sft", "models.dcd=runs/dcd", "eval.benchmarks=[embedded, gsm8k]",
         "eval.paths.gsm8k=data/gsm8k.jsonl", "out=res", "dtype=bfloat16", "eval.split=test", "eval.limit=5",
         "eval.max_new_tokens=64", "eval.batch_size=4", "eval.n_samples=3", "eval.temperature=0.6",
         "eval.template=plain", "eval.system_prompt=be brief", "eval.ifeval=true", "eval.exaccerr_teacher=t",
         "eval.seed=7", "mesh.data=2", "mesh.fsdp=-1", "mesh.tensor=1"],
    ),
    "generate": (
        ["generate", "--teacher", "tea", "--benchmark", "gsm8k", "--prompts", "p.jsonl", "--out", "tr.jsonl",
         "--keep", "all", "--split", "train", "--limit", "9", "--max-new-tokens", "32", "--batch-size", "2", "--n", "4",
         "--temperature", "0.9", "--template", "raw", "--system-prompt", "hi", "--seed", "1", "--mesh", "1,-1,2"],
        ["generate.teacher=tea", "generate.benchmark=gsm8k", "generate.prompts=p.jsonl", "generate.out=tr.jsonl",
         "generate.keep=all", "generate.split=train", "generate.limit=9", "generate.max_new_tokens=32",
         "generate.batch_size=2", "generate.n=4", "generate.temperature=0.9", "generate.template=raw",
         "generate.system_prompt=hi", "generate.seed=1", "mesh.data=1", "mesh.fsdp=-1", "mesh.tensor=2"],
    ),
    "score-teacher": (
        ["score-teacher", "--teacher", "tea", "--out", "s.parquet", "--topk", "4", "--batch-size", "3",
         "--dtype", "bfloat16", "--mesh", "1,2,1", "data.path=traces.jsonl"],
        ["data.path=traces.jsonl", "score.teacher=tea", "score.out=s.parquet", "score.topk=4", "score.batch_size=3",
         "score.dtype=bfloat16", "teacher_mesh.data=1", "teacher_mesh.fsdp=2", "teacher_mesh.tensor=1"],
    ),
}


@pytest.mark.parametrize("command", sorted(FLAG_FORMS))
def test_flags_equal_config_file_and_overrides(command, tmp_path):
    flags, overrides = FLAG_FORMS[command]
    from_flags = load(flags)
    assert from_flags == load([command, *overrides])
    # the same through a --config file (every override but one in the file, that one on the line)
    nested = {}
    for item in overrides[1:]:
        key, value = item.split("=", 1)
        node = nested
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = yaml.safe_load(value)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(nested))
    assert load([command, "--config", str(tmp_path / "c.yaml"), overrides[0]]) == from_flags
    # every sugar flag is exercised above
    given = {a.lstrip("-").replace("-", "_") for a in flags if a.startswith("--")}
    assert set(FLAG_KEYS[command]) <= given


def test_flags_beat_the_file_and_overrides_beat_flags(tmp_path):
    (tmp_path / "c.yaml").write_text("generate: {teacher: a, n: 2, seed: 5}\n")
    cfg = load(["generate", "--config", str(tmp_path / "c.yaml"), "--n", "3", "--seed", "6", "generate.seed=9"])
    assert (cfg.generate.teacher, cfg.generate.n, cfg.generate.seed) == ("a", 3, 9)


def test_defaults_are_the_dataclass_defaults():
    assert load(["eval", "--model", "a=b"]) == EvalCommandConfig(models={"a": "b"})
    assert load(["generate", "--teacher", "t"]).generate == GenerateConfig(teacher="t")
    cfg = load(["score-teacher", "--teacher", "t", "data.path=x"])
    assert cfg.score.topk == 20 and cfg.score.batch_size == 8 and cfg.score.dtype == "float32"
    # one device unless a mesh is given (train's mesh defaults to all devices: explicit, documented)
    assert load(["eval", "--model", "a=b"]).mesh is None
    assert load(["generate", "--teacher", "t"]).mesh is None
    assert cfg.teacher_mesh is None
    # a run config's mesh: (training) does not move the teacher off one device
    base = ROOT / "configs" / "base.yaml"
    assert load(["score-teacher", "--config", str(base), "--teacher", "t", "data.path=x"]).teacher_mesh is None


@pytest.mark.parametrize("text, mesh", [("1,-1,1", MeshConfig(1, -1, 1)), ("2,2,2", MeshConfig(2, 2, 2)),
                                        ("4,1,-1", MeshConfig(4, 1, -1))])
def test_mesh_string_is_mesh_config(text, mesh):
    assert MeshConfig.parse(text) == mesh
    overrides = [f"mesh.data={mesh.data}", f"mesh.fsdp={mesh.fsdp}", f"mesh.tensor={mesh.tensor}"]
    assert load(["eval", "--model", "a=b", "--mesh", text]) == load(["eval", "--model", "a=b", *overrides])
    assert load(["eval", "--model", "a=b", "--mesh", text]).mesh == mesh


def test_bad_mesh_string_is_named():
    with pytest.raises(ConfigError, match="--mesh expects three integers"):
        MeshConfig.parse("1,2")


@pytest.mark.parametrize("argv, key", [
    (["eval"], "models is required"),
    (["generate"], "generate.teacher is required"),
    (["score-teacher", "data.path=x"], "score.teacher is required"),
    (["score-teacher", "--teacher", "t"], "data.path is required"),
    (["eval", "--model", "a=b", "eval.bogus=1"], r"unknown option\(s\) \['bogus'\]"),
])
def test_missing_required_key_is_named(argv, key, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert re.search(key, lines[0]), err


@pytest.mark.parametrize("name, cls, own", [
    ("eval.yaml", EvalCommandConfig, None),
    ("generate.yaml", GenerateCommandConfig, None),
    ("score-teacher.yaml", ScoreCommandConfig, {"teacher_mesh", "score"}),
])
def test_command_yaml_documents_every_option(name, cls, own):
    """configs/commands/*.yaml list exactly the command's own options, with the defaults as values."""
    doc = yaml.safe_load((COMMANDS / name).read_text())
    defaults = to_dict(cls())
    if own is not None:
        defaults = {k: v for k, v in defaults.items() if k in own}

    def keys(tree, prefix=""):
        out = set()
        for k, v in tree.items():
            out.add(prefix + k)
            if isinstance(v, dict) and v:
                out |= keys(v, prefix + k + ".")
        return out

    assert keys(doc) == keys(defaults)
    assert doc == defaults
    # and it loads (with the required keys given)
    required = {"eval.yaml": ["models.a=b"], "generate.yaml": ["generate.teacher=t"],
                "score-teacher.yaml": ["score.teacher=t", "data.path=x"]}[name]
    load_config(cls, COMMANDS / name, required)
