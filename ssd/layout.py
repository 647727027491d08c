"""The repository's top-level source folders are installed under `ssd`: kernels/ is
`ssd.kernels`, services/ is `ssd.services`, protos/ is `ssd.protos` (pyproject.toml's
package-dir). A process whose sys.path starts with the repository root (`python -m ...` or
`python -c ...` run from a checkout) would also see them as the top-level packages `kernels`
and `services`, and shadow installed packages of those names (Hugging Face's `kernels`, which
transformers imports, is one). `defer_to_installed` stops that: called first thing in those
folders' `__init__.py`, it leaves the `ssd.*` import alone and turns a top-level import into the
installed package of that name, or into ModuleNotFoundError when none is installed."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def defer_to_installed(name: str, init_file: str) -> None:
    """Called as defer_to_installed(__name__, __file__) by a folder's __init__.py. Does nothing
    when the folder was imported under `ssd`; otherwise replaces the module being imported with
    the installed package `name` found on sys.path without the repository root."""
    if name.startswith("ssd."):
        return
    folder = os.path.dirname(os.path.realpath(init_file))
    root = os.path.dirname(folder)
    path = [p for p in sys.path if os.path.realpath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is None or os.path.realpath(spec.origin or "") == folder + os.sep + "__init__.py" \
            or not (spec.loader or spec.submodule_search_locations):
        del sys.modules[name]
        raise ModuleNotFoundError(f"No module named {name!r} (the folder {folder} of this checkout is "
                                  f"ssd.{os.path.basename(folder)}, not a top-level package)", name=name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # the import system returns whatever sys.modules holds after this
    if spec.loader is not None:
        spec.loader.exec_module(module)
