"""The training loop on Accelerate (+DeepSpeed): steps, validation, checkpoints, exact resume."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from tsdia import cluster as cluster_env
from tsdia.config.schema import Config, ConfigSource, TrainingConfig
from tsdia.experiment import checkpoints as store
from tsdia.experiment.progress import ProgressWriter
from tsdia.slurm_commands import requeue_job
from tsdia.training.artifacts import full_config_dict, hyperparameters, model_summary
from tsdia.training.attempt import Attempt, decide_on_rank_zero
from tsdia.training.checkpointer import Checkpointer
from tsdia.training.components import build_optimizer, build_scheduler
from tsdia.training.data import shutdown_workers
from tsdia.training.distributed import barrier, broadcast_object, build_accelerator, deepspeed_config
from tsdia.training.preemption import (
    PreemptionWatcher,
    StopInspector,
    StopPlan,
    apply_node_exclusion,
    plan_after_stop,
    record_completed,
)
from tsdia.training.rendezvous import start_distributed
from tsdia.training.resume_override import apply_override, samples_in_epoch
from tsdia.training.trackers import Trackers
from tsdia.training.watchdog import HangWatchdog, clear_old_attempts, watch_attempt

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a finished `Trainer.train()` reports."""

    save_dir: str
    global_step: int
    epoch: int
    last_checkpoint: str | None
    best_checkpoint: str | None
    val_metrics: dict[str, float] = field(default_factory=dict)
    stopped_early: bool = False
    stop_reason: str | None = None  # the signal that stopped it early (e.g. SIGUSR2)
    requeued: bool = False  # the Slurm job was put back in the queue and will resume by itself
    end: str | None = None  # how a stopped attempt ended (attempts.json's `end`, e.g. "interrupted")


@dataclass
class _Progress:
    """Counters saved in every checkpoint (Accelerate does not store the step)."""

    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    last_val_step: int = -1  # global step of the latest validation
    # The geometry the state was saved under, so a resume with another one can find its place (-1/0: older).
    samples_in_epoch: int = -1  # samples of the epoch consumed by all ranks together
    world_size: int = 0


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
        self.progress = _Progress()
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
        self._loss_sum = torch.zeros(())  # training loss summed since the last log line (on the device)
        self._loss_count = 0
        self._stop_inspector: StopInspector | None = None  # rank 0 of a Slurm job: asks Slurm why we stop

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
        startup = start_distributed(self.config, self.cluster)  # every rank joins, or a clear error in time
        self.accelerator = accelerator = build_accelerator(self.config, self.cluster)
        decision, lock = decide_on_rank_zero(self.config, self.cluster)
        self._attempt = attempt = Attempt(self.config, self.cluster, decision, lock)
        preemption = training.preemption
        self._watcher = watcher = PreemptionWatcher(
            preemption.signals,
            preemption.check_interval,
            accelerator.num_processes > 1,
            accelerator.device,
            announce=self.cluster.local_rank == 0,
            on_signal=self._start_stop_inspector if self.cluster.is_main and self.cluster.job_id else None,
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
                plan = StopPlan(**broadcast_object(asdict(self._plan_after_stop())))
                result.stop_reason, result.requeued, result.end = watcher.stop_signal, plan.requeue, plan.end
            elif self.cluster.is_main:
                self._record_completed(result.global_step)
        except BaseException as err:
            crashed = True
            attempt.record_crash()
            if self._checkpointer is not None:
                self._checkpointer.abandon()
            if isinstance(err, Exception):
                plan = self._plan_after_stop(failure="crash")
            elif isinstance(err, KeyboardInterrupt) and watcher.interrupts > 1:
                self._plan_after_stop(failure="aborted")
            raise
        finally:
            if self._watchdog is not None:
                self._watchdog.stop()
            watcher.uninstall()
            attempt.close()
            if plan is not None and plan.requeue:
                if not crashed:
                    barrier()  # every rank has saved and closed its files before Slurm ends this attempt
                job_id = self.cluster.job_id if self.cluster.is_main else None
                if job_id and plan.requeue_now and requeue_job(job_id):
                    apply_node_exclusion(job_id, plan.exclude)
        return result

    def _plan_after_stop(self, failure: str | None = None) -> StopPlan:
        """Rank 0 records the attempt and says (in the log) whether the job will be requeued."""
        if not self.cluster.is_main:
            return StopPlan(end="", requeue=False)
        return plan_after_stop(
            save_dir=self.attempt.save_dir,
            cluster=self.cluster,
            slurm=self.config.slurm,
            resume_index=self.attempt.decision.resume_index,
            start_step=self.start_step,
            stop_step=self.progress.global_step,
            signal_name=None if failure else self.watcher.stop_signal,
            slurm_stop=self._stop_inspector.slurm_stop if self._stop_inspector else None,
            requeued_early=bool(self._stop_inspector and self._stop_inspector.requeued_early),
            failure=failure,
        )

    def _record_completed(self, step: int) -> None:
        record_completed(
            self.attempt.save_dir, self.cluster, self.attempt.decision.resume_index, self.start_step, step
        )

    def _start_stop_inspector(self, signal_name: str) -> None:
        """From the signal handler: ask Slurm now (off the main thread) why the job is being stopped."""
        if self._stop_inspector is None:
            self._stop_inspector = StopInspector(self.attempt.save_dir, self.cluster, self.config.slurm)
        self._stop_inspector.start(signal_name)

    def _on_agreed_stop(self) -> None:
        """Rank 0, once the ranks agreed to stop: wait for Slurm's answer (ask now if a peer had the signal)."""
        if not (self.cluster.is_main and self.cluster.job_id):
            return
        if self._stop_inspector is None:
            self._start_stop_inspector(self.watcher.stop_signal or "")
        assert self._stop_inspector is not None
        self._stop_inspector.wait()

    def _run(self) -> TrainResult:
        """Prepare model, optimizer and data, write the run's artifacts, restore a checkpoint, then loop."""
        accelerator, attempt, training = self.accelerator, self.attempt, self.config.training
        raw_optimizer = build_optimizer(self.model.parameters(), training.optimizer)
        prepared = accelerator.prepare(self.model, raw_optimizer, self.train_dataloader, *self._val_loaders())
        model, optimizer, train_dl = prepared[:3]
        val_dl = prepared[3] if len(prepared) > 3 else None
        steps_per_epoch = math.ceil(len(train_dl) / training.gradient_accumulation_steps)
        schedule_steps = steps_per_epoch * training.epochs
        total_steps = min(schedule_steps, training.max_steps or schedule_steps)
        self.total_steps = total_steps
        scheduler = build_scheduler(raw_optimizer, training.scheduler, schedule_steps)
        accelerator.register_for_checkpointing(scheduler)
        self.prepared_model, self.optimizer, self.scheduler = model, optimizer, scheduler

        zero_stage = self._zero_stage()
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
            ),
        )
        attempt.write_text_once("model_summary.txt", model_summary(self.model))
        self._checkpointer = Checkpointer(
            accelerator,
            attempt.save_dir,
            training.checkpoint,
            zero_stage is not None,
            attempt.decision.resume_from,
        )
        if attempt.decision.resume_from:
            self.progress = _Progress(**self.checkpointer.load(attempt.decision.resume_from))
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
        self.start_step = self.progress.global_step
        self.trackers = attempt.start_trackers(full_config_dict(self.config), self.progress.global_step)
        if self.cluster.is_main:
            self._progress_writer = ProgressWriter(
                attempt.save_dir, total_steps, attempt.decision.resume_index
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
        self._loss_sum = torch.zeros((), device=accelerator.device)
        self._loss_count = 0
        stopped_early = False
        model.train()
        while progress.epoch < training.epochs and progress.global_step < total_steps:
            epoch = progress.epoch
            if progress.batches_in_epoch < len(train_dl):  # (a resume may land exactly at an epoch's end)
                stopped_early = self._train_epoch(model, optimizer, train_dl, scheduler, bar, total_steps)
                if stopped_early:
                    break
            if progress.batches_in_epoch >= len(train_dl):
                val_metrics = self._end_epoch(val_dl, epoch) or val_metrics
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
        window_loss = torch.zeros((), device=accelerator.device)  # over one optimizer step's micro-batches
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
            window_loss += loss.detach()
            if not accelerator.sync_gradients:
                watchdog.phase = "data"
                continue
            micro = (progress.batches_in_epoch - 1) % training.gradient_accumulation_steps + 1
            self._loss_sum += window_loss / micro
            self._loss_count += 1
            window_loss.zero_()
            scheduler.step()
            progress.global_step += 1
            bar.update(1)
            step = progress.global_step
            watchdog.step_done(step)
            if step == self.start_step + 1:
                self.attempt.begin_trackers()  # off the critical path: after the first step
            if step % training.logging.interval == 0 or step == total_steps:
                mean_loss = accelerator.reduce(self._loss_sum / max(self._loss_count, 1), "mean").item()
                lr = float(scheduler.get_last_lr()[0])
                self._log({"train_loss": mean_loss, "lr": lr, "epoch": epoch}, step)
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", refresh=False)
                self._loss_sum.zero_()
                self._loss_count = 0
            epoch_done = progress.batches_in_epoch >= len(train_dl)
            at_interval = checkpoint_cfg.interval is not None and step % checkpoint_cfg.interval == 0
            # At an epoch's end the post-validation checkpoint covers this step.
            covered = epoch_done and self._validates_at(epoch) and checkpoint_cfg.save_on_validation
            if at_interval and not covered and step < total_steps:
                self.save_checkpoint({})
            if step >= total_steps:
                return False
            if self.watcher.should_stop(step):
                self._on_agreed_stop()
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

    @torch.no_grad()
    def _validate(self, val_dl: Any) -> dict[str, float]:
        """Average every scalar the model returns over the validation set, across ranks; log as `val_*`."""
        if val_dl is None:
            return {}
        with self.watchdog.watching("validation"):
            return self._validate_watched(val_dl)

    def _validate_watched(self, val_dl: Any) -> dict[str, float]:
        accelerator = self.accelerator
        model = self.prepared_model
        model.eval()
        sums: dict[str, torch.Tensor] = {}
        batches = 0
        limit = self.config.training.validation.max_steps
        for i, batch in enumerate(val_dl):
            if limit is not None and i >= limit:
                break
            output = model(batch)
            values = output if isinstance(output, dict) else {"loss": output}
            for name, value in values.items():
                if torch.is_tensor(value) and value.numel() == 1:
                    sums[name] = (
                        sums.get(name, torch.zeros((), device=accelerator.device)) + value.detach().float()
                    )
            batches += 1
        model.train()
        metrics = {
            f"val_{name}": accelerator.reduce(total / max(batches, 1), "mean").item()
            for name, total in sorted(sums.items())
        }
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
        final = progress.global_step >= self.total_steps  # the end of training, wherever it is saved from
        progress.world_size = self.accelerator.num_processes
        progress.samples_in_epoch = samples_in_epoch(
            progress.batches_in_epoch,
            self.config.training.batch_size,
            progress.world_size,
            _dataset_len(self.train_dataloader),
        )
        with self.watchdog.watching("checkpoint"):
            path = self.checkpointer.save(
                self.prepared_model, epoch, progress.global_step, metrics, asdict(progress), final
            )
        return str(path)

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
