"""One attempt at an experiment: the rank-0 decision broadcast to all ranks, then the attempt's files.

Order matters for "nothing half-made": the decision (which may refuse) comes first and writes nothing
when it refuses; only then are logs, config.yml and the other artifacts written, by rank 0 alone.
"""

from __future__ import annotations

import json
import logging
import shutil
import traceback
from pathlib import Path
from typing import Any

from tsdia import errors
from tsdia.cluster import ClusterEnvironment
from tsdia.config.loader import effective_yaml
from tsdia.config.schema import Config
from tsdia.experiment.checkpoints import clean_staging
from tsdia.experiment.config_change import (
    ConfigChange,
    compare_on_resume,
    log_lines,
    neutral_component_keys,
    render_resume_config,
    resume_config_path,
    saved_world_size,
)
from tsdia.experiment.decision import Decision, open_experiment
from tsdia.experiment.layout import CONFIG_FILE, LOGS_DIR, RANK_LOGS_DIR, STORE_DIR
from tsdia.experiment.lock import ExperimentLock
from tsdia.fileio import atomic_write_text
from tsdia.training.distributed import barrier, broadcast_object
from tsdia.training.logging_utils import (
    init_trackers,
    record_wandb_loss,
    reserve_wandb_run,
    save_wandb_info,
    setup_file_logger,
)
from tsdia.training.tee import ConsoleTee
from tsdia.training.tracker_startup import BackgroundTrackers
from tsdia.training.trackers import Tracker, Trackers, WandbSettings, WandbTracker

logger = logging.getLogger(__name__)


def decide_on_rank_zero(
    config: Config, cluster: ClusterEnvironment
) -> tuple[Decision, ExperimentLock | None]:
    """Rank 0 decides (and claims); every rank receives the same decision or raises the same error."""
    checkpoint = config.training.checkpoint
    outcome: dict[str, Any]
    lock = None
    if cluster.is_main:
        try:
            decision = open_experiment(checkpoint.save_dir, checkpoint.resume, cluster.claim_token)
            if decision.action == "resume" and not decision.created_dir:
                # Before the lock and any file: a refused change leaves the directory as it was.
                old_world = saved_world_size(decision.save_dir, decision.resume_from)
                neutral = neutral_component_keys(config)
                change = compare_on_resume(config, decision.save_dir, cluster.world_size, old_world, neutral)
                decision.config_change = change.to_dict() if change else None
            lock = ExperimentLock(decision.save_dir)
            lock.acquire(cluster.job_id)
            removed = clean_staging(decision.save_dir)
            if removed:
                decision.note = (decision.note + "; " if decision.note else "") + f"removed partial {removed}"
            outcome = {"decision": decision.to_dict()}
        except errors.TsdiaError as err:
            outcome = {"error": type(err).__name__, "message": str(err), "directory": checkpoint.save_dir}
    else:
        outcome = {}
    outcome = broadcast_object(outcome)
    if "error" in outcome:
        if lock is not None:
            lock.release()
        raise _rebuild_error(outcome)
    return Decision(**outcome["decision"]), lock


def _rebuild_error(outcome: dict[str, Any]) -> errors.TsdiaError:
    cls = getattr(errors, outcome["error"], errors.TsdiaError)
    if cls is errors.CheckpointDirectoryExistsError:
        return errors.CheckpointDirectoryExistsError(outcome["directory"])
    return cls(outcome["message"])


class Attempt:
    """The files and trackers of one attempt at an experiment (log tee, config.yml, artifacts, trackers).

    Holds rank 0's lock on the directory (None on other ranks); `close()` releases everything.
    """

    def __init__(
        self,
        config: Config,
        cluster: ClusterEnvironment,
        decision: Decision,
        lock: ExperimentLock | None,
    ) -> None:
        self.config = config
        self.cluster = cluster
        self.decision = decision
        self.lock = lock
        self.save_dir = Path(decision.save_dir)
        self.tee: ConsoleTee | None = None
        self.trackers: Trackers = Trackers()

    @property
    def log_path(self) -> Path:
        name = self.decision.log_name
        if self.cluster.is_main:
            return self.save_dir / LOGS_DIR / name
        return (
            self.save_dir / LOGS_DIR / RANK_LOGS_DIR / name.replace(".log", f".rank{self.cluster.rank}.log")
        )

    def start_logging(self) -> None:
        """Create the directory skeleton (rank 0), then every rank tees its console to its log file."""
        if self.cluster.is_main:
            (self.save_dir / LOGS_DIR / RANK_LOGS_DIR).mkdir(parents=True, exist_ok=True)
            (self.save_dir / STORE_DIR).mkdir(exist_ok=True)
        barrier()
        logging_config = self.config.training.logging
        self.tee = setup_file_logger(self.log_path, progress_interval=logging_config.progress_log_seconds)
        decision = self.decision
        if self.cluster.is_main:
            what = "Resuming" if decision.action == "resume" else "Starting"
            print(
                f"{what} experiment {decision.save_dir} (attempt {decision.resume_index}, log {self.log_path.name})"
            )
            if decision.resume_from:
                print(f"Resuming from {decision.resume_from}")
            if decision.note:
                print(f"Note: {decision.note}")
            if self.cluster.distributed:
                print(
                    f"Rendezvous: {self.cluster.master_addr}:{self.cluster.master_port} "
                    f"({self.cluster.master_addr_reason or self.cluster.launcher})"
                )

    @property
    def config_change(self) -> ConfigChange | None:
        """A resume's config compared with the experiment's (None on a first attempt)."""
        data = self.decision.config_change
        return ConfigChange.from_dict(data) if data else None

    def write_config(self) -> None:
        """config.yml: a byte-identical copy, or the effective config when overrides were given.

        A resume that changed the config records its effective config in `logs/config_resume_N.yml`
        instead (config.yml stays as the experiment began) and lists the changes in its log.
        """
        self._record_config_change()
        target = self.save_dir / CONFIG_FILE
        if not (self.cluster.is_main and self.decision.created_dir) or target.exists():
            return
        source = self.config.source
        if source.path and not source.overrides:
            tmp = target.with_name(".config.yml.tmp")
            shutil.copyfile(source.path, tmp)
            tmp.replace(target)
        else:
            import yaml

            from tsdia.training.artifacts import full_config_dict

            text = (
                effective_yaml(self.config) if source.path else yaml.safe_dump(full_config_dict(self.config))
            )
            atomic_write_text(target, text)

    def _record_config_change(self) -> None:
        change = self.config_change
        lines = log_lines(change) if change else []
        if change is None or not lines or not self.cluster.is_main:
            return
        print("\n".join(lines), flush=True)
        index = self.decision.resume_index
        path = resume_config_path(self.save_dir, index)
        atomic_write_text(path, render_resume_config(self.config, change, index))
        print(f"Effective config of this attempt recorded in {path.relative_to(self.save_dir)}", flush=True)

    def write_json_once(self, name: str, data: dict[str, Any]) -> None:
        path = self.save_dir / name
        if self.cluster.is_main and not path.exists():
            atomic_write_text(path, json.dumps(data, indent=2, default=str))

    def write_text_once(self, name: str, text: str) -> None:
        path = self.save_dir / name
        if self.cluster.is_main and not path.exists():
            atomic_write_text(path, text)

    def start_trackers(self, full_config: dict[str, Any], start_step: int) -> Trackers:
        if not self.cluster.is_main:
            return self.trackers
        logging_config = self.config.training.logging
        wandb_settings = None
        if logging_config.wandb:
            wandb_settings = WandbSettings(
                project=logging_config.wandb_project,
                entity=logging_config.wandb_entity,
                group=logging_config.wandb_group,
                run_name=logging_config.run_name or self.save_dir.resolve().name,
                mode=logging_config.wandb_mode,
                save_dir=str(self.save_dir),
            )
        resuming = self.decision.action == "resume"
        # Now, not in the background start: a stop before WandB is up must still leave the run id behind.
        run_id = reserve_wandb_run(self.save_dir, wandb_settings) if wandb_settings is not None else None
        config_yaml = effective_yaml(self.config) if self.config.source.path else json.dumps(full_config)

        def start() -> Trackers:
            try:
                return start_now()
            except Exception as err:  # e.g. wandb-core killed by a stop signal while it started
                logger.warning(
                    "The trackers could not start (%s: %s); training goes on without them.",
                    type(err).__name__,
                    err,
                )
                if wandb_settings is not None:
                    record_wandb_loss(self.save_dir, self.decision.resume_index, start_step, err)
                return Trackers()

        def start_now() -> Trackers:
            trackers, wandb_tracker = init_trackers(
                save_dir=str(self.save_dir),
                full_config=full_config,
                config_yaml=config_yaml,
                tensorboard=logging_config.tensorboard,
                wandb=wandb_settings,
                start_step=start_step,
                resuming=resuming,
                wandb_run_id=run_id,
            )
            if wandb_tracker is not None:
                save_wandb_info(wandb_tracker, self.save_dir)
            trackers.on_lost = self._tracker_lost  # a tracker that dies later is recorded, not fatal
            return trackers

        # Off the critical path: the model prepares and trains while wandb starts (records are queued).
        self.trackers = BackgroundTrackers(
            start, configured=logging_config.tensorboard or logging_config.wandb
        )
        return self.trackers

    def begin_trackers(self) -> None:
        """The attempt's first step is done: the trackers may start now (see `BackgroundTrackers`)."""
        if isinstance(self.trackers, BackgroundTrackers):
            self.trackers.begin()

    def _tracker_lost(self, tracker: Tracker, step: int, error: BaseException) -> None:
        """A tracker died mid-attempt (see `Trackers`): say in wandb_info.json which steps WandB misses."""
        if isinstance(tracker, WandbTracker):
            record_wandb_loss(self.save_dir, self.decision.resume_index, step, error)

    def record_crash(self) -> None:
        """Put the traceback in this rank's log now: Python prints it only after the tee is gone."""
        if self.tee is not None:
            self.tee.write_file_only(traceback.format_exc())

    def drain_log(self) -> None:
        """Flush everything printed so far into the log file (before an exit that skips `close()`)."""
        if self.tee is not None:
            self.tee.close()

    def close(self) -> None:
        self.trackers.finish()
        if self.tee is not None:
            self.tee.close()
        if self.lock is not None:
            self.lock.release()
