"""Training PIUmr (`python models/train.py`), one job per module:

- `config`: every configuration key, its default and validation; JSON config files.
- `cli`: the command line of models/train.py.
- `run`: a run from start to end (`run_training`, `Run`): set-up, epochs, checkpoints, test.
- `loop`: one training epoch and its step.
- `builders`: model, loss, optimiser and learning-rate schedule from the configuration.
- `data_loading`: datasets, samplers and DataLoaders from the configuration.
- `precision`: autocast dtype and memory format.
- `checkpointing`: saving and resuming training checkpoints; seeding for exact resume.
- `run_log`: console table, CSV, TensorBoard and curve PNG of a run.
- `distributed`: torchrun process groups.
"""
