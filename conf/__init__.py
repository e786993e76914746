"""The Hydra config root (`conf/main.yaml` and its groups), installed as the package `ntt.conf`.

Only yaml lives here; this file makes the folder importable so that Hydra reaches it as `pkg://ntt.conf`
from any working directory and from an installed wheel (pyproject.toml maps `ntt.conf` to `conf/`).
"""
