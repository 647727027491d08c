"""The gRPC services (installed as `ssd.services`). Imported as a top-level `services` from a
checkout's root, this folder defers to the installed package of that name (ssd/layout.py)."""
import ssd.layout

ssd.layout.defer_to_installed(__name__, __file__)
