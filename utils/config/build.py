"""The MMDetection config of a trial, from its hyperparameters and the experiment's data section.

The MMDetection config stays the single source of truth; hyperparameters only name it and override
a few keys (learning rate, weight decay, momentum, batch size, dotted `override_mmdet_config` keys).
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import logging
import traceback
from pathlib import Path
from typing import Any

from mmengine.config import Config, ConfigDict
from mmengine.config.config import BASE_KEY
from mmengine.utils import import_modules_from_strings

from utils.base.errors import ConfigError
from utils.config.schedule import accumulation

logger = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[2]
# The hyperparameters the trial reads; anything else in an experiment is a typo or unused.
KNOWN_HPARAMS = (
    "config_file",
    "merge_config",
    "override_mmdet_config",
    "global_batch_size",
    "lr",
    "weight_decay",
    "momentum",
    "auto_scale_lr",
    "coco_backend",
    "streamed_evaluation",
    "load_from",
    "visualization",
    "evaluation_plots",
    "sanity_pass",
)


def resolve_config_path(name: str, key: str = "config_file") -> Path:
    """Find `mmdet::group/file.py` in the installed mmdet, else a path (relative to cwd or repo).

    `key`: the hyperparameter that names it (`config_file` or `merge_config`), for the error.
    """
    if name.startswith("mmdet::"):
        spec = importlib.util.find_spec("mmdet")
        path = Path(spec.origin).parent / ".mim" / "configs" / name.removeprefix("mmdet::")
        hint = "a path under mmdet's configs/, e.g. mmdet::retinanet/retinanet_r50_fpn_1x_coco.py"
    else:
        path = Path(name)
        if not path.is_absolute() and not path.exists():
            path = REPO_ROOT / name
        hint = "a file under configs/ or an mmdet:: config"
    if not path.is_file():
        raise ConfigError(f"hyperparameters.{key}: config {name!r} not found ({path}); use {hint}.")
    return path


def load_config(hparams: dict[str, Any]) -> Config:
    """`config_file` with `merge_config` merged on top, before any other change."""
    if "config_file" not in hparams:
        raise ConfigError("hyperparameters.config_file is missing: name an mmdet config to train.")
    cfg = read_config(resolve_config_path(hparams["config_file"]), "config_file")
    if hparams.get("merge_config"):
        path = resolve_config_path(hparams["merge_config"], "merge_config")
        extra = read_config(path, "merge_config")
        cfg.merge_from_dict(extra.to_dict(), allow_list_keys=True)
    return cfg


def read_config(path: Path, key: str = "config_file") -> Config:
    """mmengine's `Config.fromfile`, with errors that name the file and line at fault, which
    mmengine's own do not (it parses without the file name): a syntax error or a missing
    `_base_` file anywhere in the inheritance, an error while a file runs, a failed
    `custom_imports`. `key`: the hyperparameter that names `path`, for the messages."""
    files = config_files(path, key)
    try:
        cfg = Config.fromfile(path, import_custom_modules=False)
    except Exception as err:  # reading config files: any error is the config's
        raise ConfigError(
            f"{_failed_line(err, files, path)}: {type(err).__name__}: {err} "
            f"(hyperparameters.{key}): fix the config."
        ) from err
    imports = cfg.get("custom_imports")
    if imports:
        try:
            import_modules_from_strings(**imports)
        except Exception as err:  # a missing module, or any error while importing one
            setter = next((f for f, names in files.items() if "custom_imports" in names), None)
            where = f"{setter}, line {files[setter]['custom_imports']}" if setter else str(path)
            raise ConfigError(
                f"{where}: custom_imports {imports.get('imports')} failed: "
                f"{type(err).__name__}: {err}. Install the module or fix its name; modules of "
                "this repository import from the working directory."
            ) from err
    return cfg


def config_files(path: Path, key: str = "config_file") -> dict[Path, dict[str, int]]:
    """The Python config files `path` reads (itself, then its `_base_` files, depth first), each
    with the line of every top-level name it assigns. A syntax error, or a `_base_` that does
    not exist, is a ConfigError naming the file and line."""
    files: dict[Path, dict[str, int]] = {}
    pending = [Path(path).resolve()]
    while pending:
        file = pending.pop()
        if file in files or file.suffix != ".py":
            continue  # YAML and JSON configs: mmengine's errors name the file
        top = file == Path(path).resolve()
        inherited = f" (hyperparameters.{key}{'' if top else f' {path} inherits it'})"
        try:
            tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
        except SyntaxError as err:
            raise ConfigError(
                f"{file}, line {err.lineno}: {err.msg}{inherited}: fix the syntax."
            ) from err
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{file}: cannot read it ({err}){inherited}.") from err
        files[file] = names = {}
        for node in tree.body:
            for target in node.targets if isinstance(node, ast.Assign) else []:
                if isinstance(target, ast.Name):
                    names.setdefault(target.id, node.lineno)
        pending += reversed([base_file(name, file, names) for name in _base_names(tree)])
    return files


def base_file(name: str, file: Path, names: dict[str, int]) -> Path:
    """Where mmengine finds the `_base_` entry `name` of `file`; a ConfigError if nowhere."""
    where = f"{file}, line {names.get(BASE_KEY)}: _base_ {name!r}"
    try:
        found, _ = Config._get_cfg_path(name, str(file))  # mmengine's own lookup
    except Exception as err:  # a package that is not installed, a metafile without the name
        raise ConfigError(
            f"{where} cannot be found ({err}): fix the name (mmdet::group/file.py names a file "
            "under mmdet's configs/)."
        ) from err
    if not Path(found).is_file():
        raise ConfigError(
            f"{where} does not exist ({Path(found)}): fix the path (relative to {file.parent}), or "
            "name an mmdet config as mmdet::group/file.py."
        )
    return Path(found).resolve()


def _base_names(tree: ast.Module) -> list[str]:
    """The file's `_base_` entries; none where they are not literal strings (mmengine then
    evaluates and reports them itself) or use its `{{ }}` substitutions."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == BASE_KEY for t in node.targets
        ):
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                return []
            entries = value if isinstance(value, list | tuple) else [value]
            return [e for e in entries if isinstance(e, str) and "{{" not in e]
    return []


def _failed_line(err: Exception, files: dict[Path, dict[str, int]], path: Path) -> str:
    """The config file and line where `err` was raised while mmengine ran the files, else
    `path`."""
    for frame in reversed(traceback.extract_tb(err.__traceback__)):
        if Path(frame.filename).resolve() in files:
            return f"{frame.filename}, line {frame.lineno}"
    return str(path)


def accumulative_counts(hparams: dict[str, Any]) -> int:
    """Batches per optimizer step (`optim_wrapper.accumulative_counts`), from the config files.

    For Determined's cluster entry point, which gives it (the aggregation frequency) to
    Determined before the trial exists to plan the run; where a plan exists, read
    `RunPlan.accumulation` instead (the same value).
    """
    cfg = load_config(hparams)
    apply_overrides(cfg, hparams.get("override_mmdet_config") or {})
    return accumulation(cfg)


def apply_hparams(cfg: Config, hparams: dict[str, Any]) -> None:
    """Map the named searchable hyperparameters onto the optimizer config."""
    optimizer = cfg.optim_wrapper.optimizer
    for name in ("lr", "weight_decay", "momentum"):
        if hparams.get(name) is None:
            continue
        if name == "momentum" and "momentum" not in optimizer and optimizer.type != "SGD":
            raise ConfigError(
                f"hyperparameters.momentum is set but the optimizer {optimizer.type} takes no "
                "momentum; remove it or set the optimizer's own keys via override_mmdet_config."
            )
        optimizer[name] = float(hparams[name])


def scale_lr(cfg: Config, global_batch: int, enable: bool | None) -> None:
    """Linear LR scaling as mmengine's runner does it with the config's `auto_scale_lr`.

    The hyperparameter `auto_scale_lr` (true/false) overrides the config's `enable`; the LR in the
    config or in `lr` is then the one for `auto_scale_lr.base_batch_size` images per step.
    """
    auto = cfg.get("auto_scale_lr") or {}
    if enable is not None:
        auto = {**auto, "enable": bool(enable)}
    if not auto.get("enable"):
        return
    if "base_batch_size" not in auto:
        raise ConfigError(
            "auto_scale_lr is enabled but the config has no auto_scale_lr.base_batch_size: "
            "add it (mmdet's COCO configs use 16)."
        )
    ratio = global_batch / auto["base_batch_size"]
    cfg.optim_wrapper.optimizer.lr *= ratio
    logger.info(
        "LR scaled by %d/%d to %g.",
        global_batch,
        auto["base_batch_size"],
        cfg.optim_wrapper.optimizer.lr,
    )


def apply_overrides(cfg: Config, overrides: dict[str, Any]) -> None:
    """Apply `override_mmdet_config`: each dotted key must already exist in the config."""
    for key, value in overrides.items():
        parts = key.split(".")
        parent: Any = None
        node: Any = cfg
        for depth, part in enumerate(parts):
            if isinstance(node, (dict, Config)):
                options = list(node)
            elif isinstance(node, list):
                options = [str(i) for i in range(len(node))]
            else:
                options = []
            if part not in options:
                close = difflib.get_close_matches(part, options, n=3)
                raise ConfigError(
                    f"override_mmdet_config: unknown key {key!r} ({part!r} is not in "
                    f"{'.'.join(parts[:depth]) or 'the config'}"
                    + (f"; did you mean {', '.join(close)}?" if close else "")
                    + "). Check the key against the resolved config."
                )
            parent, node = node, node[int(part) if isinstance(node, list) else part]
        leaf = int(parts[-1]) if isinstance(parent, list) else parts[-1]
        parent[leaf] = ConfigDict(value) if isinstance(value, dict) else value
