"""``dcd-jax data inspect``: what the student will learn, before any compute is spent.

The report has the record counts (kept / skipped / dropped / truncated, by reason), token-length
percentiles, the packing efficiency of one pass over the data with the configured packer, and a
few rendered examples in which the tokens in the loss are shown between ``«`` and ``»``.

Streamed (``data.streaming``, ``--limit`` or ``--processes``): the data is read block by block as
each of ``processes`` processes would read it (only the first ``limit`` records with ``--limit``),
holding one block at a time, and the report adds the bytes each process read.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import numpy as np

from dcd_jax.data.config import DataConfig
from dcd_jax.data.pipeline import DataStats, TrainIterator, prepare_examples, streamed_iterator
from dcd_jax.data.teacher_scores import tokenizer_fingerprint
from dcd_jax.data.tokenization import TokenizedExample, uses_chat_template

LOSS_OPEN, LOSS_CLOSE = "«", "»"


def render_with_mask(example: TokenizedExample, tokenizer: Any) -> str:
    """The example's text with every run of loss tokens wrapped in ``«...»`` (special tokens shown)."""
    ids, mask = example.input_ids, example.response_mask
    parts = []
    for in_loss, group in itertools.groupby(range(len(ids)), key=lambda i: bool(mask[i])):
        idx = list(group)
        text = tokenizer.decode(ids[idx].tolist(), skip_special_tokens=False)
        parts.append(f"{LOSS_OPEN}{text}{LOSS_CLOSE}" if in_loss else text)
    return "".join(parts)


def _percentiles(values: np.ndarray) -> str:
    p = np.percentile(values, [50, 90, 99]) if values.size else [0, 0, 0]
    return f"p50 {p[0]:.0f}  p90 {p[1]:.0f}  p99 {p[2]:.0f}  max {values.max() if values.size else 0}"


def packing_pass(cfg: DataConfig, examples: list[TokenizedExample], *, max_batches: int = 100_000) -> tuple[float, int]:
    """Efficiency (real tokens / token slots) and batch count of the first epoch as configured."""
    it = TrainIterator(dataclasses.replace(cfg, num_epochs=1), examples, DataStats(),
                       process_index=0, process_count=1, tokenizer_fp="")
    for _ in itertools.islice(it, max_batches):
        pass
    return it.stats.packing_efficiency or 0.0, it.stats.batches


def _streamed_pass(cfg: DataConfig, tokenizer: Any, processes: int, n_show: int) -> dict[str, Any]:
    """One epoch of every process's share, streamed: stats, lengths, packing and bytes per process."""
    cfg = dataclasses.replace(cfg, streaming=True, num_epochs=1, shuffle=False)
    lengths: dict[str, list[int]] = {"total": [], "prompt": [], "response": []}
    shown: list[TokenizedExample] = []

    def observe(examples: list[TokenizedExample]) -> None:
        for ex in examples:
            lengths["total"].append(ex.num_tokens)
            lengths["prompt"].append(ex.prompt_length)
            lengths["response"].append(ex.num_response_tokens)
        shown.extend(examples[: n_show - len(shown)])

    per_process, slots, real, batches = [], 0, 0, 0
    for p in range(processes):
        it = streamed_iterator(cfg, tokenizer, process_index=p, process_count=processes)
        it.source.observer = observe
        for _ in it:
            pass
        per_process.append(it.stats)
        slots, real, batches = slots + it.stats.token_slots, real + it.stats.real_tokens, batches + it.stats.batches
    return {"stats": per_process, "lengths": {k: np.array(v) for k, v in lengths.items()}, "shown": shown,
            "efficiency": real / slots if slots else 0.0, "batches": batches}


def _merged_summary(stats: list[DataStats]) -> str:
    total = DataStats()
    for s in stats:
        for f in ("records_read", "examples", "tokens", "response_tokens", "truncated", "dropped_too_long"):
            setattr(total, f, getattr(total, f) + getattr(s, f))
        total.skipped.update(s.skipped)
        for reason, where in s.skip_examples.items():
            total.skip_examples.setdefault(reason, []).extend(where[: 3 - len(total.skip_examples.get(reason, []))])
    return total.summary()


def inspect_data(cfg: DataConfig, tokenizer: Any, *, n_show: int = 3, limit: int | None = None,
                 processes: int = 1) -> str:
    """The text report of ``dcd-jax data inspect`` for ``cfg`` and the student ``tokenizer``.

    Reads and validates the whole input (as process 0 of 1), or streamed (``data.streaming``,
    ``limit`` records, or the shares of ``processes`` processes; see the module doc). Invalid
    records raise :class:`DataError` unless ``on_bad_record: skip`` (then they are counted).
    """
    streamed = cfg.streaming or limit is not None or processes > 1
    if streamed:
        if limit is not None:
            cfg = dataclasses.replace(cfg, max_records=min(limit, cfg.max_records or limit))
        result = _streamed_pass(cfg, tokenizer, processes, n_show)
        summary = _merged_summary(result["stats"])
        total, prompt, response = (result["lengths"][k] for k in ("total", "prompt", "response"))
        efficiency, batches, examples = result["efficiency"], result["batches"], result["shown"]
    else:
        examples, stats = prepare_examples(cfg, tokenizer)
        summary = stats.summary()
        total = np.array([e.num_tokens for e in examples])
        response = np.array([e.num_response_tokens for e in examples])
        prompt = np.array([e.prompt_length for e in examples])
        efficiency, batches = packing_pass(cfg, examples)
    mode = f"packed ({cfg.pack_strategy})" if cfg.packing else "padded (one example per row)"
    template = "the tokenizer's chat template" if uses_chat_template(tokenizer, cfg) else "the plain template"
    lines = [
        f"data: {cfg.path} (split {cfg.split})" + (f", first {limit} records" if limit is not None else ""),
        f"tokenizer: {type(tokenizer).__name__}, {len(tokenizer)} tokens, fingerprint {tokenizer_fingerprint(tokenizer)}",
        f"rendering: {template}" + (f", system prompt {cfg.system_prompt!r}" if cfg.system_prompt else ""),
        "",
        "counts",
        "  " + summary.replace("\n", "\n  "),
        "",
        f"token lengths (seq_len {cfg.seq_len})",
        f"  example   {_percentiles(total)}",
        f"  prompt    {_percentiles(prompt)}",
        f"  response  {_percentiles(response)}",
        "",
        f"batching: {mode}, {cfg.batch_size} rows x {cfg.seq_len} tokens",
        f"  one epoch = {batches} batches, efficiency {efficiency:.1%} of token slots hold real tokens",
        "",
    ]
    if streamed:
        lines.append(f"bytes read (streamed, {processes} process(es), traces and scores; planning included)")
        lines += [f"  process {s.process_index}: {s.bytes_read:,} bytes, {s.records_read} records"
                  for s in result["stats"]]
        lines.append("")
    lines.append(f"examples (tokens in the loss between {LOSS_OPEN} and {LOSS_CLOSE}; they are what the student learns)")
    for ex in examples[:n_show]:
        note = ", truncated" if ex.truncated else ""
        lines += [
            f"--- {ex.id} ({ex.location}): {ex.num_tokens} tokens, {ex.num_response_tokens} in the loss{note}",
            render_with_mask(ex, tokenizer),
        ]
    return "\n".join(lines) + "\n"
