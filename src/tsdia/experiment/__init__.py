"""The experiment directory, torch-free, shared by the submit side and the job side.

- `layout`: the names inside an experiment directory and the owner record.
- `decision`: the one rule that decides fresh / resume / refuse, and the claim of a new directory.
- `claim`: the submit-time claim (owner record with a claim token), built on `decision`.
- `lock`: the lock rank 0 holds on the directory while it trains.
- `checkpoints`: named checkpoints on disk: manifests, staging + rename, discovery, best link, rotation.
- `attempts`: `checkpoints/attempts.json`, one record per attempt that stopped or crashed.

Nothing here imports torch: `tsdia-submit` uses it without paying for the training stack.
"""
