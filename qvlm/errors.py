"""One exception type for user errors: what was wrong, where, and what to do."""


class QVLMError(ValueError):
    """A user-facing error. The message names what was wrong, where, and what to do.

    The CLI prints it on one line and exits with code 2; library callers can catch it.
    """
