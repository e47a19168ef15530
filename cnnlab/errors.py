"""User-facing errors: each one is printed as a single line, never a traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class CnnlabError(Exception):
    """A mistake in the user's input (config, files, command line).

    The CLI prints ``error: <message>`` and exits with status 2; bugs in
    cnnlab itself stay ordinary exceptions with a full traceback.
    """


def close_matches(word: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    candidates = list(candidates)
    matches = difflib.get_close_matches(word, candidates, n=n, cutoff=0.6)
    if not matches:
        # Prefix matches catch abbreviations such as "res" -> "resnet18".
        matches = [c for c in candidates if c.startswith(word) or word.startswith(c)][:n]
    return matches


def suggestion(word: str, candidates: Iterable[str]) -> str:
    """' (did you mean: a, b?)' or '' when nothing is close."""
    matches = close_matches(word, candidates)
    return f" (did you mean: {', '.join(matches)}?)" if matches else ""
