"""Kernels of the core engine (installed as `ssd.kernels`): attention, batch-invariant linear,
rejection sampling. Imported as a top-level `kernels` from a checkout's root, this folder defers
to the installed package of that name (ssd/layout.py)."""
import ssd.layout

ssd.layout.defer_to_installed(__name__, __file__)
