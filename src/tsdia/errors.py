"""One exception hierarchy for everything tsdia reports to a user.

Every `TsdiaError` carries a message meant for a person: what is wrong, where, and how to fix it.
The command-line entry points print it without a traceback and exit with `EXIT_USAGE`.
"""

from __future__ import annotations

EXIT_USAGE = 2  # bad input or a refused experiment: the user must change something
EXIT_REQUEUED = 3  # stopped on a signal, saved, and the Slurm job was requeued: it will resume by itself
EXIT_STOPPED = 4  # stopped on a signal and saved, but not requeued: resume with `resume: latest`
EXIT_INTERRUPTED = (
    130  # Ctrl-C (SIGINT): saved and stopped (first Ctrl-C) or aborted (second); the shell's 128+2
)
EXIT_HANG = 5  # the watchdog saw no training progress: stacks dumped, attempt recorded (requeued under Slurm)


class TsdiaError(Exception):
    """Root of tsdia's user-facing errors."""


class ConfigError(TsdiaError, ValueError):
    """A configuration file, key, value or override is invalid."""


class CheckpointDirectoryExistsError(TsdiaError, FileExistsError):
    """The experiment directory already exists and the run is not resuming it."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        super().__init__(directory_exists_message(directory))

    def __str__(self) -> str:
        return directory_exists_message(self.directory)


class CheckpointError(TsdiaError):
    """A checkpoint is missing, incomplete, or cannot be written."""


class ExperimentInUseError(TsdiaError):
    """Another live process or Slurm job owns the experiment directory."""


def directory_exists_message(directory: str) -> str:
    """The refusal text users see when an experiment directory already exists (kept verbatim)."""
    rule = "=" * 70
    return (
        f"\n{rule}\n"
        "ERROR: Checkpoint directory already exists!\n"
        f"{rule}\n"
        f"Directory: {directory}\n"
        "\n"
        "To prevent accidental overwriting of existing experiments, training cannot proceed.\n"
        "\n"
        "Please choose ONE of the following options:\n"
        "  1. Change 'checkpoint.save_dir' in your config to a new path\n"
        "  2. Set 'checkpoint.resume' to resume from this checkpoint\n"
        "  3. Manually delete the directory if you want to overwrite it\n"
        f"{rule}"
    )
