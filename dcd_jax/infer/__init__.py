"""Inference kernels shared by evaluation, teacher-data production and online training.

* :mod:`~dcd_jax.infer.sampler` - the jitted, batched KV-cache sampler (greedy / temperature /
  top-k / top-p, ``n`` samples, stop strings, bucketed shapes, sharded on the mesh).
"""
