"""The one base class of the errors that qrs reports to users as a message, never a traceback."""


class QrsError(Exception):
    """A user-facing error: bad input, a missing file, an inconsistent option. The CLI prints the
    message and exits with status 2; the HTTP service answers 4xx with it."""


class DatasetError(QrsError, ValueError):
    """A prepared dataset that is missing, incomplete or not what was asked for."""
