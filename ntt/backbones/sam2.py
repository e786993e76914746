"""SAM2 as ntt uses it: image features once per image, then the prompt decoder on batches of prompts.

Built from a model yaml without sam2's global Hydra (:mod:`ntt.backbones.sam2_configs`). Parity with the
reference (method.md §5.2, §9.1 item 1):

* ``encode_image``: ImageNet normalisation, ``forward_image`` (Hiera trunk + FPN neck, the two high-res
  levels through ``conv_s0`` / ``conv_s1``), the last ``num_feature_levels`` levels as in
  ``_prepare_backbone_features``; ``no_mem_embed`` is added only when ``add_no_mem_embed=True``.
* ``decode``: prompt encoder (points + the padding point when no box is given) and
  ``sam_mask_decoder.predict_masks`` on image features pre-expanded along the batch (the reference's
  ``repeat_image=False`` path); all 4 masks and IoUs, no object-score gating.
* ``exact_attention``: on CPU the decoder's attention runs with PyTorch's flash kernel disabled
  (``sdpa_kernel([MATH, EFFICIENT_ATTENTION])``), which is what the reference's attention context does on
  CPU and what makes the outputs bit-identical to it. CUDA keeps PyTorch's default kernels.
* ``cached_decoder`` (default on): the decoder's prompt-independent part (image embedding + dense
  no-mask embedding, positional encoding, block 0's image-side attention projections) is computed once
  per image (:mod:`ntt.backbones.sam2_decoder`); same operations, bit-identical outputs on the CPU.
* ``decoder_chunk``: prompts go through the decoder in chunks of exactly this many (the last chunk padded
  with copies of its last prompt), so memory per call is bounded and every call has the same shapes:
  results do not depend on the grid size or ``points_batch_size``. A call's bits can depend on its prompt
  count (GEMM blocking): on an AMD EPYC chunks of >= 8 gave the bits of the reference's batches of 64 / 256,
  on an Intel Xeon (AVX-512) chunks of 8 and 16 differ by ~1e-6 in the logits, and a single-prompt call
  differs by ~4e-7; the parity tests hold the default chunk of 16 to the reference's outputs.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ntt.backbones.allocator import tune_malloc
from ntt.backbones.checkpoints import CheckpointError, load_state_dict_strict, resolve_checkpoint, torch_load
from ntt.backbones.sam2_configs import instantiate_sam2, resolve_sam2_config
from ntt.backbones.sam2_decoder import CachedSAM2Decoder, DecoderImageCache
from ntt.data.images import SAM2_RESIZES

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM_INIT_WARNING = "random weights: outputs are meaningless; plumbing/speed only"
# Prompts per decoder call: >= 8 gives the same bits as the reference's big batches on our CPUs, and 16
# keeps the per-call temporaries near 0.7 GB (they grow ~45 MB per prompt).
DEFAULT_DECODER_CHUNK = 16


@dataclass
class SAM2ImageFeatures:
    """Image features of a batch of 1024x1024 images.

    Attributes:
        image_embed: [B, 256, 64, 64] stride-16 embedding (``no_mem_embed`` added only if configured).
        high_res_feats: [[B, 32, 256, 256], [B, 64, 128, 128]] after ``conv_s0`` / ``conv_s1`` (empty for a
            model without high-resolution features).
    """

    image_embed: Tensor
    high_res_feats: list[Tensor]


def exact_sdpa_context(device: torch.device, enabled: bool | str = True) -> contextlib.AbstractContextManager:
    """The reference's CPU attention setting: SDPA without the flash kernel (math/efficient only).

    Args:
        device: device of the attention inputs.
        enabled: True = on the CPU only (the reference's CPU setting; CUDA keeps PyTorch's defaults),
            ``"always"`` = on every device, False = never.

    Returns:
        An ``sdpa_kernel`` context, or a null context.
    """
    if enabled not in (True, False, "always"):
        raise ValueError(f"exact_attention must be true, false or 'always', got {enabled!r}")
    if not enabled or (enabled is True and torch.device(device).type != "cpu"):
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH, SDPBackend.EFFICIENT_ATTENTION])


def imagenet_normalize(images: Tensor) -> Tensor:
    """``(x - mean) / std`` per channel, as ``torchvision.transforms.Normalize`` computes it."""
    mean = torch.as_tensor(IMAGENET_MEAN, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    std = torch.as_tensor(IMAGENET_STD, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    return (images - mean) / std


class SAM2Backbone(nn.Module):
    """The parts of a SAM2 model the method uses: image encoder, prompt encoder and mask decoder.

    Args:
        model: a built ``sam2.modeling.sam2_base.SAM2Base`` (weights loaded).
        name: registry/config name (for messages and run names).
        add_no_mem_embed: add the learned ``no_mem_embed`` to the stride-16 features (SAM2ImagePredictor
            behaviour). False = the reference (parity).
        exact_attention: True: on CPU, run the decoder attention without the flash SDPA kernel (bit-exact
            with the reference; CUDA keeps PyTorch's default kernels); ``"always"``: on every device;
            False: PyTorch's default kernels everywhere.
        cached_decoder: compute the decoder's prompt-independent part once per image (exact; default).
            False = the official ``predict_masks`` on image features expanded per prompt (slower; kept to
            check and measure the cached path).
        decoder_chunk: prompts per decoder call (the last chunk is padded to this size); memory per call
            grows ~45 MB per prompt. Results depend on it in the last bits on some CPUs (see above).
            A chunk >= the grid size decodes all prompts in one call (the "one batch" fast path on a GPU).
        decoder_autocast: FAST PATH, not parity: ``"bfloat16"`` or ``"float16"`` runs the per-prompt
            decoder under ``torch.autocast`` (the per-image cache stays float32; outputs are float32).
            None (default) = float32.
        tf32: FAST PATH, not parity: allow TF32 matmuls/convolutions in the decoder on CUDA (no effect
            on the CPU). Default off.
        compile_decoder: FAST PATH: ``torch.compile`` the cached decoder's per-chunk step (static shapes:
            every call has ``decoder_chunk`` prompts). Meant for GPUs; default off.
        input_resize: how an image is stretched to the 1024 input (``ntt.data.images.sam2_input``):
            ``pil_bicubic`` (NTT's code, default) or ``bilinear_antialias`` (``SAM2ImagePredictor``,
            FSOD-VFM). Read by whoever makes this model's input (the test loop's loader, the practitioner
            app, the reference box masks); :meth:`encode_image` takes the image already stretched.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        name: str,
        add_no_mem_embed: bool = False,
        exact_attention: bool | str = True,
        cached_decoder: bool = True,
        decoder_chunk: int = DEFAULT_DECODER_CHUNK,
        decoder_autocast: str | None = None,
        tf32: bool = False,
        compile_decoder: bool = False,
        input_resize: str = "pil_bicubic",
    ):
        super().__init__()
        self.model = model
        self.name = name
        self.add_no_mem_embed = bool(add_no_mem_embed)
        exact_sdpa_context(torch.device("cpu"), exact_attention)  # validates the value
        self.exact_attention = exact_attention
        if int(decoder_chunk) < 1:
            raise ValueError(f"{name}: decoder_chunk must be >= 1, got {decoder_chunk}")
        self.cached_decoder = bool(cached_decoder)
        self.decoder_chunk = int(decoder_chunk)
        if decoder_autocast not in (None, "bfloat16", "float16"):
            raise ValueError(
                f"{name}: decoder_autocast must be null, bfloat16 or float16, got {decoder_autocast!r}"
            )
        self.decoder_autocast = decoder_autocast
        self.tf32 = bool(tf32)
        self.compile_decoder = bool(compile_decoder)
        if input_resize not in SAM2_RESIZES:
            raise ValueError(
                f"{name}: input_resize must be one of {', '.join(SAM2_RESIZES)}, got {input_resize!r}"
            )
        self.input_resize = input_resize
        self._compiled_step = None
        self.image_size: int = int(model.image_size)
        self.embed_dim: int = int(model.sam_prompt_embed_dim)
        self.embed_size: int = int(model.sam_image_embedding_size)
        self.num_feature_levels: int = int(model.num_feature_levels)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------------------------------------
    def encode_image(self, images: Tensor) -> SAM2ImageFeatures:
        """Image features of a batch of stretched 1024x1024 images.

        Args:
            images: [B, 3, 1024, 1024] RGB in [0, 1] (ImageNet-normalised here).

        Returns:
            :class:`SAM2ImageFeatures` (image_embed [B, 256, 64, 64], high-res [B, 32, 256, 256] and
            [B, 64, 128, 128]).
        """
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != (self.image_size,) * 2:
            raise ValueError(
                f"{self.name}: encode_image expects [B, 3, {self.image_size}, {self.image_size}] images, "
                f"got {tuple(images.shape)}"
            )
        x = imagenet_normalize(images.to(device=self.device, dtype=torch.float32))
        backbone_out = self.model.forward_image(x)
        # = SAM2Base._prepare_backbone_features: the last num_feature_levels FPN levels (levels 0/1 already
        # went through conv_s0/conv_s1 in forward_image), kept in [B, C, H, W] layout.
        levels = list(backbone_out["backbone_fpn"][-self.num_feature_levels :])
        image_embed = levels[-1]
        if self.add_no_mem_embed:
            image_embed = image_embed + self.model.no_mem_embed.view(1, -1, 1, 1)
        return SAM2ImageFeatures(image_embed=image_embed, high_res_feats=levels[:-1])

    # ------------------------------------------------------------------------------------------------
    def prepare_decoder(self, features: SAM2ImageFeatures, image_index: int = 0) -> DecoderImageCache:
        """The decoder's prompt-independent state for one image of ``features`` (reuse it for all prompts).

        Args:
            features: output of :meth:`encode_image`.
            image_index: which image of ``features``.

        Returns:
            A :class:`~ntt.backbones.sam2_decoder.DecoderImageCache`.
        """
        image_embed = features.image_embed[image_index : image_index + 1]
        high_res = [f[image_index : image_index + 1] for f in features.high_res_feats]
        with exact_sdpa_context(image_embed.device, self.exact_attention):
            return CachedSAM2Decoder(self.model).prepare(image_embed, high_res)

    def _prompts(self, device, points, point_labels, boxes) -> tuple[Tensor, Tensor]:
        """Validated prompt-encoder inputs: (coords [P, n, 2] float32, labels [P, n] int32)."""
        if points is None and boxes is None:
            raise ValueError(f"{self.name}: decode needs points and/or boxes")
        coords_list, labels_list = [], []
        n_prompts = None
        if boxes is not None:
            boxes = torch.as_tensor(boxes, dtype=torch.float32, device=device)
            if boxes.ndim != 2 or boxes.shape[1] != 4:
                raise ValueError(f"{self.name}: boxes must be [P, 4], got {tuple(boxes.shape)}")
            n_prompts = boxes.shape[0]
            coords_list.append(boxes.reshape(-1, 2, 2))
            labels_list.append(torch.tensor([[2, 3]], dtype=torch.int32, device=device).expand(n_prompts, 2))
        if points is not None:
            points = torch.as_tensor(points, dtype=torch.float32, device=device)
            if points.ndim != 3 or points.shape[-1] != 2:
                raise ValueError(f"{self.name}: points must be [P, n, 2], got {tuple(points.shape)}")
            if n_prompts is not None and points.shape[0] != n_prompts:
                raise ValueError(f"{self.name}: {points.shape[0]} point prompts but {n_prompts} boxes")
            n_prompts = points.shape[0]
            if point_labels is None:
                point_labels = torch.ones(points.shape[:2], dtype=torch.int32, device=device)
            point_labels = torch.as_tensor(point_labels, device=device).to(torch.int32)
            if point_labels.shape != points.shape[:2]:
                raise ValueError(
                    f"{self.name}: point_labels {tuple(point_labels.shape)} do not match points "
                    f"{tuple(points.shape)}"
                )
            coords_list.append(points)
            labels_list.append(point_labels)
        coords = torch.cat(coords_list, dim=1) if len(coords_list) > 1 else coords_list[0]
        labels = torch.cat(labels_list, dim=1) if len(labels_list) > 1 else labels_list[0]
        return coords, labels

    def _official_chunk(self, features, image_index, coords, labels) -> tuple[Tensor, Tensor]:
        """The official ``predict_masks`` on features expanded along the chunk (``repeat_image=False``)."""
        n = coords.shape[0]
        src = features.image_embed[image_index : image_index + 1].expand(n, -1, -1, -1)
        high_res = [f[image_index : image_index + 1].expand(n, -1, -1, -1) for f in features.high_res_feats]
        sparse, dense = self.model.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        masks, iou_pred, _, _ = self.model.sam_mask_decoder.predict_masks(
            image_embeddings=src,
            image_pe=self.model.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            repeat_image=False,
            high_res_features=high_res if high_res else None,
        )
        return masks, iou_pred

    def _fast_paths(self, device: torch.device) -> contextlib.ExitStack:
        """The opt-in fast paths (``decoder_autocast``, ``tf32``) as one context; empty by default."""
        stack = contextlib.ExitStack()
        if self.decoder_autocast:
            dtype = getattr(torch, self.decoder_autocast)
            stack.enter_context(torch.autocast(device_type=torch.device(device).type, dtype=dtype))
        if self.tf32 and torch.device(device).type == "cuda":
            saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

            def restore() -> None:
                torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved

            stack.callback(restore)
        return stack

    def _decode_chunks(self, features, cache, image_index, coords, labels, *, best_only: bool, chunk=None):
        """Decode all prompts in chunks of exactly ``chunk`` (default ``decoder_chunk``; the last one padded).

        Yields ``(start, stop, ious [k, 4], masks [k, 4, h, w] or best [k, h, w], best_index or None)``.
        """
        n, chunk = coords.shape[0], int(chunk or self.decoder_chunk)
        dec = CachedSAM2Decoder(self.model) if self.cached_decoder else None
        step = dec.decode if dec is not None else None
        if dec is not None and self.compile_decoder and chunk == self.decoder_chunk:
            if self._compiled_step is None:  # one compiled step per backbone (static shapes: one graph)
                self._compiled_step = torch.compile(CachedSAM2Decoder(self.model).decode, dynamic=False)
            step = self._compiled_step
        if dec is not None and cache is None:
            cache = dec.prepare(
                features.image_embed[image_index : image_index + 1],
                [f[image_index : image_index + 1] for f in features.high_res_feats],
            )
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            c, lab = coords[start:stop], labels[start:stop]
            if stop - start < chunk:  # same shapes in every call: results independent of n
                pad = chunk - (stop - start)
                c = torch.cat([c, c[-1:].expand(pad, -1, -1)])
                lab = torch.cat([lab, lab[-1:].expand(pad, -1)])
            k = stop - start
            with self._fast_paths(coords.device):
                if dec is None:
                    masks, ious = self._official_chunk(features, image_index, c, lab)
                else:
                    sparse, _ = self.model.sam_prompt_encoder(points=(c, lab), boxes=None, masks=None)
                    out = step(cache, sparse)
                    masks, ious = out.masks, out.ious
            masks, ious = masks[:k].float(), ious[:k].float()
            if not best_only:
                yield start, stop, ious, masks, None
                continue
            # the 4-output product is computed in full: one output alone takes another matmul kernel
            # (last-bit differences) and the product is < 1% of the decoder's work
            best = 1 + torch.argmax(ious[:, 1:], dim=1)
            yield start, stop, ious, masks[torch.arange(k, device=best.device), best], best
            del masks

    def decode(
        self,
        features: SAM2ImageFeatures,
        *,
        image_index: int = 0,
        points: Tensor | None = None,
        point_labels: Tensor | None = None,
        boxes: Tensor | None = None,
        cache: DecoderImageCache | None = None,
        chunk: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Decode P prompts on one image: all 4 mask logits and predicted IoUs.

        Args:
            features: output of :meth:`encode_image`.
            image_index: which image of ``features`` the prompts belong to.
            points: [P, n, 2] (x, y) in 1024-frame pixels (the prompt encoder adds 0.5 and normalises).
            point_labels: [P, n], 1 positive / 0 negative (default: all positive).
            boxes: [P, 4] xyxy in 1024-frame pixels. As in SAM2ImagePredictor, a box becomes two corner
                points (labels 2, 3) placed before the points.
            cache: :meth:`prepare_decoder` of this image (computed here when None).
            chunk: prompts per decoder call for this call (default ``decoder_chunk``): 1 decodes each prompt
                alone, as one ``SAM2ImagePredictor.predict`` call per prompt does (the bits of a reduced-
                precision decoder depend on the batch, method.md §5.11).

        Returns:
            (low-res logits [P, 4, 256, 256], predicted IoUs [P, 4]); index 0 = the single-mask token.
        """
        device = features.image_embed.device
        coords, labels = self._prompts(device, points, point_labels, boxes)
        masks_out, ious_out = None, None
        with exact_sdpa_context(device, self.exact_attention):
            for start, stop, ious, masks, _ in self._decode_chunks(
                features, cache, image_index, coords, labels, best_only=False, chunk=chunk
            ):
                if masks_out is None:
                    masks_out = masks.new_empty((coords.shape[0], *masks.shape[1:]))
                    ious_out = ious.new_empty((coords.shape[0], *ious.shape[1:]))
                masks_out[start:stop] = masks
                ious_out[start:stop] = ious
        return masks_out.float(), ious_out.float()

    def decode_best(
        self,
        features: SAM2ImageFeatures,
        *,
        image_index: int = 0,
        points: Tensor,
        point_labels: Tensor | None = None,
        cache: DecoderImageCache | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Decode P point prompts keeping only the chosen multimask output (docs/method.md §5.2).

        Same numbers as :meth:`decode` followed by ``ntt.proposals.select_best_multimask``, without holding
        the [P, 4, 256, 256] logits of all outputs.

        Args:
            features: output of :meth:`encode_image`.
            image_index: which image of ``features``.
            points: [P, n, 2] (x, y) in 1024-frame pixels.
            point_labels: [P, n] (default: all positive).
            cache: :meth:`prepare_decoder` of this image (computed here when None).

        Returns:
            (logits of the chosen output [P, 256, 256], IoUs of all 4 outputs [P, 4], chosen index [P] in
            1..3 = ``1 + argmax(ious[:, 1:])``, ties to the first).
        """
        device = features.image_embed.device
        coords, labels = self._prompts(device, points, point_labels, None)
        n = coords.shape[0]
        best_out, ious_out, index_out = None, None, torch.empty(n, dtype=torch.int64, device=device)
        with exact_sdpa_context(device, self.exact_attention):
            for start, stop, ious, best, index in self._decode_chunks(
                features, cache, image_index, coords, labels, best_only=True
            ):
                if best_out is None:
                    best_out = best.new_empty((n, *best.shape[1:]))
                    ious_out = ious.new_empty((n, *ious.shape[1:]))
                best_out[start:stop] = best
                ious_out[start:stop] = ious
                index_out[start:stop] = index
        return best_out.float(), ious_out.float(), index_out

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, add_no_mem_embed={self.add_no_mem_embed}, "
            f"exact_attention={self.exact_attention}, cached_decoder={self.cached_decoder}, "
            f"decoder_chunk={self.decoder_chunk}, decoder_autocast={self.decoder_autocast}, tf32={self.tf32}, "
            f"compile_decoder={self.compile_decoder}, input_resize={self.input_resize!r}"
        )


def load_sam2_checkpoint(model: nn.Module, checkpoint: str | Path) -> None:
    """Load an official-format SAM2 checkpoint (``{"model": state_dict}``) strictly into ``model``.

    Raises:
        CheckpointError: the file is not ``{"model": ...}`` or its keys/shapes do not match the config.
    """
    obj = torch_load(checkpoint)
    if not isinstance(obj, dict) or "model" not in obj or not isinstance(obj["model"], dict):
        keys = list(obj)[:5] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(
            f"Checkpoint {checkpoint} is not in the official SAM2 format {{'model': state_dict}} (found {keys})."
        )
    load_state_dict_strict(model, obj["model"], path=checkpoint)


def build_sam2(
    *,
    name: str,
    config: str,
    checkpoint: str | None,
    random_init: bool = False,
    add_no_mem_embed: bool = False,
    exact_attention: bool | str = True,
    cached_decoder: bool = True,
    decoder_chunk: int = DEFAULT_DECODER_CHUNK,
    decoder_autocast: str | None = None,
    tf32: bool = False,
    compile_decoder: bool = False,
    input_resize: str = "pil_bicubic",
    init_seed: int | None = 0,
    device: str | torch.device = "cpu",
) -> SAM2Backbone:
    """Build a SAM2 backbone from a model yaml and an official checkpoint.

    Never touches sam2's global Hydra, so it works inside a running ``@hydra.main`` app and outside one.

    Args:
        name: registry/config name (``sam2_hiera_l``); ``ntt download <name>`` fetches official weights.
        config: a model yaml in the sam2 schema: a config shipped in the sam2 package
            (``sam2/sam2_hiera_l.yaml``, ``sam2.1/sam2.1_hiera_t.yaml``), one shipped in
            ``ntt/backbones/configs`` (``sam2_tiny.yaml``) or a file path.
        checkpoint: ``{"model": state_dict}`` file (loaded strictly). Ignored when ``random_init``.
        random_init: build with random weights (plumbing/speed only; logs a loud warning). A missing
            checkpoint is never silently replaced by random weights.
        add_no_mem_embed: add ``no_mem_embed`` to the stride-16 features (off = reference parity).
        exact_attention: True (default): on CPU run the decoder attention without the flash SDPA kernel
            (bit-exact with the reference; the image encoder keeps the default kernels, as in the reference);
            CUDA keeps PyTorch's default kernels. ``"always"``: that kernel choice on every device. False:
            PyTorch's defaults (on CPU within ~4e-7 of the reference).
        cached_decoder: compute the decoder's prompt-independent part once per image (exact; default true).
        decoder_chunk: prompts per decoder call, last chunk padded (default 16; see :class:`SAM2Backbone`).
        decoder_autocast: fast path (not parity): ``bfloat16`` / ``float16`` decoder; None = float32.
        tf32: fast path (not parity): TF32 in the decoder on CUDA.
        compile_decoder: fast path: ``torch.compile`` the cached decoder (static shapes).
        input_resize: how images are stretched to the 1024 input: ``pil_bicubic`` (NTT, default) or
            ``bilinear_antialias`` (``SAM2ImagePredictor``, FSOD-VFM; method.md §5.11).
        init_seed: seed of the random initialisation (same weights in every process); None = global RNG.
        device: where the model lives.

    Returns:
        A :class:`SAM2Backbone` in eval mode with gradients disabled.

    Raises:
        MissingCheckpointError: the checkpoint file does not exist (names the path and the fetch command).
        CheckpointError: the checkpoint's format, keys or shapes do not match.
        FileNotFoundError: unknown config.
    """
    # the decoder loop's big temporaries are reused instead of being page-faulted in again per call
    # (ntt/backbones/allocator.py; numbers unchanged; NTT_MALLOC_TUNING=0 turns it off)
    tune_malloc()
    config_path = resolve_sam2_config(config)
    if random_init:
        if checkpoint:
            log.warning("SAM2 '%s': random_init is true, so checkpoint %s is NOT loaded", name, checkpoint)
        log.warning("SAM2 '%s' (%s): %s", name, config, RANDOM_INIT_WARNING.upper())
        with torch.random.fork_rng(devices=[]):
            if init_seed is not None:
                torch.manual_seed(int(init_seed))
            model = instantiate_sam2(config_path)
    else:
        ckpt = resolve_checkpoint(checkpoint, name=name)
        model = instantiate_sam2(config_path)
        load_sam2_checkpoint(model, ckpt)
        log.info("SAM2 '%s': loaded %s (config %s)", name, ckpt, config_path)
    model = model.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
    backbone = SAM2Backbone(
        model,
        name=name,
        add_no_mem_embed=add_no_mem_embed,
        exact_attention=exact_attention,
        cached_decoder=cached_decoder,
        decoder_chunk=decoder_chunk,
        decoder_autocast=decoder_autocast,
        tf32=tf32,
        compile_decoder=compile_decoder,
        input_resize=input_resize,
    )
    return backbone.eval()


__all__ = [
    "SAM2Backbone",
    "SAM2ImageFeatures",
    "build_sam2",
    "exact_sdpa_context",
    "imagenet_normalize",
    "load_sam2_checkpoint",
]
