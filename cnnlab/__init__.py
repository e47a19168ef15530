"""cnnlab: a configuration-driven experiment runner for convolutional networks.

From Python: ``cnnlab.train``, ``cnnlab.tune``, ``cnnlab.compose`` and ``cnnlab.load`` (cnnlab/api.py), imported on first use
so that ``import cnnlab`` stays light; a mistake raises ``cnnlab.CnnlabError``.
"""

from cnnlab.core.errors import CnnlabError
from cnnlab.core.version import __version__

__all__ = ["CnnlabError", "RunResult", "SearchResult", "__version__", "compose", "load", "train", "tune"]
_API = {"train", "compose", "load", "tune", "RunResult", "SearchResult"}


def __getattr__(name: str):
    if name in _API:
        from cnnlab import api

        return getattr(api, name)
    raise AttributeError(f"module 'cnnlab' has no attribute {name!r}")
