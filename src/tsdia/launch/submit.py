"""`tsdia-submit CONFIG [KEY=VALUE ...]` (or `--config CONFIG`): check, claim the experiment directory, and submit the job to Slurm.

    tsdia-submit CONFIG [KEY=VALUE ...]           submit; print the job id, the experiment and its logs
        --wait                                    ... and block until the job ends (requeues included)
        --dry-run                                 print the sbatch script; write and submit nothing
        --local                                   run the same job on this machine, without Slurm
        --emit-sbatch [single|multi|requeue]      print a plain sbatch script (a filled template) for `sbatch`

With `slurm.container.image` set, the job is a plain sbatch script that runs each task in the image
(`tsdia.launch.container`); the claim, the messages and `--wait` are the same.

Submitting never imports torch (or accelerate, deepspeed, wandb): the job does, on the cluster.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tsdia.cli import EXIT_INTERRUPTED, run_cli
from tsdia.config.loader import load_config
from tsdia.config.schema import Config
from tsdia.errors import TsdiaError
from tsdia.experiment import claim as claims
from tsdia.experiment.config_change import check_resume_at_submit
from tsdia.experiment.weight_files import check_init_from
from tsdia.fileio import atomic_write_text
from tsdia.launch import container, sbatch
from tsdia.launch.job import TrainJob
from tsdia.launch.resources import SlurmResources, check_line, resolve
from tsdia.parse_args import build_arg_parser, config_and_overrides
from tsdia.slurm_commands import is_job_active, wait_for_job

PROG = "tsdia-submit"
EXIT_JOB_FAILED = 1  # --wait / --local: the job ran and failed (2 stays "you must change something")


class SubmitError(TsdiaError):
    """Slurm could not be reached or refused the job."""


def build_parser() -> Any:
    parser = build_arg_parser(PROG, "Submit a tsdia training run to Slurm (through submitit).")
    mode = parser.add_argument_group("what to do (default: submit and return)")
    mode.add_argument("--wait", action="store_true", help="block until the job ends; exit with its outcome")
    mode.add_argument("--dry-run", action="store_true", help="print the sbatch script; write/submit nothing")
    mode.add_argument(
        "--local", action="store_true", help="run the job on this machine without Slurm (waits)"
    )
    mode.add_argument(
        "--emit-sbatch",
        nargs="?",
        const="auto",
        metavar="KIND",
        help="print a filled KIND.sbatch template (single, multi or requeue; default: by slurm.nodes)",
    )
    sweep = parser.add_argument_group("sweeps (one job array; see the README's Sweeps section)")
    sweep.add_argument(
        "--sweep",
        action="append",
        metavar="KEY=V1,V2,...",
        help="sweep KEY over the values (repeat for a Cartesian product); save_dir becomes the sweep directory",
    )
    sweep.add_argument(
        "--sweep-file", metavar="FILE", help="a YAML file with a 'sweep:' mapping KEY: [V1, V2]"
    )
    sweep.add_argument("--parallel", type=int, metavar="P", help="most members running at once")
    return parser


def parse(argv: Sequence[str]) -> Any:
    argv = list(argv)
    # `--emit-sbatch` takes an optional KIND: keep it from swallowing an override or the config path.
    for i, arg in enumerate(argv):
        if arg == "--emit-sbatch" and (i + 1 == len(argv) or argv[i + 1] not in sbatch.TEMPLATE_KINDS):
            argv[i] = "--emit-sbatch=auto"
    parser = build_parser()
    args = config_and_overrides(parser, parser.parse_intermixed_args(argv))
    modes = [m for m in ("dry_run", "local", "emit_sbatch") if getattr(args, m)]
    if len(modes) > 1 or (args.wait and (args.dry_run or args.emit_sbatch)):
        parser.error("choose one of --dry-run, --local, --emit-sbatch (--wait goes with a real submit)")
    if args.parallel is not None and args.parallel < 1:
        parser.error("--parallel must be at least 1")
    if (args.parallel is not None) and not (args.sweep or args.sweep_file):
        parser.error("--parallel goes with --sweep or --sweep-file")
    if (args.sweep or args.sweep_file) and args.emit_sbatch:
        parser.error("--emit-sbatch prints one experiment's script; --dry-run shows a sweep's array script")
    return args


def run(argv: Sequence[str]) -> int:
    args = parse(argv)
    cwd = os.getcwd()
    check_line("the working directory", cwd)  # all of them go into sbatch scripts
    check_line("the config path", os.path.abspath(args.config))
    for override in args.overrides:
        check_line("an override", override)
    if args.sweep or args.sweep_file:
        from tsdia.launch.sweep_submit import run_sweep

        return run_sweep(args, list(argv), cwd)
    config = load_config(args.config, args.overrides)
    check_init_from(config)
    res = resolve(config)
    if args.emit_sbatch:
        kind = args.emit_sbatch
        if kind == "auto":
            kind = "single" if res.nodes == 1 else "multi"
        if res.container is not None and kind in sbatch.TEMPLATE_KINDS:
            # One script for every kind: a container job is always signal- and requeue-aware.
            text = container.render_script(res, res.container, cwd, args.config, args.overrides, None)
        else:
            text = sbatch.render_template(kind, res, args.config, args.overrides, cwd)
        print(text, end="")
        return 0
    resume = config.training.checkpoint.resume
    check_resume_at_submit(
        config, res.save_dir, res.num_tasks
    )  # a refused change fails now, not in the queue
    if args.dry_run:
        claims.check_can_submit(res.save_dir, resume, is_job_active if _have_slurm() else None)
        if res.container is not None:
            token = container.DRY_RUN_TOKEN
            snapshot = _snapshot_path(res, token)
            print(container.render_script(res, res.container, cwd, snapshot, args.overrides, token), end="")
            _say(
                f"{PROG}: dry run: nothing was written or submitted. A real submit claims {res.save_dir}, "
                f"copies the config to {snapshot} and submits this script with sbatch; {'X' * 8}... stands "
                f"for the claim token it makes. Each task ({_shape(res)}) runs tsdia-train in the image "
                f"{res.container.image} ({res.container.runtime}); Slurm logs go to {res.folder}/."
            )
            return 0
        print(sbatch.render_submitit_script(res, cwd), end="")
        train = " ".join(TrainJob(os.path.abspath(args.config), tuple(args.overrides)).argv())
        _say(
            f"{PROG}: dry run: nothing was written or submitted. A real submit claims {res.save_dir}, and "
            f"each task of the job ({_shape(res)}) runs the equivalent of `{train}` in {cwd}; Slurm logs go "
            f"to {res.folder}/."
        )
        return 0
    if args.local:
        return submit_local(config, res, args.config, args.overrides)
    if res.container is not None:
        return submit_container(config, res, args.config, args.overrides, cwd, wait=args.wait)
    return submit_slurm(config, res, args.config, args.overrides, cwd, wait=args.wait)


def submit_slurm(
    config: Config, res: SlurmResources, config_path: str, overrides: Sequence[str], cwd: str, wait: bool
) -> int:
    _require_slurm()
    from submitit import SlurmExecutor
    from submitit.core.utils import FailedJobError

    claim = claims.claim_for_submit(
        res.save_dir, config.training.checkpoint.resume, config_path, overrides, "slurm", is_job_active
    )
    try:
        job_spec = TrainJob(_snapshot(config, res, claim.token), tuple(overrides), claim.token)
        executor = SlurmExecutor(folder=res.folder, max_num_timeout=res.max_requeues)
        executor.update_parameters(**sbatch.submitit_parameters(res, cwd))
        with contextlib.redirect_stderr(
            io.StringIO()
        ):  # submitit echoes sbatch's errors; we report them once
            job = executor.submit(job_spec)
    except FailedJobError as err:
        claim.release()
        raise SubmitError(
            f"sbatch refused the job; nothing was queued and {res.save_dir} was released:\n{err}"
        ) from None
    except BaseException:
        claim.release()
        raise
    _record(claim, job.job_id)
    _print_submitted(res, job.job_id)
    return _follow(res, job.job_id) if wait else 0


def submit_container(
    config: Config, res: SlurmResources, config_path: str, overrides: Sequence[str], cwd: str, wait: bool
) -> int:
    """A container job: the same claim, snapshot, messages and --wait as `submit_slurm`, but the script is
    the `container.sbatch` template (see `tsdia.launch.container`), submitted with `sbatch --parsable`."""
    _require_slurm()
    assert res.container is not None
    claim = claims.claim_for_submit(
        res.save_dir, config.training.checkpoint.resume, config_path, overrides, "slurm", is_job_active
    )
    try:
        snapshot = _snapshot(config, res, claim.token)
        script = container.render_script(res, res.container, cwd, snapshot, overrides, claim.token)
        job_id = _sbatch(script, Path(res.folder), claim.token, cwd)
    except BaseException:
        claim.release()
        raise
    _record(claim, job_id)
    _print_submitted(res, job_id)
    return _follow(res, job_id) if wait else 0


def _sbatch(script: str, folder: Path, token: str, cwd: str) -> str:
    """Submit `script` with `sbatch --parsable`; keep it as `<folder>/<jobid>_submission.sh`."""
    path = folder / f"submission-{token[:8]}.sh"
    atomic_write_text(path, script)
    try:
        done = subprocess.run(
            ["sbatch", "--parsable", str(path)], cwd=cwd, capture_output=True, text=True, timeout=120
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise SubmitError(f"sbatch failed: {err}; nothing was queued") from None
    job_id = done.stdout.strip().split(";")[0]
    if done.returncode != 0 or not job_id:
        path.unlink(missing_ok=True)
        raise SubmitError(
            "sbatch refused the job; nothing was queued and the experiment directory was released:\n"
            + (done.stderr.strip() or done.stdout.strip())
        )
    path.replace(folder / f"{job_id}_submission.sh")
    return job_id


def _follow(res: SlurmResources, job_id: str) -> int:
    """`--wait`: block until the job ends for good (requeues included) and report its outcome."""
    try:
        state, exit_code = wait_for_job(job_id, on_change=lambda s: _say(f"job {job_id}: {s}"))
    except KeyboardInterrupt:
        _say(f"stopped waiting; job {job_id} goes on (scancel {job_id} stops it)")
        return EXIT_INTERRUPTED
    return _report(res, job_id, state == "COMPLETED", f"{state}, exit code {exit_code or '?'}")


def submit_local(
    config: Config,
    res: SlurmResources,
    config_path: str,
    overrides: Sequence[str],
    claim: claims.Claim | None = None,
) -> int:
    """Run the job on this machine through submitit's LocalExecutor (claiming the directory unless a
    sweep already claimed it)."""
    from submitit import LocalExecutor

    if claim is None:
        claim = claims.claim_for_submit(
            res.save_dir, config.training.checkpoint.resume, config_path, overrides, "local"
        )
    try:
        job_spec = TrainJob(_snapshot(config, res, claim.token), tuple(overrides), claim.token, _free_port())
        executor = LocalExecutor(folder=res.folder, max_num_timeout=res.max_requeues)
        # One machine plays every node: nodes x tasks_per_node processes.
        executor.update_parameters(
            timeout_min=res.time_min, tasks_per_node=res.num_tasks, signal_delay_s=res.signal_lead_s
        )
        job = executor.submit(job_spec)
    except BaseException:
        claim.release()
        raise
    _record(claim, job.job_id)
    _say(f"Running locally (no Slurm): {res.num_tasks} process(es), job {job.job_id}")
    if res.container is not None:
        _say(
            "  note: --local runs on this machine's Python, not in slurm.container.image "
            "(docker/run.sh runs the image locally)"
        )
    if res.setup:
        _say("  note: slurm.setup is for the cluster's batch shell and is not run by --local")
    _print_paths(res, job.job_id)
    try:
        job.results()
        ok, detail = True, "finished"
    except KeyboardInterrupt:
        job.cancel(check=False)
        _say(f"interrupted: stopped the local job {job.job_id}")
        return EXIT_INTERRUPTED
    except Exception as err:  # the job's own error, re-raised by submitit with its traceback
        ok, detail = False, f"failed:\n{err}"
    return _report(res, job.job_id, ok, detail, tail_logs=False)


def _snapshot(config: Config, res: SlurmResources, token: str) -> str:
    """The config as submitted, kept in the experiment: the job (and every requeue) reads this copy, so
    editing the original while the job waits in the queue changes nothing."""
    path = Path(_snapshot_path(res, token))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, config.source.text)
    return str(path)


def _snapshot_path(res: SlurmResources, token: str) -> str:
    return os.path.join(res.folder, f"config-{token[:8]}.yml")


def _record(claim: claims.Claim, job_id: str) -> None:
    try:
        claim.record_job(job_id)
    except OSError as err:  # the job is queued and holds its token: only the record's job id is missing
        _say(f"{PROG}: warning: could not write the job id into {claim.save_dir}: {err}")


def _print_submitted(res: SlurmResources, job_id: str) -> None:
    print(f"Submitted Slurm job {job_id}: {_shape(res)}, time limit {res.time}")
    _print_paths(res, job_id)
    print(f"Follow:      squeue -j {job_id}    tail -f {res.save_dir}/logs/training_*.log")
    print(f"Cancel:      scancel {job_id}")
    sys.stdout.flush()


def _print_paths(res: SlurmResources, job_id: str) -> None:
    print(f"Experiment:  {res.save_dir}")
    print(f"Job logs:    {res.folder}/{job_id}_<task>_log.out and .err (rank 0: {job_id}_0_log.out)")
    print(f"Training log: {res.save_dir}/logs/training_*.log (written once the job starts)")
    sys.stdout.flush()


def _report(res: SlurmResources, job_id: str, ok: bool, detail: str, tail_logs: bool = True) -> int:
    if ok:
        print(f"Job {job_id} completed. Experiment: {res.save_dir}")
        return 0
    _say(f"{PROG}: job {job_id} did not complete ({detail})")
    _say(f"  logs: {res.folder}/{job_id}_*_log.err, {res.save_dir}/logs/")
    err_log = Path(res.folder) / f"{job_id}_0_log.err"
    if tail_logs and err_log.exists():
        lines = err_log.read_text(errors="replace").splitlines()[-20:]
        _say(f"  last lines of {err_log}:\n    " + "\n    ".join(lines))
    return EXIT_JOB_FAILED


def _shape(res: SlurmResources) -> str:
    node = "node" if res.nodes == 1 else "nodes"
    task = "task" if res.tasks_per_node == 1 else "tasks"
    return f"{res.nodes} {node} x {res.tasks_per_node} {task}"


def _require_slurm() -> None:
    if not _have_slurm():
        raise SubmitError(
            "sbatch/srun not found: this machine is not a Slurm submit host. HINT: run it here with "
            f"{PROG} --local, print a script with --emit-sbatch, or start a local cluster with "
            "slurm/dev-cluster.sh start."
        )


def _have_slurm() -> bool:
    return shutil.which("sbatch") is not None and shutil.which("srun") is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: user errors print one clear message and exit 2 (traceback with --debug)."""
    return run_cli(PROG, run, argv)


if __name__ == "__main__":
    sys.exit(main())
