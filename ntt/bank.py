"""The memory bank: what the test needs from the references (instance features + metadata, never weights).

One class for both paths: the benchmark pipeline's ``memory.pt`` / ``memory_postprocessed.pt`` (K shots per
class) and the practitioner's ``bank.ntt`` (``Segmenter.save``: any number of references per class). The
file is a ``torch.save`` of plain tensors and JSON metadata, loadable with ``weights_only=True``.

Format ``ntt-memory``: version 2 adds ragged classes (``counts``) and the segmenter's config nodes
(``config``); version 3 adds each practitioner reference's source to ``refs`` (image sha256, prompt kind and
geometry or mask sha256: ``Segmenter.add_reference``). A bank is written with the lowest version that holds
it: one that uses none of these is version 1, byte for byte what version-1 writers wrote (run directories
record the sha256 of their memory files). ``load`` reads every version, and the practitioner's former
format, ``ntt-reference-bank`` version 1. Edits (class subsets, removing, renaming, merging) are in
``ntt.bank_edit`` (whose ``describe`` lists a bank's classes and each reference's source).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ntt.utils.files import write_bytes_atomic

__all__ = ["MemoryBank", "compute_prototypes"]

MEMORY_FORMAT = "ntt-memory"
MEMORY_FORMAT_VERSION = 3
REFERENCE_BANK_FORMAT = "ntt-reference-bank"  # the practitioner's format before version 2 (read only)


def _ntt_version() -> str:
    from ntt import __version__

    return str(__version__)


def compute_prototypes(instance_means: torch.Tensor) -> torch.Tensor:
    """Class prototypes: L2-normalised plain mean over shots of the instance means (method.md §4).

    Args:
        instance_means: ``[C, K, D]``.

    Returns:
        ``[C, D]`` unit vectors.
    """
    return F.normalize(instance_means.mean(dim=1), p=2, dim=-1)


@dataclass
class MemoryBank:
    """Everything the test stage needs from the references (megabytes, never model weights).

    Row c is class ``category_names[c]``; its references are ``instance_means[c, :counts[c]]``, the rest of
    the row is zero padding that no computation reads. A benchmark bank has ``shots`` references in every
    class; a practitioner's bank any number.

    Args:
        instance_means: ``[C, K, D]`` float32 mask-weighted mean feature per reference (K: the most
            references of any class).
        weight_sums: ``[C, K]`` sum of the patch-grid mask weights per reference.
        category_ids: ``C`` ascending category ids (row c = class index c).
        category_names: ``C`` names.
        shots: K of a benchmark bank (every class has K references); None for a practitioner's bank.
        counts: ``[C]`` int64 number of references of each class (default: K for every class).
        seed: the reference-sampling seed (``None`` for fixed reference files and practitioner banks).
        encoder: encoder name.
        feature_dim: D.
        config_hash: hash of the config that built it.
        ntt_version: ntt version that built it.
        refs: per class, per reference: its provenance (benchmark: ``{"image_id", "ann_id"}``;
            practitioner: ``{"source", "prompt", "bbox", "image_sha256"}`` plus the prompt's ``"box"``,
            ``"points"`` + ``"point_labels"`` or ``"mask_sha256"``, and ``"category_id"`` when one was given).
        postprocessed: set by ``postprocess_memory``.
        fill_settings: settings of the fill (context_ratio, mask_pooling, img_size, grid_size).
        config: the segmenter's ``backbone`` / ``proposer`` / ``matcher`` config nodes, unresolved
            (``Segmenter.save``; empty for a benchmark bank, whose run directory holds the config).
        patch_features: optional ``[C, K, N, D]`` raw patch features (``keep_patch_features=True``).
        patch_weights: optional ``[C, K, N]`` patch-grid mask weights (``keep_patch_features=True``).
    """

    instance_means: torch.Tensor
    weight_sums: torch.Tensor
    category_ids: list[int]
    category_names: list[str]
    shots: int | None = None
    counts: torch.Tensor | None = None
    seed: int | None = None
    encoder: str = ""
    feature_dim: int = 0
    config_hash: str = ""
    ntt_version: str = field(default_factory=_ntt_version)
    refs: list[list[dict]] = field(default_factory=list)
    postprocessed: bool = False
    fill_settings: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    patch_features: torch.Tensor | None = None
    patch_weights: torch.Tensor | None = None

    # meta fields that ``load(expect=...)`` can check
    CHECKABLE = (
        "category_ids",
        "category_names",
        "shots",
        "seed",
        "encoder",
        "feature_dim",
        "config_hash",
        "ntt_version",
        "postprocessed",
        "fill_settings",
    )

    def __post_init__(self):
        n_classes, width = (int(s) for s in self.instance_means.shape[:2])
        if self.feature_dim == 0 and self.instance_means.dim() == 3:
            self.feature_dim = int(self.instance_means.shape[-1])
        if self.counts is None:
            self.counts = torch.full((n_classes,), width, dtype=torch.int64)
        self.counts = torch.as_tensor(self.counts, dtype=torch.int64)
        if self.counts.shape != (n_classes,) or bool((self.counts > width).any()):
            raise ValueError(
                f"MemoryBank: counts {self.counts.tolist()} do not fit instance_means [{n_classes}, {width}, D]"
            )
        if self.shots is not None and bool((self.counts != self.shots).any()):
            raise ValueError(
                f"MemoryBank: shots={self.shots} but the classes have {self.counts.tolist()} references"
            )

    @property
    def ragged(self) -> bool:
        """Whether some class has fewer references than the widest one (its row is padded)."""
        return bool((self.counts != self.instance_means.shape[1]).any())

    @property
    def mask_weights(self) -> torch.Tensor | None:
        """Alias of ``patch_weights`` (``[C, K, N]`` patch-grid mask weights, when kept)."""
        return self.patch_weights

    def prototypes(self) -> torch.Tensor:
        """``[C, D]`` L2-normalised class prototypes: per class the mean of its own references only.

        A bank of FSOD-VFM's whole-image references (method.md §3.4) leaves out the references whose mask
        was empty on the grid (weight sum 0) and uses FSOD-VFM's arithmetic (``class_prototypes``).
        """
        if (self.fill_settings.get("semantics") or {}).get("references") == "whole_image":
            from ntt.gridmatching import class_prototypes

            rows = self.instance_means
            return class_prototypes(
                [rows[c, :n][self.weight_sums[c, :n] > 0] for c, n in enumerate(self.counts.tolist())]
            ).contiguous()
        if not self.ragged:
            return compute_prototypes(self.instance_means)
        rows = [
            compute_prototypes(self.instance_means[c : c + 1, :n]) for c, n in enumerate(self.counts.tolist())
        ]
        return torch.cat(rows)

    @property
    def records_sources(self) -> bool:
        """Whether the references record their sources (image sha256, prompt geometry): format version 3."""
        return any("image_sha256" in ref for refs in self.refs for ref in refs)

    def format_version(self) -> int:
        """The lowest ``ntt-memory`` version that holds this bank (1: the bytes of version-1 writers)."""
        if self.records_sources:
            return 3
        return 2 if self.ragged or self.config else 1

    def meta(self) -> dict:
        """JSON-able metadata (``format_version``: :meth:`format_version`)."""
        meta = {
            "format": MEMORY_FORMAT,
            "format_version": self.format_version(),
            "category_ids": [int(c) for c in self.category_ids],
            "category_names": [str(n) for n in self.category_names],
            "shots": None if self.shots is None else int(self.shots),
            "seed": None if self.seed is None else int(self.seed),
            "encoder": str(self.encoder),
            "feature_dim": int(self.feature_dim),
            "config_hash": str(self.config_hash),
            "ntt_version": str(self.ntt_version),
            "refs": self.refs,
            "postprocessed": bool(self.postprocessed),
            "fill_settings": dict(self.fill_settings),
        }
        if self.config:
            meta["config"] = self.config
        return meta

    def save(self, path: str | os.PathLike) -> Path:
        """``torch.save`` plain tensors + JSON-able metadata (atomic: temp file + rename). Returns the path.

        Args:
            path: output file (``<run_dir>/memory.pt``, ``bank.ntt``).
        """
        payload: dict[str, Any] = {
            "meta_json": json.dumps(self.meta(), sort_keys=True),
            "instance_means": self.instance_means.detach().to("cpu", torch.float32).contiguous(),
            "weight_sums": self.weight_sums.detach().to("cpu", torch.float32).contiguous(),
        }
        if self.ragged:  # a uniform bank leaves it out: its bytes stay those of format version 1
            payload["counts"] = self.counts.detach().cpu().contiguous()
        if self.patch_features is not None:
            payload["patch_features"] = self.patch_features.detach().cpu().contiguous()
        if self.patch_weights is not None:
            payload["patch_weights"] = self.patch_weights.detach().cpu().contiguous()
        # torch.save names the zip's root folder after the file it writes to; serialising to memory
        # first gives the same bytes whatever the (temp) file name, so equal banks are equal files.
        buf = io.BytesIO()
        torch.save(payload, buf)
        path = Path(path)
        write_bytes_atomic(path, buf.getvalue())  # with the umask's mode (mkstemp's 0600 would hide it)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, expect: Mapping[str, Any] | None = None) -> MemoryBank:
        """Load a bank saved by ``save`` (``torch.load(weights_only=True)``) and check it against the run.

        Reads format ``ntt-memory`` up to version 3 and the former ``ntt-reference-bank`` version 1.

        Args:
            path: the bank file.
            expect: ``{field: value}`` this run expects (any of ``MemoryBank.CHECKABLE``); every mismatch
                is named in one error.

        Raises:
            FileNotFoundError: no such file.
            ValueError: not an ntt memory bank, a newer format, or metadata mismatches.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"memory bank not found: {path} (run stage fill_memory first, or build and save one with "
                "Segmenter)"
            )
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"cannot read memory file {path}: {err}") from err
        if not isinstance(payload, dict) or "meta_json" not in payload:
            raise ValueError(
                f"{path} is not an ntt memory file (no metadata): delete it or rerun fill_memory"
            )
        meta = json.loads(payload["meta_json"])
        fmt, version = meta.get("format"), int(meta.get("format_version", 1))
        if fmt == REFERENCE_BANK_FORMAT and version == 1:
            bank = _from_reference_bank_v1(meta, payload)
        elif fmt != MEMORY_FORMAT:
            raise ValueError(f"{path}: unknown memory format {fmt!r}")
        elif version > MEMORY_FORMAT_VERSION:
            raise ValueError(f"{path}: memory format version {version} is newer than this ntt; upgrade ntt")
        else:
            bank = cls(
                instance_means=payload["instance_means"],
                weight_sums=payload["weight_sums"],
                category_ids=[int(c) for c in meta["category_ids"]],
                category_names=list(meta["category_names"]),
                shots=None if meta.get("shots") is None else int(meta["shots"]),
                counts=payload.get("counts"),
                seed=meta.get("seed"),
                encoder=meta.get("encoder", ""),
                feature_dim=int(meta.get("feature_dim", 0)),
                config_hash=meta.get("config_hash", ""),
                ntt_version=meta.get("ntt_version", "unknown"),
                refs=meta.get("refs", []),
                postprocessed=bool(meta.get("postprocessed", False)),
                fill_settings=meta.get("fill_settings", {}),
                config=meta.get("config", {}),
                patch_features=payload.get("patch_features"),
                patch_weights=payload.get("patch_weights"),
            )
        if expect:
            bank.check(expect, source=str(path))
        return bank

    def check(self, expect: Mapping[str, Any], *, source: str = "memory bank") -> None:
        """Raise if any expected field differs, naming every mismatch.

        Args:
            expect: ``{field: value}``.
            source: how to name the bank in the message (its file).
        """
        problems = []
        for key, want in expect.items():
            if key not in self.CHECKABLE:
                raise ValueError(f"MemoryBank.check: unknown field {key!r} (checkable: {self.CHECKABLE})")
            got = getattr(self, key)
            if _normalise(got) != _normalise(want):
                problems.append(f"{key}={got!r}, but this run has {key}={want!r}")
        if problems:
            name = Path(source).name if source != "memory bank" else source
            raise ValueError(
                f"{name} does not match this run: it was built with "
                + "; ".join(problems)
                + f". Delete {source} or rerun stage fill_memory."
            )


# matcher.memory keys of the configs saved in ntt-reference-bank v1 files that ntt no longer has (the
# unread statistics of postprocess_memory)
_REMOVED_MEMORY_KEYS = ("compute_stats", "kmeans_k", "n_pca")


def _from_reference_bank_v1(meta: dict, payload: dict) -> MemoryBank:
    """A bank from the former practitioner format (``ntt-reference-bank`` v1: names, references, counts)."""
    config = meta.get("config", {})
    memory = config.get("matcher", {}).get("memory")
    if isinstance(memory, dict):
        for key in _REMOVED_MEMORY_KEYS:
            memory.pop(key, None)
    return MemoryBank(
        instance_means=payload["instance_means"],
        weight_sums=payload["weight_sums"],
        category_ids=[int(c) for c in meta["category_ids"]],
        category_names=list(meta["names"]),
        counts=payload["counts"],
        encoder=str(meta["encoder"]),
        ntt_version=meta.get("ntt_version", "unknown"),
        refs=meta["references"],
        fill_settings=dict(meta["fill_settings"]),
        config=config,
    )


def _normalise(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_normalise(x) for x in v]
    if isinstance(v, Mapping):
        return {str(k): _normalise(x) for k, x in v.items()}
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v
