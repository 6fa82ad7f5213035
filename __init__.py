"""AAADiT for ComfyUI: the node pack's entry point (ComfyUI imports this file).

Importing it loads no model and touches no network; the nodes live in ``nodes/``, the plain
PyTorch library they call in ``aaa_core/``.
"""

# ComfyUI serves this folder under /extensions/<pack folder>/; its frontend shows
# web/docs/<node id>.md as each node's help page.
WEB_DIRECTORY = "./web"

# ComfyUI imports this folder as a package. pytest also imports this file, as the package of the
# test folder, and when the checkout's folder name is not a Python identifier
# (``custom_nodes/aaa-dit``) it does so with no parent package, where a relative import fails. The
# tests import the pack the way ComfyUI does (``tests/pack_import.py``), so nothing is lost.
if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
