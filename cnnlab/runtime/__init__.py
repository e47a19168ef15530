"""What every run relies on, below training itself: atomic files and checkpoints, the run-directory
lock, stop signals, and the DDP process group."""
