#!/usr/bin/env bash
# Seed sweep 'dmc' (see scripts/sweep.py --help): the dominance paper's 12 tasks x 7 mitigations x 6 seeds, each run
# 500k frames (jaxrl's max_steps) and reacher-easy_masked 4M frames (its reward mask lasts 500k gradient steps).
# Further configurations: CONFIGS=ln_switch (LayerNorm switched on part-way, paper Figs. 10/16; use with
# TASKS=reacher-easy_masked) and CONFIGS=resnet18 (paper Fig. 12). Overrides: environment variables
#   ALGO GAMES CONFIGS SEEDS EXTRA N RUNS_DIR   or the same as flags (--games "Pong Breakout" ...).
# Flags: --dry-run (print the commands), --slurm (submit a job array; with --dry-run print the sbatch script).
exec python "$(dirname "$0")/sweep.py" dmc "$@"
