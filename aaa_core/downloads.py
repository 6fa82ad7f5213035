"""Where the three official model files live on ModelScope, and fetching them once into a folder.

A local file always wins; a download happens only when no path is given and the file is not
already there. Offline, the error names the file, where it was looked for, and how to get it.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import shutil
from pathlib import Path
from typing import Callable

from .errors import ModelFileError

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

    @property
    def url(self) -> str:
        return f"https://modelscope.cn/models/{self.repo_id}/files"


DIT = ModelSource("AAADiT", "DiffSynth-Studio/AAAMyModel", "step-600000.safetensors", "aaa_dit_step-600000.safetensors")
VAE = ModelSource("FLUX.2 VAE", "black-forest-labs/FLUX.2-klein-4B", "vae/diffusion_pytorch_model.safetensors", "flux2_vae.safetensors")
TEXT_ENCODER = ModelSource("Qwen3-0.6B text encoder", "Qwen/Qwen3-0.6B", "model.safetensors", "qwen3_0.6b.safetensors")
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
) -> Path:
    """Returns ``local_path`` if given (it must exist), else the file in ``model_dir``, downloading it once."""
    if local_path is not None:
        path = Path(local_path).expanduser()
        if not path.exists():
            raise ModelFileError(f"{path}: {source.label} file not found")
        return path
    target = Path(model_dir or default_model_dir()) / source.local_name
    if target.is_file():
        return target
    return download(source, target, progress)


def download(source: ModelSource, target: Path, progress: DownloadProgress | None = None) -> Path:
    """Fetches ``source`` from ModelScope to ``target``, atomically: no partial file at ``target``."""
    try:
        from modelscope.hub.snapshot_download import snapshot_download  # heavy import, only when needed
    except ImportError:  # ComfyUI's own requirements do not include modelscope
        raise ModelFileError(
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
        os.replace(fetched, target)
    except (KeyboardInterrupt, ModelFileError):
        raise
    except Exception as err:  # modelscope raises many types (network, HTTP, hub errors)
        reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise ModelFileError(
            f"{source.label} not found at {target} and the download from ModelScope failed ({reason}). "
            f"Get '{source.repo_file}' from {source.url} and save it as {target}, or pass its path explicitly"
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
