"""The run service below the CLI, cnnlab.api and cnnlab.tuning: composing a run (compose.py) and starting it, or a
trial of a search, on its one road (run.py)."""
