"""Where a sweep's study lives (hydra.sweeper.storage), reached and kept reachable.

An outage of the storage is normal: a database restarts, a file server stalls. Every call a worker makes on
the study (create or load it, claim a trial, report an epoch, ask the pruner, tell the end, set an attribute)
goes through ``keep_retrying``: a connection error is tried again with backoff for up to
``hydra.sweeper.storage_retry_s`` seconds, said once when it starts and once when it ends. After that the
worker stops with one line naming the storage and the time waited (``StorageOutage``, exit status 75).
Its trial stays RUNNING with its directory unlocked, so the next claim (another worker, a rerun, a SLURM
requeue) continues it from its last checkpoint. A login the server refuses, a database that does not
exist or a full disk is no outage: those are not retried.
"""

from __future__ import annotations

import errno
import functools
import os
import random
import sys
import time
from pathlib import Path

from cnnlab.core.errors import CnnlabError, StorageOutage

STORAGE_FILES = {"sqlite": "optuna.db", "journal": "optuna.journal"}
RETRY_ENV = "CNNLAB_STORAGE_RETRY_S"  # how a trial run by another launcher's process learns storage_retry_s
DEFAULT_RETRY_S = 120.0


def storage_target(spec: str, sweep_dir: Path) -> str:
    """What names the study's storage for Optuna and optuna-dashboard: a URL or a journal file."""
    if spec == "sqlite":
        return f"sqlite:///{(sweep_dir / STORAGE_FILES['sqlite']).resolve()}"
    if spec == "journal":
        return str((sweep_dir / STORAGE_FILES["journal"]).resolve())
    return spec


def shown(target: str) -> str:
    """A storage target fit to print: a database URL without its password."""
    if "://" not in target or target.startswith("sqlite"):
        return target
    from sqlalchemy.engine import make_url

    try:
        return make_url(target).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy reads: say it as given
        return target


PASSWORD_ENV = "CNNLAB_DB_PASSWORD"


def dashboard_command(target: str) -> str:
    """The optuna-dashboard command for a study, fit to print and to copy: a database password is not shown but
    read by the shell from $CNNLAB_DB_PASSWORD, which the line names."""
    if "://" not in target or target.startswith("sqlite"):
        return f"optuna-dashboard {target}"
    from sqlalchemy.engine import make_url

    try:
        url = make_url(target)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy reads: as it was given, password hidden
        return f"optuna-dashboard {shown(target)}"
    if url.password is None:
        return f"optuna-dashboard '{target}'"
    shell = url.set(password="PASSWORD_HERE").render_as_string(hide_password=False)
    shell = shell.replace("PASSWORD_HERE", "${" + PASSWORD_ENV + "}")
    return f'optuna-dashboard "{shell}"  (export {PASSWORD_ENV}=<the password, as written in the URL> first; it is not shown)'


def database_url(target: str) -> str:
    """postgresql://... with the driver that is installed: psycopg 3 (cnnlab[postgres]) unless psycopg2 is."""
    import importlib.util

    if target.startswith("postgresql://") and importlib.util.find_spec("psycopg2") is None \
            and importlib.util.find_spec("psycopg") is not None:
        return "postgresql+psycopg://" + target.removeprefix("postgresql://")
    return target


SCHEMA_ATTEMPTS = 20


def creating_schema_at_once(error: BaseException) -> bool:
    """Workers that meet an empty database at once each create Optuna's tables; all but one then fail on a
    duplicate type or table (PostgreSQL: pg_type_typname_nsp_index). The tables exist then: open it again."""
    import sqlalchemy.exc

    text = str(error).lower()
    return isinstance(error, (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError)) and (
        "duplicate key" in text or "already exists" in text)


# Not outages, though the driver may call them operational errors: retrying would only delay the line.
REFUSALS = ("authentication failed", "password", "does not exist", "permission denied", "access denied",
            "disk is full", "no space left", "read-only", "readonly")
# A file system's hiccups, for a journal file on a shared file system.
TRANSIENT_ERRNOS = {errno.ESTALE, errno.EIO, errno.ETIMEDOUT, errno.ECONNREFUSED, errno.ECONNRESET,
                    errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EAGAIN}
# What optuna's _CachedStorage calls on the storage it wraps, beside BaseStorage's public methods.
CACHED_BACKEND_CALLS = ("_create_new_trial", "_get_best_trial_id", "_get_stale_trial_ids", "_get_trials",
                        "_set_trial_param")


def is_connection_error(error: BaseException) -> bool:
    """A server or file system that could not be reached, anywhere in the error's chain (optuna wraps the
    driver's error in a StorageInternalError that blames "invalid data ... exceeding max length")."""
    import sqlalchemy.exc

    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError,
                          sqlalchemy.exc.DisconnectionError)):
            return not any(word in str(e).lower() for word in REFUSALS)
        if isinstance(e, OSError) and e.errno in TRANSIENT_ERRNOS:
            return True
        e = e.__cause__ or e.__context__
    return False


def first_line(error: BaseException) -> str:
    """The driver's own words, one line (SQLAlchemy's wrapper adds a background link and the SQL)."""
    while error.__cause__ is not None and "sqlalchemy" not in type(error).__module__:
        error = error.__cause__
    return (str(getattr(error, "orig", None) or error).strip().splitlines() or [type(error).__name__])[0]


class _Outage:
    """One process's view of an outage: when it began, so the notice is said once and the wait is counted
    across calls (a claim makes several)."""

    began: float | None = None


def retrying(call, target: str, limit_s: float):
    """``call``, its connection errors retried with backoff (0.5 s doubling to 4 s, jittered) for ``limit_s``."""

    @functools.wraps(call)
    def patient(*args, **kwargs):
        delay = 0.5
        while True:
            try:
                result = call(*args, **kwargs)
            except Exception as e:
                if not is_connection_error(e):
                    raise
                now = time.monotonic()
                if _Outage.began is None:
                    _Outage.began = now
                    print(f"warning: the study's storage {shown(target)} cannot be reached ({first_line(e)}); "
                          f"retrying for up to {limit_s:g} s (hydra.sweeper.storage_retry_s)", file=sys.stderr, flush=True)
                waited = now - _Outage.began
                if waited >= limit_s:
                    raise StorageOutage(f"the study's storage {shown(target)} could not be reached for {waited:.0f} s "
                                        f"(hydra.sweeper.storage_retry_s={limit_s:g}): {first_line(e)}; this worker stops "
                                        "and its trial continues from its last checkpoint when the same command runs "
                                        "again") from None
                time.sleep(min(delay, limit_s - waited) * (0.75 + 0.5 * random.random()))
                delay = min(2 * delay, 4.0)
                continue
            if _Outage.began is not None:
                print(f"the study's storage {shown(target)} is reachable again after "
                      f"{time.monotonic() - _Outage.began:.1f} s", file=sys.stderr, flush=True)
                _Outage.began = None
            return result

    return patient


def keep_retrying(storage, target: str, limit_s: float):
    """``storage`` with every call retried through an outage (its methods replaced on the instance, so optuna
    still sees its own RDBStorage or JournalStorage and wraps it as it would)."""
    from optuna.storages import BaseStorage

    names = [n for n in dir(BaseStorage) if not n.startswith("_")] + list(CACHED_BACKEND_CALLS)
    for name in names:
        method = getattr(storage, name, None)
        if callable(method):
            setattr(storage, name, retrying(method, target, limit_s))
    return storage


def retry_seconds(value=None) -> float:
    """hydra.sweeper.storage_retry_s, or in a trial that another launcher's process runs, what its sweeper set."""
    if value is None:
        value = os.environ.get(RETRY_ENV, DEFAULT_RETRY_S)
    return float(value)


def open_storage(spec: str, sweep_dir: Path, retry_s: float | None = None, *, patient: bool | None = None,
                 setting: str = "hydra.sweeper.storage"):
    """The study's storage, reached now, its calls retried through an outage from then on.

    A wrong URL, a server that refuses the login, or a journal file that cannot be written is one line naming
    ``setting`` (hydra.sweeper.storage). A server that cannot be reached is one line at once from a command typed at a
    terminal, where a wrong URL looks the same as an outage; in a SLURM job (``patient``), where nobody
    reads that line in time, it is waited for as any outage is."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    limit_s = retry_seconds(retry_s)
    if patient is None:
        patient = bool(os.environ.get("SLURM_JOB_ID"))
    target = storage_target(spec, sweep_dir)
    made = None
    try:
        if spec == "journal" or target.endswith(".journal"):
            if spec == "journal":
                sweep_dir.mkdir(parents=True, exist_ok=True)
            return keep_retrying(JournalStorage(JournalFileBackend(target)), target, limit_s)
        if "://" not in target:
            raise CnnlabError(f"{setting}={spec!r}: give sqlite, journal, a journal file (*.journal) "
                              "or a database URL (postgresql://user@host/db, mysql://...)")
        engine = {"connect_args": {"timeout": 120}} if target.startswith("sqlite") else {"pool_pre_ping": True}
        if target.startswith("postgresql"):  # a host that is down answers nothing: give up a connection in 10 s
            engine["connect_args"] = {"connect_timeout": 10}
        if spec == "sqlite":
            sweep_dir.mkdir(parents=True, exist_ok=True)
            if not (sweep_dir / STORAGE_FILES["sqlite"]).exists():
                made = sweep_dir / STORAGE_FILES["sqlite"]  # a database this call creates: gone again if it fails

        def reach():
            for attempt in range(SCHEMA_ATTEMPTS):
                try:
                    return optuna.storages.RDBStorage(database_url(target), engine_kwargs=engine)
                except Exception as e:
                    if attempt + 1 == SCHEMA_ATTEMPTS or not creating_schema_at_once(e):
                        raise
                    time.sleep(0.05 * (attempt + 1) + random.random() * 0.1)

        storage = (retrying(reach, target, limit_s) if patient else reach)()
        return keep_retrying(storage, target, limit_s)
    except CnnlabError:
        raise
    except Exception as e:  # noqa: BLE001 - a driver's error, told in one line
        if made is not None:  # e.g. a full disk: no empty database is left for the next run to trust
            made.unlink(missing_ok=True)
        raise CnnlabError(f"{setting}={shown(target)}: cannot open the study there: {first_line(e)}") from None
