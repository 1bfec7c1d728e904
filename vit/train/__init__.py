"""Training: the params.json schema, the epoch engine, optimizer and schedule, precision, run
checkpoints and resume, DDP helpers."""
