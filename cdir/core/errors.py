"""User-facing errors: the CLI prints these as one line and exits non-zero."""


class CdirError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class ModelUnavailable(CdirError):
    """A model that is neither cached locally nor reachable."""


def first_line(e: BaseException, width: int = 200) -> str:
    """An exception as one short line, for messages that name a cause without its traceback."""
    text = str(e).strip().splitlines()
    return text[0][:width] if text else e.__class__.__name__
