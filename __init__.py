"""AAADiT for ComfyUI: the node pack's entry point (ComfyUI imports this file).

Importing it loads no model and touches no network; the nodes live in ``nodes/``, the plain
PyTorch library they call in ``aaa_core/``.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
