"""Compose and run the Hydra pipeline with the smoke settings (tiny RANDOM backbones: plumbing only)."""

from __future__ import annotations

from pathlib import Path

from conftest import REPO
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

# Every artifact of a finished run (the run directory's contract, docs/ARCHITECTURE.md), config.yaml aside.
RUN_ARTIFACTS = [
    "refs.json",
    "memory.pt",
    "memory_postprocessed.pt",
    "predictions.json",
    "metrics.json",
    "stage_sample_refs.json",
    "stage_fill_memory.json",
    "stage_postprocess_memory.json",
    "stage_test.json",
]


def compose_smoke(tmp_path: Path, *overrides: str, small: tuple[str, ...] = ()):
    """``conf/main.yaml`` + ``debug=smoke`` on CPU, outputs and the run directory (``run``) under ``tmp_path``.

    Args:
        tmp_path: folder for outputs; the run directory is ``tmp_path / "run"``.
        overrides: further Hydra overrides (applied last).
        small: overrides that shrink the dataset (applied before ``overrides``).
    """
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(
            config_name="main",
            overrides=[
                "debug=smoke",
                "device=cpu",
                f"paths.output_dir={tmp_path}",
                f"run_dir={tmp_path / 'run'}",
                *small,
                *overrides,
            ],
        )


def run_smoke(tmp_path: Path, *overrides: str, small: tuple[str, ...] = ()):
    """Run the pipeline on :func:`compose_smoke`'s config; returns what ``run_pipeline`` returns."""
    from ntt.runner import run_pipeline

    return run_pipeline(compose_smoke(tmp_path, *overrides, small=small))


def count_calls(monkeypatch, owner, name: str) -> list[tuple]:
    """Wrap ``owner.<name>`` so each call's positional arguments are appended to the returned list (the
    function still runs); undone by ``monkeypatch`` at the end of the test."""
    calls: list[tuple] = []
    real = getattr(owner, name)

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, counting)
    return calls
