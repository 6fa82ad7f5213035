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


def short_reason(err: BaseException, limit: int = 200) -> str:
    """An exception's message on one line for a one-line error: whitespace folded, cut between words.

    Library errors (ModelScope, transformers) can span lines or run long; cutting mid-word or
    keeping only the first line would lose the part that says what happened.
    """
    text = " ".join(str(err).split()) or type(err).__name__
    if len(text) <= limit:
        return text
    head = text[: limit + 1].rsplit(" ", 1)[0] if " " in text[:limit] else text[:limit]
    return head.rstrip(" ,;:") + " ..."


def combined(messages: "list[str]", what: str) -> ModelFileError:
    """One error for several problems found in one pass, numbered on one line; a single one stays as is."""
    if len(messages) == 1:
        return ModelFileError(messages[0])
    return ModelFileError(f"{len(messages)} {what}: " + " ".join(f"({i}) {m}" for i, m in enumerate(messages, 1)))
