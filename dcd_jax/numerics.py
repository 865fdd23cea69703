"""Numeric constants the model and the objectives share (ground: both may import it)."""

# Finite "minus infinity" for masked logits and attention scores: exp(NEG_INF - max) underflows to
# exactly 0, while softmax / logsumexp and their gradients stay NaN-free even when every entry of a
# row is masked (a padding row), where -inf would give -inf - -inf = NaN.
NEG_INF = -1e30
