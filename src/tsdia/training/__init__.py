"""The trainer and what it uses: checkpoints, trackers, the log tee. Import submodules directly."""
