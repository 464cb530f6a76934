"""`tsdia-submit ... --sweep KEY=V1,V2`: check every member, claim them all, submit one job array.

The same modes as a single experiment: a real submit (and `--wait`), `--dry-run` (the member table and the
array script; nothing written or queued), `--local` (the members one after another on this machine).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
import shutil
import sys
from pathlib import Path

from tsdia.config.loader import load_config
from tsdia.errors import CheckpointDirectoryExistsError, ConfigError
from tsdia.experiment import claim as claims
from tsdia.experiment.config_change import check_resume_at_submit
from tsdia.experiment.layout import SWEEP_FILE
from tsdia.follow.scan import read_experiment
from tsdia.launch import sbatch, sweep
from tsdia.launch.job import TrainJob
from tsdia.launch.resources import SlurmResources
from tsdia.launch.submit import (
    EXIT_JOB_FAILED,
    PROG,
    SubmitError,
    _have_slurm,
    _record,
    _require_slurm,
    _say,
    _snapshot,
    submit_local,
)
from tsdia.slurm_commands import is_job_active, wait_for_job


def run_sweep(args: argparse.Namespace, argv: list[str], cwd: str) -> int:
    axes = sweep.parse_axes(args.sweep or [], args.sweep_file)
    base = load_config(args.config, args.overrides)
    if not base.training.checkpoint.save_dir:
        raise ConfigError("training.checkpoint.save_dir: a sweep needs one: it becomes the sweep directory")
    sweep_dir = os.path.abspath(base.training.checkpoint.save_dir)
    resume = base.training.checkpoint.resume
    if resume not in (None, "latest"):
        raise ConfigError(
            f"training.checkpoint.resume: {resume}: a sweep resumes with resume=latest (each member from its "
            "own newest checkpoint)"
        )
    previous = sweep.read_sweep(sweep_dir) if resume else None
    if resume and previous is None:
        if Path(sweep_dir).exists() and any(Path(sweep_dir).iterdir()):
            raise ConfigError(
                f"training.checkpoint.resume: latest: {sweep_dir} is not a sweep directory (no {SWEEP_FILE})."
            )
        resume = None  # nothing to resume yet: a fresh sweep
    if previous is not None:
        axes, members = sweep.merge_members(previous, axes)
    else:
        members = sweep.expand(axes)
    prepared = sweep.prepare(args.config, args.overrides, sweep_dir, members, Path(sweep_dir).name)
    _check_one_shape(prepared)
    if prepared[0].res.container is not None:
        raise ConfigError(
            "slurm.container.image: sweeps of container jobs are not supported yet; submit the members one by "
            "one (tsdia-submit ... training.checkpoint.save_dir=DIR/NAME KEY=VALUE)"
        )
    todo = [p for p in prepared if previous is None or not sweep.completed(p.member)]
    for p in todo:  # a member whose changed config its job would refuse fails the submit now
        if resume is not None and Path(p.member.save_dir).exists():
            try:
                check_resume_at_submit(p.config, p.member.save_dir, p.res.num_tasks)
            except ConfigError as err:
                raise ConfigError(f"sweep member {p.member.index} ({p.member.name}): {err}") from None
    parallel = args.parallel or base.slurm.array_parallelism or max(len(todo), 1)
    record = sweep.Sweep(
        save_dir=sweep_dir,
        config=os.path.abspath(args.config),
        overrides=list(args.overrides),
        axes=axes,
        members=members,
        parallel=parallel,
        command=["tsdia-submit", *argv],
        array_job_ids=list(previous.array_job_ids) if previous else [],
        submitted=list(previous.submitted) if previous else [],
    )
    if args.dry_run:
        return _dry_run(record, todo, resume, parallel, cwd)
    if not todo:
        print(f"All {len(members)} members of {sweep_dir} have completed; nothing to submit.")
        return 0
    if args.local:
        return _local(record, todo, resume, args.config)
    return _submit(record, todo, resume, args.config, parallel, cwd, wait=args.wait)


def _check_one_shape(prepared: list[sweep.Prepared]) -> None:
    """One array has one shape: members may not differ in what they ask Slurm for."""
    first = prepared[0]
    shape = sbatch.submitit_parameters(first.res, "")
    shape.pop("job_name", None)
    for p in prepared[1:]:
        other = sbatch.submitit_parameters(p.res, "")
        other.pop("job_name", None)
        if other != shape:
            changed = sorted(k for k in set(shape) | set(other) if shape.get(k) != other.get(k))
            raise ConfigError(
                f"sweep member {p.member.index} ({p.member.name}) asks Slurm for other resources ({', '.join(changed)}) "
                f"than member {first.member.index}: one job array has one shape. Sweep slurm.* keys in separate sweeps."
            )


def _dry_run(
    record: sweep.Sweep, todo: list[sweep.Prepared], resume: str | None, parallel: int, cwd: str
) -> int:
    job_is_active = is_job_active if _have_slurm() else None
    if resume is None and Path(record.save_dir).exists():
        raise CheckpointDirectoryExistsError(record.save_dir)
    for p in todo:
        member_resume = resume if Path(p.member.save_dir).exists() else None
        try:
            claims.check_can_submit(p.member.save_dir, member_resume, job_is_active)
        except Exception as err:
            raise type(err)(f"sweep member {p.member.index} ({p.member.name}): {err}") from None
    print(sweep.member_table([p.member for p in todo], record.save_dir))
    print()
    res = todo[0].res
    folder_res = _sweep_res(res, record.save_dir)
    print(sbatch.render_submitit_script(folder_res, cwd, array=(len(todo), parallel)), end="")
    _say(
        f"{PROG}: dry run: nothing was written or submitted. A real submit claims {record.save_dir} and the "
        f"{len(todo)} member directories above, and queues them as one job array (at most {parallel} at once)."
    )
    return 0


def _sweep_res(res: SlurmResources, sweep_dir: str) -> SlurmResources:
    """The array's resources: a member's, with the sweep's name and the sweep's Slurm folder."""
    return dataclasses.replace(res, save_dir=sweep_dir, job_name=Path(sweep_dir).name)


def _local(record: sweep.Sweep, todo: list[sweep.Prepared], resume: str | None, config_path: str) -> int:
    made = sweep.claim_all(record.save_dir, todo, resume, config_path, "local", None)
    record.write()
    failed = []
    for p, claim in zip(todo, made, strict=True):
        _say(f"{PROG}: sweep member {p.member.index} ({p.member.name})")
        if submit_local(p.config, p.res, config_path, p.overrides, claim=claim) != 0:
            failed.append(p.member.name)
    _print_summary(record, [p.member for p in todo], {})
    return EXIT_JOB_FAILED if failed else 0


def _submit(
    record: sweep.Sweep,
    todo: list[sweep.Prepared],
    resume: str | None,
    config_path: str,
    parallel: int,
    cwd: str,
    wait: bool,
) -> int:
    _require_slurm()
    from submitit import SlurmExecutor
    from submitit.core.utils import FailedJobError

    previous = sweep.read_sweep(record.save_dir) if resume is not None else None
    if previous is not None:  # a fresh sweep is decided by the mkdir in claim_all, even when racing
        sweep.check_resumable(previous)
    made = sweep.claim_all(record.save_dir, todo, resume, config_path, "slurm", is_job_active)
    created_root = resume is None
    res = _sweep_res(todo[0].res, record.save_dir)
    try:
        executor = SlurmExecutor(folder=res.folder, max_num_timeout=res.max_requeues)
        params = sbatch.submitit_parameters(res, cwd)
        executor.update_parameters(**params, array_parallelism=parallel)
        # One copy of the config for the whole sweep (the members differ only in their overrides).
        snapshot = _snapshot(todo[0].config, res, made[0].token)
        specs = [
            TrainJob(snapshot, tuple(p.overrides), claim.token) for p, claim in zip(todo, made, strict=True)
        ]
        with contextlib.redirect_stderr(io.StringIO()), executor.batch():
            jobs = [executor.submit(spec) for spec in specs]
    except BaseException as err:
        for claim in reversed(made):
            claim.release()
        if created_root:
            shutil.rmtree(record.save_dir, ignore_errors=True)
        if isinstance(err, FailedJobError):
            raise SubmitError(f"sbatch refused the sweep's job array; nothing was queued:\n{err}") from None
        raise
    array_id = jobs[0].job_id.split("_")[0]
    for p, claim, job in zip(todo, made, jobs, strict=True):
        _record(claim, job.job_id)
        p.member.job_id = job.job_id
    record.array_job_ids.append(array_id)
    record.submitted.append(sweep.now())
    record.write()
    print(
        f"Submitted sweep {record.save_dir}: {len(todo)} member(s) as Slurm job array {array_id} "
        f"(at most {parallel} at once), time limit {res.time} each"
    )
    print(sweep.member_table([p.member for p in todo], record.save_dir))
    print(f"Follow:      tsdia status {record.save_dir}    squeue -r -j {array_id}")
    print(f"Cancel:      scancel {array_id}   (one member: scancel {array_id}_<index in the array>)")
    sys.stdout.flush()
    if not wait:
        return 0
    outcomes = {}
    for p in todo:
        job_id = p.member.job_id or ""
        outcomes[p.member.name] = wait_for_job(job_id)[0]
    _print_summary(record, [p.member for p in todo], outcomes)
    return 0 if all(state == "COMPLETED" for state in outcomes.values()) else EXIT_JOB_FAILED


def _print_summary(record: sweep.Sweep, members: list[sweep.Member], states: dict[str, str]) -> None:
    """One line per member: its state and best metric."""
    for m in members:
        info = read_experiment(Path(m.save_dir))
        best = (
            f"{info.best_metric} {info.best[0]:.4g} @ step {info.best[1]}"
            if info.best
            else "no best checkpoint"
        )
        state = states.get(m.name) or ("COMPLETED" if sweep.completed(m) else "not completed")
        print(f"  {m.index:>3}  {m.name}: {state}, {best}")
