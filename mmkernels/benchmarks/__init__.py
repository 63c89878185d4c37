"""Benchmark cases, timing, gates (gates.toml) and the fidelity report behind ``mmkernels bench``."""
