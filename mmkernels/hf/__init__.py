"""Drop-in acceleration of Hugging Face transformers models: ``mmkernels.patch(model)``.

``report = patch(model, attention=True, reduce=None, quantize=None, calib_data=None)`` patches the
instance (never a class), ``unpatch(model)`` restores it exactly, ``with patched(model): ...``
does both. See :func:`mmkernels.hf.core.patch`.
"""

from .core import PatchReport, is_patched, patch, patched, unpatch

__all__ = ["patch", "unpatch", "patched", "is_patched", "PatchReport"]
