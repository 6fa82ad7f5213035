"""The AAADiT trainer: ``python -m training --config run.toml`` (see ``train.py`` for the launch commands).

Modules: ``config`` (every option and default), ``data`` (finding image/caption pairs),
``cache`` (encoding them once), ``batches`` (the data order), ``loss`` (the flow-matching
objective), ``checkpoints`` (weights and resumable states), ``metrics`` (MFU, TensorBoard),
``samples`` (validation images), ``interrupt`` (Ctrl-C), ``train`` (the loop).
"""
