"""Merging a base model with continually pretrained ones: ``jaxcpt merge``.

methods.py (the formulas), inputs.py (HF directories and jaxcpt checkpoints, read a
tensor at a time), writer.py (sharded safetensors, written as they are merged, renamed
into place), core.py (the streaming merge), sweep.py (mixture coefficients evaluated on
a run's held-out sources), command.py (the CLI).
"""
