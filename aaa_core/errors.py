"""User-facing errors: each message is one line that says what is wrong and how to fix it."""

from __future__ import annotations

from typing import Mapping


class AAAError(Exception):
    """Base class for errors caused by user input (bad files, bad sizes, missing models).

    The CLI and the ComfyUI nodes show the message as is, without a traceback, so every
    message names the file or value at fault and what was expected.

    ``settings`` names what the user could change, in terms that belong to no front end (a
    ``downloads.SOURCES`` key such as ``"dit"``). The library cannot know whether that is a CLI
    flag, a trainer option or a node's widget, so each front end adds its own way out
    (:func:`ways_out`) instead of the message speaking in one front end's terms.
    """

    def __init__(self, *args: object, settings: "tuple[str, ...]" = ()):
        super().__init__(*args)
        self.settings = tuple(settings)


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


def combined(errors: "list[AAAError]", what: str) -> ModelFileError:
    """One error for several problems found in one pass, numbered on one line; a single one stays as is."""
    settings = tuple(dict.fromkeys(s for err in errors for s in err.settings))
    if len(errors) == 1:
        return ModelFileError(str(errors[0]), settings=settings)
    text = " ".join(f"({i}) {err}" for i, err in enumerate(errors, 1))
    return ModelFileError(f"{len(errors)} {what}: {text}", settings=settings)


def ways_out(err: AAAError, options: "Mapping[str, str]") -> str:
    """The front end's own way out for the settings ``err`` names: ``"; or pass a local file with --vae"``.

    ``options`` maps the settings a front end offers to its option names; the others add nothing.
    """
    names = [options[s] for s in err.settings if s in options]
    return f"; or pass a local file with {' / '.join(names)}" if names else ""
