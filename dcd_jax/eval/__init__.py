"""Generation and evaluation, separate from training.

* :mod:`~dcd_jax.eval.sampler` - the jitted, batched KV-cache sampler (greedy / temperature /
  top-k / top-p, ``n`` samples, stop strings, bucketed shapes, sharded on the mesh).
* :mod:`~dcd_jax.eval.generate` - ``dcd-jax generate``: teacher traces with rejection filtering.
* :mod:`~dcd_jax.eval.scoring` - ``dcd-jax score-teacher``: cached per-token and top-k teacher log-probs.
* :mod:`~dcd_jax.eval.grading`, :mod:`~dcd_jax.eval.benchmarks`, :mod:`~dcd_jax.eval.metrics`,
  :mod:`~dcd_jax.eval.stability`, :mod:`~dcd_jax.eval.ifeval` - answer extraction and equivalence,
  benchmark adapters, pass@k / bootstrap CIs, trace stability and ExAccErr, instruction following.
* :mod:`~dcd_jax.eval.runner` - ``dcd-jax eval`` and the train loop's evaluation hook;
  :mod:`~dcd_jax.eval.report` writes the results folder (JSONL, summary, table, chart).
"""
