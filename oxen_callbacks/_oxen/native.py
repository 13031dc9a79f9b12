"""oxenai's compiled core (``oxen.oxen_py``) without its Python package.

``import oxen`` costs ~0.2 s of CPU, nearly all of it polars and requests, which the
package's ``__init__`` imports for data frames and the hub. Local commits, restores
and pushes only need the compiled ``PyRepo`` (~7 ms to load). Every commit process
and Oxen child pays that import once, on the training machine's cores, so it is
loaded alone here. A later ``import oxen`` in the same process finds the module
already loaded and reuses it.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import sys
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

PACKAGE, CORE = "oxen", "oxen_py"  # oxenai's package and its compiled module
NATIVE = f"{PACKAGE}.{CORE}"


def core() -> ModuleType:
    """The loaded ``oxen.oxen_py``; falls back to ``import oxen`` when it cannot be loaded alone."""
    loaded = sys.modules.get(NATIVE)
    if loaded is not None:
        return loaded
    try:
        return _load_alone()
    except Exception as exc:  # another oxenai layout: the full import still works
        log.debug("Loading %s alone failed (%s); importing oxenai", NATIVE, exc)
        import oxen

        return oxen.oxen_py


def _load_alone() -> ModuleType:
    package = importlib.util.find_spec(PACKAGE)  # finds the folder; runs no oxenai code
    if package is None or not package.submodule_search_locations:
        raise ImportError("oxenai is not installed")
    found = importlib.machinery.PathFinder.find_spec(CORE, list(package.submodule_search_locations))
    if found is None or not isinstance(found.loader, importlib.machinery.ExtensionFileLoader) or not found.origin:
        raise ImportError(f"oxenai has no compiled {CORE} module")
    spec = importlib.util.spec_from_file_location(NATIVE, found.origin)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {found.origin}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[NATIVE] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[NATIVE]
        raise
    return module


def open_repo(path: str) -> Any:
    """oxenai's ``PyRepo`` for the repository at the absolute ``path`` (it validates nothing)."""
    return core().PyRepo(path)
