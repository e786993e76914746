"""Process-count-independent distributed helpers on top of Accelerate.

Inference is sharded by image id: process r takes ids r, r + W, r + 2W, ... (a fixed interleave, so the
assignment is a function of the id list and W only), writes its own result shard, and the main process
merges shards in dataset order. Results therefore never depend on the number of processes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)


def state():
    """Accelerate's PartialState (a single CPU/GPU process when not launched distributed)."""
    import torch
    from accelerate import PartialState

    # Without cpu=True Accelerate ignores a torchrun/`accelerate launch` world on a machine without CUDA
    # and every process believes it is alone (each would then do all the work).
    return PartialState(cpu=not torch.cuda.is_available())


def shard(items: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """The items process `rank` of `world_size` handles (interleaved, no padding, no duplicates)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad rank {rank} for world size {world_size}")
    return list(items[rank::world_size])


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    st = state()
    if st.num_processes > 1:
        st.wait_for_everyone()


def resolve_device(device: str) -> str:
    """`auto` -> this process's accelerator device (cuda:<local rank>) or cpu; anything else as given."""
    if device != "auto":
        return device
    return str(state().device)
