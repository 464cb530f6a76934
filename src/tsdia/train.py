"""`tsdia-train CONFIG [KEY=VALUE ...]` (or `--config CONFIG`; also `python -m tsdia.train`): parse, build, train."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from tsdia.cli import run_cli
from tsdia.errors import EXIT_INTERRUPTED, EXIT_REQUEUED, EXIT_STOPPED


def run(argv: Sequence[str] | None = None) -> int:
    from tsdia.parse_args import unified_parser

    config, config_path = unified_parser(argv)
    from tsdia.training.preemption import catch_stop_signals_early, ignore_stop_signals

    stop_signals = config.training.preemption.signals
    catch_stop_signals_early(stop_signals)

    from accelerate.utils import set_seed

    from tsdia.training.components import build_component
    from tsdia.training.data import build_dataloaders
    from tsdia.training.trainer import Trainer

    set_seed(config.training.seed)
    model = build_component(config.model, "model", config.source)
    datasets = build_component(config.dataset, "dataset", config.source)
    train_set, val_set = datasets if isinstance(datasets, tuple) else (datasets, None)
    train_dl, val_dl = build_dataloaders(train_set, val_set, config.training)
    trainer = Trainer(model, train_dl, val_dl, config=config, config_path=config_path)
    result = trainer.train()
    ignore_stop_signals(stop_signals)  # everything is saved: a late signal must not fail the job
    if result.stopped_early:
        if result.end == "interrupted":
            return EXIT_INTERRUPTED
        return EXIT_REQUEUED if result.requeued else EXIT_STOPPED
    if trainer.cluster.is_main:
        why = f" ({result.stop_reason})" if result.stop_reason else ""
        print(f"Done: {result.global_step} steps{why}; experiment in {result.save_dir}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: user errors print one clear message and exit 2 (traceback with --debug)."""
    code = run_cli("tsdia-train", run, argv)
    if code in (EXIT_REQUEUED, EXIT_STOPPED, EXIT_INTERRUPTED):
        # Stopped by a signal: the checkpoint is complete and every file and tracker is closed. Skip the
        # interpreter's teardown of the model and optimizer (about a second) while the deadline runs.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
