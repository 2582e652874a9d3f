"""User-facing errors: the CLI prints these as one line and exits non-zero."""


class CdirError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class ModelUnavailable(CdirError):
    """A model that is neither cached locally nor reachable."""
