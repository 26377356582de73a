"""User-facing errors: the CLI prints them as one paragraph, without a traceback."""


class OrchError(Exception):
    """A problem the user can fix (bad input, a missing file, a refused action)."""
