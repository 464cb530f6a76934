"""Launching tsdia on Slurm: `tsdia-submit`, its sbatch scripts and the job that runs on every task.

- `resources`: the `slurm` config section checked and turned into what Slurm is asked for.
- `sbatch`: the sbatch text (submitit's script for `--dry-run`, the packaged templates for `--emit-sbatch`).
- `container`: container jobs (pyxis, apptainer, podman): the sbatch script that runs each task in an image.
- `claim`: the experiment directory claimed at submit time (the owner record and its token).
- `job`: the callable submitit runs on every task (a thin wrapper around `tsdia.train.run`).
- `slurm_state`: the job's state as Slurm reports it, for `--wait`.
- `submit`: the `tsdia-submit` command line.

Nothing here imports torch: submitting stays fast (see benchmarks/submit_latency.py).
"""
