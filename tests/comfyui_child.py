"""The child side of the ComfyUI test harness: runs inside a fresh Python and imports ComfyUI.

Started by ``comfyui_harness.run_in_comfyui`` with a JSON request. It boots ComfyUI once on the
CPU, loads the pack with ComfyUI's own custom-node loader (``nodes.load_custom_node``: same
module naming, relative imports exercised), runs every requested action (validate, execute,
execute with an interrupt) and writes a JSON result.

Calls whose signatures changed since the 2024 snapshot go through feature checks (``_call``), so
a current ComfyUI checkout works too: loaders and validation became async, ``validate_prompt``
gained ``prompt_id``, ``PromptExecutor`` gained cache arguments, and UI outputs moved to
``history_result``.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import logging
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

logger = logging.getLogger("comfyui_harness")
HERE = Path(__file__).resolve().parent


def _call(function: Callable, *args: Any, **optional: Any) -> Any:
    """Call a ComfyUI function whose signature differs between versions.

    Keyword arguments the function does not take are dropped, and a coroutine (ComfyUI made its
    node loaders and `validate_prompt` async in 2025) is run to completion.
    """
    accepted = inspect.signature(function).parameters
    result = function(*args, **{key: value for key, value in optional.items() if key in accepted})
    return asyncio.run(result) if inspect.iscoroutine(result) else result


def _boot_comfyui(root: Path) -> SimpleNamespace:
    """Import ComfyUI from `root` on the CPU and register its built-in nodes, as main.py does."""
    # This file's folder is sys.path[0] when run as a script; a test module there must never
    # shadow one of ComfyUI's top-level modules.
    if sys.path and Path(sys.path[0]).resolve() == HERE:
        sys.path.pop(0)
    sys.path.insert(0, str(root))

    # The CUDA build of torch fails without a driver unless ComfyUI picks the CPU before
    # comfy.model_management is first imported (docs/comfyui.md section 2, "Testing gotcha").
    from comfy.cli_args import args

    args.cpu = True
    if (root / "app" / "custom_node_manager.py").is_file():
        # The template routes (2025 on), imported before nodes.py as main.py imports server.py
        # first: nodes.py puts comfy/ first on sys.path, and comfy/utils.py would then shadow
        # the top-level utils package this module needs.
        import app.custom_node_manager  # noqa: F401

    import comfy.model_management
    import comfy.utils
    import execution
    import folder_paths
    import nodes

    if hasattr(nodes, "init_extra_nodes"):  # mid-2024 on: built-in and custom nodes load separately
        _call(nodes.init_extra_nodes, init_custom_nodes=False, init_api_nodes=False)
    else:  # 2024-03: one function loads comfy_extras and then every pack under "custom_nodes"
        folder_paths.folder_names_and_paths["custom_nodes"] = ([], set())
        nodes.init_custom_nodes()

    try:
        from comfyui_version import __version__ as version
    except ImportError:  # the 2024 tree has no version file
        version = None
    return SimpleNamespace(
        nodes=nodes,
        execution=execution,
        folder_paths=folder_paths,
        model_management=comfy.model_management,
        utils=comfy.utils,
        version=version,
    )


def _point_folders(folder_paths: Any, dirs: dict[str, str], model_paths: dict[str, str]) -> dict[str, list]:
    """Send ComfyUI's output/input/temp and model folders to the test's directories.

    Returns what ComfyUI now lists in each model folder, so a test can check the plumbing.
    """
    folder_paths.set_output_directory(dirs["output"])
    folder_paths.set_input_directory(dirs["input"])
    folder_paths.set_temp_directory(dirs["temp"])
    for name, path in model_paths.items():
        folder_paths.add_model_folder_path(name, path)
    return {name: folder_paths.get_filename_list(name) for name in model_paths}


class _LogCapture(logging.Handler):
    """Collects warnings; ComfyUI's loader reports an import failure only through logging."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _load_pack(nodes: Any, pack_dir: Path) -> dict[str, Any]:
    """Load the pack through `nodes.load_custom_node` and describe what it registered."""
    builtin = set(nodes.NODE_CLASS_MAPPINGS)
    capture = _LogCapture()
    logging.getLogger().addHandler(capture)
    try:
        # `ignore` is what startup passes: a pack cannot replace an already registered node id.
        imported = bool(_call(nodes.load_custom_node, str(pack_dir), ignore=builtin, module_parent="custom_nodes"))
    finally:
        logging.getLogger().removeHandler(capture)

    init_file = str(pack_dir / "__init__.py")
    module = next((m for m in list(sys.modules.values()) if getattr(m, "__file__", None) == init_file), None)
    declared = list(getattr(module, "NODE_CLASS_MAPPINGS", None) or {})
    node_ids = [node_id for node_id in declared if node_id not in builtin and node_id in nodes.NODE_CLASS_MAPPINGS]
    info, problems = {}, {}
    for node_id in node_ids:
        info[node_id], problems[node_id] = _node_info(nodes, node_id)
    return {
        "imported": imported,
        "error": None if imported else "\n".join(capture.lines),
        "module_name": module.__name__ if module is not None else None,
        "node_ids": node_ids,
        "ignored_node_ids": [node_id for node_id in declared if node_id in builtin],
        "node_info": info,
        "node_problems": {node_id: found for node_id, found in problems.items() if found},
    }


def _node_info(nodes: Any, node_id: str) -> tuple[dict, list[str]]:
    """What GET /object_info reports for a node, and the problems that would break it.

    server.py builds this inside PromptServer.__init__ (not reachable without a web server), so
    the same fields are rebuilt here from the same class attributes.
    """
    cls = nodes.NODE_CLASS_MAPPINGS[node_id]
    problems = []
    try:
        inputs = cls.INPUT_TYPES()
    except Exception as exc:
        return {}, [f"INPUT_TYPES() failed: {exc!r}"]
    if not isinstance(inputs, dict):
        problems.append(f"INPUT_TYPES() returned {type(inputs).__name__}, not dict")
    outputs = getattr(cls, "RETURN_TYPES", None)
    if not isinstance(outputs, tuple):
        problems.append(f"RETURN_TYPES is {type(outputs).__name__}, not tuple")
        outputs = ()
    function = getattr(cls, "FUNCTION", None)
    if not isinstance(function, str) or not callable(getattr(cls, function, None)):
        problems.append(f"FUNCTION {function!r} is not a method of the class")
    category = getattr(cls, "CATEGORY", None)
    if not isinstance(category, str):
        problems.append(f"CATEGORY is {category!r}, not a string")
    info = {
        "input": inputs,
        "output": outputs,
        "output_is_list": getattr(cls, "OUTPUT_IS_LIST", [False] * len(outputs)),
        "output_name": getattr(cls, "RETURN_NAMES", outputs),
        "name": node_id,
        "display_name": nodes.NODE_DISPLAY_NAME_MAPPINGS.get(node_id, node_id),
        "description": getattr(cls, "DESCRIPTION", ""),
        "category": category if isinstance(category, str) else "sd",
        "output_node": getattr(cls, "OUTPUT_NODE", False) is True,
    }
    try:
        json.dumps(info)  # the route answers with web.json_response(info)
    except (TypeError, ValueError) as exc:
        problems.append(f"object_info is not JSON-serialisable: {exc}")
    return info, problems


class _Server:
    """The part of server.PromptServer that PromptExecutor and the progress hook use.

    The executor reads and writes the running client, prompt and node ids and sends events
    with `send_sync`; current ComfyUI also reads `sockets_metadata` before sending a preview.
    There is no websocket here, so events are only logged.
    """

    def __init__(self) -> None:
        self.client_id: str | None = None
        self.last_prompt_id: str | None = None
        self.last_node_id: str | None = None
        self.sockets_metadata: dict = {}

    def send_sync(self, event: Any, data: Any, sid: str | None = None) -> None:
        if isinstance(event, str):
            logger.debug("event %s: %s", event, data)


class _ProgressHook:
    """The ProgressBar hook main.py installs (`hijack_progress`), recording every update.

    Like main.py's hook it first checks the interrupt flag, so a progress update is also an
    interrupt point. After `interrupt_after` updates it sets the flag the way POST /interrupt
    does; the node's next `throw_exception_if_processing_interrupted()` (or the next update)
    raises InterruptProcessingException and the executor reports `execution_interrupted`.
    """

    def __init__(self, model_management: Any) -> None:
        self.model_management = model_management
        self.updates: list[dict] = []
        self.interrupt_after: int | None = None

    def reset(self, interrupt_after: int | None) -> None:
        self.updates, self.interrupt_after = [], interrupt_after

    def __call__(
        self, value: float, total: float, preview: Any, prompt_id: str | None = None, node_id: str | None = None
    ) -> None:
        self.model_management.throw_exception_if_processing_interrupted()
        self.updates.append({"value": value, "total": total, "preview": preview is not None})
        if len(self.updates) == self.interrupt_after:
            self.model_management.interrupt_current_processing(True)


def _validate(comfy: SimpleNamespace, prompt: dict, prompt_id: str) -> dict[str, Any]:
    """Run `execution.validate_prompt` (2024: `(prompt)`; now async `(prompt_id, prompt, partial)`)."""
    # The 2024 validate_prompt raises KeyError on an unknown class_type; current ComfyUI returns
    # this error instead, so report it the same way on both.
    for node_id, node in prompt.items():
        if node.get("class_type") not in comfy.nodes.NODE_CLASS_MAPPINGS:
            error = {
                "type": "missing_node_type",
                "message": f"Node type {node.get('class_type')!r} not found",
                "details": f"Node ID '#{node_id}'",
                "extra_info": {"node_id": node_id, "class_type": node.get("class_type")},
            }
            return {"valid": False, "error": error, "node_errors": {}, "outputs": []}
    valid, error, outputs, node_errors = _call(
        comfy.execution.validate_prompt, prompt_id=prompt_id, prompt=prompt, partial_execution_list=None
    )
    return {"valid": valid, "error": error, "node_errors": node_errors, "outputs": list(outputs)}


def _files_under(directory: Path) -> set[str]:
    return {path.relative_to(directory).as_posix() for path in directory.rglob("*") if path.is_file()}


def _execute(comfy: SimpleNamespace, server: _Server, hook: _ProgressHook, action: dict, output_dir: Path) -> dict:
    """Validate and execute one prompt the way main.py's prompt_worker does, with a fresh executor.

    A fresh PromptExecutor per action means no node outputs are cached between actions, so
    every action really runs its nodes.
    """
    prompt, prompt_id = action["prompt"], str(uuid.uuid4())
    validation = _validate(comfy, prompt, prompt_id)
    result = {"validation": validation, "outputs": {}, "files": [], "progress": [], "messages": []}
    if not validation["valid"]:
        error = validation["error"] or {}
        message = f"validation failed: {error.get('message')}: {error.get('details')}"
        return {**result, "status": "error", "error": message}

    # Current ComfyUI indexes cache_args["ram"] even for the classic cache; 2024 takes no such argument.
    executor = _call(comfy.execution.PromptExecutor, server, cache_args={"lru": 0, "ram": 0.0, "ram_inactive": 0.0})
    files_before = _files_under(output_dir)
    hook.reset(action.get("interrupt_after_progress"))
    server.last_prompt_id = prompt_id
    captured = [node_id for node_id in action.get("capture", []) if node_id not in validation["outputs"]]
    executor.execute(prompt, prompt_id, {"client_id": "comfyui-harness"}, validation["outputs"] + captured)

    events = dict(executor.status_messages)
    if "execution_interrupted" in events:
        status, error = "interrupted", None
    elif "execution_error" in events:
        failure = events["execution_error"]
        status = "error"
        error = (
            f"{failure['node_type']} (node {failure['node_id']}): "
            f"{failure['exception_type']}: {failure['exception_message']}"
        )
    else:
        status, error = "success", None
    history = getattr(executor, "history_result", None)  # current ComfyUI; 2024 keeps outputs_ui
    return {
        **result,
        "status": status,
        "error": error,
        "outputs": history["outputs"] if history is not None else executor.outputs_ui,
        "files": sorted(_files_under(output_dir) - files_before),
        "progress": hook.updates,
        "messages": executor.status_messages,
        "captured": {node_id: _capture(executor, node_id, output_dir.parent / "captured") for node_id in action.get("capture", [])},
    }


def _capture(executor: Any, node_id: str, folder: Path) -> dict[str, Any]:
    """Writes the CONDITIONING a node output first: its tensors to ``folder/<node_id>.safetensors``, its options as JSON
    (a tensor there as its repr).

    The executor still holds the prompt's outputs: 2024 in ``outputs``, current ComfyUI in its output cache.
    """
    from safetensors.torch import save_file

    if hasattr(executor, "caches"):
        entry = executor.caches.outputs.get(node_id)
        outputs = entry.outputs if entry is not None else None
    else:
        outputs = executor.outputs.get(node_id)
    if outputs is None:
        return {"file": None, "options": []}
    conditioning = outputs[0][0]  # first output, first list item
    folder.mkdir(exist_ok=True)
    path = folder / f"{node_id}.safetensors"
    save_file({str(index): tensor.contiguous() for index, (tensor, _) in enumerate(conditioning)}, str(path))
    return {"file": str(path), "options": [json.loads(json.dumps(options, default=repr)) for _, options in conditioning]}


def _templates(root: Path, action: dict, work_dir: Path) -> dict[str, Any]:
    """Ask ComfyUI's template routes what they list and serve for the pack, as the frontend does.

    The routes (``app/custom_node_manager.py``, 2025 on; the 2024 tree has none) are mounted on a
    bare aiohttp app the way ``server.py`` mounts them, with the pack linked into a
    ``custom_nodes`` folder under ``action["folder_name"]``; then ``GET /workflow_templates`` and
    each ``GET /api/workflow_templates/<folder>/<file>`` of ``action["files"]``.
    """
    if not (root / "app" / "custom_node_manager.py").is_file():
        return {"supported": False}
    import folder_paths
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer
    from app.custom_node_manager import CustomNodeManager

    custom_nodes = work_dir / "custom_nodes"
    link = custom_nodes / action["folder_name"]
    custom_nodes.mkdir(exist_ok=True)
    if not link.exists():
        link.symlink_to(action["pack_dir"], target_is_directory=True)
    folder_paths.folder_names_and_paths["custom_nodes"] = ([str(custom_nodes)], set())

    async def ask() -> dict[str, Any]:
        app, routes = web.Application(), web.RouteTableDef()
        CustomNodeManager().add_routes(routes, app, [(action["folder_name"], str(link))])
        app.add_routes(routes)
        async with TestClient(TestServer(app)) as client:
            listing = await (await client.get("/workflow_templates")).json()
            served = {}
            for name in action["files"]:
                response = await client.get(f"/api/workflow_templates/{action['folder_name']}/{name}")
                body = await response.read()
                served[name] = {"status": response.status, "content_type": response.content_type, "bytes": len(body)}
        return {"supported": True, "listing": listing, "served": served}

    return asyncio.run(ask())


def _execute_each_choice(comfy: SimpleNamespace, server: _Server, hook: _ProgressHook, action: dict, output_dir: Path) -> dict:
    """Execute the prompt once per value of one node's combo input, as this ComfyUI lists them."""
    node = action["prompt"][action["node_id"]]
    spec = comfy.nodes.NODE_CLASS_MAPPINGS[node["class_type"]].INPUT_TYPES()["required"][action["input_name"]]
    choices = list(spec[0]) if isinstance(spec[0], (list, tuple)) else list(spec[1]["options"])  # 0.10 may write COMBO
    runs = []
    for choice in choices:
        prompt = json.loads(json.dumps(action["prompt"]))
        prompt[action["node_id"]]["inputs"][action["input_name"]] = choice
        outcome = _execute(comfy, server, hook, {"prompt": prompt}, output_dir)
        runs.append({key: outcome[key] for key in ("status", "error", "files")})
    return {"choices": choices, "runs": runs}


def _child_main(request_path: Path, result_path: Path) -> None:
    """Boot ComfyUI, load the pack, run the actions, write the JSON result."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    request = json.loads(request_path.read_text())
    started = time.perf_counter()
    comfy = _boot_comfyui(Path(request["comfyui_root"]))
    model_files = _point_folders(comfy.folder_paths, request["dirs"], request["model_paths"])
    pack = _load_pack(comfy.nodes, Path(request["pack_dir"]))
    for path in request.get("test_nodes", []):
        if not _call(comfy.nodes.load_custom_node, path, ignore=set(comfy.nodes.NODE_CLASS_MAPPINGS), module_parent="custom_nodes"):
            raise RuntimeError(f"the test nodes in {path} failed to load; see the log above")
    server, hook = _Server(), _ProgressHook(comfy.model_management)
    comfy.utils.set_progress_bar_global_hook(hook)
    startup_seconds = time.perf_counter() - started
    logger.info("ComfyUI %s booted and pack loaded in %.1f s", comfy.version or "(2024 tree)", startup_seconds)

    results = []
    output_dir = Path(request["dirs"]["output"])
    for action in request["actions"] if pack["imported"] else []:
        started = time.perf_counter()
        if action["kind"] == "validate":
            outcome = _validate(comfy, action["prompt"], str(uuid.uuid4()))
        elif action["kind"] == "templates":
            outcome = _templates(Path(request["comfyui_root"]), action, output_dir.parent)
        elif action["kind"] == "execute_each_choice":
            outcome = _execute_each_choice(comfy, server, hook, action, output_dir)
        else:
            outcome = _execute(comfy, server, hook, action, output_dir)
        results.append({"kind": action["kind"], "seconds": time.perf_counter() - started, **outcome})

    result = {
        "comfyui_root": request["comfyui_root"],
        "comfyui_version": comfy.version,
        "output_dir": str(output_dir),
        "startup_seconds": startup_seconds,
        "pack": pack,
        "model_files": model_files,
        "actions": results,
    }
    # default=str: validation errors and executor messages may hold tuples or odd objects.
    result_path.write_text(json.dumps(result, default=str))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Child side of the ComfyUI test harness.")
    parser.add_argument("--request", type=Path, required=True, help="JSON request written by run_in_comfyui")
    parser.add_argument("--result", type=Path, required=True, help="where to write the JSON result")
    cli = parser.parse_args()
    _child_main(cli.request, cli.result)
