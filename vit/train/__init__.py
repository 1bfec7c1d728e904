"""Training: the run (loop.py) and what it prints and reports (report.py), one epoch (engine.py), the
optimizer and schedule (optim.py), run checkpoints and resume (checkpoint.py). What inference shares
with it (params, the model factory, evaluation, precision, DDP helpers) lives below, in vit/."""
