"""Scale-out launchers (ntt/utils/dist.py, conf/hydra/launcher/): two real CPU processes give the bytes of one.

- `accelerate launch --multi_gpu --num_processes 2` starts two CPU processes (gloo) on a machine without GPUs;
- `accelerate launch --cpu --num_processes 2` starts ONE (Accelerate needs MPI for that): ntt warns;
- Hydra's submitit launcher (`hydra/launcher=slurm`, tested through its local twin `slurm_local`): the tasks
  of one job form one world and shard the test images.
Random tiny backbones: every metric here measures plumbing only, never accuracy.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import yaml
from conftest import REPO
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from ntt.utils import dist

# memory batches of 2 crops (4 classes x 2 shots: 4 batches): with two processes each encodes two of them
SMALL = [
    "dataset=synthetic",
    "dataset.synthetic.num_images=9",
    "dataset.max_test_images=3",
    "debug=smoke",
    "matcher.memory.batch_size=2",
]
COMPARED = ["refs.json", "memory.pt", "predictions.json", "metrics.json"]
HAS_SUBMITIT = importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None
needs_submitit = pytest.mark.skipif(
    not HAS_SUBMITIT, reason="hydra-submitit-launcher not installed (pip install -e '.[slurm]')"
)


def _env(tmp: Path) -> dict[str, str]:
    # one thread per process; HF_HOME: no `accelerate config` default file of this machine is read
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HOME=str(tmp / "hf"), PYTHONUNBUFFERED="1")


def _launch(cmd: list[str], tmp: Path) -> str:
    proc = subprocess.run(cmd, cwd=REPO, env=_env(tmp), capture_output=True, text=True, timeout=400)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def _run_dir(out_dir: Path) -> Path:
    (run_dir,) = out_dir.glob("synthetic/*/*/smoke-*")
    return run_dir


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The run directory of the same smoke run in one process (the bytes every launch must reproduce)."""
    out = tmp_path_factory.mktemp("one")
    _launch([sys.executable, "-m", "ntt", "run", "device=cpu", f"paths.output_dir={out}", *SMALL], out)
    return _run_dir(out)


def _assert_same_bytes(run_dir: Path, reference: Path, world_size: int) -> None:
    assert run_dir.relative_to(run_dir.parents[3]) == reference.relative_to(reference.parents[3])
    shards = sorted(p.name for p in (run_dir / "predictions").glob("rank*.jsonl"))
    assert shards == [f"rank{r}.jsonl" for r in range(world_size)]  # every process did a share
    for name in COMPARED:
        assert (run_dir / name).read_bytes() == (reference / name).read_bytes(), name


# ---------------------------------------------------------------------------------------------------
# Accelerate


def test_accelerate_multi_gpu_flag_runs_two_cpu_processes(tmp_path, one_process):
    """The documented CPU multi-process line: two processes, each a share of the images, same bytes."""
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    log = _launch([*cmd, "-m", "ntt", "run", "device=cpu", f"paths.output_dir={out}", *SMALL], tmp_path)
    assert "for this process (0/2)" in log and "for this process (1/2)" in log
    assert "kB, 2 process(es))" in log  # the bank was filled by both processes
    _assert_same_bytes(_run_dir(out), one_process, world_size=2)


def test_accelerate_cpu_flag_starts_one_process_and_ntt_says_so(tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts one process: ntt warns and names what works."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2"]
    overrides = [f"paths.output_dir={tmp_path}", *SMALL, "stages=[sample_refs]"]
    log = _launch([*cmd, "-m", "ntt", "run", *overrides], tmp_path)
    assert "started ONE" in log and "--multi_gpu --num_processes N" in log and "torchrun" in log


@pytest.mark.parametrize(
    ("env", "lost"),
    [
        ({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1"}, True),  # --cpu --num_processes 2
        ({"ACCELERATE_USE_CPU": "True"}, False),  # --cpu, one process asked for
        ({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "WORLD_SIZE": "2"}, False),
        ({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "h", "OMPI_COMM_WORLD_SIZE": "4"}, False),  # mpirun
        ({"ACCELERATE_USE_CPU": "False", "MASTER_ADDR": "127.0.0.1"}, False),
        ({"MASTER_ADDR": "127.0.0.1"}, False),  # not Accelerate's CPU launcher
    ],
)
def test_lost_processes_detection(monkeypatch, env, lost):
    for name in ["ACCELERATE_USE_CPU", "MASTER_ADDR", *dist.WORLD_SIZE_VARS]:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert dist.accelerate_cpu_launch_lost_processes() is lost


def test_state_warns_once_in_the_lost_process(monkeypatch, caplog):
    for name in dist.WORLD_SIZE_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    dist._warn_lost_processes.cache_clear()
    with caplog.at_level(logging.WARNING, logger="ntt.utils.dist"):
        assert dist.state().num_processes == 1
        dist.state()
    assert [r.message for r in caplog.records].count(dist.CPU_LAUNCH_WARNING) == 1


# ---------------------------------------------------------------------------------------------------
# SLURM through Hydra's submitit launcher


def _launcher_cfg(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="main", overrides=list(overrides), return_hydra_config=True)


def test_slurm_launcher_files_are_plugin_configs():
    """Readable without the plugin: each extends the plugin's own config and is placed at hydra.launcher."""
    for name, base in [("slurm", "submitit_slurm"), ("slurm_local", "submitit_local")]:
        path = REPO / "conf" / "hydra" / "launcher" / f"{name}.yaml"
        text = path.read_text()
        assert text.startswith("# @package hydra.launcher"), path
        assert yaml.safe_load(text)["defaults"] == [base, "_self_"], path


@needs_submitit
def test_slurm_launcher_composes_with_partition_from_the_environment(monkeypatch, tmp_path):
    from hydra.utils import instantiate

    monkeypatch.setenv("NTT_SLURM_PARTITION", "gpu-long")
    monkeypatch.delenv("NTT_SLURM_ACCOUNT", raising=False)
    cfg = _launcher_cfg(
        "hydra/launcher=slurm", "hydra.launcher.gpus_per_node=4", f"paths.output_dir={tmp_path}"
    )
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.partition == "gpu-long" and launcher.account is None
    assert launcher.tasks_per_node == 4  # one task (process) per GPU
    assert launcher.max_num_timeout > 0  # requeue is safe: every stage resumes
    assert launcher.submitit_folder == f"{tmp_path}/.submitit/%j"  # beside the run dirs
    built = instantiate(launcher)  # the target imports and accepts every key
    assert built.params["tasks_per_node"] == 4 and built.params["partition"] == "gpu-long"


@needs_submitit
def test_cfg_hydra_resolves_the_slurm_launcher_target(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "ntt",
        "run",
        "hydra/launcher=slurm",
        "--cfg",
        "hydra",
        "-p",
        "hydra.launcher",
    ]
    out = _launch(cmd, tmp_path)
    assert "_target_: hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher" in out


@needs_submitit
@pytest.mark.parametrize(("ntasks", "rank"), [(2, 1), (1, 0)])
def test_a_submitit_task_exports_its_world(ntasks, rank):
    """Task `rank` of a local submitit job of `ntasks` tasks: RANK/WORLD_SIZE/MASTER_* for Accelerate."""
    world = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"]
    # patch.dict restores the whole environment: the variables the code under test sets must not leak
    # into later tests (a leaked RANK=1 makes every later 2-process launch wait forever)
    before = dict(os.environ)
    with mock.patch.dict(os.environ):
        for name in [*world, *dist.WORLD_SIZE_VARS]:
            os.environ.pop(name, None)
        os.environ |= {
            "SUBMITIT_EXECUTOR": "local",
            "SUBMITIT_LOCAL_JOB_ID": "4242",
            "SUBMITIT_LOCAL_NODEID": "0",
        }
        os.environ |= {"SUBMITIT_LOCAL_NTASKS": str(ntasks), "SUBMITIT_LOCAL_JOB_NUM_NODES": "1"}
        os.environ |= {"SUBMITIT_LOCAL_GLOBALID": str(rank), "SUBMITIT_LOCAL_LOCALID": str(rank)}
        dist._submitit_world()
        if ntasks == 1:
            assert not any(name in os.environ for name in world)  # a one-task job stays a plain process
            return
        assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("1", "2", "1")
        port = os.environ["MASTER_PORT"]
        assert 20000 <= int(port) <= 60000
        for name in world:
            del os.environ[name]
        os.environ["SUBMITIT_LOCAL_GLOBALID"] = os.environ["SUBMITIT_LOCAL_LOCALID"] = "0"
        dist._submitit_world()
        assert os.environ["RANK"] == "0" and os.environ["MASTER_PORT"] == port  # every task: the same port
    assert dict(os.environ) == before


@needs_submitit
@pytest.mark.slow
def test_submitit_job_with_two_tasks_shards_images_like_two_processes(tmp_path, one_process):
    """`hydra/launcher=slurm_local` (submitit's local executor, the SLURM code path without a scheduler),
    a job of 2 tasks: one world of 2 processes, same bytes as one process."""
    out = tmp_path / "two"
    cmd = [
        sys.executable,
        "-m",
        "ntt",
        "run",
        "-m",
        "hydra/launcher=slurm_local",
        "hydra.launcher.tasks_per_node=2",
        "hydra.launcher.timeout_min=5",  # a hung job ends itself (submitit kills its tasks)
    ]
    _launch([*cmd, "device=cpu", f"paths.output_dir={out}", *SMALL], tmp_path)
    job_logs = "".join(p.read_text() for p in out.glob(".submitit/*/*_log.*"))
    assert "task 0 of 2" in job_logs and "task 1 of 2" in job_logs
    _assert_same_bytes(_run_dir(out), one_process, world_size=2)
