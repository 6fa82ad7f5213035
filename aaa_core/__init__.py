"""aaa_core: plain-PyTorch AAADiT text-to-image stack (models, schedule, sampling, I/O).

It never imports ComfyUI; the ``nodes`` and ``training`` packages are thin layers over it.
"""

__version__ = "0.1.0"
