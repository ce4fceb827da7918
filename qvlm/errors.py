"""One exception type for user errors: what was wrong, where, and what to do."""


class QVLMError(ValueError):
    """A user-facing error. The message names what was wrong, where, and what to do.

    The CLI prints it on one line and exits with code 2; library callers can catch it.
    """


def warn(message: str) -> None:
    """A warning for the user, on one line of stderr: ``qvlm: warning: MESSAGE`` (what happened and
    what qvlm did about it). The run goes on."""
    import sys

    print("qvlm: warning: " + " ".join(message.split()), file=sys.stderr)
