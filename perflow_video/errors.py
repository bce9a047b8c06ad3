"""Errors a user meets: a wrong config, a missing path, weights that do not fit. Any layer may raise them;
the CLIs print their message alone (no traceback) and exit with status 2."""

from __future__ import annotations

import sys
from collections.abc import Callable

#: The exit status of a command line that stopped on a user error.
USER_ERROR_STATUS = 2
# torch re-raises a DataLoader worker's exception with the worker's traceback as its message.
_WORKER_TRACEBACK = "\nOriginal Traceback (most recent call last):"


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


def user_message(err: BaseException) -> str:
    """The message of a user error; for one re-raised from a DataLoader worker, the worker's own message."""
    text = str(err)
    if _WORKER_TRACEBACK not in text:
        return text
    _, found, message = text.rpartition(f"{type(err).__qualname__}: ")
    return message.strip() if found else text


def exit_status_of(command: Callable[[], int], debug: bool) -> int:
    """Run a command line's body: a :class:`UserError` becomes one ``error:`` line on stderr and
    :data:`USER_ERROR_STATUS` (with ``debug``, it is raised with its traceback); other errors raise."""
    try:
        return command()
    except UserError as err:
        if debug:
            raise
        print(f"error: {user_message(err)}", file=sys.stderr)
        return USER_ERROR_STATUS
