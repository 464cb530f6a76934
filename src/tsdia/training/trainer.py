"""The training loop on Accelerate (+DeepSpeed): steps, validation, checkpoints, exact resume."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from tsdia import cluster as cluster_env
from tsdia.config.schema import Config, ConfigSource, TrainingConfig
from tsdia.experiment import checkpoints as store
from tsdia.experiment.progress import ProgressWriter
from tsdia.training.after_stop import StopFlow, StopPlan
from tsdia.training.artifacts import full_config_dict, hyperparameters, model_summary
from tsdia.training.attempt import Attempt, decide_on_rank_zero
from tsdia.training.checkpointer import Checkpointer
from tsdia.training.data import shutdown_workers
from tsdia.training.distributed import barrier, broadcast_object, build_accelerator, deepspeed_config
from tsdia.training.early_stopping import EarlyStopping, build_early_stopping
from tsdia.training.ema import EMA, build_ema
from tsdia.training.optim import build_optimizer, build_scheduler, check_optim
from tsdia.training.preemption import PreemptionWatcher
from tsdia.training.rendezvous import start_distributed
from tsdia.training.resume_override import apply_override, samples_in_epoch
from tsdia.training.run_state import Progress, TrainResult, checkpoint_state, restore_state
from tsdia.training.step_log import StepLog
from tsdia.training.trackers import Trackers
from tsdia.training.validation import validate
from tsdia.training.watchdog import HangWatchdog, clear_old_attempts, watch_attempt
from tsdia.weights import initialize_from

logger = logging.getLogger(__name__)

PROGRESS_EVERY_S = 2.0  # logs/progress.json (for tsdia status) is rewritten at most this often while training


class Trainer:
    """Trains `model` with full experiment management: directory protection, logs, trackers, checkpoints.

    `model(batch)` must return a dict with a scalar `loss` (plus optional scalar metrics, averaged during
    validation and logged as `val_<name>`), or the loss tensor itself.
    """

    def __init__(
        self,
        model: nn.Module,
        train_dataloader: DataLoader[Any],
        val_dataloader: DataLoader[Any] | None,
        config: Config | TrainingConfig,
        config_path: str | None = None,
        cluster: cluster_env.ClusterEnvironment | None = None,
    ) -> None:
        if isinstance(config, TrainingConfig):
            config = Config(training=config)
        if config_path and not config.source.path:
            config.source = ConfigSource(path=config_path, text=Path(config_path).read_text())
        self.config = config
        self.model = model  # the user's module, as given
        self.train_dataloader = train_dataloader
        self.val_dataloader = val_dataloader
        self.cluster = cluster or cluster_env.detect()
        self.progress = Progress()
        self.total_steps = 0
        self.start_step = 0  # the global step this attempt started (or resumed) at
        # Built by train(), in this order; declared here so that the trainer's state has one home.
        self.accelerator: Any = None
        self._attempt: Attempt | None = None
        self._watcher: PreemptionWatcher | None = None
        self._checkpointer: Checkpointer | None = None
        self.prepared_model: Any = None  # the model as Accelerate (DDP, DeepSpeed) wrapped it
        self.optimizer: Any = None
        self.scheduler: Any = None
        self.trackers = Trackers()
        self._progress_writer: ProgressWriter | None = None  # rank 0: logs/progress.json for `tsdia status`
        self._watchdog: HangWatchdog | None = None
        self._step_log: StepLog | None = None  # train_loss and lr every logging.interval steps
        self._stop_flow: StopFlow | None = None
        self.init_from: dict[str, Any] | None = None  # where training.init_from's weights came from
        self.ema: EMA | None = None  # training.ema: fp32 moving average of the weights
        self.early_stopping: EarlyStopping | None = build_early_stopping(
            self.config, val_dataloader is not None
        )

    @property
    def attempt(self) -> Attempt:
        """This attempt's files, trackers and decision (once `train()` has started)."""
        if self._attempt is None:
            raise RuntimeError("Trainer.train() has not started yet")
        return self._attempt

    @property
    def watcher(self) -> PreemptionWatcher:
        if self._watcher is None:
            raise RuntimeError("Trainer.train() has not started yet")
        return self._watcher

    @property
    def stop_flow(self) -> StopFlow:
        if self._stop_flow is None:
            raise RuntimeError("Trainer.train() has not started yet")
        return self._stop_flow

    @property
    def checkpointer(self) -> Checkpointer:
        if self._checkpointer is None:
            raise RuntimeError("Trainer.train() has not prepared the model yet")
        return self._checkpointer

    @property
    def watchdog(self) -> HangWatchdog:
        if self._watchdog is None:
            raise RuntimeError("Trainer.train() has not reached its training loop yet")
        return self._watchdog

    def train(self) -> TrainResult:
        """Run (or resume) the experiment to the end; raises `TsdiaError` subclasses for user mistakes."""
        training = self.config.training
        # Before the experiment directory is made: a bad optimizer or schedule target, a bad init_from path
        # or mismatched keys stop every rank (exit 2) with nothing on disk.
        check_optim(training, self.config.source, len(self.train_dataloader))
        self.init_from = initialize_from(self.model, self.config)
        startup = start_distributed(self.config, self.cluster)  # every rank joins, or a clear error in time
        self.accelerator = accelerator = build_accelerator(self.config, self.cluster)
        decision, lock = decide_on_rank_zero(self.config, self.cluster)
        self._attempt = attempt = Attempt(self.config, self.cluster, decision, lock)
        self._stop_flow = stop_flow = StopFlow(
            attempt.save_dir, self.cluster, self.config.slurm, decision.resume_index
        )
        preemption = training.preemption
        self._watcher = watcher = PreemptionWatcher(
            preemption.signals,
            preemption.check_interval,
            accelerator.num_processes > 1,
            announce=self.cluster.local_rank == 0,
            on_signal=stop_flow.on_signal if stop_flow.asks_slurm else None,
        )
        watcher.install()
        plan: StopPlan | None = None
        crashed = False
        try:
            attempt.start_logging()
            if startup is not None and self.cluster.is_main:
                print(startup.line(), flush=True)
            attempt.write_config()
            result = self._run()
            if result.stopped_early:
                local_plan = stop_flow.plan(self.start_step, self.progress.global_step, watcher.stop_signal)
                plan = StopPlan(**broadcast_object(asdict(local_plan)))
                result.stop_reason, result.requeued, result.end = watcher.stop_signal, plan.requeue, plan.end
            else:
                stop_flow.record_completed(
                    self.start_step, result.global_step, result.stop_reason or "completed"
                )
        except BaseException as err:
            crashed = True
            attempt.record_crash()
            if self._checkpointer is not None:
                self._checkpointer.abandon()
            if isinstance(err, Exception):
                plan = stop_flow.plan(self.start_step, self.progress.global_step, None, failure="crash")
            elif isinstance(err, KeyboardInterrupt) and watcher.interrupts > 1:
                stop_flow.plan(self.start_step, self.progress.global_step, None, failure="aborted")
            raise
        finally:
            if self._watchdog is not None:
                self._watchdog.stop()
            watcher.uninstall()
            attempt.close()
            if plan is not None and plan.requeue:
                if not crashed:
                    barrier()  # every rank has saved and closed its files before Slurm ends this attempt
                stop_flow.requeue(plan)
        return result

    def _run(self) -> TrainResult:
        """Prepare model, optimizer and data, write the run's artifacts, restore a checkpoint, then loop."""
        accelerator, attempt, training = self.accelerator, self.attempt, self.config.training
        raw_optimizer = build_optimizer(self.model.parameters(), training.optimizer, self.config.source)
        prepared = accelerator.prepare(self.model, raw_optimizer, self.train_dataloader, *self._val_loaders())
        model, optimizer, train_dl = prepared[:3]
        val_dl = prepared[3] if len(prepared) > 3 else None
        steps_per_epoch = math.ceil(len(train_dl) / training.gradient_accumulation_steps)
        schedule_steps = steps_per_epoch * training.epochs
        total_steps = min(schedule_steps, training.max_steps or schedule_steps)
        self.total_steps = total_steps
        scheduler = build_scheduler(raw_optimizer, training.scheduler, schedule_steps, self.config.source)
        accelerator.register_for_checkpointing(scheduler)
        self.prepared_model, self.optimizer, self.scheduler = model, optimizer, scheduler

        zero_stage = self._zero_stage()
        self.ema = build_ema(self.config, accelerator.unwrap_model(model), zero_stage)
        attempt.write_json_once(
            "hyperparameters.json",
            hyperparameters(
                self.config,
                world_size=accelerator.num_processes,
                steps_per_epoch=steps_per_epoch,
                total_steps=total_steps,
                zero_stage=zero_stage,
                num_parameters=sum(p.numel() for p in self.model.parameters()),
                code_path=Path(__file__),
                init_from=self.init_from,
            ),
        )
        attempt.write_text_once("model_summary.txt", model_summary(self.model))
        self._checkpointer = Checkpointer(
            accelerator,
            attempt.save_dir,
            training.checkpoint,
            zero_stage is not None,
            attempt.decision.resume_from,
            self.ema,
        )
        if attempt.decision.resume_from:
            self.progress = restore_state(
                self.checkpointer.load(attempt.decision.resume_from), self.early_stopping
            )
            change = attempt.config_change
            if change is not None and change.overridden:
                apply_override(
                    change,
                    training,
                    optimizer,
                    scheduler,
                    self.progress,
                    world_size=accelerator.num_processes,
                    batches_per_epoch=len(train_dl),
                    dataset_len=_dataset_len(train_dl),
                    accelerator=accelerator,
                )
            logger.info(
                "Resumed at step %d (epoch %d, batch %d)",
                self.progress.global_step,
                self.progress.epoch,
                self.progress.batches_in_epoch,
            )
        elif self.init_from is not None:
            source = self.init_from["weights"] or self.init_from["checkpoint"]
            logger.info("Initialised the model from %s (training.init_from)", source)
        self.start_step = self.progress.global_step
        self.trackers = attempt.start_trackers(full_config_dict(self.config), self.progress.global_step)
        if self.cluster.is_main:
            self._progress_writer = ProgressWriter(
                attempt.save_dir, total_steps, attempt.decision.resume_index, min_interval_s=PROGRESS_EVERY_S
            )
            clear_old_attempts(attempt.save_dir, attempt.decision.resume_index)
        barrier()
        self._start_watchdog()
        # Entered after the trackers start (wandb swaps the console streams): from here on log records go
        # through tqdm.write, so they never land in the middle of a progress-bar line.
        with logging_redirect_tqdm():
            return self._loop(model, optimizer, train_dl, val_dl, scheduler, total_steps)

    def _start_watchdog(self) -> None:
        """Every rank watches its own progress; rank 0 records a hang (and requeues under Slurm)."""
        attempt = self.attempt
        self._watchdog = watch_attempt(
            self.config,
            self.cluster,
            attempt.save_dir,
            attempt.decision.resume_index,
            self.start_step,
            drain_log=attempt.drain_log,
        )

    def _loop(
        self, model: Any, optimizer: Any, train_dl: Any, val_dl: Any, scheduler: Any, total_steps: int
    ) -> TrainResult:
        """Epochs until the end (or a stop signal), then the final validation and checkpoint."""
        accelerator, training = self.accelerator, self.config.training
        checkpoint_cfg = training.checkpoint
        progress = self.progress
        val_metrics: dict[str, float] = {}
        bar = tqdm(
            total=total_steps,
            initial=progress.global_step,
            disable=not (accelerator.is_main_process and training.logging.progress_bar),
            desc="train",
            dynamic_ncols=True,
        )
        self._step_log = StepLog(accelerator, training.logging.interval, total_steps, self._log, bar)
        stopped_early = False
        model.train()
        while (
            not self._early_stopped()
            and progress.epoch < training.epochs
            and progress.global_step < total_steps
        ):
            epoch = progress.epoch
            if progress.batches_in_epoch < len(train_dl):  # (a resume may land exactly at an epoch's end)
                stopped_early = self._train_epoch(model, optimizer, train_dl, scheduler, bar, total_steps)
                if stopped_early:
                    break
            if progress.batches_in_epoch >= len(train_dl):
                val_metrics = self._end_epoch(val_dl, epoch) or val_metrics
                if self._validates_at(epoch) and self._early_stop_after(val_metrics):
                    break  # the final checkpoint below is this validation's checkpoint
                if self._validates_at(epoch) and checkpoint_cfg.save_on_validation:
                    self.save_checkpoint(val_metrics)
        bar.close()
        if not stopped_early:
            if progress.last_val_step != progress.global_step:
                val_metrics = self._validate(val_dl) or val_metrics
            last_saved = self.save_checkpoint(val_metrics)
        else:
            last_saved = self.save_checkpoint({})
        with self.watchdog.watching("checkpoint"):
            self.checkpointer.commit_pending()  # a background write still in flight is committed before we return
        shutdown_workers(train_dl, val_dl)  # persistent DataLoader workers outlive the loop; not the save
        if self._progress_writer is not None:
            state = "stopped" if stopped_early else "finished"
            self._progress_writer.update(progress.global_step, progress.epoch, val_metrics, state)
        best = self.attempt.save_dir / store.BEST_LINK
        return TrainResult(
            save_dir=str(self.attempt.save_dir),
            global_step=progress.global_step,
            epoch=progress.epoch,
            last_checkpoint=last_saved,
            best_checkpoint=str(best.resolve()) if best.is_symlink() else None,
            val_metrics=val_metrics,
            stopped_early=stopped_early,
            stop_reason=self._early_stop_reason(),
        )

    def _train_epoch(
        self, model: Any, optimizer: Any, train_dl: Any, scheduler: Any, bar: Any, total_steps: int
    ) -> bool:
        """Train the rest of the current epoch; True if a stop signal ended it early."""
        accelerator, training, progress = self.accelerator, self.config.training, self.progress
        checkpoint_cfg = training.checkpoint
        epoch = progress.epoch
        train_dl.set_epoch(epoch)
        batches = train_dl
        if progress.batches_in_epoch:
            batches = accelerator.skip_first_batches(train_dl, progress.batches_in_epoch)
        step_log = self._step_log
        assert step_log is not None  # set by _loop
        watchdog = self.watchdog  # phases: which ranks were furthest behind when a run hangs
        watchdog.phase = "data"
        for batch in batches:
            watchdog.phase = "forward"
            with accelerator.accumulate(model):
                loss = _loss_of(model(batch))
                watchdog.phase = "backward"
                accelerator.backward(loss)
                watchdog.phase = "optimizer"
                if accelerator.sync_gradients and training.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(model.parameters(), training.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            progress.batches_in_epoch += 1
            step_log.add(loss)
            if not accelerator.sync_gradients:
                watchdog.phase = "data"
                continue
            scheduler.step()
            progress.global_step += 1
            if self.ema is not None:
                self.ema.after_step(progress.global_step)
            bar.update(1)
            step = progress.global_step
            watchdog.step_done(step)
            if step == self.start_step + 1:
                self.attempt.begin_trackers()  # off the critical path: after the first step
            micro = (progress.batches_in_epoch - 1) % training.gradient_accumulation_steps + 1
            step_log.step_done(step, micro, epoch, scheduler)
            epoch_done = progress.batches_in_epoch >= len(train_dl)
            at_interval = checkpoint_cfg.interval is not None and step % checkpoint_cfg.interval == 0
            # At an epoch's end the post-validation checkpoint covers this step.
            covered = epoch_done and self._validates_at(epoch) and checkpoint_cfg.save_on_validation
            if at_interval and not covered and step < total_steps:
                self.save_checkpoint({})
            if step >= total_steps:
                return False
            if self.watcher.should_stop(step):
                self.stop_flow.on_agreed_stop(self.watcher.stop_signal)
                return True
            watchdog.phase = "data"
        return False

    def _log(self, metrics: dict[str, float], step: int) -> None:
        """To the trackers, and to the progress record that `tsdia status` reads."""
        self.trackers.log(metrics, step)
        if self._progress_writer is not None:
            self._progress_writer.update(step, self.progress.epoch, metrics)

    def _val_loaders(self) -> list[DataLoader[Any]]:
        return [self.val_dataloader] if self.val_dataloader is not None else []

    def _validates_at(self, epoch: int) -> bool:
        return (epoch + 1) % self.config.training.validation.interval == 0

    def _end_epoch(self, val_dl: Any, epoch: int) -> dict[str, float] | None:
        """Close epoch `epoch`: validate if it is due, then move the counters to the next epoch."""
        metrics = self._validate(val_dl) if self._validates_at(epoch) else None
        self.progress.epoch = epoch + 1
        self.progress.batches_in_epoch = 0
        return metrics

    def _validate(self, val_dl: Any) -> dict[str, float]:
        """Average every scalar the model returns over the validation set, across ranks; log as `val_*`."""
        if val_dl is None:
            return {}
        with self.watchdog.watching("validation"):
            return self._validate_watched(val_dl)

    def _validate_watched(self, val_dl: Any) -> dict[str, float]:
        accelerator = self.accelerator
        limit = self.config.training.validation.max_steps
        ema = self.config.training.ema
        metrics = validate(self.prepared_model, val_dl, accelerator, limit, self.ema, ema.validate_on)
        step = self.progress.global_step
        self.progress.last_val_step = step
        self._log(metrics, step)
        if accelerator.is_main_process:
            shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
            tqdm.write(f"Validation at step {step} (epoch {self.progress.epoch}): {shown}")
            if self.trackers:
                tqdm.write("✓ Validation metrics logged to trackers")
        return metrics

    def save_checkpoint(self, metrics: dict[str, float]) -> str:
        """Save the current state as a complete named checkpoint (collective: every rank calls it)."""
        progress = self.progress
        # The epoch it was saved in: after an epoch closes the counter already points at the next one.
        epoch = progress.epoch if progress.batches_in_epoch else max(progress.epoch - 1, 0)
        # The end of training, wherever it is saved from.
        final = progress.global_step >= self.total_steps or self._early_stopped()
        progress.world_size = self.accelerator.num_processes
        progress.samples_in_epoch = samples_in_epoch(
            progress.batches_in_epoch,
            self.config.training.batch_size,
            progress.world_size,
            _dataset_len(self.train_dataloader),
        )
        state = checkpoint_state(progress, self.early_stopping)
        with self.watchdog.watching("checkpoint"):
            path = self.checkpointer.save(
                self.prepared_model, epoch, progress.global_step, metrics, state, final
            )
        return str(path)

    def _early_stopped(self) -> bool:
        return self.early_stopping is not None and self.early_stopping.stopped

    def _early_stop_reason(self) -> str | None:
        return self.early_stopping.reason() if self.early_stopping and self.early_stopping.stopped else None

    def _early_stop_after(self, metrics: dict[str, float]) -> bool:
        """Count a scheduled validation (collective: every rank has the same reduced metrics)."""
        if self.early_stopping is None or not self.early_stopping.update(metrics, self.progress.global_step):
            return False
        logger.info("Stopping at step %d: %s", self.progress.global_step, self.early_stopping.reason())
        return True

    def _zero_stage(self) -> int | None:
        ds = deepspeed_config(self.config, self.cluster)
        return None if ds is None else int(ds.get("zero_optimization", {}).get("stage", 0))


def _dataset_len(dataloader: Any) -> int | None:
    try:
        return len(dataloader.dataset)
    except (TypeError, AttributeError):  # an IterableDataset without a length
        return None


def _loss_of(output: Any) -> Any:
    if isinstance(output, dict):
        if "loss" not in output:
            raise KeyError("the model's output dict has no 'loss' entry; return {'loss': tensor, ...}")
        return output["loss"]
    return output
