#!/usr/bin/env bash
# Seed sweep 'simbav2' (see scripts/sweep.py --help): the 7 hard dm_control state tasks (HumanoidBench's stand-ins)
# x {baseline, hr, widen} x seeds 1-5, 1M frames each. Overrides: environment variables
#   GAMES (or TASKS) CONFIGS SEEDS EXTRA N RUNS_DIR   or the same as flags (--games "humanoid-run dog-run" ...);
#   more configurations: hr_critic widen_critic hr_shared.
# Flags: --dry-run (print the commands), --slurm (submit a job array; with --dry-run print the sbatch script).
exec python "$(dirname "$0")/sweep.py" simbav2 "$@"
