"""The training loop (`loop`) and what surrounds it: setup before the first step, model preparation,
the resume state of a checkpoint, signals, trackers and curves."""
