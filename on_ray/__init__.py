"""The Ray adapter: the same experiment YAMLs trained by Ray Train and searched by Ray Tune.

Only this package imports `ray`; it drives the engine-free session of `utils/` as the
Determined adapter (`on_determined/`) does. Commands: `python -m on_ray train | tune` (see
`python -m on_ray --help`).
"""
