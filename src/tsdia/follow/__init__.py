"""Following experiments from a login node: `tsdia status`, `tsdia logs`, `tsdia sync` (torch-free).

- `scan`: find tsdia experiments under some paths and read what each one has on disk.
- `status`: one row per experiment, states from Slurm (one squeue, one sacct) or from disk.
- `logs`: print or follow an experiment's current attempt log across requeues.
- `sync`: upload offline WandB runs, every attempt in order, and mark them synced.
- `cli`: the `tsdia` command and its subcommands.
"""
