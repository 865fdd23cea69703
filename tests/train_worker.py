"""Run a training job in a subprocess (multi-process and kill/resume tests).

usage: python train_worker.py KILL_AT_STEP|-1 key=value ...
With KILL_AT_STEP >= 0 the process SIGKILLs itself right after that step's checkpoint is complete.
"""

import os
import signal
import sys

from dcd_jax.config import load_config
from dcd_jax.train.config import RunConfig
from dcd_jax.train.loop import TrainHooks, train

if __name__ == "__main__":
    kill_at = int(sys.argv[1])
    cfg = load_config(RunConfig, None, sys.argv[2:])

    def after_checkpoint(step: int) -> None:
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    result = train(cfg, TrainHooks(after_checkpoint=after_checkpoint))
    print(f"RESULT {result.status} {result.step}", flush=True)
