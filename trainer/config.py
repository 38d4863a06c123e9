"""Compose the Hydra config from the packaged conf/ and the command-line overrides."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONF_DIR = Path(__file__).parent / "conf"


class ConfigError(ValueError):
    """A bad override or config value; the message is one line that names the key."""


def _root_cause(e: BaseException) -> str:
    while e.__cause__ is not None:
        e = e.__cause__
    return str(e).strip().splitlines()[0]


def load_config(overrides: list[str]) -> DictConfig:
    """The resolved config for these overrides (`key=value`, `group=option`)."""
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as e:
        msg = str(e).strip().splitlines()[0]
        cause = _root_cause(e)
        raise ConfigError(msg if cause == msg else f"{msg} {cause}") from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"missing required config value: {', '.join(missing)} (e.g. data.path=corpus.txt)")
    return cfg
