#!/usr/bin/env bash
# Seed sweep 'mrq' (see scripts/sweep.py --help): MR.Q on DMC-Visual, the HR v2 paper's 7 hard tasks (dog-*,
# humanoid-*) by default, all 28 DMC-Visual tasks with --all, x {baseline, hr, widen} x seeds 1-5, 1M frames each.
# Overrides: environment variables
#   GAMES (or TASKS; `all` or `hard` name the sets) CONFIGS SEEDS EXTRA N RUNS_DIR   or the same as flags
#   (--games "dog-run humanoid-run" ...); more configurations: hr_convs hr_zsa hr_all widen_all.
# Flags: --all (the 28 tasks), --dry-run (print the commands), --slurm (submit a job array; with --dry-run print the
# sbatch script).
args=()
for a in "$@"; do
  if [ "$a" = "--all" ]; then args+=(--games all); else args+=("$a"); fi
done
exec python "$(dirname "$0")/sweep.py" mrq "${args[@]}"
