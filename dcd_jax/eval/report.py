"""Evaluation outputs: the results folder, a markdown table and a bar chart.

Layout of one run's folder (``out_dir``)::

    out_dir/
      generations/<benchmark>.jsonl   # one JSON object per generated response, nothing dropped
      summary.json                    # every metric, per method/checkpoint and benchmark
      <chart>.png                     # optional, from :func:`bar_chart`

The summary is the single source for the table and the chart; its ``results`` entry is nested as
``{method: {benchmark: {metric: value, metric + "_ci": [lo, hi], ...}}}`` (what
:func:`summary_rows` and :func:`bar_chart` consume).  JSON never contains NaN/Infinity (they are
written as ``null``) so the files load in any JSON reader, not just Python's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from dcd_jax import storage
from dcd_jax.atomic_files import atomic_file, atomic_write_text

__all__ = ["to_jsonable", "write_results", "summary_rows", "markdown_table", "bar_chart"]


def to_jsonable(obj: Any) -> Any:
    """Convert numpy scalars/arrays, dataclasses, paths, sets and non-finite floats for JSON."""
    if obj is None or isinstance(obj, (str, bool)):
        return obj
    if isinstance(obj, (int, np.integer)) and not isinstance(obj, bool):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.ndarray):
        return [to_jsonable(x) for x in obj.tolist()]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(x) for x in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "to_dict"):
        return to_jsonable(obj.to_dict())
    return str(obj)


def _safe_name(name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("._")
    if not safe:
        raise ValueError(f"benchmark name {name!r} gives an empty file name")
    return safe


def write_results(
    out_dir: str | Path,
    per_benchmark_generations: Mapping[str, Iterable[Mapping[str, Any]]],
    summary: Mapping[str, Any],
) -> dict[str, Path]:
    """Write every generation and the summary of a run.

    Args:
        out_dir: the run's results folder (created if needed).
        per_benchmark_generations: ``{benchmark: records}``; each record is one response with
            whatever the driver knows (id, prompt, response, gold, extracted, correct, finished,
            n_tokens, sample index...).  Written as-is to ``generations/<benchmark>.jsonl``.
        summary: the metrics (see the module docstring); written to ``summary.json``.

    Returns the written paths: ``{"summary": ..., "generations/<benchmark>": ...}``.
    """
    out = storage.path(out_dir)
    gen_dir = out / "generations"
    gen_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    used: dict[str, str] = {}
    for bench, records in per_benchmark_generations.items():
        fname = _safe_name(bench)
        if fname in used and used[fname] != bench:
            raise ValueError(f"benchmarks {used[fname]!r} and {bench!r} map to the same file name")
        used[fname] = bench
        path = gen_dir / f"{fname}.jsonl"
        lines = [json.dumps(to_jsonable(r), ensure_ascii=False, allow_nan=False) for r in records]
        atomic_write_text(path, "".join(line + "\n" for line in lines))
        written[f"generations/{bench}"] = path
    spath = out / "summary.json"
    atomic_write_text(spath, json.dumps(to_jsonable(summary), indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    written["summary"] = spath
    return written


def summary_rows(results: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Flatten ``{method: {benchmark: metrics}}`` into table rows ``{method, benchmark, **metrics}``."""
    rows = []
    for method, per_bench in results.items():
        for bench, metrics in per_bench.items():
            rows.append({"method": method, "benchmark": bench, **dict(metrics)})
    return rows


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, bool, int, float, np.integer, np.floating, np.bool_))


def _fmt(v: Any, float_fmt: str, scale: float) -> str:
    if v is None:
        return "-"
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return "-" if not math.isfinite(float(v)) else float_fmt.format(float(v) * scale)
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(
    summary_rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    *,
    float_fmt: str = "{:.3f}",
    percent: bool = False,
) -> str:
    """A GitHub-markdown table of summary rows, for the terminal and for pasting into notes.

    ``columns`` defaults to every scalar key in first-seen order.  A ``<metric>_ci`` entry is
    shown inside the ``<metric>`` cell as ``value [lo, hi]`` rather than as its own column.
    ``percent=True`` multiplies floats by 100 (for accuracy-only tables).
    """
    rows = [dict(r) for r in summary_rows]
    if columns is None:
        columns = []
        for r in rows:
            for k, v in r.items():
                if k.endswith("_ci") or not _is_scalar(v) or k in columns:
                    continue
                columns.append(k)
    scale = 100.0 if percent else 1.0
    header = "| " + " | ".join(columns) + " |"
    sep = "|" + "|".join("---" if i < 2 else "---:" for i in range(len(columns))) + "|"
    lines = [header, sep]
    for r in rows:
        cells = []
        for c in columns:
            cell = _fmt(r.get(c), float_fmt, scale)
            ci = r.get(f"{c}_ci")
            if ci is not None and len(ci) == 2 and all(x is not None for x in ci):
                cell += f" [{_fmt(ci[0], float_fmt, scale)}, {_fmt(ci[1], float_fmt, scale)}]"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bar_chart(
    summary_by_method: Mapping[str, Mapping[str, Mapping[str, Any]]],
    out_png: str | Path,
    metric: str = "pass@1",
    *,
    title: str | None = None,
    percent: bool = True,
) -> Path:
    """Grouped bar chart of ``metric`` per benchmark, one bar per method/checkpoint.

    Error bars are the ``<metric>_ci`` bootstrap intervals when present.  Benchmarks missing a
    method's value get no bar for it.  Drawn with matplotlib's Agg canvas directly (no pyplot,
    so it neither needs a display nor changes the caller's backend).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    methods = list(summary_by_method)
    if not methods:
        raise ValueError("nothing to plot: summary_by_method is empty")
    benches: list[str] = []
    for per_bench in summary_by_method.values():
        for b, m in per_bench.items():
            if metric in m and b not in benches:
                benches.append(b)
    if not benches:
        raise ValueError(f"no benchmark has metric {metric!r}")
    scale = 100.0 if percent else 1.0

    fig = Figure(figsize=(max(6.0, 1.2 * len(benches) * max(1, len(methods)) ** 0.5 + 2), 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(benches), dtype=np.float64)
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        vals, lo_err, hi_err = [], [], []
        for b in benches:
            m = summary_by_method[method].get(b, {})
            v = m.get(metric)
            v = float(v) * scale if v is not None and math.isfinite(float(v)) else np.nan
            ci = m.get(f"{metric}_ci")
            if ci is not None and len(ci) == 2 and None not in ci and not np.isnan(v):
                lo_err.append(max(0.0, v - float(ci[0]) * scale))
                hi_err.append(max(0.0, float(ci[1]) * scale - v))
            else:
                lo_err.append(0.0)
                hi_err.append(0.0)
            vals.append(v)
        pos = x - 0.4 + width * (i + 0.5)
        bars = ax.bar(pos, vals, width, label=str(method), yerr=[lo_err, hi_err], capsize=3)
        ax.bar_label(bars, labels=["" if np.isnan(v) else f"{v:.1f}" if percent else f"{v:.3f}" for v in vals],
                     fontsize=7, padding=2)
    ax.set_xticks(x)
    ax.set_xticklabels(benches, rotation=20 if len(benches) > 4 else 0, ha="right" if len(benches) > 4 else "center")
    ax.set_ylabel(f"{metric} (%)" if percent else metric)
    if percent:
        ax.set_ylim(0, 105)
    ax.set_title(title or f"{metric} by benchmark")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    out = storage.path(out_png)
    with atomic_file(out) as tmp:  # a local temporary: matplotlib writes local files; a bucket gets the upload
        fig.savefig(tmp, format=out.suffix.lstrip(".") or "png")
    return out
