"""Metric loggers. Results are files first (metrics.json); a logger only mirrors them to a dashboard.

Names on W&B: ``bbox/<metric>`` and ``segm/<metric>`` are metrics.json's values as they are (fractions,
COCOeval's iouType names, -1 = no ground truth); ``box/<metric>`` and ``mask/<metric>`` are the same box AP
and mask AP in percent, the numbers of `ntt summarize`'s tables (a -1 is left out, never -100).
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


class NullLogger:
    """Logs nothing (the default): metrics.json in the run directory is the record."""

    def log_config(self, config: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, Any]) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbLogger(NullLogger):
    """Mirrors the resolved config and the flattened metrics to one W&B run (main process only)."""

    def __init__(
        self,
        *,
        project: str,
        entity: str | None,
        mode: str,
        group: str | None,
        tags: list[str],
        name: str,
        run_dir: str,
    ) -> None:
        import wandb  # heavy and optional: imported only when asked for

        self._wandb = wandb
        self._run = wandb.init(
            project=project,
            entity=entity,
            mode=mode,
            group=group,
            tags=list(tags),
            name=name,
            dir=run_dir,
            reinit=True,
        )

    def log_config(self, config: dict[str, Any]) -> None:
        self._run.config.update(config, allow_val_change=True)

    def log_metrics(self, metrics: dict[str, Any]) -> None:
        """Scalars as history + summary; the per-class AP and the run's summary row as W&B Tables."""
        scalars = {k: v for k, v in metrics.items() if k not in ("per_class", "config", "identity")}
        flat = {k: v for k, v in _flatten(scalars).items() if isinstance(v, (int, float))}
        flat.update(percent_aps(metrics))
        tables = {}
        per_class = [r for r in metrics.get("per_class") or [] if isinstance(r, dict)]
        if per_class:
            columns = sorted({k for row in per_class for k in row}, key=lambda k: (k != "name", k))
            tables["per_class_AP"] = self._wandb.Table(
                columns=columns, data=[[row.get(c) for c in columns] for row in per_class]
            )
        summary_cols = ["dataset", "sam2", "dinov2", "variant", "shots", "seed", "config_id", "num_images"]
        summary_cols += [k for k in flat if k.startswith(("bbox/", "segm/", "box/", "mask/"))]
        row = {**{k: metrics.get(k) for k in summary_cols[:8]}, **flat}
        tables["summary"] = self._wandb.Table(columns=summary_cols, data=[[row.get(c) for c in summary_cols]])
        self._run.log({**flat, **tables})
        self._run.summary.update(flat)

    def finish(self) -> None:
        """End the run with everything on disk: `run.finish()` can return before wandb-core (its own
        process) has written the offline run file (seen: only the 7-byte header, in 1 of 3 tries on a busy
        machine); `wandb.teardown()` waits for it. The next job's logger starts a new service (~1 s)."""
        self._run.finish()
        self._wandb.teardown()


# metrics.json's COCOeval iouType -> the name its AP goes by on W&B next to it
CLEAR_NAMES = {"bbox": "box", "segm": "mask"}


def percent_aps(metrics: dict[str, Any]) -> dict[str, float]:
    """``{"box/AP": 36.8, "mask/AP": 34.2, ...}``: metrics.json's bbox and segm values in percent, the numbers
    of `ntt summarize`'s tables; -1 (no ground truth) and non-numbers are left out.

    Args:
        metrics: metrics.json's content (``bbox`` and ``segm``: COCOeval stats as fractions).
    """
    out = {}
    for iou_type, clear in CLEAR_NAMES.items():
        for name, value in (metrics.get(iou_type) or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
                out[f"{clear}/{name}"] = 100.0 * value
    return out


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        else:
            out[key] = v
    return out


def build_logger(
    *,
    kind: str = "none",
    project: str = "ntt",
    entity: str | None = None,
    mode: str = "offline",
    group: str | None = None,
    tags: list[str] | None = None,
    name: str = "run",
    run_dir: str = ".",
    is_main: bool = True,
) -> NullLogger:
    """Build the metric logger of the `logger` config group.

    Args:
        kind: `none` or `wandb`.
        project: W&B project.
        entity: W&B entity (team/user); null = your default.
        mode: W&B mode: `offline` (default; sync later), `online` or `disabled`.
        group: W&B group (the config's `study_name` by default: one group per study, e.g. coco).
        tags: W&B tags.
        name: run name (the app passes the config-derived run name).
        run_dir: where W&B writes its files (the run directory).
        is_main: only the main process logs; other processes get a NullLogger.
    """
    if kind == "none" or not is_main:
        return NullLogger()
    if kind == "wandb":
        return WandbLogger(
            project=project,
            entity=entity,
            mode=mode,
            group=group,
            tags=tags or [],
            name=name,
            run_dir=run_dir,
        )
    raise ValueError(f"logger.kind={kind!r} is not known; use `none` or `wandb`")
