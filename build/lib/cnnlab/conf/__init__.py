"""cnnlab's Hydra config groups, installed as the package ``cnnlab.conf`` (pyproject maps it here),
so an installed cnnlab finds them through the package wherever it runs."""
