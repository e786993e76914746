"""The segmenter's config: composed from option names, rebuilt from a saved bank, and the inference
parameters it gives (``ntt.app.segmenter.Segmenter``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from ntt.inference import InferenceParams

__all__ = ["check_segmenter_params", "compose_config", "params_from_config", "saved_config"]


def compose_config(
    *,
    sam2: str | None = None,
    dinov2: str | None = None,
    proposer: str | None = None,
    matcher: str | None = None,
    overrides: Sequence[str] = (),
):
    """Compose ``conf/main.yaml`` with Hydra's compose API (the same groups as ``ntt run``).

    Args:
        sam2: option of ``conf/backbone/sam2`` (e.g. ``sam2.1_hiera_t``, ``tiny_random``).
        dinov2: option of ``conf/backbone/dinov2`` (e.g. ``vits14``; ``dinov2_vits14`` is accepted).
        proposer: option of ``conf/proposer`` (``paper``, ``grid16``, ``cpu_fast``).
        matcher: option of ``conf/matcher`` (``paper``, ``fixed``).
        overrides: further Hydra overrides (``matcher.nms_thr=0.6``, ``paths.checkpoints=/models``, ...).

    Returns:
        The composed ``DictConfig``.
    """
    from ntt.utils.compose import compose

    opts = []
    if sam2:
        opts.append(f"backbone/sam2={sam2}")
    if dinov2:
        name = dinov2[len("dinov2_") :] if dinov2.startswith("dinov2_") else dinov2
        opts.append(f"backbone/dinov2={name}")
    if proposer:
        opts.append(f"proposer={proposer}")
    if matcher:
        opts.append(f"matcher={matcher}")
    return compose([*opts, *overrides])


def params_from_config(cfg) -> InferenceParams:
    """The inference parameters of a config's ``proposer`` and ``matcher`` nodes (every predict knob).

    Raises:
        ConfigError: one line naming a setting the segmenter cannot honour (:func:`check_segmenter_params`).
    """
    from ntt.utils.config import MatcherConfig, ProposerConfig, build_node
    from ntt.utils.errors import ConfigError

    prop = build_node(cfg.proposer, ProposerConfig)
    if prop.prompts != "grid":  # boxes come per test image of a dataset: `ntt run` (method.md §5.11)
        raise ConfigError(
            f"proposer.prompts={prop.prompts}: the segmenter proposes with the point grid; box-prompt "
            "proposals (proposer=boxes, recipe=fsod_vfm) run with `ntt run`"
        )
    mat = build_node(cfg.matcher, MatcherConfig)
    if not mat.semantics.is_default:  # whole images, grid masks: wired into `ntt run` only (method.md §5.13)
        differ = ", ".join(f"{k}={v}" for k, v in _non_ntt_semantics(mat.semantics).items())
        raise ConfigError(
            "matcher.semantics: the segmenter encodes and scores as NTT; FSOD-VFM's semantic side "
            f"(matcher=fsod_vfm, recipe=fsod_vfm; here {differ}) runs with `ntt run`"
        )
    if mat.output_box != "mask":  # a prompt box exists only with proposer=boxes (method.md §5.14)
        raise ConfigError(
            f"matcher.output_box={mat.output_box}: the segmenter's boxes are its masks' extents; prompt boxes "
            "(proposer=boxes, recipe=fsod_vfm) run with `ntt run`"
        )
    if mat.classes is not None:  # one way per path: the segmenter's subset is per call
        raise ConfigError(
            f"matcher.classes={list(mat.classes)}: the segmenter takes the classes per call: "
            "predict(..., classes=[...]) or `ntt segment --classes a,b`"
        )
    return InferenceParams.from_settings(prop, mat)


def _non_ntt_semantics(semantics) -> dict:
    """The keys of a ``matcher.semantics`` node (or of InferenceParams' semantic fields) not at NTT's value."""
    from ntt.utils.config import SemanticsConfig

    ntt = SemanticsConfig()
    names = [f.name for f in dataclasses.fields(SemanticsConfig)]
    return {
        k: getattr(semantics, k)
        for k in names
        if hasattr(semantics, k) and getattr(semantics, k) != getattr(ntt, k)
    }


def check_segmenter_params(params: InferenceParams, where: str = "predict") -> InferenceParams:
    """Refuse the settings the segmenter cannot honour, in one line naming the first (method.md §5.11, §5.13).

    The segmenter proposes with the point grid (box prompts come per image of a dataset: ``ntt run``) and
    encodes and scores as NTT (FSOD-VFM's whole-image / long-side encoding lives in the run's image loading
    and memory stage). Everything after the scores (NMS, ``score_filter``, ``merge`` incl. ``diffusion``) is
    the run's own code (``ntt.inference.infer_image``) and is honoured.

    Args:
        params: the settings of a predict call (or of the segmenter).
        where: names the caller in the message (``predict``).

    Raises:
        ConfigError: ``predict(prompts=boxes): ...`` / ``predict(encoder_input=long_side): ...``.
    """
    from ntt.utils.errors import ConfigError

    if params.prompts != "grid":
        raise ConfigError(
            f"{where}(prompts={params.prompts}): the segmenter proposes with the point grid; box-prompt "
            "proposals (proposer=boxes, recipe=fsod_vfm) run with `ntt run`"
        )
    for key, value in _non_ntt_semantics(params).items():
        raise ConfigError(
            f"{where}({key}={value}): the segmenter encodes and scores as NTT; FSOD-VFM's semantic side "
            "(matcher=fsod_vfm, recipe=fsod_vfm) runs with `ntt run`"
        )
    return params


def saved_config(saved_nodes: dict, overrides: Sequence[str]):
    """The config a saved bank was built with: its nodes over the defaults, then the caller's ``overrides``.

    Each node comes from the bank unless the caller chose another option of its group
    (``proposer=cpu_fast``); the caller's ``key=value`` overrides apply on top of the bank's nodes too.

    Args:
        saved_nodes: the bank's ``config`` (``backbone`` / ``proposer`` / ``matcher`` nodes, unresolved).
        overrides: Hydra overrides, as on the ``ntt segment`` line.
    """
    from omegaconf import OmegaConf

    cfg = compose_config(overrides=overrides)
    saved = OmegaConf.create(saved_nodes)
    keys = [ov.split("=", 1)[0].lstrip("+~") for ov in overrides]
    dotted = []
    for group, node in (("backbone/sam2", "backbone.sam2"), ("backbone/dinov2", "backbone.dinov2"),
                        ("proposer", "proposer"), ("matcher", "matcher")):  # fmt: skip
        value = OmegaConf.select(saved, node)
        if group in keys or value is None:
            continue
        OmegaConf.update(cfg, node, value, merge=False)
        dotted += [ov.lstrip("+") for ov, k in zip(overrides, keys) if k.startswith(node + ".")]
    if dotted:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(dotted))
    return cfg
