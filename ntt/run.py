"""The one entry point: `python -m ntt.run [overrides]` (console script `ntt-run`).

Composes `conf/main.yaml` (+ the `experiments/` root) and runs `cfg.stages`. Examples:
    python -m ntt.run --cfg job --resolve                       # print the fully resolved config
    python -m ntt.run dataset=synthetic debug=smoke             # random-weight smoke run
    python -m ntt.run +paper=coco_30shot                        # the paper's COCO 30-shot run
    accelerate launch -m ntt.run +paper=coco_30shot             # the same on every GPU of the machine

A user error (bad input or config, `ntt.errors.UserError`) prints one message and exits with status 2;
`-v` / `--verbose` (or `HYDRA_FULL_ERROR=1`, `NTT_TRACEBACK=1`) shows its traceback too. Any other
exception is a bug and keeps its traceback. A multirun ends with the list of every failed job and why.
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

from ntt import dist
from ntt.errors import UserError

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
log = logging.getLogger("ntt")
USER_ERROR_EXIT = 2
VERBOSE_FLAGS = ("-v", "--verbose")

# (overrides, error) of every failed job of this process's multirun, filled by `FailedJobs`
FAILED_JOBS: list[tuple[str, str]] = []
# Jobs that run in other processes (Hydra's submitit/SLURM launcher) report into this folder under the sweep
# dir (a shared filesystem on a cluster); its path reaches them through the environment variable.
FAILURES_ENV = "NTT_MULTIRUN_FAILURES"
FAILURES_DIR: list[Path] = []


def _show_traceback() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1" or os.environ.get("NTT_TRACEBACK") == "1"


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
        import ntt.run as registry  # see _report_failed_jobs: the module object `main` reads

        registry.FAILURES_DIR[:] = [folder]

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        import hashlib
        import json

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
            (Path(folder) / name).write_text(json.dumps({"overrides": overrides, "error": why}))


def _collect_failed_jobs() -> list[tuple[str, str]]:
    """This process's failed jobs, then those other processes reported, each once, in a stable order."""
    import json
    import shutil

    import ntt.run as registry

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


def _report_failed_jobs() -> None:
    # Hydra instantiates the callback from `ntt.run`, a different module object than `__main__` under
    # `python -m ntt.run`: `_collect_failed_jobs` reads the lists from there
    jobs = _collect_failed_jobs()
    if not jobs:
        return
    lines = [f"{len(jobs)} job(s) of the multirun failed:"]
    for overrides, why in jobs:
        first = why.strip().splitlines()[0] if why.strip() else why
        lines.append(f"  - {overrides}\n      {first}")
    lines.append("The other jobs' results are kept; rerun the same command to retry only what is missing.")
    sys.stderr.write("\n".join(lines) + "\n")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="main")
def _app(cfg: DictConfig) -> float | None:
    from ntt.pipeline import run_pipeline

    try:
        metrics = run_pipeline(cfg)
    except UserError as err:
        if _show_traceback() or _in_multirun():
            raise  # a multirun records it per job (FailedJobs) and goes on
        log.error("%s", err)
        sys.exit(USER_ERROR_EXIT)  # `main` leaves the process group on the way out
    # Hydra sweepers (e.g. Optuna) read the return value: the bbox AP when there is one.
    if metrics and "bbox" in metrics:
        return float(metrics["bbox"]["AP"])
    return None


def main() -> None:
    """Console-script entry (`ntt-run`): Hydra parses sys.argv (after our own `-v` / `--verbose`)."""
    if any(a in VERBOSE_FLAGS for a in sys.argv[1:]):
        sys.argv = [sys.argv[0]] + [a for a in sys.argv[1:] if a not in VERBOSE_FLAGS]
        os.environ["NTT_TRACEBACK"] = "1"
    try:
        _app()
    finally:
        dist.shutdown()
        _report_failed_jobs()


if __name__ == "__main__":
    main()
