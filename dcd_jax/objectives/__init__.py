"""Training objectives: SFT / KD losses with distribution-corrected (DCD) and baseline weightings.

See ``docs/objectives.md`` for the equations (paper: arXiv 2605.14071). Everything here is a
pure function of arrays, jit- and shard-friendly:

* :func:`compute_objective` - the entry point used by the train step, returning an
  :class:`ObjectiveOutput` ``(loss_sum, denominator, metrics)``.
* :func:`generalized_jsd_chunked` - online GKD's full-vocabulary generalized JSD between a live
  teacher and the student, chunked over the sequence.
* :func:`token_logprobs_chunked` - memory-light per-token log-probs / entropy / top-k from hidden
  states and the unembedding (also used to score traces with the teacher).
* :class:`ObjectiveConfig` and the batch-field / vocabulary checks.
"""

from dcd_jax.objectives.config import (
    DCDConfig,
    GKDConfig,
    IDFTConfig,
    IWSFTConfig,
    KLConfig,
    LamSchedule,
    ObjectiveConfig,
    ToDiConfig,
    VocabMismatchError,
    check_batch_fields,
    check_vocab_alignment,
    required_batch_fields,
    validate_batch,
)
from dcd_jax.objectives.gkd import GKDStats, generalized_jsd_chunked, generalized_jsd_loss
from dcd_jax.objectives.logprobs import TokenStats, token_logprobs_chunked, token_logprobs_reference
from dcd_jax.objectives.losses import ce_token_loss, forward_kl_token_loss, todi_token_loss
from dcd_jax.objectives.objective import (
    METRIC_DOC,
    ObjectiveOutput,
    compute_objective,
    merge_metrics,
    summarize_metrics,
)
from dcd_jax.objectives.weights import Weights, compute_weights, idft_exponent, lam_schedule

__all__ = [
    "DCDConfig",
    "GKDConfig",
    "GKDStats",
    "IDFTConfig",
    "IWSFTConfig",
    "KLConfig",
    "LamSchedule",
    "METRIC_DOC",
    "ObjectiveConfig",
    "ObjectiveOutput",
    "ToDiConfig",
    "TokenStats",
    "VocabMismatchError",
    "Weights",
    "ce_token_loss",
    "check_batch_fields",
    "check_vocab_alignment",
    "compute_objective",
    "compute_weights",
    "forward_kl_token_loss",
    "generalized_jsd_chunked",
    "generalized_jsd_loss",
    "idft_exponent",
    "lam_schedule",
    "merge_metrics",
    "required_batch_fields",
    "summarize_metrics",
    "todi_token_loss",
    "token_logprobs_chunked",
    "token_logprobs_reference",
    "validate_batch",
]
