"""Checkpoint file layouts used by :mod:`mmkernels.compress.serialize`: one module per format.
(The in-memory packed weight is :mod:`mmkernels.quant.packing`.)"""
