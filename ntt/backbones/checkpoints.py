"""Official checkpoint registry, checkpoint resolution with a clear error, and strict state-dict loading.

Registry names are the ``name:`` fields of ``conf/backbone/{sam2,dinov2}/*.yaml``; ``ntt download <name>``
(:mod:`ntt.backbones.download`) fetches the files.

sha256 values: only hashes found in a public source are recorded (the source is noted next to each);
an unknown hash is ``None``. For those the downloader computes the hash, writes it next to the file
(``<file>.sha256``) and logs a warning that it could not verify the download.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ntt.utils.errors import UserError

ENV_CHECKPOINT_DIR = "NTT_CHECKPOINTS"


# ----------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file exists but cannot be used (wrong format, keys or shapes do not match)."""


class MissingCheckpointError(UserError, FileNotFoundError):
    """A checkpoint file is not where the config says it is."""


# ----------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointInfo:
    """One official weight file.

    Attributes:
        name: registry name (the ``name:`` of the backbone yaml; ``ntt download <name>``).
        family: ``"sam2"`` or ``"dinov2"``.
        url: official download URL.
        filename: file name on disk (the last URL component).
        sha256: expected sha256 of the file, or None when no source for it was found.
        description: one line for ``ntt download --list``.
    """

    name: str
    family: str
    url: str
    filename: str
    sha256: str | None
    description: str = ""


_SAM2_0 = "https://dl.fbaipublicfiles.com/segment_anything_2/072824"
_SAM2_1 = "https://dl.fbaipublicfiles.com/segment_anything_2/092824"
_DINOV2 = "https://dl.fbaipublicfiles.com/dinov2"

# sha256 sources (public code that pins the official files by hash):
#  [micro-sam] computational-cell-analytics/micro-sam, micro_sam/v2/util.py `HASHES` (all eight SAM2.0 and
#      SAM2.1 files next to their dl.fbaipublicfiles.com URLs; later revisions keep only the SAM2.1 ones).
#      Independently repeated in other projects: SAM2.1 large (898,083,611 bytes) and tiny (156,008,466
#      bytes) in several, SAM2.0 large with its official URL in several, SAM2.0 base_plus in the
#      SlicerSegmentWithSAM extension (`downloadFileIntoCache(..., "SHA256:d0bb7f...")`).
#  [dinov2-l] RoMa-based projects pinning `dinov2_vitl14_pretrain.pth` (torch hub cache of the official URL),
#      two independent projects.
#  [dinov2-s,b] jepa-wms based projects pinning `dinov2_vits14_pretrain.pth` / `dinov2_vitb14_pretrain.pth`
#      (DINO_HASHES next to the official hub code at commit 7764ea0).
#  [dinov2-g] a MapAnything weight lock pinning `dinov2_vitg14_pretrain.pth` (one source).
#  [dinov2-s-reg4] a WOFTSAM adapter pinning `dinov2_vits14_reg4_pretrain.pth` (one source).
# If a recorded hash ever disagrees with the official file, `ntt download --no-verify <name>` downloads
# without checking (and logs the computed hash).
_SAM2_FILES = [
    # name, url base, file, sha256
    (
        "sam2_hiera_t",
        _SAM2_0,
        "sam2_hiera_tiny.pt",
        "65b50056e05bcb13694174f51bb6da89c894b57b75ccdf0ba6352c597c5d1125",
    ),  # [micro-sam]
    (
        "sam2_hiera_s",
        _SAM2_0,
        "sam2_hiera_small.pt",
        "95949964d4e548409021d47b22712d5f1abf2564cc0c3c765ba599a24ac7dce3",
    ),  # [micro-sam]
    (
        "sam2_hiera_bplus",
        _SAM2_0,
        "sam2_hiera_base_plus.pt",
        "d0bb7f236400a49669ffdd1be617959a8b1d1065081789d7bbff88eded3a8071",
    ),  # [micro-sam], SlicerSegmentWithSAM
    (
        "sam2_hiera_l",
        _SAM2_0,
        "sam2_hiera_large.pt",
        "7442e4e9b732a508f80e141e7c2913437a3610ee0c77381a66658c3a445df87b",
    ),  # [micro-sam] + several
    (
        "sam2.1_hiera_t",
        _SAM2_1,
        "sam2.1_hiera_tiny.pt",
        "7402e0d864fa82708a20fbd15bc84245c2f26dff0eb43a4b5b93452deb34be69",
    ),  # [micro-sam] + several
    (
        "sam2.1_hiera_s",
        _SAM2_1,
        "sam2.1_hiera_small.pt",
        "6d1aa6f30de5c92224f8172114de081d104bbd23dd9dc5c58996f0cad5dc4d38",
    ),  # [micro-sam] + several
    (
        "sam2.1_hiera_bplus",
        _SAM2_1,
        "sam2.1_hiera_base_plus.pt",
        "a2345aede8715ab1d5d31b4a509fb160c5a4af1970f199d9054ccfb746c004c5",
    ),  # [micro-sam] + DAM4SAM config
    (
        "sam2.1_hiera_l",
        _SAM2_1,
        "sam2.1_hiera_large.pt",
        "2647878d5dfa5098f2f8649825738a9345572bae2d4350a2468587ece47dd318",
    ),  # [micro-sam] + several
]

_SAM2_DESCRIPTIONS = {
    "sam2_hiera_t": "SAM2.0 Hiera-T (July 2024)",
    "sam2_hiera_s": "SAM2.0 Hiera-S (July 2024)",
    "sam2_hiera_bplus": "SAM2.0 Hiera-B+ (July 2024)",
    "sam2_hiera_l": "SAM2.0 Hiera-L (July 2024; paper default)",
    "sam2.1_hiera_t": "SAM2.1 Hiera-T (Sept 2024)",
    "sam2.1_hiera_s": "SAM2.1 Hiera-S (Sept 2024)",
    "sam2.1_hiera_bplus": "SAM2.1 Hiera-B+ (Sept 2024)",
    "sam2.1_hiera_l": "SAM2.1 Hiera-L (Sept 2024)",
}

_DINOV2_FILES = [
    # name, arch dir, file, sha256, description
    (
        "dinov2_vits14",
        "dinov2_vits14",
        "dinov2_vits14_pretrain.pth",
        "b938bf1bc15cd2ec0feacfe3a1bb553fe8ea9ca46a7e1d8d00217f29aef60cd9",  # [dinov2-s,b]
        "DINOv2 ViT-S/14 (21 M)",
    ),
    (
        "dinov2_vitb14",
        "dinov2_vitb14",
        "dinov2_vitb14_pretrain.pth",
        "0b8b82f85de91b424aded121c7e1dcc2b7bc6d0adeea651bf73a13307fad8c73",  # [dinov2-s,b]
        "DINOv2 ViT-B/14 (86 M)",
    ),
    (
        "dinov2_vitl14",
        "dinov2_vitl14",
        "dinov2_vitl14_pretrain.pth",
        "d5383ea8f4877b2472eb973e0fd72d557c7da5d3611bd527ceeb1d7162cbf428",  # [dinov2-l]
        "DINOv2 ViT-L/14 (304 M; paper default)",
    ),
    (
        "dinov2_vitg14",
        "dinov2_vitg14",
        "dinov2_vitg14_pretrain.pth",
        "baf8467e50af277596bbbafa06887c177ee899ab46033649c383577d7e9309d3",  # [dinov2-g]
        "DINOv2 ViT-g/14 (1.1 B, SwiGLU FFN)",
    ),
    (
        "dinov2_vits14_reg4",
        "dinov2_vits14",
        "dinov2_vits14_reg4_pretrain.pth",
        "f433177089a681826f849f194ece3bb48f4d63fb38d32fc837e3dc7a4e5641fb",  # [dinov2-s-reg4]
        "DINOv2 ViT-S/14 with 4 register tokens",
    ),
    (
        "dinov2_vitb14_reg4",
        "dinov2_vitb14",
        "dinov2_vitb14_reg4_pretrain.pth",
        None,
        "DINOv2 ViT-B/14 + 4 registers",
    ),
    (
        "dinov2_vitl14_reg4",
        "dinov2_vitl14",
        "dinov2_vitl14_reg4_pretrain.pth",
        None,
        "DINOv2 ViT-L/14 + 4 registers",
    ),
    (
        "dinov2_vitg14_reg4",
        "dinov2_vitg14",
        "dinov2_vitg14_reg4_pretrain.pth",
        None,
        "DINOv2 ViT-g/14 + 4 registers",
    ),
]


# SAM v1 ViT-H: the model the authors made VOC / CD-FSOD pseudo masks with (`ntt prepare`, docs/method.md
# §1.5). sha256 pinned next to the official URL in several public projects (micro-sam `_CHECKSUMS`,
# SlicerSegmentWithSAM); 2,564,550,879 bytes.
_SAM1_FILES = [
    (
        "sam_vit_h",
        "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
        "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
        "SAM v1 ViT-H (box -> mask for VOC / CD-FSOD, `ntt prepare`)",
    ),
]


def _build_registry() -> dict[str, CheckpointInfo]:
    reg: dict[str, CheckpointInfo] = {}
    for name, url, sha, desc in _SAM1_FILES:
        reg[name] = CheckpointInfo(name, "sam", url, url.rsplit("/", 1)[-1], sha, desc)
    for name, base, fname, sha in _SAM2_FILES:
        reg[name] = CheckpointInfo(name, "sam2", f"{base}/{fname}", fname, sha, _SAM2_DESCRIPTIONS[name])
    for name, arch_dir, fname, sha, desc in _DINOV2_FILES:
        reg[name] = CheckpointInfo(name, "dinov2", f"{_DINOV2}/{arch_dir}/{fname}", fname, sha, desc)
    return reg


OFFICIAL_CHECKPOINTS: dict[str, CheckpointInfo] = _build_registry()
"""Every official SAM2.0/2.1 (t/s/b+/l) and DINOv2 (s/b/l/g, with and without 4 registers) file, and SAM v1 ViT-H."""


def default_checkpoint_dir() -> Path:
    """The checkpoint directory: ``$NTT_CHECKPOINTS`` or ``./checkpoints``."""
    return Path(os.environ.get(ENV_CHECKPOINT_DIR) or "checkpoints")


def fetch_command(name: str | None, directory: Path | None = None) -> str:
    """The command that fetches the registry file ``name`` (for error messages)."""
    if name in OFFICIAL_CHECKPOINTS:
        cmd = f"ntt download {name}"
        if directory is not None and directory.resolve() != default_checkpoint_dir().resolve():
            cmd += f" --dir {directory}"
        return f"`{cmd}` (or `make checkpoints` for the default set)"
    return ""


# ----------------------------------------------------------------------------------------------------
# Resolution and strict loading
# ----------------------------------------------------------------------------------------------------


def resolve_checkpoint(path: str | os.PathLike[str] | None, *, name: str) -> Path:
    """Return ``path`` as a Path if the file exists, else raise :class:`MissingCheckpointError`.

    Args:
        path: the checkpoint file the config names.
        name: the backbone's registry name (``ntt download <name>`` fetches official files).

    Raises:
        MissingCheckpointError: naming the file, the absolute path looked at, and how to fetch it.
    """
    if path is None or str(path) == "":
        raise MissingCheckpointError(
            f"No checkpoint given for backbone '{name}'. Set `checkpoint:` to the weight file, or set "
            "`random_init: true` for a random-weight model (plumbing/speed only)."
        )
    p = Path(path).expanduser()
    if p.is_file():
        return p
    where = p.resolve()
    lines = [f"Checkpoint for backbone '{name}' not found: {p.name}", f"  looked at: {where}"]
    if p.exists():
        lines[0] = f"Checkpoint for backbone '{name}' is not a file: {p.name}"
    how = fetch_command(name, where.parent)
    if how:
        lines.append(f"  fetch it with: {how}")
        info = OFFICIAL_CHECKPOINTS[name]
        if info.filename != p.name:
            lines.append(f"  (the official file is named {info.filename})")
    else:
        lines.append(
            f"  '{name}' is not an official checkpoint (see `ntt download --list`); provide the file."
        )
    lines.append(
        f"  checkpoint directory: ${ENV_CHECKPOINT_DIR} or `paths.checkpoints` (default ./checkpoints)"
    )
    raise MissingCheckpointError("\n".join(lines))


def check_checkpoints(backbones: Iterable[Mapping[str, Any]]) -> None:
    """Every named checkpoint file exists; else ONE error naming every missing file and one command for all.

    The models are built one after the other, so without this a run with two missing files would name the
    second only after the first was fetched.

    Args:
        backbones: the config node of each backbone to build (``name``, ``checkpoint``, ``random_init``);
            random-weight ones need no file.

    Raises:
        MissingCheckpointError: the message of the one missing file, or of all of them with
            ``ntt download <name> <name>``.
    """
    missing: list[tuple[str, Path | None, str]] = []
    for node in backbones:
        if node.get("random_init"):
            continue
        name, path = str(node.get("name")), node.get("checkpoint")
        try:
            resolve_checkpoint(path, name=name)
        except MissingCheckpointError as err:
            folder = Path(path).expanduser().resolve().parent if path else None
            missing.append((name, folder, str(err)))
    if len(missing) == 1:
        raise MissingCheckpointError(missing[0][2])
    if missing:
        lines = [f"{len(missing)} checkpoints are missing:"]
        lines += ["  " + ln for _, _, text in missing for ln in text.splitlines()]
        official = [(name, folder) for name, folder, _ in missing if name in OFFICIAL_CHECKPOINTS]
        folders = {folder for _, folder in official}
        if len(official) > 1 and len(folders) == 1:  # one command fetches them all into their one folder
            cmd = "ntt download " + " ".join(name for name, _ in official)
            folder = folders.pop()
            if folder is not None and folder != default_checkpoint_dir().resolve():
                cmd += f" --dir {folder}"
            lines.append(f"fetch them all with: `{cmd}`")
        raise MissingCheckpointError("\n".join(lines))


def _fmt_keys(keys: Iterable[str], limit: int = 12) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_state_dict_strict(
    module: Any, state_dict: Mapping[str, Any], *, path: str | os.PathLike[str]
) -> None:
    """``module.load_state_dict(state_dict, strict=True)`` with an error that names the file and keys.

    Args:
        module: the torch module to load into.
        state_dict: tensors by key.
        path: the file the state dict came from (for the message).

    Raises:
        CheckpointError: missing keys, unexpected keys or shape mismatches, all listed.
    """
    expected = module.state_dict()
    missing = set(expected) - set(state_dict)
    unexpected = set(state_dict) - set(expected)
    shapes = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state_dict))
        if hasattr(state_dict[k], "shape") and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = [f"Checkpoint {path} does not match the model architecture (strict loading):"]
        if missing:
            parts.append(f"  missing keys ({len(missing)}): {_fmt_keys(missing)}")
        if unexpected:
            parts.append(f"  unexpected keys ({len(unexpected)}): {_fmt_keys(unexpected)}")
        if shapes:
            parts.append(f"  shape mismatches ({len(shapes)}): " + "; ".join(shapes[:8]))
        parts.append("  Is the config/arch the one this checkpoint was trained with?")
        raise CheckpointError("\n".join(parts))
    module.load_state_dict(state_dict, strict=True)


def torch_load(path: str | os.PathLike[str]) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with a clear error naming the file."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file name
        raise CheckpointError(f"Cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc


__all__ = [
    "OFFICIAL_CHECKPOINTS",
    "CheckpointError",
    "CheckpointInfo",
    "MissingCheckpointError",
    "check_checkpoints",
    "default_checkpoint_dir",
    "load_state_dict_strict",
    "resolve_checkpoint",
    "torch_load",
]
