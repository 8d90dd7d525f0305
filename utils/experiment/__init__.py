"""The experiment YAML: loading it with `--set` overrides, local hyperparameter values, and what a
Determined 0.38.1 master accepts in it."""
