"""The bank files: what the test needs from the references (instance features + metadata, never weights).

``MemoryBank`` is the benchmark pipeline's bank (``memory.pt``: ``[C, K, D]`` instance means, K shots per
class); ``ReferenceBank`` is the practitioner's (``bank.ntt``: any number of references per class). Both are a
``torch.save`` of plain tensors and JSON metadata, loadable with ``weights_only=True``.
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

__all__ = ["MemoryBank", "ReferenceBank", "compute_prototypes"]

MEMORY_FORMAT = "ntt-memory"
MEMORY_FORMAT_VERSION = 1
BANK_FORMAT = "ntt-reference-bank"
BANK_FORMAT_VERSION = 1


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

    Args:
        instance_means: ``[C, K, D]`` float32 mask-weighted mean feature per reference.
        weight_sums: ``[C, K]`` sum of the patch-grid mask weights per reference.
        category_ids: ``C`` ascending category ids (row c = class index c).
        category_names: ``C`` names.
        shots: K.
        seed: the reference-sampling seed (``None`` for fixed reference files).
        encoder: encoder name.
        feature_dim: D.
        config_hash: hash of the config that built it.
        ntt_version: ntt version that built it.
        refs: per class, per slot ``{"image_id", "ann_id"}``.
        postprocessed: set by ``postprocess_memory``.
        stats: optional statistics (tensors), only from ``postprocess_memory(compute_stats=True)``.
        fill_settings: settings of the fill (context_ratio, mask_pooling, img_size, grid_size).
        patch_features: optional ``[C, K, N, D]`` raw patch features (``keep_patch_features=True``).
        patch_weights: optional ``[C, K, N]`` patch-grid mask weights (``keep_patch_features=True``).
    """

    instance_means: torch.Tensor
    weight_sums: torch.Tensor
    category_ids: list[int]
    category_names: list[str]
    shots: int
    seed: int | None = None
    encoder: str = ""
    feature_dim: int = 0
    config_hash: str = ""
    ntt_version: str = field(default_factory=_ntt_version)
    refs: list[list[dict]] = field(default_factory=list)
    postprocessed: bool = False
    stats: dict[str, torch.Tensor] | None = None
    fill_settings: dict = field(default_factory=dict)
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
        if self.feature_dim == 0 and self.instance_means.dim() == 3:
            self.feature_dim = int(self.instance_means.shape[-1])

    @property
    def mask_weights(self) -> torch.Tensor | None:
        """Alias of ``patch_weights`` (``[C, K, N]`` patch-grid mask weights, when kept)."""
        return self.patch_weights

    @property
    def num_classes(self) -> int:
        """C."""
        return int(self.instance_means.shape[0])

    def prototypes(self) -> torch.Tensor:
        """``[C, D]`` L2-normalised class prototypes (computed on demand from the instance means)."""
        return compute_prototypes(self.instance_means)

    def meta(self) -> dict:
        """JSON-able metadata."""
        return {
            "format": MEMORY_FORMAT,
            "format_version": MEMORY_FORMAT_VERSION,
            "category_ids": [int(c) for c in self.category_ids],
            "category_names": [str(n) for n in self.category_names],
            "shots": int(self.shots),
            "seed": None if self.seed is None else int(self.seed),
            "encoder": str(self.encoder),
            "feature_dim": int(self.feature_dim),
            "config_hash": str(self.config_hash),
            "ntt_version": str(self.ntt_version),
            "refs": self.refs,
            "postprocessed": bool(self.postprocessed),
            "fill_settings": dict(self.fill_settings),
        }

    def save(self, path: str | os.PathLike) -> None:
        """``torch.save`` plain tensors + JSON-able metadata (atomic: temp file + rename).

        Args:
            path: output file (e.g. ``<run_dir>/memory.pt``).
        """
        payload: dict[str, Any] = {
            "meta_json": json.dumps(self.meta(), sort_keys=True),
            "instance_means": self.instance_means.detach().to("cpu", torch.float32).contiguous(),
            "weight_sums": self.weight_sums.detach().to("cpu", torch.float32).contiguous(),
        }
        if self.stats is not None:
            payload["stats"] = {k: v.detach().cpu().contiguous() for k, v in self.stats.items()}
        if self.patch_features is not None:
            payload["patch_features"] = self.patch_features.detach().cpu().contiguous()
        if self.patch_weights is not None:
            payload["patch_weights"] = self.patch_weights.detach().cpu().contiguous()
        # torch.save names the zip's root folder after the file it writes to; serialising to memory
        # first gives the same bytes whatever the (temp) file name, so equal banks are equal files.
        buf = io.BytesIO()
        torch.save(payload, buf)
        write_bytes_atomic(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike, *, expect: Mapping[str, Any] | None = None) -> MemoryBank:
        """Load a bank saved by ``save`` (``torch.load(weights_only=True)``) and check it against the run.

        Args:
            path: the memory file.
            expect: ``{field: value}`` this run expects (any of ``MemoryBank.CHECKABLE``); every mismatch
                is named in one error.

        Raises:
            FileNotFoundError: no such file.
            ValueError: not an ntt memory file, or metadata mismatches.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"memory file not found: {path} (run stage fill_memory first)")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"cannot read memory file {path}: {err}") from err
        if not isinstance(payload, dict) or "meta_json" not in payload:
            raise ValueError(
                f"{path} is not an ntt memory file (no metadata): delete it or rerun fill_memory"
            )
        meta = json.loads(payload["meta_json"])
        if meta.get("format") != MEMORY_FORMAT:
            raise ValueError(f"{path}: unknown memory format {meta.get('format')!r}")
        bank = cls(
            instance_means=payload["instance_means"],
            weight_sums=payload["weight_sums"],
            category_ids=[int(c) for c in meta["category_ids"]],
            category_names=list(meta["category_names"]),
            shots=int(meta["shots"]),
            seed=meta.get("seed"),
            encoder=meta.get("encoder", ""),
            feature_dim=int(meta.get("feature_dim", 0)),
            config_hash=meta.get("config_hash", ""),
            ntt_version=meta.get("ntt_version", "unknown"),
            refs=meta.get("refs", []),
            postprocessed=bool(meta.get("postprocessed", False)),
            stats=payload.get("stats"),
            fill_settings=meta.get("fill_settings", {}),
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


def _normalise(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_normalise(x) for x in v]
    if isinstance(v, Mapping):
        return {str(k): _normalise(x) for k, x in v.items()}
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


@dataclass
class ReferenceBank:
    """Per-class reference features with any number of references per class (a small file, no weights).

    Row c is class ``names[c]``; its real references are ``instance_means[c, :counts[c]]``; the rest of the
    row is zero padding that no computation reads.

    Args:
        names: C class names, ordered by category id.
        category_ids: C ascending category ids.
        instance_means: ``[C, Kmax, D]`` float32 mask-weighted mean feature per reference.
        weight_sums: ``[C, Kmax]`` patch-grid mask weight sums.
        counts: ``[C]`` int64 number of references of each class.
        encoder: DINOv2 config name the features come from.
        fill_settings: context_ratio, mask_pooling, img_size, grid_size.
        references: per class, per reference: provenance (source, prompt kind, COCO box).
        config: the segmenter's ``backbone`` / ``proposer`` / ``matcher`` config nodes (unresolved).
    """

    names: list[str]
    category_ids: list[int]
    instance_means: torch.Tensor
    weight_sums: torch.Tensor
    counts: torch.Tensor
    encoder: str
    fill_settings: dict
    references: list[list[dict]]
    config: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        """C."""
        return len(self.names)

    def prototypes(self) -> torch.Tensor:
        """``[C, D]`` L2-normalised class prototypes: the mean over each class's own references only."""
        rows = [
            compute_prototypes(self.instance_means[c : c + 1, : int(self.counts[c])])
            for c in range(self.num_classes)
        ]
        return torch.cat(rows)

    def meta(self) -> dict:
        """JSON-able metadata."""
        return {
            "format": BANK_FORMAT,
            "format_version": BANK_FORMAT_VERSION,
            "names": list(self.names),
            "category_ids": [int(c) for c in self.category_ids],
            "encoder": self.encoder,
            "fill_settings": dict(self.fill_settings),
            "references": self.references,
            "config": self.config,
            "ntt_version": _ntt_version(),
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the bank (``torch.save`` of plain tensors + JSON metadata; atomic). Returns the path."""
        payload = {
            "meta_json": json.dumps(self.meta(), sort_keys=True),
            "instance_means": self.instance_means.detach().to("cpu", torch.float32).contiguous(),
            "weight_sums": self.weight_sums.detach().to("cpu", torch.float32).contiguous(),
            "counts": self.counts.detach().to("cpu", torch.int64).contiguous(),
        }
        path = Path(path)
        buf = io.BytesIO()  # bytes independent of the file name (see MemoryBank.save)
        torch.save(payload, buf)
        write_bytes_atomic(path, buf.getvalue())  # with the umask's mode (mkstemp's 0600 would hide it)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ReferenceBank:
        """Read a bank written by :meth:`save` (``weights_only=True``: no code is unpickled).

        Raises:
            FileNotFoundError: no such file. ValueError: not an ntt reference bank.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"reference bank not found: {path}")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            meta = json.loads(payload["meta_json"])
        except Exception as err:
            raise ValueError(f"{path} is not an ntt reference bank (Segmenter.save): {err}") from err
        if meta.get("format") != BANK_FORMAT:
            hint = (
                " (that is a benchmark memory bank: use Segmenter.from_memory_bank)"
                if "shots" in meta
                else ""
            )
            raise ValueError(f"{path} is not an ntt reference bank (format {meta.get('format')!r}){hint}")
        if int(meta.get("format_version", 0)) > BANK_FORMAT_VERSION:
            raise ValueError(
                f"{path}: bank format {meta['format_version']} is newer than this ntt; upgrade ntt"
            )
        return cls(
            names=list(meta["names"]),
            category_ids=[int(c) for c in meta["category_ids"]],
            instance_means=payload["instance_means"],
            weight_sums=payload["weight_sums"],
            counts=payload["counts"],
            encoder=str(meta["encoder"]),
            fill_settings=dict(meta["fill_settings"]),
            references=meta["references"],
            config=meta.get("config", {}),
        )
