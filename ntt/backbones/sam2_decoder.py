"""SAM2's prompt decoder with its prompt-independent part computed once per image (docs/method.md §5.2).

The official ``MaskDecoder.predict_masks`` (the reference's ``repeat_image=False`` path, ``masks=None``)
does, per batch of B prompts, work that depends only on the image:

* ``src = image_embedding + no_mask_embed`` and the positional encoding, both materialised B times
  (``[B, 256, 64, 64]`` each);
* in the first two-way block (``skip_first_layer_pe``), ``keys`` is still the image embedding, so
  ``keys + key_pe`` (computed twice there), the token->image attention's ``k_proj(keys + key_pe)`` and
  ``v_proj(keys)``, and the image->token attention's ``q_proj(keys + key_pe)`` are the same for every prompt.

:class:`CachedSAM2Decoder` computes those once per image (:meth:`CachedSAM2Decoder.prepare`) and then runs
the rest with the official modules' weights and the *same* tensor operations on the same memory layouts, so
its outputs equal the official decoder's bit for bit on the CPU (tests/test_sam2_decoder.py checks this;
docs: benchmarks/README.md). Later blocks depend on the prompts (``keys`` is updated at the end of block 0)
and are run as in the official code, except that ``keys + key_pe``, computed twice per block there, is
computed once (an element-wise sum: same values). All four outputs are always computed: one output alone
takes another matmul kernel on the CPU, which changes the last bits (the caller keeps only the chosen one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["CachedSAM2Decoder", "DecoderImageCache", "DecoderOutput"]


@dataclass
class DecoderImageCache:
    """The prompt-independent decoder state of one image (batch dimension 1 everywhere).

    Attributes:
        keys_rows: ``[1, HW, C]`` image embedding + ``no_mask_embed`` (the transformer's initial keys), stored
            row-major (the official code's ``keys`` is a permuted view of ``[1, C, H, W]``; same values): the
            block-0 residual ``keys + attn_out`` then runs on contiguous memory (an element-wise sum: the
            layout does not change its values).
        key_pe_rows: ``[1, HW, C]`` dense positional encoding ``key_pe``, stored row-major, for the later
            blocks' ``keys + key_pe`` (idem).
        t2i_k: ``[1, heads, HW, c]`` block 0 token->image attention keys (``k_proj(keys + key_pe)``).
        t2i_v: ``[1, heads, HW, c]`` block 0 token->image attention values (``v_proj(keys)``).
        i2t_q: ``[1, heads, HW, c]`` block 0 image->token attention queries (``q_proj(keys + key_pe)``).
        high_res: ``[feat_s0 [1, C/8, 4H, 4W], feat_s1 [1, C/4, 2H, 2W]]`` or None.
        size: ``(H, W)`` of the embedding grid.
    """

    keys_rows: Tensor
    key_pe_rows: Tensor
    t2i_k: Tensor
    t2i_v: Tensor
    i2t_q: Tensor
    high_res: list[Tensor] | None
    size: tuple[int, int]


@dataclass
class DecoderOutput:
    """Decoder outputs of a batch of b prompts.

    Attributes:
        ious: ``[b, 4]`` predicted IoUs of all outputs (index 0 = the single-mask token).
        masks: ``[b, 4, 4H, 4W]`` logits of all outputs.
    """

    ious: Tensor
    masks: Tensor


def _attention(attn: nn.Module, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """``sam2.modeling.sam.transformer.Attention.forward`` on already projected, head-separated q/k/v."""
    out = nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.0)
    return attn.out_proj(attn._recombine_heads(out))


def _layer_norm_2d(ln: nn.Module, x: Tensor) -> Tensor:
    """``sam2.modeling.sam2_utils.LayerNorm2d.forward`` with ``x - u`` computed once and in-place updates
    (the same element-wise operations in the same order: same values). ``x`` is overwritten."""
    if type(ln).__name__ != "LayerNorm2d" or not hasattr(ln, "eps"):  # another norm: run it as it is
        return ln(x)
    u = x.mean(1, keepdim=True)
    d = x.sub_(u)
    s = d.pow(2).mean(1, keepdim=True)
    d.div_(torch.sqrt(s + ln.eps))
    return d.mul_(ln.weight[:, None, None]).add_(ln.bias[:, None, None])


class CachedSAM2Decoder:
    """Runs a built SAM2 model's prompt encoder + mask decoder with per-image caching.

    Args:
        model: a built ``sam2.modeling.sam2_base.SAM2Base`` (its ``sam_prompt_encoder`` and
            ``sam_mask_decoder`` are used; nothing is copied, so weights stay shared).
    """

    def __init__(self, model: nn.Module):
        self.prompt_encoder = model.sam_prompt_encoder
        self.mask_decoder = model.sam_mask_decoder
        self.transformer = self.mask_decoder.transformer
        if self.mask_decoder.training or self.transformer.layers[0].training:
            raise ValueError("CachedSAM2Decoder needs the model in eval mode (attention dropout off)")
        if not self.transformer.layers[0].skip_first_layer_pe:
            raise ValueError("CachedSAM2Decoder expects skip_first_layer_pe in the first two-way block")

    # ------------------------------------------------------------------------------------------------
    def prepare(self, image_embed: Tensor, high_res_feats: list[Tensor] | None) -> DecoderImageCache:
        """The prompt-independent part of the decoder for one image.

        Args:
            image_embed: ``[1, C, H, W]`` stride-16 image embedding.
            high_res_feats: ``[feat_s0, feat_s1]`` of the same image (batch 1), or None / empty.

        Returns:
            A :class:`DecoderImageCache`.
        """
        if image_embed.ndim != 4 or image_embed.shape[0] != 1:
            raise ValueError(f"prepare expects one image [1, C, H, W], got {tuple(image_embed.shape)}")
        _, c, h, w = image_embed.shape
        pe = self.prompt_encoder
        # = PromptEncoder.forward(masks=None) dense embedding + predict_masks' `src + dense` for one image.
        dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, h, w)
        src = image_embed + dense
        image_pe = pe.get_dense_pe()
        if image_pe.shape[0] != 1:
            raise ValueError("get_dense_pe() should have batch size 1")
        # = TwoWayTransformer.forward: B x C x H x W -> B x HW x C (a permuted view; same layout as there).
        keys = src.flatten(2).permute(0, 2, 1)
        key_pe = torch.repeat_interleave(image_pe, 1, dim=0).flatten(2).permute(0, 2, 1)
        block = self.transformer.layers[0]
        k = keys + key_pe
        t2i, i2t = block.cross_attn_token_to_image, block.cross_attn_image_to_token
        return DecoderImageCache(
            keys_rows=keys.contiguous(),
            key_pe_rows=key_pe.contiguous(),
            t2i_k=t2i._separate_heads(t2i.k_proj(k), t2i.num_heads),
            t2i_v=t2i._separate_heads(t2i.v_proj(keys), t2i.num_heads),
            i2t_q=i2t._separate_heads(i2t.q_proj(k), i2t.num_heads),
            high_res=list(high_res_feats) if high_res_feats else None,
            size=(h, w),
        )

    # ------------------------------------------------------------------------------------------------
    def _first_block(self, cache: DecoderImageCache, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """TwoWayAttentionBlock 0 (skip_first_layer_pe) with the image-side projections from the cache."""
        block = self.transformer.layers[0]
        b = tokens.shape[0]
        query_pe = tokens
        queries = block.self_attn(q=tokens, k=tokens, v=tokens)
        queries = block.norm1(queries)

        t2i = block.cross_attn_token_to_image
        q = t2i._separate_heads(t2i.q_proj(queries + query_pe), t2i.num_heads)
        attn_out = _attention(t2i, q, cache.t2i_k.expand(b, -1, -1, -1), cache.t2i_v.expand(b, -1, -1, -1))
        queries = queries + attn_out
        queries = block.norm2(queries)

        mlp_out = block.mlp(queries)
        queries = queries + mlp_out
        queries = block.norm3(queries)

        i2t = block.cross_attn_image_to_token
        q_tok = queries + query_pe
        k = i2t._separate_heads(i2t.k_proj(q_tok), i2t.num_heads)
        v = i2t._separate_heads(i2t.v_proj(queries), i2t.num_heads)
        attn_out = _attention(i2t, cache.i2t_q.expand(b, -1, -1, -1), k, v)
        keys = cache.keys_rows + attn_out
        keys = block.norm4(keys)
        return queries, keys

    @staticmethod
    def _block(block: nn.Module, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor):
        """``TwoWayAttentionBlock.forward`` (not the first block) with ``keys + key_pe`` computed once."""
        q = queries + query_pe
        attn_out = block.self_attn(q=q, k=q, v=queries)
        queries = queries + attn_out
        queries = block.norm1(queries)

        q = queries + query_pe
        k = keys + key_pe
        attn_out = block.cross_attn_token_to_image(q=q, k=k, v=keys)
        queries = queries + attn_out
        queries = block.norm2(queries)

        mlp_out = block.mlp(queries)
        queries = queries + mlp_out
        queries = block.norm3(queries)

        q = queries + query_pe
        # the official block recomputes `keys + key_pe` here; keys has not changed since, so reuse k
        attn_out = block.cross_attn_image_to_token(q=k, k=q, v=queries)
        keys = keys + attn_out
        keys = block.norm4(keys)
        return queries, keys

    def _transformer(self, cache: DecoderImageCache, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """``TwoWayTransformer.forward`` -> (hs [b, T, C], src [b, HW, C])."""
        queries, keys = self._first_block(cache, tokens)
        for block in self.transformer.layers[1:]:
            queries, keys = self._block(block, queries, keys, tokens, cache.key_pe_rows)
        t = self.transformer
        q = queries + tokens
        k = keys + cache.key_pe_rows
        attn_out = t.final_attn_token_to_image(q=q, k=k, v=keys)
        queries = queries + attn_out
        queries = t.norm_final_attn(queries)
        return queries, keys

    # ------------------------------------------------------------------------------------------------
    def decode(self, cache: DecoderImageCache, sparse: Tensor) -> DecoderOutput:
        """``MaskDecoder.predict_masks`` for a batch of prompts on the cached image.

        Args:
            cache: from :meth:`prepare`.
            sparse: ``[b, n, C]`` sparse prompt embeddings (``sam_prompt_encoder(...)[0]``).

        Returns:
            A :class:`DecoderOutput`.
        """
        md = self.mask_decoder
        b = sparse.shape[0]
        if md.pred_obj_scores:
            s = 1
            output_tokens = torch.cat([md.obj_score_token.weight, md.iou_token.weight, md.mask_tokens.weight])
        else:
            s = 0
            output_tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(b, -1, -1)
        tokens = torch.cat((output_tokens, sparse), dim=1)

        hs, src = self._transformer(cache, tokens)
        iou_token_out = hs[:, s, :]
        mask_tokens_out = hs[:, s + 1 : (s + 1 + md.num_mask_tokens), :]

        h, w = cache.size
        c = src.shape[-1]
        src = src.transpose(1, 2).view(b, c, h, w)
        if not md.use_high_res_features:
            upscaled = md.output_upscaling(src)
        else:
            dc1, ln1, act1, dc2, act2 = md.output_upscaling
            feat_s0, feat_s1 = cache.high_res
            # `dc1(src) + feat_s1` etc. of the official code, summed in place (same values, less memory)
            upscaled = act1(_layer_norm_2d(ln1, dc1(src).add_(feat_s1)))
            upscaled = act2(dc2(upscaled).add_(feat_s0))

        hyper_in = torch.stack(
            [md.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :]) for i in range(md.num_mask_tokens)],
            dim=1,
        )
        b, c, h, w = upscaled.shape
        ious = md.iou_prediction_head(iou_token_out)
        masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
        return DecoderOutput(ious=ious, masks=masks)
