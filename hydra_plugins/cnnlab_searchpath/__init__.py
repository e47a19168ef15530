"""Where `cnnlab train` looks for configs: the user's --config-dir folders first, then cnnlab's own
(the package cnnlab.conf). A SearchPathPlugin, because Hydra puts its own --config-dir after the
primary config folder, so a user's YAML could add entries but never replace ours.

It acts only while cnnlab's CLI runs (cnnlab.service.compose.SEARCH_PATH is set); any other Hydra
application in the same environment sees no change.
"""

from __future__ import annotations

import sys

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class CnnlabSearchPath(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        app = sys.modules.get("cnnlab.service.compose")
        for path in getattr(app, "SEARCH_PATH", None) or ():
            search_path.append(provider="cnnlab", path=path)
