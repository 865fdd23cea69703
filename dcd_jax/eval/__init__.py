"""Evaluation, separate from training (the sampler is :mod:`dcd_jax.infer`, teacher data :mod:`dcd_jax.teacher`).

* :mod:`~dcd_jax.eval.grading`, :mod:`~dcd_jax.eval.benchmarks`, :mod:`~dcd_jax.eval.metrics`,
  :mod:`~dcd_jax.eval.stability`, :mod:`~dcd_jax.eval.ifeval` - answer extraction and equivalence,
  benchmark adapters, pass@k / bootstrap CIs, trace stability and ExAccErr, instruction following.
* :mod:`~dcd_jax.eval.runner` - ``dcd-jax eval`` and the train loop's evaluation hook;
  :mod:`~dcd_jax.eval.report` writes the results folder (JSONL, summary, table, chart).
"""
