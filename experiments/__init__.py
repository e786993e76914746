"""The experiment config root (studies, paper runs, ablations), installed as the package `ntt.experiments`.

Only yaml lives here; `conf/main.yaml` puts it on Hydra's searchpath as `pkg://ntt.experiments`, so the
experiment groups are found from any working directory and from an installed wheel.
"""
