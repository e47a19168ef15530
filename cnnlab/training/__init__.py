"""Training: the loop, checkpoints, and what a run reports (terminal, TensorBoard, summary.json)."""
