"""What a run directory may lend to a command: its overrides (.hydra/overrides.yaml, a sweep's record) are
someone else's, possibly. Only a setting or group choice of cnnlab's own config passes: no Hydra key, no
``_target_``, no resolver, no sweep, no plugin import, and no path (a folder it names would be created)."""

from __future__ import annotations

import re
from pathlib import Path

from cnnlab.core.errors import CnnlabError
from cnnlab.runtime.files import read_limited

SAVED_VALUE = re.compile(r"[\w.+-]+")  # a config group's choice: a name, never a path
PATH_KEY = re.compile(r"(^|[./_])(root|dir|path|file|folder|output_dir|data_dir|tensorboard|pretrained)$")


def read_saved_overrides(path, what: str) -> list[tuple[int, str]]:
    """A run's .hydra/overrides.yaml: (line, override) for each entry of its YAML list of strings."""
    import yaml

    try:
        node = yaml.compose((read_limited(path, "overrides file") or b"").decode())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise CnnlabError(f"{what}: {path} is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CnnlabError(f"{what}: cannot read {path}: {e}") from None
    if node is None:
        return []
    if not isinstance(node, yaml.SequenceNode):
        raise CnnlabError(f"{what}: {path} line {node.start_mark.line + 1}: expected a list of overrides (key=value)")
    entries = []
    for item in node.value:
        if not isinstance(item, yaml.ScalarNode) or item.tag.endswith(":null"):
            raise CnnlabError(f"{what}: {path} line {item.start_mark.line + 1}: expected an override (key=value)")
        entries.append((item.start_mark.line + 1, item.value))
    return entries


def check_lent_override(override: str, where: str, config_dirs: list[str] = (), *, printed: bool = False) -> None:
    """An override read from a run directory (someone else's, possibly): only a setting or group choice of
    cnnlab's own config, with no Hydra key, no _target_, no resolver call, no sweep and no plugin import.
    ``printed``: for a command cnnlab prints for the user to read and paste (a sweep's next search), where a
    sweep and a path, shell-quoted, are what the user sees and decides on."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException, OverrideParseException

    from cnnlab.core.config import CONF_DIR, TOP_LEVEL_KEYS

    refuse = f"{where}: {override!r} "
    try:
        parsed = OverridesParser.create().parse_override(override)
    except (OverrideParseException, HydraException) as e:
        raise CnnlabError(refuse + f"is not an override: {' '.join(str(e).split())}") from None
    key = parsed.key_or_group
    root = re.split(r"[./]", key, maxsplit=1)[0]
    groups = {p.name for folder in [CONF_DIR, *map(Path, config_dirs)] for p in folder.iterdir() if p.is_dir()}
    if root == "hydra" or root not in TOP_LEVEL_KEYS | groups - {"hydra"}:
        raise CnnlabError(refuse + "is not a cnnlab setting; a run directory lends only cnnlab's own config keys "
                          "(type anything else on the command line yourself)")
    if parsed.package is not None or any(part.startswith("_") for part in re.split(r"[./]", key)) or "_target_" in override:
        raise CnnlabError(refuse + "names a package or a private key; a run directory lends only cnnlab's own config keys")
    if parsed.is_sweep_override() and not printed:
        raise CnnlabError(refuse + "is a sweep; a run's record holds single values")
    if re.search(r"\$\{[^}]*:", override):
        raise CnnlabError(refuse + "calls a resolver; a run directory lends plain values only")
    if (root == "paths" or PATH_KEY.search(key)) and not printed:
        raise CnnlabError(refuse + "names a folder or file; a run directory lends no path (type it yourself)")
    if root == "plugins":
        raise CnnlabError(f"{where}: the run was trained with {override}; a run directory's file imports no module: "
                          f"pass {override} on the command line yourself to load it")
    values = parsed.value().list if parsed.is_sweep_override() and hasattr(parsed.value(), "list") else [parsed.value()]
    if "." not in key and root in groups and not all(isinstance(v, str) and SAVED_VALUE.fullmatch(v) for v in values):
        raise CnnlabError(refuse + f"is not the name of a {root} config")
