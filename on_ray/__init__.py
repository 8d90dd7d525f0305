"""The Ray adapter: the same experiment YAMLs trained by Ray Train, searched by Ray Tune, and a
trained checkpoint served by Ray Serve.

Only this package imports `ray`; its workers run the core's loop (`utils/training/loop.py`) as
Determined's trial does. Commands: `python -m on_ray train | tune | serve | export | predict |
evaluate` (see `python -m on_ray --help`); none needs Determined.
"""
