"""Looking at runs: evaluation (TTA, ensembles, `cnnlab eval`), pictures (`cnnlab viz`), the LR range
test (`cnnlab lr-find`) and plotting."""
