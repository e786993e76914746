"""What identifies a result: the config values that can change a detection or a metric.

A run directory is ``<dataset>/<sam2>+<dinov2>/<K>shot_seed<S>/<variant>-<config_id>``: the readable
factors, then :func:`config_id`, a short hash of every other config value that can change a result, so
two different settings never share (or overwrite) a directory and ``ntt summarize`` never mixes them.

The identity is the composed config *before* interpolation (so ``${paths.data}/coco`` stays that
string and the id is the same on every machine), without the keys that only say where files live or
how the job runs (:data:`NON_RESULT_KEYS`). Any key added to the config later is part of the identity
unless it is listed there; a result key added later is left out while it has the value that reproduces the
runs of before (:data:`INERT_DEFAULTS`, :data:`INERT_UNLESS`), so their ids stay. :func:`setting_id` is the same hash without the per-run factors (dataset
location and classes, shots, seed): the runs of one study that differ only in those share it, which is
how tables group seeds and shots of one setting.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ntt.utils.config import to_plain

# top-level keys that never change a detection or a metric
NON_RESULT_KEYS = (
    "hydra",
    "paths",
    "run_name",
    "run_dir",
    "device",
    "stages",
    "force",
    "trace",
    "fail_fast",
    "logger",
    "study_name",
    "io",  # image loading workers, asynchronous writing, timing: same bytes either way (tests/test_io.py)
)
# per-run factors left out of the setting id (the dataset's own files and classes, shots, seed)
RUN_FACTORS = ("shots", "seed")
DATASET_FACTORS = (
    "name",
    "root",
    "ref_json",
    "ref_image_root",
    "test_json",
    "test_image_root",
    "class_split",
    "class_names",
    "refs_file",
)
RESOLVER = "ntt.config_id"
# Keys added after runs were recorded, with the value those runs had: while a key has it, it is left out of
# every identity, key and recorded config, so an existing run keeps its directory, stage keys and bytes.
INERT_DEFAULTS = {
    "matcher.merge": "soft",
    "matcher.score_filter": "positive",
    "matcher.output_box": "mask",
    "matcher.classes": None,
    "matcher.semantics.reference_mask_precision": "float32",
    "backbone.sam2.input_resize": "pil_bicubic",
}
# Groups read only when another key has a value (`matcher.diffusion` only under `matcher.merge=diffusion`,
# `proposer.boxes_json` only under box prompts: the NTT-to-FSOD-VFM walk gives its grid steps the key so one
# `proposer.boxes_json=` line serves every step): left out otherwise, as they cannot change a result.
INERT_UNLESS = {
    "matcher.diffusion": ("matcher.merge", "diffusion"),
    "proposer.boxes_json": ("proposer.prompts", "boxes"),
}


def drop_inert_keys(data: dict[str, Any]) -> dict[str, Any]:
    """A config dict without the keys of :data:`INERT_DEFAULTS` at their value and the groups of
    :data:`INERT_UNLESS` that are not read (copies the nodes it changes; ``data`` is left as it is).

    Args:
        data: a plain config dict (the whole config, or ``{"matcher": <node>}``).
    """
    out = dict(data)

    def value(dotted: str) -> Any:
        return _dotted(out, dotted)

    def drop(dotted: str) -> None:
        head, _, last = dotted.rpartition(".")
        parent = out
        for part in head.split(".") if head else []:
            if not isinstance(parent.get(part), dict):
                return
            parent[part] = dict(parent[part])
            parent = parent[part]
        parent.pop(last, None)

    for dotted, (key, wanted) in INERT_UNLESS.items():
        if value(key) in (wanted,) or value(dotted) is _ABSENT:
            continue
        drop(dotted)
    for dotted, default in INERT_DEFAULTS.items():
        if value(dotted) == default:
            drop(dotted)
    return out


def _dotted(tree: Any, dotted: str) -> Any:
    """The value at ``a.b.c`` of a plain dict tree, or ``_ABSENT``."""
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def inert_values(data: dict[str, Any]) -> dict[str, Any]:
    """The values the keys of :data:`INERT_UNLESS` / :data:`INERT_DEFAULTS` have in a plain config dict (those
    present): what an identity leaves out at its default, for comparing a setting with the defaults.

    Args:
        data: a plain config dict (the whole config).
    """
    found = {dotted: _dotted(data, dotted) for dotted in (*INERT_UNLESS, *INERT_DEFAULTS)}
    return {dotted: v for dotted, v in found.items() if v is not _ABSENT}


def drop_inert_matcher(matcher: Any) -> Any:
    """:func:`drop_inert_keys` of a plain ``matcher`` node (what the run's keys hash)."""
    if not isinstance(matcher, dict):
        return matcher
    return drop_inert_keys({"matcher": matcher})["matcher"]


_ABSENT = object()


def identity_keys(cfg: Any) -> dict[str, Any]:
    """The config values that identify a result (unresolved interpolations kept as written).

    Args:
        cfg: the composed config (DictConfig, with or without the ``hydra`` node) or a plain dict.
    """
    from omegaconf import DictConfig, OmegaConf

    data = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else dict(cfg)
    return drop_inert_keys({k: v for k, v in data.items() if k not in NON_RESULT_KEYS})


def _digest(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:8]


def config_id(cfg: Any) -> str:
    """8-hex hash of :func:`identity_keys` (the run directory's suffix)."""
    return _digest(identity_keys(cfg))


def setting_keys(cfg: Any) -> dict[str, Any]:
    """:func:`identity_keys` without the per-run factors (dataset files/classes, shots, seed): a setting.

    Args:
        cfg: the composed config, or its identity keys (metrics.json's ``identity``).
    """
    keys = {k: v for k, v in identity_keys(cfg).items() if k not in RUN_FACTORS}
    if isinstance(keys.get("dataset"), dict):
        keys["dataset"] = {k: v for k, v in keys["dataset"].items() if k not in DATASET_FACTORS}
    return keys


def setting_id(cfg: Any) -> str:
    """8-hex hash of :func:`setting_keys`."""
    return _digest(setting_keys(cfg))


def _resolve_config_id(*, _root_) -> str:
    return config_id(_root_)


def register_resolver() -> None:
    """Register ``${ntt.config_id:}`` (used by ``run_name`` in conf/main.yaml); idempotent."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, _resolve_config_id)


def portable_config(cfg: Any) -> dict[str, Any]:
    """The resolved config as recorded in metrics.json, the same on every machine.

    Location keys (``paths``, ``run_dir``, ``run_name``, ``hydra``) and the host's I/O tuning (``io``:
    loader workers, asynchronous writing; the same bytes either way) are left out, and resolved strings
    that start with a ``paths.*`` folder are written back as ``${paths.<key>}/...`` (so the same run in
    another output folder writes the same bytes).
    """
    from omegaconf import DictConfig, OmegaConf

    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    prefixes = sorted(
        ((str(v), k) for k, v in (data.get("paths") or {}).items() if isinstance(v, str) and v),
        key=lambda kv: -len(kv[0]),
    )

    def portable(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: portable(v) for k, v in value.items()}
        if isinstance(value, list):
            return [portable(v) for v in value]
        if isinstance(value, str):
            for prefix, key in prefixes:
                if value == prefix or value.startswith(prefix.rstrip("/") + "/"):
                    return "${paths." + key + "}" + value[len(prefix.rstrip("/")) :]
        return value

    return drop_inert_keys(
        {k: portable(v) for k, v in data.items() if k not in ("paths", "run_dir", "run_name", "hydra", "io")}
    )


def backbone_identity(node: Any, sha256: Callable[[Path], str | None], *, which: str) -> dict[str, Any]:
    """A ``backbone.<which>`` config node with its checkpoint path replaced by ``[file name, content digest]``:
    path-free, so the same weights anywhere give the same identity (random-weight backbones keep the node).
    Keys added later are left out at the value the runs before them had (:data:`INERT_DEFAULTS`).

    Args:
        node: the backbone's config node.
        sha256: the digest of a file (a run's or a segment folder's ``FileDigests`` cache).
        which: ``sam2`` or ``dinov2`` (the node's key under ``backbone``).
    """
    plain = dict(drop_inert_keys({"backbone": {which: dict(to_plain(node))}})["backbone"][which])
    if plain.get("checkpoint") and not plain.get("random_init"):
        ckpt = Path(str(plain["checkpoint"]))
        plain["checkpoint"] = [ckpt.name, sha256(ckpt)]
    return plain
