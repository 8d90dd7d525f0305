"""What one measured subprocess runs: a training or a data loader pass, ours or mmengine's.

Run as `python -m bench.workloads SPEC.json RESULT.json`; bench.training starts one process per
measurement so that each has its own peak memory and no state carries over. SPEC holds `kind`
("train" or "loader"), `side` ("ours", "mmengine", or "ray": training on Ray Train), `sets`
(the experiment `--set` overrides all sides build their config from), `output` (a scratch
folder) and, for loaders, `passes`.
Kind "startup" stops at the first training batch (its one stamp: the start-up's end); its side
"mmengine" reads the config file `config` as tools/train.py does (no checks of ours), "dataset"
builds mmdet's training dataset from it alone.
RESULT receives `stamps` (wall-clock seconds at the start of each training iteration, or after
each loaded batch), `cpu` (the process's CPU seconds at the same points), `peak_so_far_mb` (its
peak resident memory up to each point), `images` (images per batch) and `peak_mb` (the peak of the
whole run; loader workers share the process's pages and are not counted); kind "startup", side
"ours", also `sanity_seconds` (its sanity pass).
"""

from __future__ import annotations

import json
import resource
import sys
import time
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
EXPERIMENT = REPO / "experiments" / "demo.yaml"


def stamp() -> tuple[float, float, float]:
    """Wall-clock seconds, the process's CPU seconds and its peak resident memory so far (MB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return time.perf_counter(), time.process_time(), peak


def build_cfg(sets: list[str]) -> Any:
    """The mmdet config our trial builds from demo.yaml with these overrides (one slot)."""
    from utils.experiment import load as experiment
    from utils.training.plan import build_config

    exp_conf = experiment.load_experiment(EXPERIMENT, sets)
    return build_config(experiment.local_hparams(exp_conf["hyperparameters"]), exp_conf["data"])


def train_ours(spec: dict[str, Any]) -> list[tuple[float, ...]]:
    """A local run of our trial through Determined's Trainer, stamped at each train_batch."""
    from on_determined.local import run_local
    from on_determined.trial import MMDetTrial

    stamps: list[tuple[float, ...]] = []

    class StampedTrial(MMDetTrial):
        def train_batch(self, batch: Any, epoch_idx: int, batch_idx: int) -> dict[str, Any]:
            stamps.append(stamp())
            return super().train_batch(batch, epoch_idx, batch_idx)

    run_local(str(EXPERIMENT), spec["sets"], spec["output"], trial_class=StampedTrial)
    return stamps


def stamp_to_file(path: str, batch_index: int, rank: int) -> None:
    """A Ray worker's batch hook: its stamp appended to `path` (the worker is another process)."""
    with open(path, "a") as stream:
        stream.write(json.dumps(stamp()) + "\n")


def train_ray(spec: dict[str, Any]) -> list[tuple[float, ...]]:
    """A run of Ray Train's TorchTrainer on one worker (a local Ray), stamped in the worker."""
    import functools

    from on_ray.train import train

    stamps = Path(spec["output"]) / "stamps.jsonl"
    hook = functools.partial(stamp_to_file, str(stamps))
    train(str(EXPERIMENT), spec["sets"], workers=1, output=spec["output"], batch_hook=hook)
    return [tuple(json.loads(line)) for line in stamps.read_text().splitlines()]


class FirstBatch(Exception):
    """Raised at the first training batch: the start-up is over."""


def startup(spec: dict[str, Any], extra: dict[str, Any]) -> list[tuple[float, ...]]:
    """Process start to the first training batch, or to mmdet's training dataset built; ours
    puts the seconds of its sanity pass (part of its start-up) into `extra`."""
    from mmengine.config import Config

    stamps: list[tuple[float, ...]] = []
    if spec["side"] == "ours":
        from on_determined.local import run_local
        from on_determined.trial import MMDetTrial

        class FirstBatchTrial(MMDetTrial):
            def train_batch(self, batch: Any, epoch_idx: int, batch_idx: int) -> dict[str, Any]:
                stamps.append(stamp())
                extra["sanity_seconds"] = self.sanity_seconds
                raise FirstBatch

        try:
            run_local(str(EXPERIMENT), spec["sets"], spec["output"], trial_class=FirstBatchTrial)
        except FirstBatch:
            pass
        return stamps
    cfg = Config.fromfile(spec["config"])
    if spec["side"] == "dataset":
        from mmdet.registry import DATASETS
        from mmdet.utils import register_all_modules

        register_all_modules()
        DATASETS.build(cfg.train_dataloader.dataset).full_init()
        return [stamp()]
    cfg.work_dir = spec["output"]
    cfg.launcher = "none"
    try:
        train_mmengine_cfg(cfg, stamps, stop=True)
    except FirstBatch:
        pass
    return stamps


def train_mmengine(spec: dict[str, Any]) -> list[tuple[float, ...]]:
    """mmdet's tools/train.py path: `Runner.from_cfg(cfg).train()`, stamped by a hook."""
    cfg = build_cfg(spec["sets"])
    cfg.work_dir = spec["output"]
    cfg.launcher = "none"
    stamps: list[tuple[float, ...]] = []
    train_mmengine_cfg(cfg, stamps)
    return stamps


def train_mmengine_cfg(cfg: Any, stamps: list, stop: bool = False) -> None:
    """`Runner.from_cfg(cfg).train()`, stamped at each iteration; `stop`: at the first."""
    from mmengine.hooks import Hook
    from mmengine.runner import Runner

    class Stamps(Hook):
        priority = "HIGHEST"

        def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
            stamps.append(stamp())
            if stop:
                raise FirstBatch

    runner = Runner.from_cfg(cfg)
    runner.register_hook(Stamps())
    runner.train()


def load_ours(spec: dict[str, Any]) -> tuple[list[tuple[float, ...]], list[int]]:
    """The trial's training loader, as Determined's Trainer iterates it (one repeated stream)."""
    from determined import pytorch

    import model_def
    from utils.experiment import load as experiment

    exp_conf = experiment.load_experiment(EXPERIMENT, spec["sets"])
    hparams = experiment.local_hparams(exp_conf["hyperparameters"])
    with pytorch.init(hparams=hparams, exp_conf=exp_conf) as context:
        trial = model_def.MMDetTrial(context)
        det_loader = trial.build_training_data_loader()
        batches = spec["passes"] * len(det_loader)
        loader = det_loader.get_data_loader(repeat=True)
        stamps, images = [], []
        for count, batch in enumerate(loader, start=1):
            stamps.append(stamp())
            images.append(len(batch["inputs"]))
            if count == batches:
                break
    return stamps, images


def load_mmengine(spec: dict[str, Any]) -> tuple[list[tuple[float, ...]], list[int]]:
    """The Runner's training loader from the same config, epoch by epoch as its train loop runs.

    Built by a Runner, as the trial's is built by the trial: the workers fork from a process that
    holds the model, as they do in training (their garbage collector walks what they inherit).
    """
    from mmengine.runner import Runner

    cfg = build_cfg(spec["sets"])
    cfg.work_dir = spec["output"]
    cfg.launcher = "none"
    loader = Runner.from_cfg(cfg).train_dataloader
    stamps, images = [], []
    for epoch in range(spec["passes"]):
        loader.batch_sampler.sampler.set_epoch(epoch)  # as mmengine's DistSamplerSeedHook
        for batch in loader:
            stamps.append(stamp())
            images.append(len(batch["inputs"]))
    return stamps, images


def main(spec_path: str, result_path: str) -> None:
    warnings.filterwarnings("ignore")
    sys.path.insert(0, str(REPO))
    spec = json.loads(Path(spec_path).read_text())
    images: list[int] = []
    extra: dict[str, Any] = {}
    if spec["kind"] == "startup":
        stamps = startup(spec, extra)
    elif spec["kind"] == "train":
        trainers = {"ours": train_ours, "mmengine": train_mmengine, "ray": train_ray}
        stamps = trainers[spec["side"]](spec)
    else:
        stamps, images = (load_ours if spec["side"] == "ours" else load_mmengine)(spec)
    result = {
        "stamps": [wall for wall, _, _ in stamps],
        "cpu": [cpu for _, cpu, _ in stamps],
        "peak_so_far_mb": [peak for _, _, peak in stamps],
        "images": images,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **extra,
    }
    Path(result_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:3])
