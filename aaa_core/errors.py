"""User-facing errors: each message is one line that says what is wrong and how to fix it."""


class AAAError(Exception):
    """Base class for errors caused by user input (bad files, bad sizes, missing models).

    The CLI and the ComfyUI nodes show the message as is, without a traceback, so every
    message names the file or value at fault and what was expected.
    """


class ModelFileError(AAAError):
    """A model file is missing, unreadable, truncated or holds the wrong model."""


class InputError(AAAError, ValueError):
    """A size, prompt, image or option is invalid."""


class OutputError(AAAError):
    """An output file cannot be written: a folder in the way, no permission, read-only, disk full.

    ``path`` and ``reason`` are kept apart so a caller can restate the error in its own terms.
    """

    def __init__(self, path: object, reason: str):
        super().__init__(f"{path}: cannot be written: {reason}")
        self.path = path
        self.reason = reason


class ComputeError(AAAError):
    """A computation could not finish usefully: out of memory, or numbers that overflowed to NaN/inf."""
