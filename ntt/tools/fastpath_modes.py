"""The fast-path modes of ``make bench-fastpaths``: which ``SAM2Backbone`` flags each one sets.

Every mode shares the built backbone's model (same weights, no copy); ``parity`` is the reference every other
mode is compared with (``ntt.tools.fastpaths``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["DEFAULT_MODES", "MODES", "FastMode", "mode_backbone"]


@dataclass(frozen=True)
class FastMode:
    """One way of running the per-image path.

    Attributes:
        name: key used on the command line and in the outputs.
        flags: ``SAM2Backbone`` attributes it sets (on top of the built backbone's).
        what: what it changes, in words.
        one_batch: decode all ``P * P`` prompts in one decoder call (``decoder_chunk`` and
            ``points_batch_size`` = ``P * P``; 1024 at the paper's 32x32 grid).
        cuda_only: why it is skipped on the CPU (None: runs everywhere).
    """

    name: str
    flags: dict[str, Any] = field(default_factory=dict)
    what: str = ""
    one_batch: bool = False
    cuda_only: str | None = None

    def flag_text(self) -> str:
        items = [f"{k}={v}" for k, v in self.flags.items()]
        if self.one_batch:
            items.append("decoder_chunk=points_batch_size=P*P")
        return ", ".join(items) or "(defaults)"


MODES: dict[str, FastMode] = {
    m.name: m
    for m in (
        FastMode("parity", what="parity mode: fp32, chunks of 16 prompts, eager"),
        FastMode(
            "parity_rerun",
            what="parity mode again: run-to-run noise floor (exactly 1.0 on the CPU; GPU kernels may differ)",
        ),
        FastMode("bf16", {"decoder_autocast": "bfloat16"}, "prompt decoder under torch.autocast(bfloat16)"),
        FastMode(
            "fp16",
            {"decoder_autocast": "float16"},
            "prompt decoder under torch.autocast(float16)",
            cuda_only="fp16 autocast on the CPU is emulated and slow: skipped on CPU",
        ),
        FastMode(
            "tf32",
            {"tf32": True},
            "TF32 matmuls/convolutions in the prompt decoder",
            cuda_only="TF32 does not exist on the CPU (identical to parity): skipped on CPU",
        ),
        FastMode("one_batch", what="all prompts of the grid in one decoder call", one_batch=True),
        FastMode(
            "compile",
            {"compile_decoder": True},
            "torch.compile (inductor) of the decoder step, static shapes",
        ),
        FastMode(
            "combo",
            {"decoder_autocast": "bfloat16", "tf32": True, "compile_decoder": True},
            "the GPU goal's combination: bf16 + TF32 + one decoder call + torch.compile",
            one_batch=True,
        ),
    )
}
DEFAULT_MODES = "parity,parity_rerun,bf16,fp16,tf32,one_batch,compile,combo"


def mode_backbone(base, mode: FastMode, grid_prompts: int, decoder_chunk: int | None = None):
    """A ``SAM2Backbone`` sharing ``base``'s model (same weights, no copy) with ``mode``'s flags.

    Args:
        base: the built ``ntt.backbones.sam2.SAM2Backbone`` (its own fast-path flags are ignored).
        mode: the mode.
        grid_prompts: ``P * P`` (the decoder chunk of a one-batch mode).
        decoder_chunk: prompts per decoder call of the other modes (default: parity's 16).
    """
    from ntt.backbones.sam2 import DEFAULT_DECODER_CHUNK, SAM2Backbone

    kw: dict[str, Any] = dict(
        decoder_chunk=decoder_chunk or DEFAULT_DECODER_CHUNK,
        decoder_autocast=None,
        tf32=False,
        compile_decoder=False,
    )
    kw.update(mode.flags)
    if mode.one_batch:
        kw["decoder_chunk"] = grid_prompts
    return SAM2Backbone(
        base.model,
        name=f"{base.name}[{mode.name}]",
        add_no_mem_embed=base.add_no_mem_embed,
        exact_attention=base.exact_attention,
        cached_decoder=True,
        input_resize=base.input_resize,
        **kw,
    )
