"""Process-count-independent distributed helpers on top of Accelerate.

Inference is sharded by image id: process r takes ids r, r + W, r + 2W, ... (a fixed interleave, so the
assignment is a function of the id list and W only), writes its own result shard, and the main process
merges shards in dataset order. Results therefore never depend on the number of processes.

Launchers that start the processes (docs/running.md, "Multi-GPU, multi-node, SLURM"):
- `torchrun` and `accelerate launch` (GPUs; `--multi_gpu` also starts several CPU processes with gloo);
- Hydra's submitit launcher (`hydra/launcher=slurm`): the tasks of one job form one world (`_submitit_world`).
`accelerate launch --cpu --num_processes N` starts ONE process (Accelerate runs several CPU processes only
through MPI); `state()` detects it and says what to run instead.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)

# Environment variables by which torch.distributed (env://) or an MPI launcher announce a world.
WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")

CPU_LAUNCH_WARNING = (
    "`accelerate launch --cpu` was asked for several processes (it set MASTER_ADDR) but started ONE: "
    "Accelerate starts several CPU processes only through MPI (`--mpirun_hostfile`). This run goes on in "
    "one process (same results, one process's speed). For N CPU processes run "
    "`accelerate launch --multi_gpu --num_processes N -m ntt run ...` (no GPU needed: gloo) or "
    "`torchrun --nproc_per_node N -m ntt run ...`."
)


def _env_world_size() -> int:
    for name in WORLD_SIZE_VARS:
        if os.environ.get(name):
            return int(os.environ[name])
    return 1


def accelerate_cpu_launch_lost_processes() -> bool:
    """True in the single process that `accelerate launch --cpu --num_processes N>1` starts without MPI.

    Accelerate's CPU launcher sets ACCELERATE_USE_CPU and, only when more than one process or machine was
    asked for, MASTER_ADDR; it then starts one plain process with no world (no WORLD_SIZE, no MPI size).
    """
    env = os.environ
    use_cpu = env.get("ACCELERATE_USE_CPU", "").lower() in ("true", "1", "yes")
    return use_cpu and "MASTER_ADDR" in env and _env_world_size() <= 1


def _submitit_world() -> None:
    """Inside a multi-task submitit job (Hydra's submitit launcher), export its torch.distributed world.

    submitit starts one process per task (`tasks_per_node` x `nodes`, e.g. one per GPU) but sets only its
    own SLURM / SUBMITIT variables; RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (same port on
    every task: derived from the job id) make the tasks one Accelerate world that shards the test images.
    A world already set by a launcher (torchrun, accelerate inside the job) is left alone.
    """
    if not os.environ.get("SUBMITIT_EXECUTOR") or _env_world_size() > 1 or "RANK" in os.environ:
        return
    import submitit

    if submitit.JobEnvironment().num_tasks <= 1:
        return
    # CUDA_VISIBLE_DEVICES stays as the scheduler set it: Accelerate picks cuda:<LOCAL_RANK> itself.
    # overwrite: a MASTER_ADDR exported by a setup line names the same first host; MASTER_PORT is kept.
    world = submitit.helpers.TorchDistributedEnvironment().export(
        set_cuda_visible_devices=False, overwrite=True
    )
    log.info(
        "submitit job: task %d of %d (local rank %d), master %s:%d",
        world.rank,
        world.world_size,
        world.local_rank,
        world.master_addr,
        world.master_port,
    )


@functools.cache
def _warn_lost_processes() -> None:
    log.warning(CPU_LAUNCH_WARNING)


def state():
    """Accelerate's PartialState (a single CPU/GPU process when not launched distributed)."""
    import torch
    from accelerate import PartialState

    _submitit_world()
    # Without cpu=True Accelerate ignores a torchrun/`accelerate launch` world on a machine without CUDA
    # and every process believes it is alone (each would then do all the work).
    st = PartialState(cpu=not torch.cuda.is_available())
    if st.num_processes == 1 and accelerate_cpu_launch_lost_processes():
        _warn_lost_processes()
    return st


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


def all_gather_object(obj: Any) -> list[Any]:
    """Every process's `obj` (picklable), in rank order, on every process (`[obj]` in a single process)."""
    st = state()
    if st.num_processes == 1:
        return [obj]
    import torch.distributed as tdist

    out: list[Any] = [None] * st.num_processes
    tdist.all_gather_object(out, obj)
    return out


def gather_object(obj: Any) -> list[Any] | None:
    """Every process's `obj` in rank order on the main process; None on the others."""
    st = state()
    if st.num_processes == 1:
        return [obj]
    import torch.distributed as tdist

    out: list[Any] | None = [None] * st.num_processes if st.is_main_process else None
    tdist.gather_object(obj, out, dst=0)
    return out


def shutdown() -> None:
    """Destroy the default torch.distributed process group, if any (before a distributed process exits).

    Left to interpreter exit, the group's background threads can be torn down while a peer that has already
    exited (e.g. after a user error on every process) closes its connections: the C++ runtime then aborts
    ("terminate called without an active exception") and the exit status becomes -6 instead of ours.
    """
    try:
        import torch.distributed as tdist

        if tdist.is_available() and tdist.is_initialized():
            tdist.destroy_process_group()
    except Exception as err:  # never mask the exit status or the error being reported
        log.debug("destroy_process_group failed: %s", err)


def resolve_device(device: str) -> str:
    """`auto` -> this process's accelerator device (cuda:<local rank>) or cpu; anything else as given."""
    if device != "auto":
        return device
    return str(state().device)
