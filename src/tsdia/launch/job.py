"""The callable submitit pickles and runs on every task of a tsdia job: a thin wrapper around `tsdia.train.run`.

It sets up nothing itself. Ranks, world size, master address (first host of the node list) and port (from
the job id, so it survives requeues) come from Slurm's variables through `tsdia.cluster.detect()`; the
trainer's rank-0 directory decision recognises the job by its claim token.

Preemption seam: submitit installs its own USR2 handler before this callable runs. The trainer owns
preemption (`tsdia.training.preemption`): it replaces that handler while it trains, saves collectively,
requeues the job from rank 0 (`scontrol requeue`) and `tsdia.train.run` returns `EXIT_REQUEUED`. `finish()`
then leaves without a result, so submitit and `tsdia-submit --wait` keep waiting for the rerun (same job
id, same pickled `TrainJob`, same claim token). Nothing here relies on submitit's `checkpoint()`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from tsdia.cluster import CLAIM_TOKEN_VAR
from tsdia.errors import EXIT_INTERRUPTED, EXIT_REQUEUED, EXIT_STOPPED, TsdiaError


class JobFailedError(TsdiaError):
    """The training run inside the job ended with a non-zero status."""


@dataclass(frozen=True)
class TrainJob:
    """One tsdia training run, as submitted: `tsdia-train CONFIG OVERRIDES...` on every task."""

    config_path: str  # absolute: the job may start in another working directory
    overrides: tuple[str, ...] = ()
    claim_token: str | None = None  # from the owner record tsdia-submit wrote; proves ownership of save_dir
    local_port: int | None = None  # `--local`: rendezvous port of the tasks started on this machine

    def __call__(self) -> int:
        if self.claim_token:
            # Also for code that reads the environment (tsdia.cluster.detect) and for child processes.
            os.environ[CLAIM_TOKEN_VAR] = self.claim_token
        if self.local_port is not None:
            os.environ.update(local_task_env(self.local_port))
        from tsdia.train import run  # the heavy imports (torch, accelerate) happen in the job only

        return finish(run([self.config_path, *self.overrides]))

    def argv(self) -> list[str]:
        """The equivalent `tsdia-train` command line (for messages and templates)."""
        return ["tsdia-train", self.config_path, *self.overrides]


def finish(status: int) -> int:
    """Turn the run's status into the job's outcome (what submitit records and `--wait` reports)."""
    if status == 0:
        return 0
    if status == EXIT_REQUEUED:
        # No result: this attempt is over but the job is not. SystemExit is not an Exception, so
        # submitit writes no result pickle and the rerun (same job id) writes the real one.
        raise SystemExit(0)
    if status == EXIT_STOPPED:
        raise JobFailedError(
            "training stopped on a signal and saved, but the job was not requeued (cancelled, or see the "
            "training log for why); submit again with training.checkpoint.resume=latest to continue"
        )
    if status == EXIT_INTERRUPTED:
        raise JobFailedError(
            "training was interrupted (SIGINT) and saved; submit again with training.checkpoint.resume=latest "
            "to continue"
        )
    raise JobFailedError(f"training exited with status {status}")


def local_task_env(port: int) -> dict[str, str]:
    """torchrun's variables for a task of `tsdia-submit --local` (submitit's LocalExecutor numbers them)."""
    import submitit

    env = submitit.JobEnvironment()
    return {
        "RANK": str(env.global_rank),
        "WORLD_SIZE": str(env.num_tasks),
        "LOCAL_RANK": str(env.local_rank),
        "LOCAL_WORLD_SIZE": str(env.num_tasks),
        "NODE_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
