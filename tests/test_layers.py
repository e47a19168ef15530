"""The package's layers, read from its source: the run service sits below the CLI, cnnlab.api and cnnlab.tuning, and
above everything that trains; no module reaches up into cnnlab/cli or into the package's own __init__."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "cnnlab"
ABOVE_THE_SERVICE = ("cnnlab.cli", "cnnlab.api", "cnnlab.tuning", "cnnlab.__main__", "cnnlab")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at its top or inside a function (``from a import b`` counts as a and a.b)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def sources() -> dict[str, set[str]]:
    files = [*PACKAGE.rglob("*.py"), *(ROOT / "hydra_plugins").rglob("*.py")]
    return {module_name(p): imports(p) for p in files}


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_no_module_outside_the_cli_imports_it():
    reaching = {m: sorted(i for i in found if within(i, "cnnlab.cli")) for m, found in sources().items()
                if not within(m, "cnnlab.cli") and m != "cnnlab.__main__"}
    assert {m: i for m, i in reaching.items() if i} == {}


def test_no_module_imports_the_package_init_for_a_name():
    """``from cnnlab import __version__`` made every record writer depend on the package's front door (which
    imports cnnlab.api on demand): the version lives in cnnlab.core.version."""
    reaching = {m: sorted(i for i in found if i == "cnnlab" or (i.startswith("cnnlab.") and i.count(".") == 1
                                                                 and not (PACKAGE / i.split(".")[1]).exists()
                                                                 and not (PACKAGE / f"{i.split('.')[1]}.py").exists()))
                for m, found in sources().items() if m != "cnnlab"}
    assert {m: i for m, i in reaching.items() if i} == {}


def test_the_run_service_is_below_cli_api_and_tune_and_only_they_start_runs_through_it():
    modules = sources()
    service_needs = {i for m, found in modules.items() if within(m, "cnnlab.service") for i in found}
    assert not [i for i in service_needs if any(within(i, upper) for upper in ABOVE_THE_SERVICE[:-1])]
    users = sorted(m for m, found in modules.items() if not within(m, "cnnlab.service")
                   and any(within(i, "cnnlab.service") for i in found))
    assert users and all(any(within(u, upper) for upper in ABOVE_THE_SERVICE[:-1]) or within(u, "hydra_plugins")
                         for u in users), users
    # ...and what starts a run in cnnlab.api and cnnlab.tuning is the service's start, nothing of the CLI's
    for upper in ("cnnlab.api", "cnnlab.tuning.runner"):
        assert "cnnlab.service.run.start" in modules[upper]
