"""Stage ``fill_memory`` over several processes: each encodes a share of the encoder batches, the main
process assembles the bank.

The batches are ``ntt.memory.reference_batches`` of the one-process run (their boundaries never depend on
the number of processes W, since a batched forward's bits can depend on the batch); process r encodes
batches r, r + W, r + 2W, ... (the interleave of ``ntt.utils.dist.shard``). The pieces travel through
torch.distributed (gloo on CPU, NCCL on GPU) to the main process, which places every row by its job index
and writes ``memory.pt``: its bytes are those of a one-process run, whatever W. Nothing is written until
every piece has arrived, so no partial file can outlive a crash or be mistaken for another config's.

A failure on one process (an unreadable reference image, an empty crop, an all-zero mask, an encoder error)
is exchanged before any gathering: every process then raises, the failing one its own error and the others
an error naming that process and its message, so no process waits forever and a study records the job's
failure on every process alike.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ntt.bank import MemoryBank
from ntt.fill import encoder_name_of, plan_fill
from ntt.memory import assemble_bank, encode_references
from ntt.utils import dist
from ntt.utils.errors import UserError

__all__ = ["OtherProcessFailedError", "OtherProcessUserError", "batches_of_process", "fill_memory_sharded"]


class OtherProcessFailedError(RuntimeError):
    """Another process of the world failed during ``fill_memory`` (its error is in the message)."""


class OtherProcessUserError(OtherProcessFailedError, UserError):
    """Another process failed on a user error (a bad reference): reported as one clear message."""


@dataclass
class _Failure:
    """What a failing process tells the others."""

    error: str  # "<type>: <message>"
    user: bool  # a UserError (bad input), not a bug


def batches_of_process(n_batches: int, rank: int, world_size: int) -> list[int]:
    """The batch indices process ``rank`` of ``world_size`` encodes (interleaved; together: each once)."""
    return dist.shard(range(n_batches), rank, world_size)


def fill_memory_sharded(
    refs: Mapping[int, list],
    *,
    rank: int,
    world_size: int,
    progress: bool = True,
    seed: int | None = None,
    encoder_name: str | None = None,
    config_hash: str = "",
    all_gather: Callable[[Any], list[Any]] = dist.all_gather_object,
    gather: Callable[[Any], list[Any] | None] = dist.gather_object,
    **plan_kwargs: Any,
) -> MemoryBank | None:
    """``ntt.fill.fill_memory`` with the encoder batches shared by ``world_size`` processes.

    Every process of the world must call it with the same arguments (bar ``rank``/``progress``).

    Args:
        refs: ``{category_id: [RefEntry]}``.
        rank: this process's index.
        world_size: number of processes (1: the one-process ``fill_memory``).
        progress: show a tqdm bar (of this process's share).
        seed: the sampling seed to record.
        encoder_name: name to record (default: ``encoder.name`` or its class name).
        config_hash: config hash to record.
        all_gather: ``obj -> [obj of every process]`` on every process (``ntt.utils.dist.all_gather_object``).
        gather: ``obj -> [obj of every process]`` on process 0, None elsewhere (``ntt.utils.dist.gather_object``).
        plan_kwargs: the other ``fill_memory`` arguments (``dataset_json``, ``image_root``, ``encoder``,
            ``class_ids``, ``context_ratio``, ``mask_pooling``, ``batch_size``, ``keep_patch_features``,
            ``shots``, ``apply_exif``).

    Returns:
        The bank on process 0 (bytes equal to one process's), None on the others.

    Raises:
        BadReferenceError and the other errors of ``fill_memory`` on the process that hit them;
        OtherProcessUserError / OtherProcessFailedError on every other process.
    """
    plan = part = failure = None
    try:
        plan = plan_fill(refs, **plan_kwargs)
        mine = batches_of_process(len(plan.batches), rank, world_size)
        part = encode_references(plan, plan_kwargs["encoder"], mine, progress=progress)
    except Exception as err:  # exchanged below: every process must hear of it before any gathering
        failure = err
    report = (
        None
        if failure is None
        else _Failure(f"{type(failure).__name__}: {failure}", isinstance(failure, UserError))
    )
    reports = all_gather(report)
    if failure is not None:
        raise failure
    failed = [(r, f) for r, f in enumerate(reports) if f is not None]
    if failed:
        r, f = failed[0]
        cls = OtherProcessUserError if f.user else OtherProcessFailedError
        raise cls(f"fill_memory failed on process {r} of {world_size}: {f.error}")
    parts = gather(part)
    if parts is None:
        return None
    return assemble_bank(
        plan,
        parts,
        encoder_name=encoder_name_of(plan_kwargs["encoder"], encoder_name),
        seed=seed,
        config_hash=config_hash,
    )
