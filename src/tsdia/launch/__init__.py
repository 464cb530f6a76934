"""Launching tsdia on Slurm: `tsdia-submit`, its sbatch scripts and the job that runs on every task.

- `resources`: the `slurm` config section checked and turned into what Slurm is asked for.
- `sbatch`: the sbatch text (submitit's script for `--dry-run`, the packaged templates for `--emit-sbatch`).
- `container`: container jobs (pyxis, apptainer, podman): the sbatch script that runs each task in an image.
- `job`: the callable submitit runs on every task (a thin wrapper around `tsdia.train.run`).
- `submit`: the `tsdia-submit` command line.

The experiment directory's rules and the submit-time claim live in `tsdia.experiment`; Slurm's commands in
`tsdia.slurm_commands`. Nothing here imports torch: submitting stays fast (see benchmarks/submit_latency.py).
"""
