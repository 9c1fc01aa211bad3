"""The errors a user can fix. Every command ends on one of these with one ``error: ...`` line
(``tkpbench.cli.guard``); anything else is a bug and keeps its traceback.

Each message says what was expected, what was found, and the fix. The classes live here, at the
bottom of the import graph, so that the command-line layer can catch them without importing the
stages; the modules that raise them re-export them under their old names.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input or state that the message explains; ``exit_code`` is what the command returns."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """A configuration file or override that does not fit the schema or the allowed values."""


class DatasetError(UserError, RuntimeError):
    """A dataset file or folder that is missing or does not have the expected content."""


class WeightsError(UserError, RuntimeError):
    """A pretrained weights file that is missing or does not fit the model."""


class DownloadError(UserError, RuntimeError):
    """A download that failed; what was fetched is kept for a resume."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint or weights file that is missing, damaged, unsafe or not tkpbench's."""


class RunLockedError(UserError, RuntimeError):
    """Another process is training in this run folder, or its file system cannot lock it."""


class TrainingError(UserError, RuntimeError):
    """A training that cannot start or cannot go on."""


class Interrupted(UserError):
    """Stopped by a signal after saving what it had; ``exit_code`` is 128 + the signal number."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + int(signum)


class TrainingInterrupted(Interrupted, TrainingError):
    """A training stopped by SIGTERM/SIGINT after writing a checkpoint."""
