"""Config-time checks of the metric names that early stopping and `best_checkpoint` watch, and of the EMA.

Only the names' shape can be checked here: which metrics a model returns is known once it has validated.
"""

from __future__ import annotations

from tsdia.config.schema import Config, ConfigSource

RAW_PREFIX = "val_"
EMA_PREFIX = "val_ema_"


def metric_errors(config: Config, source: ConfigSource) -> list[str]:
    """One line per problem, each naming its key and `file:line`."""
    training = config.training
    ema = training.ema
    errors: list[str] = []
    watched = [("training.checkpoint.best_metric", training.checkpoint.best_metric)]
    if training.early_stopping.metric is not None:
        watched.append(("training.early_stopping.metric", training.early_stopping.metric))
    for key, metric in watched:
        where = f"{source.where(key)}: {key}"
        if not metric.startswith(RAW_PREFIX):
            errors.append(
                f"{where}: {metric!r} is not a validation metric; those are named val_<name> (raw weights) or "
                f"val_ema_<name> (EMA weights, with training.ema), e.g. val_loss."
            )
        elif metric.startswith(EMA_PREFIX) and ema.decay is None:
            errors.append(
                f"{where}: {metric!r} is measured on the EMA weights, but training.ema.decay is null (no EMA); "
                f"set training.ema.decay (e.g. 0.999) or watch {RAW_PREFIX + metric[len(EMA_PREFIX) :]!r}."
            )
        elif ema.decay is not None and metric.startswith(EMA_PREFIX) and ema.validate_on == "raw":
            errors.append(
                f"{where}: {metric!r} is measured on the EMA weights, but training.ema.validate_on is 'raw'; "
                "set validate_on to ema or both."
            )
        elif ema.decay is not None and not metric.startswith(EMA_PREFIX) and ema.validate_on == "ema":
            errors.append(
                f"{where}: {metric!r} is measured on the raw weights, but training.ema.validate_on is 'ema'; "
                f"watch {EMA_PREFIX + metric[len(RAW_PREFIX) :]!r} or set validate_on to raw or both."
            )
    if ema.decay is not None and config.distributed.deepspeed.zero_stage == 3:
        errors.append(
            f"{source.where('training.ema.decay')}: training.ema.decay: an EMA of the weights needs the full "
            f"parameters on every rank, but distributed.deepspeed.zero_stage is 3 "
            f"({source.where('distributed.deepspeed.zero_stage')}), which shards them; use zero_stage 2 "
            "or less, or set training.ema.decay: null."
        )
    return errors
