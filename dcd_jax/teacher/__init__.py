"""Producing distillation data from a teacher (not evaluation).

* :mod:`~dcd_jax.teacher.generate` - ``dcd-jax generate``: teacher traces with rejection filtering.
* :mod:`~dcd_jax.teacher.scoring` - ``dcd-jax score-teacher``: cached per-token and top-k teacher log-probs.
"""
