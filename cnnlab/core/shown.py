"""Text that leaves cnnlab for a person or a shell: terminal lines, records, commands to paste.

Values taken from files may be someone else's: control characters (an ANSI escape in a run name) are shown
escaped, never sent raw to the terminal; a command printed for pasting is shell-quoted word by word. Secrets
(a password in a storage URL, a value whose name says token, key, secret or password) are masked wherever
cnnlab writes or prints them.
"""

from __future__ import annotations

import logging
import re
import shlex
from collections.abc import Iterable
from typing import Any

MASK = "***"
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][\w+.-]*://[^:/@\s'\"]*):(?P<secret>[^@\s'\"/]*)@")
_SECRET_WORDS = {"token", "key", "secret", "password", "passwd", "pwd", "apikey", "credential", "credentials"}
# NAME=value or NAME: value where a part of NAME (split at . _ - and case changes) is one of _SECRET_WORDS.
_ASSIGNMENT = re.compile(r"(?P<name>[A-Za-z_][\w.-]*)(?P<sep>\s*[=:]\s*)(?P<quote>['\"]?)(?P<value>[^\s'\",}\]]+)")


def printable(text: Any) -> str:
    """``text`` with every control character but newline and tab shown as an escape (``\\x1b``)."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text))


def secret_name(name: str) -> bool:
    """Whether a key or environment variable's name says it holds a secret: its last word is token, key, secret or
    password (WANDB_API_KEY, db.password, accessToken; not key_dim, and not a bare KEY, a placeholder)."""
    parts = [p.lower() for p in re.split(r"[._\-\s]+|(?<=[a-z])(?=[A-Z])", name) if p]
    return bool(parts) and parts[-1] in _SECRET_WORDS and parts != ["key"]


def masked(text: str) -> str:
    """``text`` with URL passwords and the values of secret-named assignments replaced by ***."""
    text = _URL_PASSWORD.sub(lambda m: f"{m.group('head')}:{MASK}@" if m.group("secret") else m.group(), text)

    def assignment(m: re.Match) -> str:
        if not secret_name(m.group("name").rsplit(".", 1)[-1]) or m.group("value") == MASK:
            return m.group()
        return f"{m.group('name')}{m.group('sep')}{m.group('quote')}{MASK}"

    return _ASSIGNMENT.sub(assignment, text)


def shell_line(words: Iterable[str]) -> str:
    """A command to paste into a shell: every word quoted where it needs it, secrets masked, nothing that a
    terminal would act on."""
    return printable(masked(shlex.join(str(w) for w in words)))


class SecretFilter(logging.Filter):
    """Masks secrets in every log line a handler writes (conf/hydra/*_logging: the terminal and train.log)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        shown = printable(masked(message))
        if shown != message:
            record.msg, record.args = shown, None
        return True


SHORT_NAMES = {"weight_decay": "wd", "learning_rate": "lr", "batch_size": "bs", "label_smoothing": "ls"}


def short_names(keys: list[str]) -> dict[str, str]:
    """optimizer.lr -> lr, optimizer.weight_decay -> wd; the whole key where two would read the same."""
    short = {k: SHORT_NAMES.get(k.rpartition(".")[2], k.rpartition(".")[2]) for k in keys}
    clashing = {s for s in short.values() if list(short.values()).count(s) > 1}
    return {k: (k if s in clashing else s) for k, s in short.items()}


def _compact(text: str) -> str:
    try:
        value = float(text)
    except ValueError:
        return text.replace("/", "_")
    return f"{value:.3g}" if not text.lstrip("-").isdigit() else text


def trial_label(overrides: list[str], searched: list[str], job: str) -> str:
    """What a trial varies, as its TensorBoard run is named: ``lr=0.01 wd=0.0001 #3``."""
    values = {o.partition("=")[0].lstrip("+~"): o.partition("=")[2] for o in overrides}
    names = short_names([k for k in searched if k in values])
    return " ".join([*(f"{names[k]}={_compact(values[k])}" for k in names), f"#{job}"])
