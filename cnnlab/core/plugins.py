"""Loading components: cnnlab's own modules, then those from outside cnnlab, without forking it.

- ``plugins=[my_pkg.models, my_module]`` in the config (or on the command line): modules imported
  before anything is validated; a module in the current directory is found too, as with
  ``python -m``.
- Installed packages that declare an entry point in the ``cnnlab.plugins`` group
  (``[project.entry-points."cnnlab.plugins"] my_pkg = "my_pkg.models"``): imported whenever
  cnnlab loads its own components.

What a plugin registers lands in the same registries with the same checks (options from the
signature, duplicate names refused) and shows in ``cnnlab list`` with where it came from. A plugin
that fails to import, or registers a name cnnlab already has, is one line naming the module.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
from collections.abc import Iterable

from cnnlab.core.errors import CnnlabError
from cnnlab.core.registry import DuplicateName, registering_from

ENTRY_POINT_GROUP = "cnnlab.plugins"
_imported: set[str] = set()
_entry_points_loaded = False


def _import(module: str, origin: str, how: str) -> None:
    if module in _imported:
        return
    if not module or not all(part.isidentifier() for part in module.split(".")):
        raise CnnlabError(f"{how}: {module!r} is not a Python module name (e.g. my_pkg.models)")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:  # `cnnlab` as a script does not search the current directory
        sys.path.append(cwd)
    try:
        with registering_from(origin):
            importlib.import_module(module)
    except DuplicateName as e:
        raise CnnlabError(f"plugin {module}: {e}") from None
    except ModuleNotFoundError as e:
        if e.name and (module == e.name or module.startswith(e.name + ".")):
            raise CnnlabError(f"{how}: no module named {module!r} (looked in {cwd} and the installed packages)") from None
        raise CnnlabError(f"plugin {module} failed to import: {e}") from None
    except CnnlabError as e:
        raise CnnlabError(f"plugin {module}: {e}") from None
    except Exception as e:  # noqa: BLE001 - whatever a user's module raises, it is named in one line
        first = (str(e).strip().splitlines() or [""])[0]
        raise CnnlabError(f"plugin {module} failed to import: {type(e).__name__}: {first}") from None
    except SystemExit as e:  # a module that exits while imported stops nothing silently
        raise CnnlabError(f"plugin {module} called sys.exit({e.code!r}) while being imported") from None
    except KeyboardInterrupt:
        raise CnnlabError(f"plugin {module} raised KeyboardInterrupt while being imported") from None
    _imported.add(module)


def load_plugins(modules: Iterable[str] | None) -> None:
    """Import the modules named by ``plugins=`` (each once)."""
    if modules is None:
        return
    if isinstance(modules, str) or not isinstance(modules, Iterable):
        raise CnnlabError(f"plugins must be a list of module names, e.g. plugins=[my_pkg.models], got {modules!r}")
    for module in modules:
        _import(str(module), origin=f"plugin {module}", how="plugins")


def require_plugins(modules, source: str) -> None:
    """A config read from a file (``source``: a checkpoint someone may have crafted) names ``modules``: each
    must already be imported because the user asked for it; none is imported because a file names it."""
    if modules is None:
        return
    if isinstance(modules, str) or not isinstance(modules, Iterable):
        raise CnnlabError(f"{source}: its plugins entry is not a list of module names: {modules!r}")
    for module in map(str, modules):
        if module not in _imported:
            raise CnnlabError(f"{source} was trained with plugin {module}; pass --plugin {module} to load it "
                              "(cnnlab imports no module because a file names it)")


def load_entry_points() -> None:
    """Import every installed ``cnnlab.plugins`` entry point (once per process)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        module = point.value.split(":")[0].strip()
        dist = getattr(point.dist, "name", None) or point.name
        _import(module, origin=f"{dist} (entry point)", how=f"entry point {point.name} of {dist}")


_COMPONENT_MODULES = (
    "cnnlab.data.datasets",
    "cnnlab.data.folder",
    "cnnlab.models",
    "cnnlab.optim.optimizers",
    "cnnlab.optim.schedulers",
    "cnnlab.models.init",
    "cnnlab.augment.batched",
    "cnnlab.augment.per_image",
    "cnnlab.sweep.samplers",
    "cnnlab.tasks.classify",
    "cnnlab.tasks.image_fit",
)


def load_components() -> None:
    """Import every module that registers components, cnnlab's and installed plugins' (idempotent)."""
    for module in _COMPONENT_MODULES:
        importlib.import_module(module)
    load_entry_points()

