"""Every option of every config group, in both config roots, composes, resolves and binds to its target.

No weights are loaded: each `_target_` is imported and its signature is bound to the yaml keys plus the
keyword arguments the app adds at instantiation time. A guard checks that every yaml file on disk was
composed at least once, so a new file cannot silently escape the test.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from pathlib import Path

import pytest
from conftest import REPO, SHARED
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import MissingConfigException
from omegaconf import DictConfig, OmegaConf, read_write

import ntt  # noqa: F401  registers `${ntt.config_id:}` (run_name)
from ntt.utils.config import validate_config

CONF = REPO / "conf"
EXPERIMENTS = REPO / "experiments"
TEST_CONFIGS = REPO / "tests" / "configs"
SEARCHPATH = f"hydra.searchpath=[file://{EXPERIMENTS},file://{TEST_CONFIGS}]"
# tests/configs point at the shared fixtures through `paths.shared`, a key only tests add (conf/ has no
# path outside the repository)
SHARED_PATH = f"++paths.shared={SHARED}"

# keyword arguments the app passes when it instantiates these targets (see ntt.runner.lifecycle)
APP_KWARGS = {
    "ntt.backbones.sam2.build_sam2": {"device": "cpu"},
    "ntt.backbones.dinov2.build_dinov2": {"device": "cpu"},
    "ntt.runner.loggers.build_logger": {"name": "x", "run_dir": ".", "is_main": True},
}
# groups of conf/ whose options are selected as `group=option`; the folders of experiments/ (paper, study,
# ablation) are groups too, optional in main.yaml's defaults list and selected the same way
GROUPS = [
    "dataset",
    "backbone/sam2",
    "backbone/dinov2",
    "proposer",
    "matcher",
    "eval",
    "logger",
    "paths",
    "hydra",
    "hydra/launcher",  # SLURM via Hydra's submitit launcher: composes only with the plugin installed
    "recipe",
    "debug",
]
HAS_SUBMITIT = importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None


def _options(root: Path, group: str) -> list[str]:
    folder = root / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def _cases() -> list[tuple[str, Path]]:
    cases: list[tuple[str, Path]] = [("", CONF / "main.yaml")]
    for root in (CONF, TEST_CONFIGS):
        for group in GROUPS:
            for opt in _options(root, group):
                cases.append((f"{group}={opt}", root / group / f"{opt}.yaml"))
    for folder in sorted(p for p in EXPERIMENTS.iterdir() if p.is_dir()):
        for opt in _options(EXPERIMENTS, folder.name):
            cases.append((f"{folder.name}={opt}", folder / f"{opt}.yaml"))
    return cases


CASES = _cases()


def _compose(*extra: str) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        overrides = [SEARCHPATH, SHARED_PATH] + [o for o in extra if o]
        cfg = compose(config_name="main", overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)  # needed to resolve the hydra node (known trap)
        with read_write(cfg.hydra.runtime):  # set by Hydra at run time; the job logger's file uses it
            cfg.hydra.runtime.output_dir = str(cfg.run_dir)
        # resolving to a container touches every interpolation (the hydra node included) without
        # writing into the read-only composed config
        resolved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    return resolved


def _targets(node, path="") -> list[tuple[str, dict]]:
    found = []
    if isinstance(node, DictConfig):
        if "_target_" in node:
            found.append((path, OmegaConf.to_container(node, resolve=True)))
        for key in node:
            if key != "hydra":
                found += _targets(node[key], f"{path}.{key}" if path else str(key))
    return found


def _resolve_target(dotted: str):
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("override,yaml_file", CASES, ids=[c[0] or "main" for c in CASES])
def test_option_composes_resolves_and_binds(override, yaml_file):
    if override.startswith("hydra/launcher=") and not HAS_SUBMITIT:
        pytest.skip("hydra-submitit-launcher not installed (pip install -e '.[slurm]')")
    cfg = _compose(override)
    assert cfg.run_dir and "${" not in str(cfg.run_dir)
    assert str(cfg.hydra.run.dir) == str(cfg.run_dir)  # run dir comes from the config, not the clock
    validate_config(cfg)  # every key known and of its type (what `ntt run` checks before anything runs)
    targets = _targets(cfg)
    assert {p for p, _ in targets} >= {
        "dataset",
        "backbone.sam2",
        "backbone.dinov2",
        "proposer",
        "matcher",
        "eval",
        "logger",
    }
    for path, node in targets:
        target = node.pop("_target_")
        fn = _resolve_target(target)
        try:
            inspect.signature(fn).bind(**node, **APP_KWARGS.get(target, {}))
        except TypeError as exc:
            pytest.fail(f"{override or 'main'}: `{path}` does not bind to {target}: {exc}")


def test_run_dir_is_derived_from_factors():
    cfg = _compose("shots=5")
    prefix, config_id = cfg.run_dir.rsplit("-", 1)
    assert prefix.endswith("coco_fewshot/sam2_hiera_l+dinov2_vitl14/5shot_seed33/parity")
    assert len(config_id) == 8 and int(config_id, 16) >= 0  # hash of the other result-changing keys
    assert "now" not in OmegaConf.to_yaml(cfg.hydra.run)


def test_experiment_groups_are_selected_without_plus_and_label_the_study():
    cfg = _compose("study=coco")
    assert cfg.study_name == "coco" and "study" not in cfg  # the label key is not the group's name
    assert cfg.hydra.runtime.choices.study == "coco"
    assert _compose("").study_name == "adhoc"
    assert _compose("ablation=fixes").variant == "fixed"  # the group's delta overrides main.yaml's


def test_unknown_experiment_fails_with_the_available_options():
    with pytest.raises(MissingConfigException, match="Could not find 'study/nope'") as err:
        _compose("study=nope")
    assert "coco" in str(err.value) and "voc" in str(err.value)


def test_wandb_group_is_the_study_name():
    assert _compose("study=voc", "logger=wandb").logger.group == "voc"


def test_guard_every_yaml_on_disk_has_a_compose_case():
    """Every yaml under the config roots is the subject of one parametrised case above (no silent gaps:
    a file in a folder the case builder does not know, or a misnamed group, fails here)."""
    on_disk = {
        p.resolve()
        for root in (CONF, EXPERIMENTS, TEST_CONFIGS)
        if root.exists()
        for p in root.rglob("*.yaml")
    }
    covered = {f.resolve() for _, f in CASES}
    missing = sorted(str(p.relative_to(REPO)) for p in on_disk - covered)
    assert len(covered) > 40, f"only {len(covered)} compose cases: the case builder found too little"
    assert not missing, f"yaml files no compose case covers: {missing}"


def test_debug_smoke_alone_picks_the_synthetic_dataset_and_a_dataset_on_the_line_wins():
    assert _compose("debug=smoke").dataset.name == "synthetic"
    assert _compose("debug=smoke", "dataset=fruits_nuts").dataset.name == "fruits_nuts"
    assert _compose("dataset=fruits_nuts", "debug=smoke").dataset.name == "fruits_nuts"
    # `make smoke`'s line (dataset=synthetic debug=smoke) is the same config, run directory included
    assert _compose("dataset=synthetic", "debug=smoke").run_dir == _compose("debug=smoke").run_dir


@pytest.mark.parametrize(
    "override,message",
    [
        ("matcher.nms_thres=0.6", "matcher.nms_thres=0.6: `matcher.nms_thres` is not a config key (did you mean matcher.nms_thr?)"),
        ("foo=1", "foo=1: `foo` is not a config key; the top-level keys: shots, seed"),
        ("paper=coco_30sht", "paper=coco_30sht: `paper` has no option `coco_30sht` (did you mean paper=coco_30shot?)"),
        ("shots=[1", "shots=[1: not a valid override"),
    ],
)  # fmt: skip
def test_compose_turns_hydra_errors_into_one_line_config_errors(override, message):
    """`ntt.utils.compose.compose` (used by `ntt segment`, `Segmenter.from_config`, `ntt study`)."""
    from ntt.utils.compose import compose as ntt_compose
    from ntt.utils.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        ntt_compose([override])
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "override,message",
    [
        ("shots=abc", "shots=abc: expected a whole number"),
        ("shots=0", "shots=0: use a number of references per class >= 1"),
        ("+shot=3", "shot=3: `shot` is not a config key (did you mean shots?)"),
        ("+matcher.memory.bach_size=2", "matcher.memory.bach_size=2: `matcher.memory.bach_size` is not a config key (did you mean matcher.memory.batch_size?)"),
        ("proposer.iou_thr=high", "proposer.iou_thr=high: expected a number"),
        ("dataset.class_names=[a,1]", "dataset.class_names=[a, 1]: expected a list of strings or null"),
        ("stages=test", "stages=test: expected a list of strings"),
        ("force=maybe", "force=maybe: expected true or false"),
    ],
)  # fmt: skip
def test_validate_config_names_the_key_its_type_and_the_closest_valid_key(override, message):
    from ntt.utils.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        validate_config(_compose(override))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_the_top_level_keys_of_the_config_are_the_ones_validate_config_knows():
    """A key added to conf/main.yaml must be added to `RunSettings` or `CONFIG_NODES` (or it is refused)."""
    import dataclasses

    from ntt.utils.config import CONFIG_NODES, RunSettings

    known = {f.name for f in dataclasses.fields(RunSettings)} | set(CONFIG_NODES) | {"hydra"}
    assert set(_compose("")) == known
