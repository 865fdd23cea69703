"""The typed YAML config loader: inheritance, overrides and clear errors."""

import dataclasses
from typing import Literal

import pytest

from dcd_jax.config import ConfigError, load_config, parse_overrides, to_dict


@dataclasses.dataclass(frozen=True)
class Optim:
    lr: float = 1e-3
    schedule: Literal["cosine", "linear"] = "cosine"


@dataclasses.dataclass(frozen=True)
class Run:
    name: str = "run"
    steps: int = 10
    optim: Optim = Optim()
    mesh: tuple[int, ...] = (1, -1, 1)
    seed: int | None = None

    def validate(self):
        if self.steps <= 0:
            raise ConfigError(f"steps must be positive, got {self.steps}")


def test_yaml_base_inheritance_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("steps: 5\noptim:\n  lr: 1e-4\n  schedule: linear\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nname: child\noptim:\n  lr: 3e-4\n")
    cfg = load_config(Run, tmp_path / "child.yaml", ["steps=7", "mesh=[2, 2, 2]", "seed=3"])
    assert cfg == Run(name="child", steps=7, optim=Optim(lr=3e-4, schedule="linear"), mesh=(2, 2, 2), seed=3)
    assert to_dict(cfg)["optim"] == {"lr": 3e-4, "schedule": "linear"}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["stpes=3"], r"unknown option\(s\) \['stpes'\]"),
        (["optim.lr=fast"], r"optim\.lr: expected a number, got 'fast'"),
        (["optim.schedule=step"], r"optim\.schedule: 'step' is not one of \['cosine', 'linear'\]"),
        (["steps=2.5"], r"steps: expected an integer"),
        (["steps=0"], r"steps must be positive"),
        (["mesh=3"], r"mesh: expected a list"),
    ],
)
def test_bad_values_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Run, None, overrides)


def test_missing_file_and_bad_override():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Run, "/nonexistent.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["steps"])


def test_yaml_is_never_executed(tmp_path):
    (tmp_path / "evil.yaml").write_text("name: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(Run, tmp_path / "evil.yaml")


def test_several_files_merge_left_to_right(tmp_path):
    (tmp_path / "model.yaml").write_text("name: qwen\nsteps: 5\noptim: {lr: 1.0e-4}\n")
    (tmp_path / "sft.yaml").write_text("optim: {schedule: linear}\n")
    cfg = load_config(Run, [tmp_path / "model.yaml", tmp_path / "sft.yaml"], ["steps=6"])
    assert cfg == Run(name="qwen", steps=6, optim=Optim(lr=1e-4, schedule="linear"))
