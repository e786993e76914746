"""Composition: the one way to build a config outside `ntt run`'s own Hydra app (`ntt study`, `ntt segment`,
`Segmenter.from_config`, tests), from any folder: `conf/` and `experiments/` ship inside the package
(`pkg://ntt.conf`, `pkg://ntt.experiments`). Hydra's errors become one-line `ConfigError`s naming the override.
"""

from __future__ import annotations

import difflib
from typing import Any

from ntt.utils.config import first_line, unknown_key_message
from ntt.utils.errors import ConfigError

CONF_PACKAGE = "ntt.conf"  # `conf/` of the repository, shipped in the wheel as package data


def conf_path() -> Any:
    """The config root as a file-system path (a `Traversable` of the installed package `ntt.conf`)."""
    from importlib.resources import files

    return files(CONF_PACKAGE)


def compose(
    overrides: Any = (),
    *,
    return_hydra_config: bool = False,
    job_name: str = "ntt",
    config_name: str = "main",
):
    """Compose `conf/main.yaml` (+ the `experiments/` root) with Hydra's compose API, from any folder.

    Args:
        overrides: Hydra overrides, as on the `ntt run` line (`dataset=synthetic`, `shots=3`, ...).
        return_hydra_config: also return the `hydra` node (sweeper params, launcher).
        job_name: Hydra's job name.
        config_name: the primary config.

    Returns:
        The composed `DictConfig`.
    """
    return compose_all(
        [overrides], return_hydra_config=return_hydra_config, job_name=job_name, config_name=config_name
    )[0]


def compose_all(
    override_lists: Any,
    *,
    return_hydra_config: bool = False,
    job_name: str = "ntt",
    config_name: str = "main",
) -> list:
    """`compose` of several override lists in one Hydra initialisation (the jobs of a sweep).

    The caller's Hydra state (a running app, a test's `initialize`) is kept: this composes in a clean
    global Hydra and restores the previous one.

    Args:
        override_lists: one list of overrides per config.
        return_hydra_config: also return the `hydra` node.
        job_name: Hydra's job name.
        config_name: the primary config.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from hydra.initialize import get_gh_backup, restore_gh_from_backup
    from omegaconf.errors import OmegaConfBaseException

    from ntt.utils.identity import register_resolver

    register_resolver()
    backup = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module=CONF_PACKAGE, version_base="1.3", job_name=job_name):
            configs = []
            for ov in override_lists:
                try:
                    configs.append(
                        hydra_compose(
                            config_name=config_name,
                            overrides=list(ov),
                            return_hydra_config=return_hydra_config,
                        )
                    )
                except (HydraException, OmegaConfBaseException) as err:  # an option, key or override refused
                    raise ConfigError(composition_message(err, list(ov))) from err
            return configs
    finally:
        restore_gh_from_backup(backup)


def composition_message(err: BaseException, overrides: list[str]) -> str:
    """One line for an error of Hydra's composition: the override at fault and what to do.

    Args:
        err: what Hydra raised (an unknown option of a group, an unknown key, an unparseable override, ...).
        overrides: the overrides being composed.
    """
    from hydra.errors import MissingConfigException, OverrideParseException

    if isinstance(err, MissingConfigException) and err.options is not None and err.missing_cfg_file:
        group, _, option = str(err.missing_cfg_file).rpartition("/")
        if group:
            close = difflib.get_close_matches(option, err.options, n=1)
            hint = f" (did you mean {group}={close[0]}?)" if close else ""
            options = ", ".join(err.options)
            return f"{group}={option}: `{group}` has no option `{option}`{hint}; its options: {options}"
    if isinstance(err, OverrideParseException):
        return f"{err.override}: not a valid override ({first_line(err)}): write key=value, e.g. shots=5"
    full_key = getattr(err.__cause__, "full_key", None)
    if full_key and "not in struct" in str(err.__cause__):
        keys = (str(full_key), f"{full_key}.")  # the override itself, or one below the missing node
        line = next((o for o in overrides if o.lstrip("+~").split("=")[0].startswith(keys)), str(full_key))
        return unknown_key_message(line, str(full_key))
    # anything else: Hydra's words on one line, without its config search path
    text = str(err).split("Config search path:")[0]
    return "; ".join(ln.strip() for ln in text.splitlines() if ln.strip()) or type(err).__name__
