"""Errors a user meets: a wrong config, a missing path, weights that do not fit. Any layer may raise them;
the CLIs print their message alone (no traceback) and exit with status 2."""

from __future__ import annotations


class UserError(Exception):
    """Something the user gave is wrong (config, data path, checkpoint); the message says what and where.

    The training CLI prints the message and exits with status 2; ``--debug`` shows the traceback.
    """


class ConfigError(UserError, ValueError):
    """A config value, key or file is invalid, or what it points at does not fit (e.g. a motion module that
    does not match its adapter config). The message names the dotted key (or the file)."""


class PathNotFoundError(UserError, FileNotFoundError):
    """A path the config names (training data, a checkpoint) does not exist; the message names the key."""


class WeightsNotFoundError(UserError, FileNotFoundError):
    """Weights the config names are not there (and will not be downloaded); the message names the key."""
