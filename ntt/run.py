"""The one entry point: `python -m ntt.run [overrides]` (console script `ntt-run`).

Composes `conf/main.yaml` (+ the `experiments/` root) and runs `cfg.stages`. Examples:
    python -m ntt.run --cfg job --resolve                       # print the fully resolved config
    python -m ntt.run dataset=synthetic debug=smoke             # random-weight smoke run
    python -m ntt.run +paper=coco_30shot                        # the paper's COCO 30-shot run
    accelerate launch -m ntt.run +paper=coco_30shot             # the same on every GPU of the machine
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
log = logging.getLogger("ntt")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="main")
def _app(cfg: DictConfig) -> float | None:
    from ntt.pipeline import run_pipeline

    metrics = run_pipeline(cfg)
    # Hydra sweepers (e.g. Optuna) read the return value: the bbox AP when there is one.
    if metrics and "bbox" in metrics:
        return float(metrics["bbox"]["AP"])
    return None


def main() -> None:
    """Console-script entry (`ntt-run`): Hydra parses sys.argv."""
    _app()


if __name__ == "__main__":
    main()
