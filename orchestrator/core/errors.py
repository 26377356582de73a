"""User-facing errors: the CLI prints them as one paragraph, without a traceback."""

from __future__ import annotations

import errno


class OrchError(Exception):
    """A problem the user can fix (bad input, a missing file, a refused action)."""


# Errors the machine causes where orch writes, and what to do about each: no retry and no traceback helps.
MACHINE_FAULTS = {
    errno.ENOSPC: (
        "the filesystem is full",
        "free space there (`df -h` shows it; old runs' checkpoints and exports are the large files)",
    ),
    errno.EDQUOT: (
        "your disk quota there is used up",
        "free space or ask for a larger quota (`quota -s`, or the site's usage command, shows it)",
    ),
    errno.EROFS: (
        "the filesystem is mounted read-only",
        "point ORCH_HOME (or the profile's paths.runs, or the command's output) at a writable filesystem",
    ),
    errno.EACCES: (
        "your user may not write there",
        "check the owner, group and mode of the folder (docs/run-directory.md#shared-files)",
    ),
}


def machine_fault(err: BaseException) -> str | None:
    """What an OSError of MACHINE_FAULTS (a full disk, a spent quota, a read-only or forbidden folder) means, naming
    the path and what to do, in one sentence; None for any other error."""
    if not isinstance(err, OSError) or err.errno not in MACHINE_FAULTS:
        return None
    fault, remedy = MACHINE_FAULTS[err.errno]
    path = f"{err.filename2} (from {err.filename})" if err.filename2 else err.filename or "a file orch was writing"
    return f"Cannot write {path}: {err.strerror or fault} ({fault}); {remedy}."
