"""Benchmark adapters: a local file or hub dataset -> prompts + gold answers.

Each benchmark is described by a :class:`BenchmarkSpec` (where the data lives by default, which
columns hold the problem / answer / solution, how to get the gold answer from a row, and the
prompt template).  :func:`load_benchmark` turns one into a list of :class:`EvalItem`.

Everything a user may need to change is an argument, not code: a different mirror of AIME with
``Problem``/``Answer`` columns, a local parquet export, another split, another prompt.  Column
names are also matched case-insensitively, so the common capitalised variants work untouched.

Local files are read directly (JSON, JSONL, Parquet, CSV, or a directory of them, e.g. a hub
snapshot with ``data/test-00000-of-00001.parquet``): no network and no ``datasets`` cache needed,
which is what tests and air-gapped clusters want.  Only when no ``path`` is given do we go through
``datasets.load_dataset`` with the spec's hub id, which works offline from the local HF cache or
online when the user has network.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from dcd_jax.errors import DataInputError
from dcd_jax.eval.grading import extract_boxed

__all__ = [
    "DEFAULT_PROMPT_TEMPLATE",
    "VERBATIM_TEMPLATE",
    "BenchmarkSpec",
    "EvalItem",
    "BenchmarkLoadError",
    "BENCHMARKS",
    "get_spec",
    "list_benchmarks",
    "register_benchmark",
    "fill_prompt_template",
    "read_records",
    "load_benchmark",
    "gold_from_field",
    "gold_from_gsm8k",
    "gold_from_boxed_solution",
    "gold_from_list_field",
    "iter_prompts",
    "golds",
]

logger = logging.getLogger(__name__)

#: The prompt used by most open reasoning-model evaluations (Qwen2.5-Math, DeepSeek-R1 distills).
DEFAULT_PROMPT_TEMPLATE = "{problem}\nPlease reason step by step, and put your final answer within \\boxed{}."
#: The prompt is the record's text as is (the embedded synthetic task ships finished prompts).
VERBATIM_TEMPLATE = "{problem}"


class BenchmarkLoadError(DataInputError):
    """A benchmark could not be read (missing file, unknown column, hub unreachable...)."""


@dataclasses.dataclass(frozen=True)
class EvalItem:
    """One evaluation problem.

    Attributes:
        id: stable identifier (the dataset's own id column when it has one, else ``name-index``).
        prompt: the text given to the model (template applied, chat template not applied: that is
            the sampler's business, since it depends on the tokenizer).
        gold: the reference final answer as a string, ready for :func:`~dcd_jax.eval.grading.grade`.
        meta: benchmark name, raw problem and a few descriptive columns (level, subject...), kept
            in the generations file so results can be broken down later.
    """

    id: str
    prompt: str
    gold: str
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


GoldExtractor = Callable[[Mapping[str, Any], "BenchmarkSpec"], "str | None"]


@dataclasses.dataclass(frozen=True)
class BenchmarkSpec:
    """How to read one benchmark.

    Attributes:
        name: registry key.
        hub_id: default hub dataset (``None``: local files only).
        hub_config: dataset config name for ``datasets.load_dataset``.
        split: default split (also used to pick files inside a local directory).
        problem_field: column with the problem text.
        answer_field: column with the final answer (``None`` if the benchmark has none).
        solution_field: column with a worked solution (``None`` if absent).
        id_field: column with a stable id (``None``: use ``name-index``).
        gold_extractor: ``(row, spec) -> gold answer string or None``.
        prompt_template: text with a ``{problem}`` placeholder.  Only that placeholder is
            substituted (no ``str.format``), so literal braces like ``\\boxed{}`` are safe.
        meta_fields: extra columns copied into :attr:`EvalItem.meta` when present.
    """

    name: str
    hub_id: str | None
    split: str
    problem_field: str
    answer_field: str | None
    gold_extractor: GoldExtractor
    solution_field: str | None = None
    id_field: str | None = None
    hub_config: str | None = None
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    meta_fields: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------
# Gold-answer extractors
# --------------------------------------------------------------------------------------------


def _answer_to_str(value: Any) -> str | None:
    """Stringify a gold value: integral floats lose their ``.0`` (AMC23 stores ``27.0``), and
    ``$...$`` around a string answer (Omni-MATH) is dropped."""
    if value is None:
        return None
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if value != value:  # NaN: missing in a pandas/parquet export
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (list, tuple)):
        parts = [p for p in (_answer_to_str(v) for v in value) if p]
        return ", ".join(parts) if parts else None
    s = _strip_math(str(value))
    return s or None


def _get(row: Mapping[str, Any], field: str | None) -> Any:
    """Column lookup, exact first, then case-insensitive (``Problem`` vs ``problem``)."""
    if field is None:
        return None
    if field in row:
        return row[field]
    lower = field.lower()
    for key in row:
        if isinstance(key, str) and key.lower() == lower:
            return row[key]
    return None


def _has(row: Mapping[str, Any], field: str) -> bool:
    lower = field.lower()
    return field in row or any(isinstance(k, str) and k.lower() == lower for k in row)


def gold_from_field(row: Mapping[str, Any], spec: BenchmarkSpec) -> str | None:
    """The answer column as is (AIME, AMC23, MATH500, Omni-MATH, embedded)."""
    return _answer_to_str(_get(row, spec.answer_field))


def gold_from_gsm8k(row: Mapping[str, Any], spec: BenchmarkSpec) -> str | None:
    """GSM8K: the number after the last ``####`` in the answer, thousands commas removed."""
    text = _get(row, spec.answer_field)
    if text is None:
        return None
    text = str(text)
    if "####" not in text:
        return _answer_to_str(text)
    return _answer_to_str(text.rsplit("####", 1)[1].strip().replace(",", ""))


def gold_from_boxed_solution(row: Mapping[str, Any], spec: BenchmarkSpec) -> str | None:
    """MATH: the last ``\\boxed{}`` of the solution; the answer column if the boxed one is missing."""
    sol = _get(row, spec.solution_field)
    if sol is not None:
        boxed = extract_boxed(str(sol))
        if boxed:
            return _strip_math(boxed) or None
    return _answer_to_str(_get(row, spec.answer_field))


def gold_from_list_field(row: Mapping[str, Any], spec: BenchmarkSpec) -> str | None:
    """OlympiadBench: ``final_answer`` is a list of LaTeX strings; join them with ``", "``.

    Math delimiters around each element are dropped, so ``["$\\frac{1}{2}$"]`` becomes
    ``\\frac{1}{2}`` and a multi-answer ``["$1$", "$2$"]`` becomes ``1, 2`` (graded as a set/tuple
    by math-verify).  A JSON-encoded list (as in some CSV exports) is decoded first.
    """
    value = _get(row, spec.answer_field)
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    if isinstance(value, (list, tuple)):
        parts = [_strip_math(str(v)) for v in value if v is not None and str(v).strip()]
        return ", ".join(parts) if parts else None
    return _answer_to_str(_strip_math(str(value))) if value is not None else None


def _strip_math(s: str) -> str:
    s = s.strip()
    if len(s) >= 2 and s.startswith("$") and s.endswith("$"):
        s = s.strip("$").strip()
    if s.startswith("\\(") and s.endswith("\\)"):
        s = s[2:-2].strip()
    return s


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

BENCHMARKS: dict[str, BenchmarkSpec] = {}


def _key(name: str) -> str:
    return re.sub(r"[-\s]+", "_", name.strip().lower())


_ALIASES = {
    "aime_2024": "aime24",
    "aime2024": "aime24",
    "aime_2025": "aime25",
    "aime2025": "aime25",
    "amc_23": "amc23",
    "amc2023": "amc23",
    "math_500": "math500",
    "omnimath": "omni_math",
    "olympiad_bench": "olympiadbench",
    "synthetic": "embedded",
}


def register_benchmark(spec: BenchmarkSpec, *, overwrite: bool = False) -> BenchmarkSpec:
    """Add a spec to the registry (``overwrite=True`` to replace an existing one)."""
    key = _key(spec.name)
    if key in BENCHMARKS and not overwrite:
        raise ValueError(f"benchmark {spec.name!r} is already registered")
    BENCHMARKS[key] = spec
    return spec


def get_spec(name: str) -> BenchmarkSpec:
    key = _key(name)
    key = _ALIASES.get(key, key)
    if key not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(list_benchmarks())}")
    return BENCHMARKS[key]


def list_benchmarks() -> list[str]:
    return sorted(BENCHMARKS)


for _spec in (
    BenchmarkSpec(
        name="gsm8k",
        hub_id="openai/gsm8k",
        hub_config="main",
        split="test",
        problem_field="question",
        answer_field="answer",
        gold_extractor=gold_from_gsm8k,
    ),
    BenchmarkSpec(
        name="math",
        hub_id="DigitalLearningGmbH/MATH-lighteval",
        hub_config="default",
        split="test",
        problem_field="problem",
        answer_field="answer",
        solution_field="solution",
        gold_extractor=gold_from_boxed_solution,
        meta_fields=("level", "type"),
    ),
    BenchmarkSpec(
        name="math500",
        hub_id="HuggingFaceH4/MATH-500",
        split="test",
        problem_field="problem",
        answer_field="answer",
        solution_field="solution",
        id_field="unique_id",
        gold_extractor=gold_from_field,
        meta_fields=("level", "subject"),
    ),
    BenchmarkSpec(
        name="aime24",
        hub_id="HuggingFaceH4/aime_2024",
        split="train",
        problem_field="problem",
        answer_field="answer",
        solution_field="solution",
        id_field="id",
        gold_extractor=gold_from_field,
        meta_fields=("year", "url"),
    ),
    BenchmarkSpec(
        name="aime25",
        hub_id="math-ai/aime25",
        split="test",
        problem_field="problem",
        answer_field="answer",
        id_field="id",
        gold_extractor=gold_from_field,
    ),
    BenchmarkSpec(
        name="amc23",
        hub_id="math-ai/amc23",
        split="test",
        problem_field="question",
        answer_field="answer",
        id_field="id",
        gold_extractor=gold_from_field,
        meta_fields=("url",),
    ),
    BenchmarkSpec(
        name="olympiadbench",
        hub_id="Hothan/OlympiadBench",
        hub_config="OE_TO_maths_en_COMP",
        split="train",
        problem_field="question",
        answer_field="final_answer",
        solution_field="solution",
        id_field="id",
        gold_extractor=gold_from_list_field,
        meta_fields=("subfield", "answer_type", "unit", "is_multiple_answer", "difficulty"),
    ),
    BenchmarkSpec(
        name="omni_math",
        hub_id="KbsdJames/Omni-MATH",
        split="test",
        problem_field="problem",
        answer_field="answer",
        solution_field="solution",
        gold_extractor=gold_from_field,
        meta_fields=("domain", "difficulty", "source"),
    ),
    BenchmarkSpec(
        name="embedded",
        hub_id=None,
        split="eval",  # dcd_jax.data.synthetic writes eval.jsonl next to train.jsonl
        problem_field="prompt",
        answer_field="answer",
        id_field="id",
        gold_extractor=gold_from_field,
        prompt_template=VERBATIM_TEMPLATE,
    ),
):
    register_benchmark(_spec)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------

_EXTS = (".jsonl", ".ndjson", ".json", ".parquet", ".csv")


def fill_prompt_template(template: str, problem: str) -> str:
    """Substitute ``{problem}`` in ``template`` (plain replacement, braces elsewhere are literal)."""
    if "{problem}" not in template:
        raise ValueError(f"prompt template must contain '{{problem}}': {template!r}")
    return template.replace("{problem}", problem)


def _read_file(path: Path, split: str | None) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        rows = []
        with path.open(encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise BenchmarkLoadError(f"{path}:{lineno}: invalid JSON ({e})") from e
        return rows
    if suffix == ".json":
        with path.open(encoding="utf-8-sig") as f:
            data = json.load(f)
        if isinstance(data, list):
            return list(data)
        if isinstance(data, dict):
            # {"test": [...]} / {"data": [...]} / column-oriented {"col": [...], ...}
            for key in ([split] if split else []) + ["data", "rows", "examples"]:
                if key in data and isinstance(data[key], list):
                    return list(data[key])
            cols = {k: v for k, v in data.items() if isinstance(v, list)}
            if cols and len(cols) == len(data) and len({len(v) for v in cols.values()}) == 1:
                n = len(next(iter(cols.values())))
                return [{k: cols[k][i] for k in cols} for i in range(n)]
        raise BenchmarkLoadError(f"{path}: expected a list of records or a column mapping")
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if suffix == ".csv":
        with path.open(encoding="utf-8-sig", newline="") as f:
            return list(csv.DictReader(f))
    raise BenchmarkLoadError(f"{path}: unsupported file type (use one of {', '.join(_EXTS)})")


def _split_matches(rel: Path, split: str) -> bool:
    """Whether a file inside a dataset directory belongs to ``split``.

    Matches hub layouts: ``test.jsonl``, ``test-00000-of-00001.parquet``, ``data/test-*``,
    ``test/0000.parquet``.
    """
    tokens: set[str] = set()
    for part in rel.parts[:-1]:
        tokens.add(part.lower())
    stem = rel.name.lower()
    for ext in _EXTS:
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
    tokens.add(stem)
    tokens.update(t for t in re.split(r"[-_.]", stem) if t)
    return split.lower() in tokens


def read_records(path: str | Path, split: str | None = None) -> list[dict[str, Any]]:
    """Read the rows of a local JSON / JSONL / Parquet / CSV file, or of a directory of them.

    For a directory, only the files belonging to ``split`` are read (so a hub snapshot holding
    both ``train-*`` and ``test-*`` files gives just the requested split), in sorted order.  A
    directory with a single data file is read whatever its name; several files none of which
    belongs to ``split`` is an error rather than a silent mix of splits.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise BenchmarkLoadError(f"no such file or directory: {p}")
    if p.is_file():
        return _read_file(p, split)
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in _EXTS)
    files = [f for f in files if not any(part.startswith(".") for part in f.relative_to(p).parts)]
    if not files:
        raise BenchmarkLoadError(f"{p}: no {', '.join(_EXTS)} files inside")
    if split:
        chosen = [f for f in files if _split_matches(f.relative_to(p), split)]
        if chosen:
            files = chosen
        elif len(files) > 1:
            # Never silently mix splits (e.g. train.jsonl + eval.jsonl): ask for a choice.
            names = ", ".join(str(f.relative_to(p)) for f in files[:10])
            raise BenchmarkLoadError(
                f"{p}: no file belongs to split {split!r} among {len(files)} files ({names}); "
                "pass split=<name> or the path of one file"
            )
    rows: list[dict[str, Any]] = []
    for f in files:
        rows.extend(_read_file(f, split))
    return rows


def _load_hub(hub_id: str, config: str | None, split: str) -> list[dict[str, Any]]:
    """Rows of a hub dataset through ``datasets`` (offline: from the local cache only)."""
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a core dependency
        raise BenchmarkLoadError("loading from the hub needs the 'datasets' package") from e
    try:
        ds = datasets.load_dataset(hub_id, config, split=split)
    except Exception as e:  # noqa: BLE001 - re-raised with a useful message
        raise BenchmarkLoadError(
            f"could not load hub dataset {hub_id!r} (config={config!r}, split={split!r}): {e}. "
            "Without network (HF_DATASETS_OFFLINE=1) only datasets already in the local HF cache "
            "load; otherwise download it once and pass path=<file or directory>."
        ) from e
    return [dict(r) for r in ds]


def load_benchmark(
    name: str,
    path: str | Path | None = None,
    split: str | None = None,
    *,
    hub_id: str | None = None,
    hub_config: str | None = None,
    problem_field: str | None = None,
    answer_field: str | None = None,
    solution_field: str | None = None,
    id_field: str | None = None,
    prompt_template: str | None = None,
    limit: int | None = None,
) -> list[EvalItem]:
    """Load a benchmark as :class:`EvalItem` s.

    Args:
        name: a registered benchmark (:func:`list_benchmarks`), e.g. ``"gsm8k"``, ``"math500"``.
        path: local file or directory; when ``None`` the hub dataset is used.
        split: split name (default: the spec's).  Also selects files in a directory.
        hub_id, hub_config: override the spec's hub dataset.
        problem_field, answer_field, solution_field, id_field: override column names.
        prompt_template: override the template (must contain ``{problem}``).
        limit: keep only the first ``limit`` items (after dropping rows without a gold answer).

    Rows whose gold answer cannot be determined are dropped with a warning (counted), rather than
    silently graded against an empty string.
    """
    spec = get_spec(name)
    overrides = {
        k: v
        for k, v in dict(
            hub_id=hub_id,
            hub_config=hub_config,
            problem_field=problem_field,
            answer_field=answer_field,
            solution_field=solution_field,
            id_field=id_field,
            prompt_template=prompt_template,
        ).items()
        if v is not None
    }
    spec = dataclasses.replace(spec, **overrides)
    split = split or spec.split
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")

    if path is not None:
        rows = read_records(path, split)
        source = str(path)
    else:
        if spec.hub_id is None:
            raise BenchmarkLoadError(f"benchmark {spec.name!r} has no hub dataset: pass path=")
        rows = _load_hub(spec.hub_id, spec.hub_config, split)
        source = spec.hub_id

    if rows and not _has(rows[0], spec.problem_field):
        raise BenchmarkLoadError(
            f"{source}: no column {spec.problem_field!r} for the problem text; columns are "
            f"{sorted(map(str, rows[0]))}. Pass problem_field=... to choose one."
        )

    items: list[EvalItem] = []
    n_missing = 0
    seen_ids: set[str] = set()
    for index, row in enumerate(rows):
        problem = _get(row, spec.problem_field)
        gold = spec.gold_extractor(row, spec)
        if problem is None or not str(problem).strip() or gold is None:
            n_missing += 1
            continue
        raw_id = _get(row, spec.id_field)
        item_id = str(raw_id) if raw_id is not None and str(raw_id) != "" else f"{spec.name}-{index}"
        if item_id in seen_ids:  # keep ids unique: generations are keyed by them
            item_id = f"{item_id}#{index}"
        seen_ids.add(item_id)
        meta: dict[str, Any] = {"benchmark": spec.name, "index": index, "problem": str(problem)}
        for field in spec.meta_fields:
            if _has(row, field):
                meta[field] = _jsonable(_get(row, field))
        items.append(
            EvalItem(id=item_id, prompt=fill_prompt_template(spec.prompt_template, str(problem)), gold=gold, meta=meta)
        )
        if limit is not None and len(items) >= limit:
            break
    if n_missing:
        warnings.warn(
            f"{spec.name}: dropped {n_missing} row(s) without a problem or a gold answer "
            f"(answer_field={spec.answer_field!r}, solution_field={spec.solution_field!r})",
            stacklevel=2,
        )
    return items


def _jsonable(value: Any) -> Any:
    """Meta values must survive ``json.dumps`` in the generations file."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if hasattr(value, "item"):
        try:
            return value.item()
        except Exception:  # noqa: BLE001
            pass
    return str(value)


def iter_prompts(items: Iterable[EvalItem]) -> list[str]:
    """Prompts of ``items`` in order (what the sampler consumes)."""
    return [it.prompt for it in items]


def golds(items: Sequence[EvalItem]) -> list[str]:
    """Gold answers of ``items`` in order."""
    return [it.gold for it in items]
