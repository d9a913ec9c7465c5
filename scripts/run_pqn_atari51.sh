#!/usr/bin/env bash
# Seed sweep 'pqn51' (see scripts/sweep.py --help). Overrides: environment variables
#   ALGO GAMES CONFIGS SEEDS EXTRA N RUNS_DIR   or the same as flags (--games "Pong Breakout" ...).
# Flags: --dry-run (print the commands), --slurm (submit a job array; with --dry-run print the sbatch script).
exec python "$(dirname "$0")/sweep.py" pqn51 "$@"
