"""Where the three official model files live on ModelScope, and fetching them once into a folder.

A local file always wins; a download happens only when no path is given and the file is not
already there. Offline, the error names the file, where it was looked for, and how to get it.
A fetched file is verified (complete safetensors header, right model, SHA-256 where known)
before it takes its final name, and a bad file already there is reported, not loaded.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Mapping

from .checkpoint import AAADIT, FLUX2_VAE, QWEN3, check_model_file, check_path, file_sha256
from .errors import ModelFileError, combined, short_reason

log = logging.getLogger(__name__)

# (bytes done, bytes total) -> None; may raise to cancel.
DownloadProgress = Callable[[int, int], None]


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """One official file: its ModelScope repo, its path there, and the name we store it under."""

    label: str
    repo_id: str
    repo_file: str
    local_name: str
    kind: str  # the checkpoint model kind the file must hold (checkpoint.AAADIT, ...)
    setting: str  # its key in SOURCES: what errors about it name (AAAError.settings)
    sha256: str | None = None  # hex digest, only where the publisher states one

    @property
    def url(self) -> str:
        return f"https://modelscope.cn/models/{self.repo_id}/files"

    def how_to_get(self, target: Path) -> str:
        """The manual way out, for the end of error messages (each front end adds its own: ``ways_out``)."""
        return f"get '{self.repo_file}' from {self.url} and save it as {target}"

    def error(self, message: str) -> ModelFileError:
        """A one-line error about this file that names it as the setting to change."""
        return ModelFileError(message, settings=(self.setting,))


# No SHA-256 is set: none is published alongside these files that we could check against.
DIT = ModelSource("AAADiT", "DiffSynth-Studio/AAAMyModel", "step-600000.safetensors", "aaa_dit_step-600000.safetensors", AAADIT, "dit")
VAE = ModelSource("FLUX.2 VAE", "black-forest-labs/FLUX.2-klein-4B", "vae/diffusion_pytorch_model.safetensors", "flux2_vae.safetensors", FLUX2_VAE, "vae")
TEXT_ENCODER = ModelSource("Qwen3-0.6B text encoder", "Qwen/Qwen3-0.6B", "model.safetensors", "qwen3_0.6b.safetensors", QWEN3, "text_encoder")
SOURCES = {"dit": DIT, "vae": VAE, "text_encoder": TEXT_ENCODER}


def default_model_dir() -> Path:
    """``$AAA_MODEL_DIR``, else ``$XDG_CACHE_HOME/aaa_dit`` (``~/.cache/aaa_dit``)."""
    if os.environ.get("AAA_MODEL_DIR"):
        return Path(os.environ["AAA_MODEL_DIR"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "aaa_dit"


def resolve_model_file(
    source: ModelSource,
    local_path: "str | os.PathLike[str] | None" = None,
    model_dir: "str | os.PathLike[str] | None" = None,
    progress: DownloadProgress | None = None,
    may_download: bool = True,
) -> Path:
    """Returns ``local_path`` if given (it must exist), else the file in ``model_dir``, downloading it once.

    A file already in ``model_dir`` is checked first: a bad one there (an earlier download cut
    short by a crash) would otherwise be loaded, and fail, on every run.
    """
    if local_path is not None:
        path = Path(local_path).expanduser()
        check_path(path, f"{source.label} file")
        return path
    target = Path(model_dir or default_model_dir()) / source.local_name
    if check_path(target, missing_ok=True) is not None:
        check_downloaded(source, target)
        return target
    if not may_download:
        raise source.error(f"{source.label} not found at {target} (not downloaded); {source.how_to_get(target)}")
    return download(source, target, progress)


def resolve_model_files(
    paths: Mapping[str, "str | os.PathLike[str] | None"],
    model_dir: "str | os.PathLike[str] | None" = None,
    progress: DownloadProgress | None = None,
) -> dict[str, Path]:
    """:func:`resolve_model_file` for several ``SOURCES`` keys; every missing file is named in one error.

    After one download fails (offline, typically) the others are not tried: each would only wait
    out the same network timeout, and the user learns about all of them in one run, not three.
    """
    resolved: dict[str, Path] = {}
    problems: list[ModelFileError] = []
    may_download = True
    for key, local_path in paths.items():
        source = SOURCES[key]
        try:
            resolved[key] = resolve_model_file(source, local_path, model_dir, progress, may_download)
        except ModelFileError as err:
            problems.append(err)
            target = Path(model_dir or default_model_dir()) / source.local_name
            may_download = may_download and not (local_path is None and not os.path.isfile(target))
    if problems:
        raise combined(problems, "model files are missing or bad")
    return resolved


def check_downloaded(source: ModelSource, path: Path) -> None:
    """Raises a one-line error, with "delete it and run again", if the file at the download target is bad."""
    problem = _problem(source, path)
    if problem:
        raise source.error(
            f"{path}: {problem}; this is where the {source.label} is downloaded to: delete it and run again "
            "to download it afresh"
        )


def _problem(source: ModelSource, path: Path) -> str | None:
    """What is wrong with a fetched file (incomplete, not safetensors, another model, wrong SHA-256), or None.

    The safetensors header must cover the file exactly, so a download that stopped early without
    any client error is caught here at the cost of reading the header only.
    """
    try:
        check_model_file(path, source.kind)
    except ModelFileError as err:
        return str(err).removeprefix(f"{path}: ")
    if source.sha256 is not None:
        digest = file_sha256(path)
        if digest != source.sha256:
            return f"SHA-256 is {digest}, expected {source.sha256} (the file is corrupt)"
    return None


def ensure_writable_folder(source: ModelSource, target: Path) -> None:
    """Creates ``target``'s folder if needed; a one-line error if the file cannot be written there."""
    folder = target.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise source.error(
            f"{folder}: cannot create the model folder ({err.strerror or err}) to download the {source.label}; "
            f"{source.how_to_get(target)}"
        ) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise source.error(
            f"{folder}: the model folder is not writable by this user, so the {source.label} cannot be downloaded "
            f"into it; use a writable model folder, or {source.how_to_get(target)}"
        )


def download(source: ModelSource, target: Path, progress: DownloadProgress | None = None) -> Path:
    """Fetches ``source`` from ModelScope to ``target``, atomically: no partial file at ``target``.

    The fetched file takes the final name only once it is verified complete and the right model.
    """
    ensure_writable_folder(source, target)
    try:
        from modelscope.hub.snapshot_download import snapshot_download  # heavy import, only when needed
    except ImportError:  # ComfyUI's own requirements do not include modelscope
        raise source.error(
            f"{source.label} not found at {target}, and downloading it needs the 'modelscope' package: run "
            f"`pip install modelscope` (with ComfyUI's Python inside ComfyUI), or get '{source.repo_file}' "
            f"from {source.url} and save it as {target}"
        ) from None
    staging = target.parent / f".{target.name}.download"
    log.info("downloading %s from ModelScope %s (%s) to %s", source.label, source.repo_id, source.repo_file, target)
    kwargs = {}
    if progress is not None and "progress_callbacks" in inspect.signature(snapshot_download).parameters:
        kwargs["progress_callbacks"] = [_callback_class(progress)]
    try:
        snapshot_download(source.repo_id, allow_patterns=[source.repo_file], local_dir=str(staging), **kwargs)
        fetched = staging / source.repo_file
        if not fetched.is_file():
            raise FileNotFoundError(f"{source.repo_file} is not in the repository")
        problem = _problem(source, fetched)
        if problem:
            raise source.error(
                f"{source.label}: the file downloaded from ModelScope failed its check and was discarded ({problem}); "
                f"nothing was saved at {target}. Run again to retry, or {source.how_to_get(target)}"
            )
        os.replace(fetched, target)
    except (KeyboardInterrupt, ModelFileError):
        raise
    except Exception as err:  # modelscope raises many types (network, HTTP, hub errors)
        raise source.error(
            f"{source.label} not found at {target} and the download from ModelScope failed ({short_reason(err)}); "
            f"{source.how_to_get(target)}"
        ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _callback_class(progress: DownloadProgress) -> type:
    """Adapts a plain progress function to modelscope's per-file callback class protocol."""
    from modelscope.hub.callback import ProgressCallback

    class _Callback(ProgressCallback):
        def __init__(self, filename: str, file_size: int):
            super().__init__(filename, file_size)
            self.done = 0

        def update(self, size: int) -> None:
            self.done += size
            progress(self.done, self.file_size)

    return _Callback
