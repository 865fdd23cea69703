"""Run ``dcd-jax train`` (the real CLI entry point) in a subprocess, with faults injected at chosen points.

usage: python cli_worker.py key=value ...
Environment:
  DCD_TEST_PAUSE_AFTER=N    after step N's checkpoint is complete, print PAUSED and wait ...
  DCD_TEST_RELEASE=FILE     ... until FILE exists.
  DCD_TEST_KILL_IN_SAVE=N   SIGKILL this process in the middle of saving step N (inside the
                            data-position item, after the checkpoint's other items started).
"""

import functools
import os
import signal
import sys
import time

from dcd_jax import cli
from dcd_jax.train import checkpoint, loop

if __name__ == "__main__":
    pause_after = int(os.environ.get("DCD_TEST_PAUSE_AFTER", "-1"))
    release = os.environ.get("DCD_TEST_RELEASE")
    kill_in_save = int(os.environ.get("DCD_TEST_KILL_IN_SAVE", "-1"))

    def after_checkpoint(step: int) -> None:
        if step == pause_after:
            print(f"PAUSED {step}", flush=True)
            while not os.path.exists(release):
                time.sleep(0.05)

    saving = {"step": None}
    real_save, real_data_save = checkpoint.RunCheckpointer.save, checkpoint.DataStateHandler.save

    def save(self, step, *args, **kwargs):
        saving["step"] = int(step)
        return real_save(self, step, *args, **kwargs)

    def data_save(self, directory, args):
        if saving["step"] == kill_in_save:
            print(f"KILLED IN SAVE {kill_in_save}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return real_data_save(self, directory, args)

    checkpoint.RunCheckpointer.save = save
    checkpoint.DataStateHandler.save = data_save
    loop.TrainHooks = functools.partial(loop.TrainHooks, after_checkpoint=after_checkpoint)
    sys.exit(cli.main(["train", *sys.argv[1:]]))
