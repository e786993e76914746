"""The experiment runner: `ntt run` and `ntt study` (a run is a study of one job).

main.py        the two commands (Hydra app, sweep expansion, failure report)
lifecycle.py   the one orchestrator: jobs open, run their memory stages, share test passes, close
plan.py        what a job will do: stages to run, upstream checks, test images left
stages.py      the memory stages and their manifests
testloop.py    one pass over the test images for one job or many
lines.py       per-image result lines, their merge and evaluation
keys.py        every hash key and what it decides (glossary)
context.py     a job's typed config, run directory, rank, shared models and jsons
preflight.py   input checks before any stage; reuse.py: sibling run directories; runlock.py: one run per dir
memory_shard.py  fill_memory over several processes; writer.py: result lines off the critical path
loggers.py     W&B mirror of metrics.json; summarize.py: `ntt summarize` tables

The tables' functions are public here for the report (`ntt report`, another wing): `collect_runs` (one row
per metrics.json), `collect_class_rows` (one row per run and class), `seed_stats_table` (box and mask AP
over seeds), `write_shot_plots` (AP against shots) and `RUN_METRICS` (the box and mask AP columns).
"""

from ntt.runner.context import StageError
from ntt.runner.lifecycle import Job, run_jobs, run_pipeline
from ntt.runner.seedstats import stats_table as seed_stats_table
from ntt.runner.summarize import METRICS as RUN_METRICS
from ntt.runner.summarize import collect as collect_runs
from ntt.runner.summarize import collect_per_class as collect_class_rows
from ntt.runner.summarize import write_plots as write_shot_plots

__all__ = [
    "RUN_METRICS",
    "Job",
    "StageError",
    "collect_class_rows",
    "collect_runs",
    "run_jobs",
    "run_pipeline",
    "seed_stats_table",
    "write_shot_plots",
]
