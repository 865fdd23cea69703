"""``DataConfig``: where the teacher traces are, how records are read, tokenized and batched.

Built by :func:`dcd_jax.config.from_dict` / :func:`dcd_jax.config.load_config` (the ``data:`` section
of a run config), which calls :meth:`DataConfig.validate`. Every option is documented on its field;
``docs/data.md`` shows the record formats with examples.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from dcd_jax.config import ConfigError, hash_by_value

# Role names some public trace datasets use (ShareGPT style) and what they mean here.
DEFAULT_ROLE_MAP = {"human": "user", "gpt": "assistant", "model": "assistant"}


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Options of the teacher-trace pipeline (``data:`` section of a run config).

    Attributes:
      path: A JSONL/JSON file, a Parquet file, a directory of ``*.jsonl`` files, a directory
        `datasets` can load, or a Hugging Face hub id (only from the local cache when offline).
        Files may be ``gs://`` URLs: read with ranged requests, each host only its share's blocks
        (``streaming``).
      format: ``auto`` picks from ``path``: ``.jsonl``/``.json`` files and directories holding
        ``*.jsonl`` are read line by line (errors name file and line), ``.parquet`` and other
        directories / hub ids go through `datasets`. ``hf`` forces `datasets` (also for a local
        JSONL file, errors then name the record index).
      split: Split to read through `datasets` (a local file is exposed as this split).
      cache_dir: Where `datasets` keeps its Arrow cache (default: the Hugging Face default).
      max_records: Read at most this many records (counted over the whole file; for quick runs).
      prompt_field: Field holding the prompt (user turn) in prompt/response records.
      response_field: Field holding the teacher's response (assistant turn) in those records.
      messages_field: Field holding a chat ``[{"role", "content"}, ...]`` list; a record that has
        it is read as a chat, otherwise as prompt/response.
      role_key: Key of the role inside a message (``from`` for ShareGPT-style data).
      content_key: Key of the text inside a message (``value`` for ShareGPT-style data).
      role_map: Extra role names mapped to ``system``/``user``/``assistant``
        (default maps ``human``->user, ``gpt``/``model``->assistant).
      answer_field: Optional gold final answer (kept with the example for evaluation).
      id_field: Optional record id; records without one get their 0-based record index. Ids join
        stored teacher scores, so they must be unique when ``teacher_scores`` is a Parquet file.
      system_prompt: System message prepended to records that do not start with one.
      template: ``auto`` uses the student tokenizer's chat template when it has one and the plain
        template otherwise; ``plain`` always uses the plain template (docs/data.md shows both).
      seq_len: Tokens per row. Longer examples follow ``truncation``.
      batch_size: GLOBAL rows per step; each of ``process_count`` hosts gets
        ``batch_size // process_count`` rows.
      packing: Pack several examples per row (``segment_ids``/``positions`` separate them); if
        false every example gets its own zero-padded row.
      pack_strategy: ``first_fit`` (each example goes into the first of ``pack_bins`` open rows
        with room), ``best_fit`` (into the open row it fills most tightly) or ``greedy`` (one
        open row, closed as soon as the next example does not fit; keeps example order).
      pack_bins: Open rows the packer fills at once (default: the host's rows per batch). More
        bins pack tighter; examples from neighbouring epochs may then share a batch.
      truncation: For an example longer than ``seq_len``: ``drop`` it, or ``truncate_response``
        (keep the first ``seq_len`` tokens; the cut response loses its EOS). Counted either way.
      on_bad_record: ``error`` stops at the first invalid record naming file, line and field;
        ``skip`` drops it, counts it by reason and reports the first few locations.
      shuffle: Shuffle examples (a fresh seeded permutation every epoch).
      seed: Seed of the shuffle and of the packer's row order.
      num_epochs: Passes over the data; ``null`` repeats forever (the trainer stops at its steps).
      teacher_scores: Stored teacher scores: ``null`` (not used), ``inline`` (fields of the
        records, see ``teacher_*_field``) or a Parquet file with columns ``id``,
        ``teacher_logprobs``, ``teacher_topk_ids``, ``teacher_topk_logprobs``,
        ``tokenizer_fingerprint`` joined on ``id``.
      topk: Top-k teacher entries per position to load (0: per-token log-probs only).
      teacher_logprobs_field: Inline field of per-response-token teacher log-probs.
      teacher_topk_ids_field: Inline field of per-response-token top-k token ids.
      teacher_topk_logprobs_field: Inline field of per-response-token top-k log-probs.
      teacher_fingerprint_field: Inline field holding the scoring tokenizer's fingerprint.
      teacher_fingerprint: Fingerprint for inline scores whose records do not carry one. Scores are
        refused unless a fingerprint is known and equals the student tokenizer's.
      streaming: Stream the data block by block instead of reading and validating this process's
        whole share up front: host memory stays flat in corpus size and each process reads only
        its blocks (local JSONL or Parquet inputs). Records are validated as they stream.
      block_records: Records per block when streaming without stored scores (with them, the
        block size ``score-teacher`` wrote is used). Block ``b`` belongs to process
        ``b % process_count``.
      read_workers: Streaming: worker processes that read, validate and tokenize the next blocks
        ahead of the training loop (0: in the training process). Output and resume state do not
        depend on it.
      teacher: The teacher stored Parquet scores must come from: its name as given to
        ``score-teacher`` (path or hub id) or its weights fingerprint (``w-...``); ``null``
        accepts the file's teacher. A file scored by another teacher is refused.
    """

    path: str = ""
    format: Literal["auto", "jsonl", "parquet", "hf"] = "auto"
    split: str = "train"
    cache_dir: str | None = None
    max_records: int | None = None

    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    role_key: str = "role"
    content_key: str = "content"
    role_map: dict[str, str] = dataclasses.field(default_factory=lambda: dict(DEFAULT_ROLE_MAP))
    answer_field: str = "answer"
    id_field: str = "id"

    system_prompt: str | None = None
    template: Literal["auto", "plain"] = "auto"
    seq_len: int = 1024
    batch_size: int = 8
    packing: bool = True
    pack_strategy: Literal["first_fit", "best_fit", "greedy"] = "first_fit"
    pack_bins: int | None = None
    truncation: Literal["drop", "truncate_response"] = "drop"
    on_bad_record: Literal["error", "skip"] = "error"

    shuffle: bool = True
    seed: int = 0
    num_epochs: int | None = 1

    teacher_scores: str | None = None
    topk: int = 0
    teacher_logprobs_field: str = "teacher_logprobs"
    teacher_topk_ids_field: str = "teacher_topk_ids"
    teacher_topk_logprobs_field: str = "teacher_topk_logprobs"
    teacher_fingerprint_field: str = "tokenizer_fingerprint"
    teacher_fingerprint: str | None = None
    teacher: str | None = None
    streaming: bool = False
    block_records: int = 1024
    read_workers: int = 0

    __hash__ = hash_by_value  # frozen, but `role_map` is a dict

    def validate(self) -> None:
        """Reject values that cannot work, naming the option (called by the config loader)."""
        if self.seq_len < 2:
            raise ConfigError(f"data.seq_len must be >= 2 (a prompt token and a target), got {self.seq_len}")
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {self.batch_size}")
        if self.pack_bins is not None and self.pack_bins < 1:
            raise ConfigError(f"data.pack_bins must be >= 1 or null, got {self.pack_bins}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ConfigError(f"data.num_epochs must be >= 1 or null (forever), got {self.num_epochs}")
        if self.max_records is not None and self.max_records < 1:
            raise ConfigError(f"data.max_records must be >= 1 or null, got {self.max_records}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"data.seed must be in [0, 2**32), got {self.seed}")
        if self.read_workers < 0:
            raise ConfigError(f"data.read_workers must be >= 0, got {self.read_workers}")
        if self.block_records < 1:
            raise ConfigError(f"data.block_records must be >= 1, got {self.block_records}")
        if self.topk < 0:
            raise ConfigError(f"data.topk must be >= 0, got {self.topk}")
        if self.topk > 0 and self.teacher_scores is None:
            raise ConfigError("data.topk > 0 needs data.teacher_scores (a Parquet file or 'inline')")
        for name in ("system", "user", "assistant"):
            if name in self.role_map:
                raise ConfigError(f"data.role_map: {name!r} is already a role; map other names onto it")
        bad = sorted(v for v in self.role_map.values() if v not in ("system", "user", "assistant"))
        if bad:
            raise ConfigError(f"data.role_map: targets {bad} must be one of system, user, assistant")

    def batch_fields(self) -> set[str]:
        """Fields of the batches this config produces (checked against the objective before any work)."""
        fields = {"input_ids", "targets", "positions", "segment_ids", "loss_mask"}
        if self.teacher_scores is not None:
            fields.add("teacher_logprobs")
            if self.topk > 0:
                fields.update({"teacher_topk_ids", "teacher_topk_logprobs"})
        return fields

    def local_batch_size(self, process_count: int) -> int:
        """Rows per batch on one host; the global batch must split evenly across hosts."""
        if process_count < 1 or self.batch_size % process_count:
            raise ConfigError(
                f"data.batch_size={self.batch_size} (global rows per step) is not divisible by "
                f"process_count={process_count}"
            )
        return self.batch_size // process_count
