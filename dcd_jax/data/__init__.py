"""Teacher-trace data: record formats, tokenization with a response-only loss mask, packing, and
deterministic checkpointable iteration (grain); plus the embedded synthetic reasoning task.

Main entry points::

    it = build_train_iterator(cfg, tokenizer, process_index=jax.process_index(),
                              process_count=jax.process_count())
    batch = next(it)            # dict of NumPy arrays [local_batch, seq_len]
    state = it.get_state()      # JSON-serializable; save it with the model checkpoint
    it.set_state(state)         # in a fresh iterator: resumes at exactly the next batch

    for ex in iter_examples(cfg, tokenizer, apply_length=False):  # eval / teacher scoring
        ex.input_ids, ex.response_positions

See docs/data.md for the record formats and every option of :class:`DataConfig`.
"""

from dcd_jax.data.config import DataConfig
from dcd_jax.data.errors import BadRecordPolicy, DataError, Location
from dcd_jax.data.inspect import inspect_data, render_with_mask
from dcd_jax.data.pipeline import (
    DataStats,
    TrainIterator,
    build_train_iterator,
    iter_examples,
    prepare_examples,
)
from dcd_jax.data.records import Message, Record, load_records, parse_record
from dcd_jax.data.teacher_scores import (
    ScoresProvenance,
    TeacherScores,
    content_hash,
    open_teacher_scores,
    tokenizer_fingerprint,
    write_teacher_scores,
)
from dcd_jax.data.tokenization import (
    TokenizedExample,
    fit_to_length,
    PromptStyle,
    render_prompt,
    render_prompts,
    tokenize_example,
    tokenize_records,
    uses_chat_template,
)

__all__ = [
    "BadRecordPolicy",
    "DataConfig",
    "DataError",
    "DataStats",
    "Location",
    "Message",
    "Record",
    "ScoresProvenance",
    "TeacherScores",
    "TokenizedExample",
    "TrainIterator",
    "build_train_iterator",
    "content_hash",
    "fit_to_length",
    "inspect_data",
    "iter_examples",
    "load_records",
    "open_teacher_scores",
    "parse_record",
    "prepare_examples",
    "PromptStyle",
    "render_prompt",
    "render_prompts",
    "render_with_mask",
    "tokenize_example",
    "tokenize_records",
    "tokenizer_fingerprint",
    "uses_chat_template",
    "write_teacher_scores",
]
