"""The one exception type the command line turns into a one-line error and a non-zero exit."""


class MopError(Exception):
    """A user-facing error: bad input, an unreachable target, an output directory in use."""
