"""`cnnlab tune`: the sanity gate, a coarse search, refine stages, the final seeds and one test, under a
budget of epochs (cnnlab.tuning.runner)."""
