"""The engine-free core, in layers (each imports only those before it): base, experiment,
config, data, evaluation, training, inference, check. No module here imports an engine."""
