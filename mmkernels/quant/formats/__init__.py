"""Checkpoint layouts used by ``mmkernels.quant.serialize``: one module per format."""
