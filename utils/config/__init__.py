"""The MMDetection config of a run: loaded, hyperparameters mapped onto it, read (datasets, heads,
evaluators), and its schedule."""
