"""`ntt run` (the stages of one config, or a Hydra multirun) and `ntt study` (the jobs of a sweep).

`ntt run` composes `conf/main.yaml` (+ the `experiments/` root) with Hydra's app and runs `cfg.stages`:
    python -m ntt run --cfg job --resolve                       # print the fully resolved config
    python -m ntt run dataset=synthetic debug=smoke             # random-weight smoke run
    python -m ntt run paper=coco_30shot                         # the paper's COCO 30-shot run
    accelerate launch -m ntt run paper=coco_30shot              # the same on every GPU of the machine

A user error (bad input or config, `ntt.utils.errors.UserError`) prints one message and exits with status 2
(`ntt.utils.console`). A multirun, and a study, end with the list of every failed job and why.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ntt.utils import dist
from ntt.utils.console import show_traceback, take_verbose, user_error_exit
from ntt.utils.errors import UserError
from ntt.utils.files import write_json_atomic

log = logging.getLogger("ntt")

# (overrides, error) of every failed job of this process's multirun, filled by `FailedJobs`
FAILED_JOBS: list[tuple[str, str]] = []
# Jobs that run in other processes (Hydra's submitit/SLURM launcher) report into this folder under the sweep
# dir (a shared filesystem on a cluster); its path reaches them through the environment variable.
FAILURES_ENV = "NTT_MULTIRUN_FAILURES"
FAILURES_DIR: list[Path] = []


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:  # no Hydra config (called outside the app)
        return False


class FailedJobs(Callback):
    """Hydra callback (conf/hydra/default.yaml): records every failed job of a multirun.

    Hydra itself stops at the end of the sweep with the first failure only; `main` then prints them all. Jobs
    run in this process append to `FAILED_JOBS`; jobs run elsewhere (submitit) write one json file each into
    the folder that `on_multirun_start` made and announced in ``NTT_MULTIRUN_FAILURES``.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        import time

        sweep_dir = Path(str(config.hydra.sweep.dir))
        folder = sweep_dir / ".ntt_multirun" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        folder.mkdir(parents=True, exist_ok=True)
        os.environ[FAILURES_ENV] = str(folder)
        import ntt.runner.main as registry  # see _report_failed_jobs: the module object `main` reads

        registry.FAILURES_DIR[:] = [folder]

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        import hashlib

        from hydra.core.utils import JobStatus
        from hydra.types import RunMode

        # Hydra calls this for a single run too: only a multirun's jobs are listed at its end
        if (
            job_return.status != JobStatus.FAILED
            or OmegaConf.select(config, "hydra.mode") != RunMode.MULTIRUN
        ):
            return
        err = getattr(job_return, "_return_value", None)
        overrides = " ".join(job_return.overrides or []) or "(no overrides)"
        why = f"{type(err).__name__}: {err}"
        FAILED_JOBS.append((overrides, why))
        log.error("job failed [%s]: %s", overrides, err)
        folder = os.environ.get(FAILURES_ENV)
        if folder and Path(folder).is_dir():
            name = hashlib.sha256(overrides.encode()).hexdigest()[:16] + ".json"
            write_json_atomic(Path(folder) / name, {"overrides": overrides, "error": why}, indent=None)


def _collect_failed_jobs() -> list[tuple[str, str]]:
    """This process's failed jobs, then those other processes reported, each once, in a stable order."""
    import json
    import shutil

    import ntt.runner.main as registry

    jobs = list(registry.FAILED_JOBS)
    for folder in registry.FAILURES_DIR:
        for f in sorted(folder.glob("*.json")):
            try:
                rec = json.loads(f.read_text())
                jobs.append((str(rec["overrides"]), str(rec["error"])))
            except (OSError, ValueError, KeyError):
                continue
        shutil.rmtree(folder, ignore_errors=True)
        try:
            folder.parent.rmdir()  # .ntt_multirun, when no other multirun uses it
        except OSError:
            pass
    seen: set[str] = set()
    unique = []
    for overrides, why in jobs:
        if overrides not in seen:
            seen.add(overrides)
            unique.append((overrides, why))
    return unique


def report_failures(failed: list[tuple[str, str]], what: str) -> None:
    """The end of a multirun or a study: every failed job (its overrides) and the first line of its error.

    Args:
        failed: `(job overrides, error)` pairs.
        what: `multirun` or `study`.
    """
    if not failed:
        return
    lines = [f"{len(failed)} job(s) of the {what} failed:"]
    for overrides, why in failed:
        first = why.strip().splitlines()[0] if why.strip() else why
        lines.append(f"  - {overrides}\n      {first}")
    lines.append("The other jobs' results are kept; rerun the same command to retry only what is missing.")
    sys.stderr.write("\n".join(lines) + "\n")


@hydra.main(version_base="1.3", config_path="pkg://ntt.conf", config_name="main")
def _app(cfg: DictConfig) -> float | None:
    from ntt.runner.lifecycle import run_pipeline

    try:
        metrics = run_pipeline(cfg)
    except UserError as err:
        if show_traceback() or _in_multirun():
            raise  # a multirun records it per job (FailedJobs) and goes on
        sys.exit(user_error_exit(err))  # `run_main` leaves the process group on the way out
    # Hydra sweepers (e.g. Optuna) read the return value: the bbox AP when there is one.
    if metrics and "bbox" in metrics:
        return float(metrics["bbox"]["AP"])
    return None


def run_main(argv: list[str] | None = None) -> int:
    """`ntt run [overrides]`: Hydra's app parses the overrides (and its own flags: `-m`, `--cfg`, ...), after
    `check_command_line` refused a bad line."""
    argv = take_verbose(sys.argv[1:] if argv is None else argv)
    check_command_line(argv)
    sys.argv = ["ntt run", *argv]
    try:
        _app()
    finally:
        dist.shutdown()
        # Hydra instantiates the callback from `ntt.runner.main`, which is not `__main__` when this file runs
        # as a script: `_collect_failed_jobs` reads the lists from that module object
        report_failures(_collect_failed_jobs(), "multirun")
    return 0


def check_command_line(argv: list[str]) -> None:
    """Refuse a bad `ntt run` line before Hydra's app makes a directory: every job of it (every job of the
    sweep with `-m`) composed exactly as Hydra will, then `configcheck.check_config` (keys, types, stages,
    writable folders). Lines that ask for Hydra's own output (`--help`, `--cfg`, `--info`, ...) or another
    config tree (`-cp`, `-cn`, `-cd`) are left to Hydra's app.

    Raises:
        ConfigError: Hydra's composition error or the first bad key, as one line.
    """
    from hydra._internal.utils import get_args_parser

    from ntt.runner.configcheck import check_config
    from ntt.utils.compose import compose_all

    args = get_args_parser().parse_args(argv)
    hydra_own = (
        args.help,
        args.hydra_help,
        args.cfg,
        args.info,
        args.shell_completion,
        args.experimental_rerun,
    )
    if any(hydra_own) or args.config_path or args.config_name or args.config_dir:
        return
    jobs = expand_sweep(args.overrides) if args.multirun else [args.overrides]
    for cfg in compose_all(jobs, return_hydra_config=True, job_name="run"):
        check_config(cfg)


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """The override list of every job of `ntt run -m <overrides>`, in Hydra's basic-sweeper order.

    The sweep params of the composed config (`hydra.sweeper.params`, e.g. from `study=coco`) come first,
    then the command line's overrides (a command-line sweep of the same key replaces the config's).
    """
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from ntt.utils.compose import compose

    parser = OverridesParser.create()
    parsed = parser.parse_overrides(overrides)
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    base = compose(fixed, return_hydra_config=True, job_name="ntt_study")
    params = dict(base.hydra.sweeper.get("params") or {})
    args = [f"{k}={v}" for k, v in params.items()] + list(overrides)
    batches = BasicSweeper.split_arguments(parser.parse_overrides(args), None)
    return [list(job) for batch in batches for job in batch]


def compose_jobs(overrides: list[str]) -> list[tuple[list[str], DictConfig]]:
    """`(job overrides, composed config)` of every job of the sweep (the config a Hydra job receives)."""
    from ntt.utils.compose import compose_all

    jobs = expand_sweep(overrides)
    return list(zip(jobs, compose_all(jobs, job_name="ntt_study")))


STUDY_USAGE = """usage: ntt study [-v] [--list] [hydra overrides, sweeps included]

Run every job of a sweep with ONE pass over the test images for all memory banks that share the test
images, backbones, proposer and pooling (the expensive per-image work runs once per image, not once per job).
Results equal separate `ntt run` jobs byte for byte; each lands in its own run directory.

  ntt study study=coco                                    # the paper's COCO shots x seeds study (60 banks)
  ntt study dataset=synthetic debug=smoke shots=1,2 seed=1,2,3
  ntt study --list study=coco                             # print the jobs and their run directories only
  torchrun --nproc_per_node 2 -m ntt study study=coco     # the images sharded over 2 processes
"""


def study_main(argv: list[str] | None = None) -> int:
    """`ntt study [-v] [--list] [overrides]`: see `STUDY_USAGE`; exit status 1 when a job failed."""
    from ntt.runner.configcheck import check_config
    from ntt.runner.lifecycle import run_jobs

    argv = take_verbose(list(sys.argv[1:] if argv is None else argv))
    if any(a in ("-h", "--help") for a in argv):
        print(STUDY_USAGE)
        return 0
    list_only = "--list" in argv
    overrides = [a for a in argv if a != "--list"]
    jobs = compose_jobs(overrides)  # Hydra's composition errors are `ConfigError`s
    for _, cfg in jobs:
        check_config(cfg)  # every job, before the first one writes anything
    if list_only:
        for job, cfg in jobs:
            print(f"{cfg.run_dir}\t{' '.join(job)}")
        return 0
    log.info("study: %d job(s)", len(jobs))
    try:
        done = run_jobs([cfg for _, cfg in jobs], [" ".join(job) or "(no overrides)" for job, _ in jobs])
    finally:
        dist.shutdown()  # torchrun: leave the process group before exiting (ntt.utils.dist.shutdown)
    for job in done:
        where = job.ctx.run_dir if job.ctx is not None else "?"
        log.info("study: %-6s %s  [%s]", "ok" if job.error is None else "FAILED", where, job.name)
    failed = [(j.name, j.error) for j in done if j.error is not None]
    report_failures(failed, "study")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_main())
