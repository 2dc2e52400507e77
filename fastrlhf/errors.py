"""Errors a user can fix, and how the command line reports them.

``UserError`` (and its kinds below) is raised for anything the user controls: a model
path, a data file, a checkpoint, the run directory, permissions, a full disk. Its message
is ONE line that names the file or the config key. The CLI prints it on stderr and exits
with status 2; ``--debug`` or ``FASTRLHF_DEBUG=1`` shows the traceback as well. Any other
exception is an internal error and keeps its traceback.

``user_error_from_os(e, doing)`` turns the OSErrors a user causes (permission denied, no
space left, quota exceeded, read-only filesystem) into a ``UserError`` naming the file.
"""

from __future__ import annotations

import errno
import os
import sys
import traceback
from collections.abc import Callable

EXIT_USER_ERROR = 2

# OSErrors that are the user's environment, not a bug: reported in one line
_USER_ERRNOS = {
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
}


class UserError(Exception):
    """An error the user can fix; the message is one line naming the file or key."""

    def __init__(self, message: str):
        # one line: the CLI prints nothing else, so embedded newlines would hide the cause
        super().__init__(" ".join(str(message).split()))


class CheckpointError(UserError):
    """A checkpoint that is missing, incomplete, corrupted, or not safe to load."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint where one was expected (also a FileNotFoundError for callers that
    catch that)."""

    def __init__(self, message: str):
        CheckpointError.__init__(self, message)


class CheckpointMismatchError(CheckpointError, ValueError):
    """A checkpoint that does not fit the model it is loaded into (another config)."""


class DataError(UserError):
    """A data source that cannot be read or holds no usable row."""


class ModelError(UserError):
    """A model that cannot be found or loaded."""


class RunDirError(UserError):
    """The run directory is in a state the command would destroy or cannot use."""


def user_error_from_os(e: OSError, doing: str) -> UserError | None:
    """A ``UserError`` for an OSError the user's environment caused (else None)."""
    reason = _USER_ERRNOS.get(e.errno or -1)
    if reason is None:
        return None
    where = e.filename if e.filename is not None else "?"
    return UserError(f"{doing}: {reason}: {where}")


def debug_enabled(flag: bool = False) -> bool:
    return flag or os.environ.get("FASTRLHF_DEBUG", "").strip() not in ("", "0", "false")


def run_reporting_errors(
    fn: Callable[[], int], *, debug: bool = False, user_errors: tuple[type, ...] = ()
) -> int:
    """Run ``fn`` and turn user errors into one stderr line and status 2.

    ``user_errors``: further exception types the caller treats as user errors (e.g. the
    config loader's). OSErrors of the user's environment (``user_error_from_os``) count
    too; everything else propagates with its traceback."""
    try:
        return fn()
    except (UserError, *user_errors) as e:
        return _report(e, str(e), debug)
    except OSError as e:
        converted = user_error_from_os(e, "I/O error")
        if converted is None:
            raise
        return _report(e, str(converted), debug)


def _report(e: BaseException, message: str, debug: bool) -> int:
    if debug_enabled(debug):
        traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)
    kind = "config error" if type(e).__name__ == "ConfigError" else "error"
    print(f"fastrlhf: {kind}: {' '.join(message.split())}", file=sys.stderr)
    return EXIT_USER_ERROR
