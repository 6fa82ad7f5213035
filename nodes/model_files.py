"""Model dropdowns: which files a loader offers, and turning a choice into a local file (downloading it if needed).

Each loader lists the files of a standard ComfyUI model folder and, when the official file is not
there yet, its name too (``aaa_core.downloads.SOURCES``), so the example workflows run on the first
Queue: choosing that name downloads it once from ModelScope into the folder's first directory. The
download runs in a worker thread while this thread ticks a progress bar (bytes) and checks Cancel.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

from ..aaa_core import downloads
from ..aaa_core.errors import AAAError, ModelFileError
from . import comfy_bridge as bridge

log = logging.getLogger(__name__)

# Model kind -> ComfyUI folder type. The legacy names exist in the 2024 tree, and current ComfyUI
# maps them to diffusion_models / text_encoders (docs/comfyui.md section 3).
FOLDERS = {"dit": "unet", "vae": "vae", "text_encoder": "clip"}
POLL_SECONDS = 0.25  # how often a download reports progress and checks Cancel

_downloads: dict[Path, threading.Thread] = {}  # target -> worker still running (a cancelled one may linger)


def choices(kind: str) -> list[str]:
    """The loader's dropdown: files on disk, then the official file name if it is not among them."""
    files = bridge.list_model_files(FOLDERS[kind])
    official = downloads.SOURCES[kind].local_name
    return files if official in files else [*files, official]


@contextlib.contextmanager
def naming_widget(widget: str, value: str) -> Iterator[None]:
    """Errors from resolving and loading a file name the loader widget to change, not only the file.

    ComfyUI shows the failing node's name beside the message; the widget and its value complete
    "what to change", which the library raising the error cannot know.
    """
    try:
        yield
    except AAAError as err:
        err.args = (f"{widget} '{value}': {err}",)
        raise


def resolve(kind: str, name: str) -> Path:
    """The local file for a dropdown value; the official name is downloaded when it is missing."""
    folder, source = FOLDERS[kind], downloads.SOURCES[kind]
    path = bridge.model_file_path(folder, name)
    if path is not None:
        if name == source.local_name:  # where we download to: a bad file there is one we may have left
            downloads.check_downloaded(source, path)
        return path
    dirs = bridge.folder_dirs(folder)
    where = ", ".join(dirs) if dirs else f"no '{folder}' folder is configured"
    if name != source.local_name:
        raise ModelFileError(
            f"'{name}' is not in the '{folder}' model folder ({where}); put the {source.label} file there "
            f"(the official one: '{source.repo_file}' from {source.url}, saved as {source.local_name})"
        )
    if not dirs:
        raise ModelFileError(f"cannot download {source.label}: {where}")
    return fetch(source, Path(dirs[0]) / source.local_name)


def fetch(source: downloads.ModelSource, target: Path) -> Path:
    """Downloads ``source`` to ``target`` with a byte progress bar; Cancel stops waiting at once.

    ``downloads.download`` is atomic (nothing appears at ``target`` unless complete), so a cancelled
    worker only has to stop: its progress callback raises at the next chunk.
    """
    _wait_for(_downloads.get(target))  # a cancelled download of the same file may still be winding down
    if target.is_file():  # ... or may have finished after all
        return target
    downloads.ensure_writable_folder(source, target)
    state = {"done": 0, "total": 0, "cancel": False}

    def progress(done: int, total: int) -> None:  # runs in modelscope's worker threads
        state["done"], state["total"] = done, total
        if state["cancel"]:
            raise RuntimeError("download cancelled")

    outcome: dict = {}

    def work() -> None:
        try:
            outcome["path"] = downloads.download(source, target, progress)
        except BaseException as err:  # handed to the waiting thread
            outcome["error"] = err

    worker = threading.Thread(target=work, name=f"aaa-download-{target.name}", daemon=True)
    _downloads[target] = worker
    worker.start()
    bar = None
    try:
        while True:
            worker.join(POLL_SECONDS)
            if state["total"]:
                bar = bar or bridge.progress_bar(state["total"], f"download {target.name}", "B")
                bar.update_absolute(state["done"], state["total"])
            if not worker.is_alive():
                break
            bridge.throw_if_interrupted()
    except BaseException:
        state["cancel"] = True
        log.info("download of %s cancelled", target.name)
        raise
    _downloads.pop(target, None)
    error = outcome.get("error")
    if error is not None:
        raise error
    return outcome["path"]


def _wait_for(worker: threading.Thread | None) -> None:
    while worker is not None and worker.is_alive():
        worker.join(POLL_SECONDS)
        bridge.throw_if_interrupted()
