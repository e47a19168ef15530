"""Composing a run: the overrides of a command line or of cnnlab.train made ready (--config-dir, ``resume=``,
``replay=``), the config cnnlab's groups compose from them, and Hydra's composition errors as cnnlab's one
line. The part of the run service that every entry point shares: `cnnlab train`, cnnlab.train and compose,
`cnnlab tune`, the sweeper's helper processes."""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Iterator
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from cnnlab.core.config import (CONF_DIR, GROUP_REGISTRIES, TOP_LEVEL_KEYS, DataSettings, RunConfig, TrainerSettings,
                                check_settings, parse_run_config)
from cnnlab.core.errors import CnnlabError, suggestion
from cnnlab.core.plugins import load_components
from cnnlab.runtime.distributed import launched_ranks
from cnnlab.runtime.lent import check_lent_override, read_saved_overrides
from cnnlab.runtime.lock import check_free, claim_fresh_dir
from cnnlab.tasks import check_resume


def register_resolvers() -> None:
    """${cnnlab_fresh_dir:path}: the default run directory, claimed once per run."""
    if not OmegaConf.has_resolver("cnnlab_fresh_dir"):
        OmegaConf.register_new_resolver("cnnlab_fresh_dir", claim_fresh_dir, use_cache=True)



register_resolvers()  # conf/train.yaml's hydra.run.dir calls it


# Hydra's config search path while cnnlab runs (hydra_plugins/cnnlab_searchpath reads it): the user's
# --config-dir folders (CONFIG_DIRS), then cnnlab's own. A user's YAML adds entries to a group or replaces ours.
CONFIG_DIRS: list[str] = []
SEARCH_PATH: list[str] = []


def use_config_dirs(folders: list[str]) -> None:
    """Search ``folders`` (the user's, in order) before cnnlab's own configs."""
    absolute = []
    for folder in folders:
        path = Path(folder).expanduser().resolve()
        if not path.is_dir():
            raise CnnlabError(f"--config-dir {folder}: no such folder")
        absolute.append(str(path))
    CONFIG_DIRS[:] = absolute
    SEARCH_PATH[:] = [f"file://{p}" for p in absolute] + [f"file://{CONF_DIR}"]


@contextlib.contextmanager
def search_path_restored() -> Iterator[None]:
    """The config folders as they were before the block: a Python caller's config_dirs end with its call."""
    saved = list(CONFIG_DIRS), list(SEARCH_PATH)
    try:
        yield
    finally:
        CONFIG_DIRS[:], SEARCH_PATH[:] = saved


@contextlib.contextmanager
def composed(overrides: list[str]) -> Iterator[DictConfig]:
    """The config `cnnlab train` would compose from ``overrides`` (cnnlab's config groups after the user's
    --config-dir folders, as set by use_config_dirs), with Hydra's node in HydraConfig for the block, as
    Hydra's own job runner leaves it. Hydra's global state is as it was after (none, or the multirun's of a sweeper
    that composes its packed trials here), so it can be called again."""
    from hydra import compose, initialize
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.utils import setup_globals

    if not SEARCH_PATH:
        use_config_dirs([])
    outer = GlobalHydra.instance()
    before = (outer.hydra if outer.is_initialized() else None), HydraConfig.instance().cfg
    outer.clear()
    setup_globals()  # ${now:...} and ${hydra:...}
    try:
        with config_errors_in_one_line(), initialize(config_path=None, version_base="1.3"):
            full = compose("train", overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(full)
        cfg = copy.deepcopy(full)  # the task's config without Hydra's node, as Hydra's run_job makes it
        with read_write(cfg), open_dict(cfg):
            del cfg["hydra"]
        yield cfg
    finally:
        GlobalHydra.instance().clear()
        if before[0] is not None:
            GlobalHydra.instance().initialize(before[0])
        HydraConfig.instance().cfg = before[1]



@contextlib.contextmanager
def composed_run(overrides: list[str]) -> Iterator[tuple[RunConfig, DictConfig]]:
    """``composed``, checked once: the RunConfig every consumer reads, and the composed config beside it (what
    .hydra/config.yaml records)."""
    with composed(overrides) as cfg:
        yield parse_run_config(cfg), cfg


@contextlib.contextmanager
def config_errors_in_one_line() -> Iterator[None]:
    """A config mistake that Hydra or OmegaConf raised in the block becomes cnnlab's one line
    (translate_hydra_error); anything else, a bug, keeps its traceback."""
    try:
        yield
    except CnnlabError:
        raise
    except Exception as e:  # noqa: BLE001 - translated when it is a config problem, else raised as it is
        translated = translate_hydra_error(e)
        if translated is None:
            raise
        raise translated from None


def translate_hydra_error(e: BaseException) -> CnnlabError | None:
    """A CnnlabError for a config mistake Hydra or OmegaConf caught; None for anything else."""
    load_components()
    cause: BaseException | None = e
    while cause is not None:  # a resolver of ours (cnnlab_fresh_dir) raised it: its line as it is
        if isinstance(cause, CnnlabError):
            return cause
        cause = cause.__cause__ or cause.__context__
    if isinstance(e, MissingConfigException):
        group, _, choice = (e.missing_cfg_file or "").rpartition("/")
        if group in GROUP_REGISTRIES:
            try:
                GROUP_REGISTRIES[group].get(choice)
            except CnnlabError as err:
                return err
        if group and e.options:
            return CnnlabError(f"unknown {group} {choice!r}{suggestion(choice, e.options)}; choose from: {', '.join(e.options)}")
        return CnnlabError(_one_line(e))
    cause = e.__cause__ or e
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and cause.full_key:
        parent, _, key = str(cause.full_key).rpartition(".")
        node = getattr(cause, "parent_node", None)
        try:
            if parent in GROUP_REGISTRIES and node is not None and "name" in node:
                GROUP_REGISTRIES[parent].check_options(str(node["name"]), {key: None}, parent)
            elif parent in ("trainer", "data"):
                check_settings(TrainerSettings if parent == "trainer" else DataSettings, {key: None}, parent)
            elif parent == "":
                return CnnlabError(f"unknown config key {key!r}{suggestion(key, TOP_LEVEL_KEYS)}; top-level keys: {', '.join(sorted(TOP_LEVEL_KEYS))}")
        except CnnlabError as err:
            return err
        keys = list(node.keys()) if node is not None and hasattr(node, "keys") else []
        return CnnlabError(f"{parent or 'config'} has no key {key!r}{suggestion(key, map(str, keys))}" + (f"; it has: {', '.join(map(str, keys))}" if keys else ""))
    if isinstance(e, OverrideParseException):
        return CnnlabError(f"cannot parse override {e.override!r}: {_one_line(e)}")
    if isinstance(e, (HydraException, OmegaConfBaseException)):
        return CnnlabError(_one_line(e))
    return None


def _one_line(e: BaseException) -> str:
    """Hydra's messages span lines; fold them into one, adding the cause's if it says more."""
    text = " ".join(str(e).split())
    if e.__cause__ is not None and str(e.__cause__).split():
        text += ": " + str(e.__cause__).splitlines()[0].strip()
    return text


def prepared_overrides(args: list[str], *, training: bool) -> tuple[list[str], bool]:
    """The command line's overrides made ready for composition, for `cnnlab train` and cnnlab.train alike:
    --config-dir taken, numbers Python cannot read refused, ``resume=RUN_DIR`` expanded, a run directory's
    checkpoint checked before anything is written. Returns them and whether they ask for a sweep."""
    overrides = take_config_dirs(args)
    for override in overrides:  # Python refuses to read integers of over 4,300 digits (Hydra's parser would fail)
        if (digits := max(map(len, re.findall(r"\d+", override)), default=0)) > 4300:
            raise CnnlabError(f"{_key(override)}: a number of {digits:,} digits is not a setting")
    multirun = any(a in ("-m", "--multirun") for a in overrides)
    overrides = replay_overrides(resume_overrides(overrides, multirun), multirun)
    if not multirun and training:
        refuse_bad_resume(overrides)
    return overrides, multirun


def take_config_dirs(args: list[str]) -> list[str]:
    """``--config-dir DIR`` (``-cd DIR``, repeatable): the user's config folders, searched before
    cnnlab's own (SEARCH_PATH); the other arguments are returned for Hydra."""
    folders, rest, i = [], [], 0
    while i < len(args):
        arg = args[i]
        if arg in ("--config-dir", "-cd"):
            if i + 1 == len(args):
                raise CnnlabError(f"{arg} needs a folder")
            folders.append(args[i + 1])
            i += 2
            continue
        if arg.startswith("--config-dir="):
            folders.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
        i += 1
    use_config_dirs(folders)
    return rest


def refuse_bad_resume(overrides: list[str]) -> None:
    """A run directory that holds a checkpoint is continued; check that this config may continue
    it before Hydra starts the job, which would overwrite the run's .hydra/ record."""
    run_dirs = [o.split("=", 1)[1] for o in overrides if o.startswith("hydra.run.dir=")]
    if not run_dirs or "${" in run_dirs[-1] or any(o.startswith("-") for o in overrides):
        return
    run_dir = Path(run_dirs[-1])
    if not launched_ranks().enabled:  # DDP ranks share their run's directory (rank 0 or their parent holds it)
        check_free(run_dir)  # a live run there: say so before anything else is read or written
    if not (run_dir / "checkpoints").is_dir():
        return
    with composed_run([o for o in overrides if not o.startswith(("hydra.", "hydra/"))]) as (run, _):
        check_resume(run, run_dir)


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def resume_overrides(args: list[str], multirun: bool) -> list[str]:
    """``resume=RUN_DIR``: the run's own overrides (.hydra/overrides.yaml), then the ones given
    now (they win, and must be keys a resume may change), in RUN_DIR itself."""
    run_dir, rest = folder_argument(args, "resume", multirun,
                                    "(cnnlab train RUN) continues one run; a sweep resumes with hydra.sweep.dir=<dir> "
                                    "sweep.resume=true")
    if run_dir is None:
        return args
    from cnnlab.runtime.checkpoint import LAST, PREVIOUS

    if not any((run_dir / "checkpoints" / name).is_file() for name in (LAST, PREVIOUS)):
        raise CnnlabError(f"{run_dir}: no checkpoint there to continue (looked for {run_dir / 'checkpoints' / LAST})")
    return saved_overrides(run_dir, rest, "resume") + rest + [f"hydra.run.dir={run_dir}"]


def folder_argument(args: list[str], key: str, multirun: bool, single: str) -> tuple[Path | None, list[str]]:
    """``key=FOLDER`` among ``args`` (the last one wins) and the other arguments; refused in a sweep."""
    given = [a for a in args if a.startswith(f"{key}=")]
    if not given:
        return None, args
    if multirun:
        raise CnnlabError(f"{key}= {single}")
    return Path(given[-1].split("=", 1)[1]).expanduser(), [a for a in args if not a.startswith(f"{key}=")]


def replay_overrides(args: list[str], multirun: bool) -> list[str]:
    """``replay=MEMBER_DIR``: the member's own overrides (.hydra/overrides.yaml), then the ones given now;
    the run goes to a new directory and follows the member's schedule (cnnlab.tasks.replay)."""
    member, rest = folder_argument(args, "replay", multirun, "trains one PBT member again; run it without -m")
    if member is None:
        return args
    from cnnlab.tasks.replay import read_schedule

    read_schedule(member)  # one line for a folder that is not a member, before anything is composed
    return saved_overrides(member, rest, "replay") + rest + [f"replay={member.resolve()}"]


def saved_overrides(run_dir: Path, typed: list[str], what: str) -> list[str]:
    """``run_dir``'s own overrides that ``typed`` does not set, each checked as something from someone else."""
    saved_file = run_dir / ".hydra" / "overrides.yaml"
    saved = read_saved_overrides(saved_file, f"{what}={run_dir}") if saved_file.is_file() else []
    new_keys = {_key(a) for a in typed if not a.startswith("-")}
    kept = [(line, o) for line, o in saved if _key(o) not in new_keys]  # what the user types now wins
    for line, override in kept:
        check_lent_override(override, f"{what}={run_dir}: {saved_file} line {line}", CONFIG_DIRS)
    return [o for _, o in kept]
