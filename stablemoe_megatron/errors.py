"""Exceptions for problems the user can fix (bad flags, missing files, bad input data).

Command-line entry points catch :class:`ConfigError` and print its message as a single line
(exit code 2) instead of a Python traceback, because the message already says what is wrong and
how to fix it. Anything else escaping is a bug and keeps its traceback.
"""


class ConfigError(ValueError):
    """A configuration or input problem the user can fix; the message names the flag or file and the fix."""


class InputDataError(ConfigError):
    """A record of an input data file is malformed; the message names ``file:line`` and the problem."""


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (e.g. a NaN loss); the message was already logged, exit code 1."""


class CheckpointSaveError(TrainingStopped):
    """Writing a checkpoint failed (full disk, quota, lost mount); the partial save was removed, exit 1."""
