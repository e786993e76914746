"""DINOv2 patch-token encoder (the semantic features of the method, method.md §3.2 / §5.1).

Built from the ``dinov2`` package (0.0.1.dev2, the official FAIR code of April 2023): a
``DinoVisionTransformer`` with ``block_fn=partial(NestedTensorBlock, attn_class=MemEffAttention)`` and
``block_chunks=0``, exactly like the official ``vit_small/base/large/giant2`` factories, so the official
``dinov2_vit*14_pretrain.pth`` state dicts load strictly. Without xformers the attention is the explicit
``softmax(q * scale @ k^T) @ v`` the reference runs.

Register-token models (``*_reg4``): dinov2 0.0.1.dev2 predates them, so :class:`DinoVisionTransformerReg`
adds them exactly as the current official code does (register tokens inserted after the CLS token, after
the position embedding; position-embedding interpolation with ``interpolate_antialias`` /
``interpolate_offset``; the official reg models use antialias True and offset 0.0).
"""

from __future__ import annotations

import importlib.util
import logging
import math
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from ntt.backbones.checkpoints import CheckpointError, load_state_dict_strict, resolve_checkpoint, torch_load
from ntt.backbones.sam2 import RANDOM_INIT_WARNING, imagenet_normalize

log = logging.getLogger(__name__)

# embed_dim, depth, num_heads, ffn_layer (mlp_ratio 4 for all), as the official factories.
ARCHS: dict[str, dict[str, Any]] = {
    "vits14": dict(embed_dim=384, depth=12, num_heads=6, ffn_layer="mlp"),
    "vitb14": dict(embed_dim=768, depth=12, num_heads=12, ffn_layer="mlp"),
    "vitl14": dict(embed_dim=1024, depth=24, num_heads=16, ffn_layer="mlp"),
    "vitg14": dict(embed_dim=1536, depth=40, num_heads=24, ffn_layer="swiglufused"),
}

_XFORMERS_WARNED = False


def _warn_if_xformers() -> None:
    global _XFORMERS_WARNED
    if _XFORMERS_WARNED:
        return
    if importlib.util.find_spec("xformers") is not None:
        _XFORMERS_WARNED = True
        log.warning(
            "xformers is importable: dinov2's MemEffAttention will use xformers' memory-efficient attention. "
            "The reference runs without xformers (explicit softmax attention); features differ slightly "
            "(~1e-6). Uninstall xformers for exact parity."
        )


def _dinov2_classes() -> tuple[type, type, type]:
    # dinov2 logs "xFormers not available" (a warning, per layer module) on import; we report xformers
    # ourselves (_warn_if_xformers), so that import-time noise is muted.
    dinov2_logger = logging.getLogger("dinov2")
    level = dinov2_logger.level
    dinov2_logger.setLevel(logging.ERROR)
    try:
        from dinov2.layers import MemEffAttention, NestedTensorBlock
        from dinov2.models.vision_transformer import DinoVisionTransformer
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(
            "The `dinov2` package is not installed (pip install --no-deps dinov2==0.0.1.dev2; see docs/install.md)."
        ) from exc
    finally:
        dinov2_logger.setLevel(level)
    return DinoVisionTransformer, NestedTensorBlock, MemEffAttention


def _make_reg_class(base: type) -> type:
    class DinoVisionTransformerReg(base):  # type: ignore[misc, valid-type]
        """``DinoVisionTransformer`` + register tokens and configurable position-embedding interpolation,
        as in the current official dinov2 code."""

        def __init__(
            self,
            *args: Any,
            num_register_tokens: int = 0,
            interpolate_antialias: bool = False,
            interpolate_offset: float = 0.1,
            **kwargs: Any,
        ):
            super().__init__(*args, **kwargs)
            self.num_register_tokens = int(num_register_tokens)
            self.interpolate_antialias = bool(interpolate_antialias)
            self.interpolate_offset = float(interpolate_offset)
            self.register_tokens = (
                nn.Parameter(torch.zeros(1, self.num_register_tokens, self.embed_dim))
                if self.num_register_tokens
                else None
            )
            if self.register_tokens is not None:
                nn.init.normal_(self.register_tokens, std=1e-6)

        def interpolate_pos_encoding(self, x: Tensor, w: int, h: int) -> Tensor:
            previous_dtype = x.dtype
            npatch = x.shape[1] - 1
            n = self.pos_embed.shape[1] - 1
            if npatch == n and w == h:
                return self.pos_embed
            pos_embed = self.pos_embed.float()
            class_pos_embed = pos_embed[:, 0]
            patch_pos_embed = pos_embed[:, 1:]
            dim = x.shape[-1]
            w0 = w // self.patch_size
            h0 = h // self.patch_size
            m = int(math.sqrt(n))
            assert n == m * m
            kwargs: dict[str, Any] = {}
            if self.interpolate_offset:
                kwargs["scale_factor"] = (
                    float(w0 + self.interpolate_offset) / m,
                    float(h0 + self.interpolate_offset) / m,
                )
            else:
                kwargs["size"] = (w0, h0)
            patch_pos_embed = nn.functional.interpolate(
                patch_pos_embed.reshape(1, m, m, dim).permute(0, 3, 1, 2),
                mode="bicubic",
                antialias=self.interpolate_antialias,
                **kwargs,
            )
            assert (w0, h0) == patch_pos_embed.shape[-2:]
            patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
            return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1).to(previous_dtype)

        def prepare_tokens_with_masks(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
            _, _, w, h = x.shape
            x = self.patch_embed(x)
            if masks is not None:
                x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
            x = x + self.interpolate_pos_encoding(x, w, h)
            if self.register_tokens is not None:
                x = torch.cat((x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]), dim=1)
            return x

        def forward_features(self, x: Tensor, masks: Tensor | None = None) -> dict[str, Tensor | None]:
            x = self.prepare_tokens_with_masks(x, masks)
            for blk in self.blocks:
                x = blk(x)
            x_norm = self.norm(x)
            r = self.num_register_tokens
            return {
                "x_norm_clstoken": x_norm[:, 0],
                "x_norm_regtokens": x_norm[:, 1 : r + 1],
                "x_norm_patchtokens": x_norm[:, r + 1 :],
                "x_prenorm": x,
                "masks": masks,
            }

    return DinoVisionTransformerReg


class DINOv2Encoder(nn.Module):
    """Final-norm DINOv2 patch tokens as a grid.

    Args:
        model: a built ``DinoVisionTransformer`` (weights loaded).
        name: registry/config name.
        img_size: the square input size the encoder is used at (518 -> 37x37 grid).
    """

    def __init__(self, model: nn.Module, *, name: str, img_size: int):
        super().__init__()
        self.model = model
        self.name = name
        self.img_size = int(img_size)
        self.patch_size = int(model.patch_size)
        self.embed_dim = int(model.embed_dim)
        self.grid_size = self.img_size // self.patch_size
        self.num_register_tokens = int(getattr(model, "num_register_tokens", 0))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward(self, images: Tensor, *, final_norm: bool = True) -> Tensor:
        """Patch-token grid of a batch of images.

        Args:
            images: [B, 3, H, W] RGB in [0, 1], normally H = W = ``img_size``; H and W must be multiples of
                the patch size (other sizes interpolate the position embedding). ImageNet-normalised here.
            final_norm: the tokens after the final LayerNorm (NTT); False: the last block's output before
                it, as FSOD-VFM's ``get_intermediate_layers(n=1, norm=False)`` (method.md §5.13).

        Returns:
            [B, H / patch, W / patch, D] patch tokens (CLS and register tokens dropped).
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.name}: expects [B, 3, H, W] images, got {tuple(images.shape)}")
        b, _, h, w = images.shape
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"{self.name}: image size {h}x{w} is not a multiple of the patch size {self.patch_size}"
            )
        x = imagenet_normalize(images.to(device=self.device, dtype=torch.float32))
        out = self.model.forward_features(x)
        if final_norm:
            tokens = out["x_norm_patchtokens"]
        else:
            tokens = out["x_prenorm"][:, 1 + self.num_register_tokens :]
        return tokens.reshape(b, h // self.patch_size, w // self.patch_size, self.embed_dim)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, img_size={self.img_size}, grid={self.grid_size}, dim={self.embed_dim}"


def _unwrap_state_dict(obj: Any, path: Any) -> dict[str, Tensor]:
    """Plain state dict from an official pretrain file, ``{"model": ...}`` or ``{"teacher": ...}``."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"Checkpoint {path} is not a state dict (found {type(obj).__name__})")
    wrapper = None
    for key in ("teacher", "model", "state_dict"):
        if key in obj and isinstance(obj[key], dict):
            wrapper, obj = key, obj[key]
            break
    sd = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in obj.items()}
    if any(k.startswith("backbone.") for k in sd):
        # a training checkpoint (teacher.backbone.* + heads): keep the backbone only
        sd = {k[len("backbone.") :]: v for k, v in sd.items() if k.startswith("backbone.")}
    if not sd or not all(isinstance(v, Tensor) for v in sd.values()):
        raise CheckpointError(f"Checkpoint {path} (wrapper {wrapper!r}) does not hold a DINOv2 state dict")
    return sd


def build_dinov2(
    *,
    name: str,
    arch: str,
    checkpoint: str | None,
    random_init: bool = False,
    img_size: int = 518,
    patch_size: int = 14,
    embed_dim: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
    mlp_ratio: float = 4.0,
    ffn_layer: str = "mlp",
    num_register_tokens: int = 0,
    init_values: float = 1e-5,
    qkv_bias: bool = True,
    proj_bias: bool = True,
    ffn_bias: bool = True,
    interpolate_antialias: bool = False,
    interpolate_offset: float = 0.1,
    init_seed: int | None = 0,
    device: str | torch.device = "cpu",
) -> DINOv2Encoder:
    """Build a DINOv2 encoder and load an official pretrain state dict strictly.

    Args:
        name: registry/config name (``dinov2_vitl14``); ``ntt download <name>`` fetches official weights.
        arch: ``vits14`` | ``vitb14`` | ``vitl14`` | ``vitg14`` (fills embed_dim/depth/num_heads/ffn_layer; an
            explicit value that disagrees is an error) or ``custom`` (embed_dim, depth, num_heads given).
        checkpoint: plain state dict file (``dinov2_vitl14_pretrain.pth``); ``{"teacher": ...}`` and
            ``{"model": ...}`` wrappers are accepted. Loaded strictly. Ignored when ``random_init``.
        random_init: random weights (plumbing/speed only; logs a loud warning). A missing checkpoint is never
            silently replaced by random weights.
        img_size: input size of the position embedding (518 -> 37x37 patches).
        patch_size: patch size (14).
        embed_dim: token width (custom arch).
        depth: number of blocks (custom arch).
        num_heads: attention heads (custom arch).
        mlp_ratio: FFN hidden width / embed_dim.
        ffn_layer: ``mlp`` | ``swiglufused`` (ViT-g) | ``swiglu`` | ``identity``.
        num_register_tokens: 0 (the reference) or 4 for the ``*_reg4`` models.
        init_values: LayerScale init (1e-5 as the reference; its presence switches LayerScale on).
        qkv_bias: bias of the qkv projection.
        proj_bias: bias of the attention output projection.
        ffn_bias: biases of the FFN.
        interpolate_antialias: antialias when interpolating the position embedding (reg models: True).
        interpolate_offset: the historical +0.1 of the interpolation scale (reg models: 0.0).
        init_seed: seed of the random initialisation; None = global RNG.
        device: where the model lives.

    Returns:
        A :class:`DINOv2Encoder` in eval mode with gradients disabled.

    Raises:
        MissingCheckpointError: the checkpoint file does not exist.
        CheckpointError: keys or shapes do not match the architecture.
        ValueError: unknown arch or inconsistent sizes.
    """
    if arch == "custom":
        if embed_dim is None or depth is None or num_heads is None:
            raise ValueError(f"DINOv2 '{name}': arch 'custom' needs embed_dim, depth and num_heads")
        dims = dict(embed_dim=int(embed_dim), depth=int(depth), num_heads=int(num_heads), ffn_layer=ffn_layer)
    elif arch in ARCHS:
        dims = dict(ARCHS[arch])
        given = dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads)
        for key, value in given.items():
            if value is not None and int(value) != dims[key]:
                raise ValueError(
                    f"DINOv2 '{name}': {key}={value} contradicts arch {arch} ({key}={dims[key]})"
                )
        if ffn_layer != "mlp" and ffn_layer != dims["ffn_layer"]:
            raise ValueError(
                f"DINOv2 '{name}': ffn_layer={ffn_layer} contradicts arch {arch} ({dims['ffn_layer']})"
            )
    else:
        raise ValueError(f"DINOv2 '{name}': unknown arch '{arch}' (one of {', '.join(ARCHS)}, custom)")
    if img_size % patch_size:
        raise ValueError(f"DINOv2 '{name}': img_size {img_size} is not a multiple of patch_size {patch_size}")

    _warn_if_xformers()
    vit_cls, block_cls, attn_cls = _dinov2_classes()
    plain = num_register_tokens == 0 and not interpolate_antialias and float(interpolate_offset) == 0.1
    kwargs: dict[str, Any] = dict(
        img_size=int(img_size),
        patch_size=int(patch_size),
        embed_dim=dims["embed_dim"],
        depth=dims["depth"],
        num_heads=dims["num_heads"],
        mlp_ratio=mlp_ratio,
        init_values=init_values,
        ffn_layer=dims["ffn_layer"],
        block_chunks=0,
        qkv_bias=qkv_bias,
        proj_bias=proj_bias,
        ffn_bias=ffn_bias,
        block_fn=partial(block_cls, attn_class=attn_cls),
    )
    if not plain:
        # the installed (2023) DinoVisionTransformer has no registers / interpolation options
        vit_cls = _make_reg_class(vit_cls)
        kwargs.update(
            num_register_tokens=int(num_register_tokens),
            interpolate_antialias=bool(interpolate_antialias),
            interpolate_offset=float(interpolate_offset),
        )

    if random_init:
        if checkpoint:
            log.warning("DINOv2 '%s': random_init is true, so checkpoint %s is NOT loaded", name, checkpoint)
        log.warning("DINOv2 '%s' (%s): %s", name, arch, RANDOM_INIT_WARNING.upper())
        with torch.random.fork_rng(devices=[]):
            if init_seed is not None:
                torch.manual_seed(int(init_seed))
            model = vit_cls(**kwargs)
    else:
        ckpt = resolve_checkpoint(checkpoint, name=name)
        model = vit_cls(**kwargs)
        load_state_dict_strict(model, _unwrap_state_dict(torch_load(ckpt), ckpt), path=ckpt)
        log.info("DINOv2 '%s': loaded %s (%s)", name, ckpt, arch)
    model = model.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
    return DINOv2Encoder(model, name=name, img_size=img_size).eval()


__all__ = ["ARCHS", "DINOv2Encoder", "build_dinov2"]
