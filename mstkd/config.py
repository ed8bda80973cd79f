"""Configuration: one YAML per concern under ``mstkd/configs/``, merged, then overridden.

``configs/<concern>.yaml`` becomes the ``<concern>`` key of the merged config
(``data.yaml`` -> ``cfg.data``). A preset group is a folder: ``configs/model/<name>.yaml``
is chosen with the override ``model=<name>``. Further overrides are OmegaConf dot-lists
(``data.normalization=minmax train.lr=2e-4``); a key that does not exist is refused, so a
typo never silently does nothing, and every value is checked against the typed schema of
:mod:`mstkd.schema` (type, range, choices) before any work starts. The resolved config is saved beside every output
(:func:`save_config`), so each result says how it was made.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from mstkd.atomic import write_text
from mstkd.errors import InputError
from mstkd.schema import Config, check_config

CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT_PRESETS = {"model": "lite"}


def preset_names(group: str) -> list[str]:
    """Names of the presets in ``configs/<group>/``."""
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def load_config(overrides: Sequence[str] = (), values: Mapping[str, Any] | None = None) -> DictConfig:
    """The default config with ``values`` (a nested mapping, e.g. a checkpoint's stored config) and then
    ``overrides`` applied (``group=preset`` or ``dotted.key=value``), typed and checked the same way.

    Raises:
        InputError: an unknown preset, an unknown key or a malformed override or value.
    """
    presets = dict(DEFAULT_PRESETS)
    dotlist = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise InputError(f"override {item!r} is not of the form key=value")
        if key in presets:
            presets[key] = value
        else:
            dotlist.append(item)

    parts = {p.stem: OmegaConf.load(p) for p in sorted(CONFIG_DIR.glob("*.yaml"))}
    for group, name in presets.items():
        if not (CONFIG_DIR / group).is_dir():
            continue
        path = CONFIG_DIR / group / f"{name}.yaml"
        if name not in preset_names(group):  # a name, never a path (model=../x would reach beyond the presets)
            raise InputError(f"unknown {group} preset {name!r}; choose one of {', '.join(preset_names(group))}")
        parts[group] = OmegaConf.merge(OmegaConf.load(path), {"preset": name})
    cfg = OmegaConf.merge(OmegaConf.structured(Config), parts)  # the YAML files are typed too
    OmegaConf.set_struct(cfg, True)
    try:
        if values is not None:
            cfg = OmegaConf.merge(cfg, values)
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(dotlist))
        if missing := sorted(OmegaConf.missing_keys(cfg)):
            raise InputError(f"config key {missing[0]} has no value")
        OmegaConf.resolve(cfg)
    except ConfigKeyError as exc:
        raise InputError(f"unknown config key {exc.full_key}") from None
    except OmegaConfBaseException as exc:
        key = f" {exc.full_key}" if getattr(exc, "full_key", None) else ""
        raise InputError(f"bad config value{key}: {str(exc).splitlines()[0]}") from None
    check_config(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def save_config(cfg: DictConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML, atomically."""
    return write_text(path, OmegaConf.to_yaml(cfg, resolve=True))
