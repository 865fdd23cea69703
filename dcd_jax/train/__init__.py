"""The training engine: mesh + state + jitted step + Orbax checkpoints + loop.

:func:`dcd_jax.train.loop.train` runs a :class:`dcd_jax.train.config.RunConfig` (what
``dcd-jax train --config X.yaml key=value ...`` does); the pieces live in ``state`` (train-state
pytree and shardings), ``step`` (the pure ``(state, batch) -> (state, metrics)`` function),
``optimizer``, ``checkpoint``, ``metrics`` and ``flops``; ``online`` (the online
GKD step: student rollouts and a live teacher inside the jitted step) and ``cost`` (what a run
spends: generated tokens, teacher forward FLOPs, wall time).
"""
