#!/usr/bin/env python
"""Turn runs/ into the papers' tables and figures, in one command.

    python scripts/analyze.py runs --out results

Reads every run directory under RUNS_DIR (its args.json, TensorBoard event files and `finished` summary), groups
runs by algorithm, configuration, environment and seed, and writes to --out tables as Markdown (tables.md) and CSV
and figures as PNG and PDF (scripts/plots.py: paper column/page width, axes labelled with their unit):
- results.csv                     one row per run: final score (mean of the last 5% of training episodes), final eval
                                  return, normalised scores, final value (last 5% of probes) of every metric.
- aggregates.csv                  per algorithm, configuration and score: median / IQM / mean / optimality gap with
                                  95% stratified-bootstrap CIs, computed by rliable on the (runs x tasks) matrix.
- probability_of_improvement.csv  rliable's P(config > baseline) with its 95% CI.
- tables.md                       the aggregates, the dormant-fraction table (HR v1 Table 2 / HR v2 Table 1: tanh,
                                  ReLU, sigmoid without / with HR beside the predicted p^2, 1-(1-p)^2, p), HR v2
                                  Table 2 (baseline, +HR, +widen, +2HR; table2_hr_v2.md with the DQN, SimbaV2, MR.Q
                                  columns), SimbaV2 / MR.Q per-task returns, and every run left out and why;
                                  table_dormant_<algo>.csv, table2_<algo>.csv, table2_hr_v2.csv beside it.
- curves_<algo>          median and IQM normalised score over training, 95% stratified-bootstrap bands (PQN: over
                         environment frames, the HR v2 51-game and Hadamax Atari-57 curves).
- games_<algo>           per-game learning curves, mean over seeds with standard error (tasks_<algo>: eval return,
                         SimbaV2 / MR.Q).
- final_<algo>           per-game bars of the final normalised score (Hadamax per-game bars).
- representation_<algo>  HR v2 Figure 2's layout: score, dormant fraction (KDE-peak test) and srank of --layer.
- metrics_<algo>         dormant fraction (KDE-peak test and ReDo score <= tau), srank and hidden bias (HR v1).
- aggregates_<algo>, profiles_<algo>, improvement_<algo>   rliable's interval estimates, performance profiles and
                         probability of improvement over the baseline (relu / baseline / none).
- dominance_<algo>       largest activation score against return, srank and dormant share (dominance paper Fig. 9).

Metrics recomputed after the fact: with --metrics-from SETTING the representation metrics come from
runs/NAME/probe/SETTING/ (scripts/probe.py on the runs' snapshots: own, redo_tau=T, kde_threshold=K, srank_delta=D)
instead of the runs' own events, e.g. the dormant table at another ReDo threshold:
    python scripts/probe.py runs/* --redo-tau 0 0.025 0.1
    python scripts/analyze.py runs --metrics-from redo_tau=0.025 --dormant-test score --out results_tau0.025

Step units: agent steps on Atari (one action = 4 frames), frames on DMC; PQN's aggregate curves are drawn over
environment frames (4 per agent step) as its papers plot them. Representation metrics are drawn at the steps they
were probed; episode returns as means over --curve-points windows, a window without an episode being a gap (no
forward fill). The curves span the longest run (runs of different lengths are listed in tables.md); each point
aggregates the runs with a value there.

Intervals: rliable needs the same number of runs on every task, so a task with more runs than the fewest keeps its
first seeds (tables.md counts the runs dropped). With fewer than two runs per task an interval is not defined: the
tables say so and the figures draw no band ("1 seed: no interval").

Which runs count: only finished runs (runs/NAME/finished, the JSON summary the scripts write on a clean exit) with at
least one complete episode enter the numbers. tables.md lists apart: runs that finished without a complete episode,
runs still going or stopped, runs/NAME.partial-<time> directories (moved aside when a run was started again), and
run directories that could not be read (reported and skipped). An empty RUNS_DIR is an error (exit status 1). An
older `finished` that is not JSON (an empty marker) still marks the run finished, its step count then read from its
last logged step.

SimbaV2 is scored as the HR v2 paper scores it (App. D.3): the mean evaluation return over the final 5% of training,
task-normalised (dm_control: return / 1000; MuJoCo: (return - random) / (TD3 - random)); tables.md adds its Table 2
column beside the paper's and the per-task returns beside SimbaV2's published ones. MR.Q (DMC-Visual) is scored the
same way, baseline-normalised per task (the return over the baseline configuration's mean final eval return); its
Table 2 column is on the 7 hard tasks (seeds averaged per task, then IQM and mean across tasks), beside the per-task
returns and MR.Q's published ones.

Baseline normalisation (HR papers, App. D.1): per game, lo/hi are the lowest and highest points of the ReLU
configuration's learning curves (all seeds, whole training; curves are episode returns averaged in --curve-points
windows), so lo is about the random-policy score.
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import re
import sys
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import plots  # noqa: E402

SCRIPT_ALGO = {"dqn_atari_hr": "dqn", "ppo_atari_hr": "ppo", "pqn_atari_hr": "pqn", "drq_dmc_dominance": "drq",
               "simbav2_dmc_hr": "simbav2", "mrq_dmc_hr": "mrq"}
KNOWN_CONFIGS = {"relu", "tanh", "sigmoid", "hr_sigmoid", "2hr_relu", "tanh_ln", "hr_tanh", "hr_relu", "widen_relu",
                 "widen_tanh", "2hr_tanh", "hadamax",
                 "crelu", "redo", "none", "ln", "lnwd", "hlgauss", "reset", "prune",
                 "baseline", "hr", "widen", "hr_critic", "widen_critic", "hr_shared"}
# Algorithms scored on their evaluation episodes, as their papers do (the mean eval return over the final 5% of
# training, HR v2 App. D.3), with per-task curves of eval/episodic_return; the others on training episodes.
EVAL_SCORED = {"simbav2", "mrq"}
DMC_ALGOS = {"drq", "simbav2", "mrq"}  # step unit: frames (action-repeated); the Atari scripts count agent steps
# SimbaV2's published returns at 1M frames (mean of 10 seeds; the official repo's results): the dm_control stand-ins
# for HumanoidBench, which is not installable. A GPU sweep's baseline is checked against these.
SIMBAV2_PUBLISHED = {"humanoid-stand": 916, "humanoid-walk": 652, "humanoid-run": 195, "dog-stand": 981,
                     "dog-walk": 936, "dog-trot": 862, "dog-run": 563, "Humanoid-v4": 10546}
# MuJoCo (random, TD3) returns the SimbaV2 code normalises by; dm_control tasks: (0, 1000), their return range.
MUJOCO_RANDOM_TD3 = {"HalfCheetah-v4": (-289.415, 10574), "Hopper-v4": (18.791, 3226), "Walker2d-v4": (2.791, 3946),
                     "Ant-v4": (-70.288, 3942), "Humanoid-v4": (120.423, 5165)}
# HR v2 paper, Table 2 (IQM of success-normalised scores on 14 HumanoidBench tasks): baseline, + HR, + widen
PAPER_TABLE2 = {"simbav2": (0.71, 0.84, 0.76)}
# MR.Q's published DMC-Visual returns at 1M frames (500k agent steps; mean of 10 seeds, facebookresearch/MRQ
# results/dmc-visual_results.txt), and the HR v2 paper's Table 2 MR.Q column (7 hard tasks, baseline-normalised).
MRQ_PUBLISHED = {"acrobot-swingup": 287.1, "ball_in_cup-catch": 977.3, "cartpole-balance": 999.1,
                 "cartpole-balance_sparse": 1000.0, "cartpole-swingup": 868.3, "cartpole-swingup_sparse": 797.2,
                 "cheetah-run": 775.6, "dog-run": 60.2, "dog-stand": 216.2, "dog-trot": 65.3, "dog-walk": 77.0,
                 "finger-spin": 965.3, "finger-turn_easy": 953.7, "finger-turn_hard": 932.9, "fish-swim": 79.7,
                 "hopper-hop": 270.3, "hopper-stand": 852.8, "humanoid-run": 1.4, "humanoid-stand": 7.9,
                 "humanoid-walk": 2.4, "pendulum-swingup": 829.3, "quadruped-run": 498.4, "quadruped-walk": 833.9,
                 "reacher-easy": 979.8, "reacher-hard": 965.7, "walker-run": 615.9, "walker-stand": 980.6,
                 "walker-walk": 970.3}
DMCV_HARD = ("dog-run", "dog-stand", "dog-trot", "dog-walk", "humanoid-run", "humanoid-stand", "humanoid-walk")
MRQ_PAPER_TABLE2 = (1.00, 1.17, 0.97)
PUBLISHED = {"simbav2": ("SimbaV2", SIMBAV2_PUBLISHED), "mrq": ("MR.Q", MRQ_PUBLISHED)}
RUNNING_WINDOW_S = 15 * 60  # an unfinished run whose event file changed this recently counts as still running
PARTIAL = re.compile(r"\.partial-\d+$")  # runs/NAME.partial-<unix time>: moved aside by a fresh start (harness.py)


@dataclass
class RunData:
    path: str
    name: str
    args: dict
    algo: str
    config: str
    env_id: str
    seed: int
    status: str
    scalars: dict = field(default_factory=dict)  # tag -> (steps array, values array)
    summary: dict = field(default_factory=dict)  # runs/NAME/finished (JSON); {} when absent or an older marker

    @property
    def last_step(self) -> int:
        return max((int(s[-1]) for s, _ in self.scalars.values() if len(s)), default=0)

    @property
    def global_step(self) -> int:
        """Steps the run trained: its summary's global_step, else its last logged step."""
        return int(number(self.summary.get("global_step"), self.last_step))


def number(value, default=math.nan) -> float:
    """A summary field as a float (default when it is missing or not a finite number)."""
    try:
        x = float(value) if value is not None and not isinstance(value, bool) else default
    except (TypeError, ValueError):
        return default
    return x if math.isfinite(x) else default


def read_finished(run_dir: str) -> dict | None:
    """The end-of-run summary harness.Run.finish writes to runs/NAME/finished (global_step, wall_seconds, sps,
    probe_share, peak memory, ...). None when the run has not finished; {} for an older marker that is not a JSON
    object (an empty file); any subset of the keys is accepted."""
    path = os.path.join(run_dir, "finished")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


def read_event_scalars(run_dir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{tag: (steps, values)} of the event files directly in run_dir, read by one accumulator in file order as
    TensorBoard does: a resumed run's purge_step drops what the killed process logged after its checkpoint.
    Several episodes ending at the same step are all kept."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags().get("scalars", []):
        events = sorted(acc.Scalars(tag), key=lambda e: e.step)  # stable: same-step events keep their order
        out[tag] = (np.array([e.step for e in events], dtype=np.int64),
                    np.array([e.value for e in events], dtype=float))
    return out


def config_label(args: dict, algo: str) -> str:
    """The sweep's configuration name (its --exp-name) or one derived from the flags for hand-made runs."""
    name = str(args.get("exp_name", ""))
    if name in KNOWN_CONFIGS or (algo == "drq" and name.startswith("hr_")):
        return name
    if algo == "drq":
        return ("hr_" if args.get("hr") else "") + str(args.get("mitigation", "none"))
    if algo == "mrq":
        label = "hr" if args.get("hr") else "widen" if args.get("widen") else "baseline"
        layers = str(args.get("hr_layers", "zs"))
        return label if label == "baseline" or layers == "zs" else f"{label}_{layers.replace(',', '_')}"
    if algo == "simbav2":
        label = "hr" if args.get("hr") else "widen" if args.get("widen") else "baseline"
        if label != "baseline" and args.get("hr_networks") == "critic":
            label += "_critic"
        return label + ("_shared" if args.get("hr") and args.get("hr_scaler") == "shared" else "")
    if args.get("encoder") == "hadamax":
        return "hadamax"
    if args.get("redo"):
        return "redo"
    act = str(args.get("activation", "relu"))
    parts = []
    if args.get("hr"):
        parts.append("2hr" if int(args.get("hidden_layers", 1)) >= 2 else "hr")
    elif int(args.get("hidden_dim", 512)) > 512:
        parts.append("widen")
    parts.append(act)
    if args.get("layernorm") and algo in ("dqn", "ppo"):
        parts.append("ln")
    return "_".join(parts)


# an argument only that script has, so a run's algorithm is known from its args.json alone
SIGNATURE_ARGS = (("enc_horizon", "mrq"), ("c_shift", "simbav2"), ("mitigation", "drq"), ("q_lambda", "pqn"),
                  ("clip_coef", "ppo"), ("target_network_frequency", "dqn"))


def algorithm_of(args: dict, run_name: str) -> str:
    for key, algo in SIGNATURE_ARGS:
        if key in args:
            return algo
    return SCRIPT_ALGO.get(str(args.get("exp_name", ""))) or run_name.split("__")[0]


def recomputed_metrics(run_dir: str, setting: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The representation/* scalars scripts/probe.py recomputed for one setting (runs/NAME/probe/<setting>/); {}
    when the run has none."""
    d = os.path.join(run_dir, "probe", setting)
    if not glob.glob(os.path.join(d, "events.out.tfevents.*")):
        return {}
    return {t: v for t, v in read_event_scalars(d).items() if t.startswith("representation/")}


def load_run(run_dir: str, now: float, metrics_from: str | None = None) -> RunData | None:
    args_path = os.path.join(run_dir, "args.json")
    if not os.path.exists(args_path):
        return None
    with open(args_path) as f:
        args = json.load(f)
    name = os.path.basename(run_dir.rstrip("/"))
    algo = algorithm_of(args, name)
    events = glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))
    summary = read_finished(run_dir)
    if summary is not None:
        status = "finished"
    elif PARTIAL.search(name):
        status = "moved aside"
    elif events and now - max(os.path.getmtime(e) for e in events) < RUNNING_WINDOW_S:
        status = "running"
    else:
        status = "stopped"
    run = RunData(run_dir, name, args, algo, config_label(args, algo), str(args.get("env_id", "?")),
                  int(args.get("seed", 0)), status, summary=summary or {})
    run.scalars = read_event_scalars(run_dir) if events else {}
    if metrics_from:  # the recomputed metrics in place of the inline ones; a run without them has none
        run.scalars = {t: v for t, v in run.scalars.items() if not t.startswith("representation/")}
        run.scalars.update(recomputed_metrics(run_dir, metrics_from))
    return run


def last_fraction_mean(values: np.ndarray, fraction: float = 0.05) -> float:
    if len(values) == 0:
        return math.nan
    k = max(1, int(math.ceil(fraction * len(values))))
    return float(np.mean(values[-k:]))


def game_of(run: RunData) -> str:
    if run.algo in ("drq", "simbav2", "mrq"):
        return run.env_id
    try:
        return common.atari_game_name(run.env_id)
    except ValueError:
        return run.env_id


def curve(run: RunData, grid: np.ndarray, tag: str = "charts/episodic_return") -> np.ndarray:
    """Mean of the tag's values in each window (grid[i-1], grid[i]]; NaN where the run logged nothing in a window
    (no forward fill: a run that stopped early, or a gap between episodes, stays a gap)."""
    steps, values = run.scalars.get(tag, (np.array([]), np.array([])))
    out = np.full(len(grid), np.nan)
    lo = -np.inf
    for i, hi in enumerate(grid):
        sel = (steps > lo) & (steps <= hi)
        if sel.any():
            out[i] = float(values[sel].mean())
        lo = hi
    return out


def normaliser(algo: str, runs: list[RunData], grid_of) -> tuple[str, dict]:
    """(kind, {game: (lo, hi)}): baseline-normalised for DQN/PPO (ReLU curves' min/max), human for PQN, raw for DMC;
    SimbaV2: task-normalised, (return - lo) / (hi - lo) with dm_control's (0, 1000) and MuJoCo's (random, TD3) (the
    analogue of HumanoidBench's (random, success threshold), App. D.3)."""
    if algo == "mrq":  # HR v2 Table 2: per task, over the baseline configuration's mean final eval return
        base = defaultdict(list)
        for r in runs:
            if r.config == "baseline" and not math.isnan(v := final_eval(r)):
                base[game_of(r)].append(v)
        return "baseline_normalized", {g: (0.0, float(np.mean(v))) for g, v in base.items() if np.mean(v) > 0}
    if algo == "simbav2":
        bounds = {g: MUJOCO_RANDOM_TD3.get(g, (0.0, 1000.0)) for g in {game_of(r) for r in runs}
                  if g in MUJOCO_RANDOM_TD3 or re.fullmatch(r"[a-z_]+-[a-z_]+", g)}
        return "task_normalized", bounds
    if algo in ("dqn", "ppo"):
        bounds = {}
        for game in sorted({game_of(r) for r in runs}):
            relu = [curve(r, grid_of(r)) for r in runs if game_of(r) == game and r.config == "relu"]
            vals = np.concatenate(relu) if relu else np.array([])
            vals = vals[~np.isnan(vals)]
            if vals.size and vals.max() > vals.min():
                bounds[game] = (float(vals.min()), float(vals.max()))
        return "baseline_normalized", bounds
    if algo == "pqn" or algo not in ("drq",):
        bounds = {}
        for game in {game_of(r) for r in runs}:
            if game in common.ATARI_RANDOM_HUMAN:
                bounds[game] = common.ATARI_RANDOM_HUMAN[game]
        return "human_normalized", bounds
    return "return", {}


def normalise(score, game: str, kind: str, bounds: dict):
    if kind == "return":
        return score
    if game not in bounds:
        return math.nan if np.isscalar(score) else np.full(np.shape(score), np.nan)
    lo, hi = bounds[game]
    return (np.asarray(score, dtype=float) - lo) / (hi - lo)




# ---------------------------------------------------------------------------------------------------------------
# Aggregation through rliable (Agarwal et al. 2021): score matrices of shape (runs, tasks), stratified bootstrap.
# ---------------------------------------------------------------------------------------------------------------
STAT_NAMES = ("median", "iqm", "mean", "optimality_gap")
STAT_LABELS = {"median": "Median", "iqm": "IQM", "mean": "Mean", "optimality_gap": "Optimality gap"}
NOT_DEFINED = "not defined (< 2 runs per task)"


def score_matrix(values_by_task: dict[str, list[float]]) -> tuple[np.ndarray, list[str], int]:
    """(matrix (runs, tasks), task names, runs dropped). rliable needs the same number of runs on every task: a task
    with more runs than the fewest keeps its first ones (in the order given: by seed) and the rest are counted as
    dropped (reported in tables.md)."""
    tasks = sorted(t for t, v in values_by_task.items() if len(v))
    if not tasks:
        return np.zeros((0, 0)), [], 0
    k = min(len(values_by_task[t]) for t in tasks)
    matrix = np.array([[float(values_by_task[t][i]) for t in tasks] for i in range(k)])
    return matrix, tasks, sum(len(values_by_task[t]) for t in tasks) - k * len(tasks)


def aggregate_funcs(gamma: float = 1.0) -> Callable[[np.ndarray], np.ndarray]:
    """rliable's median, IQM, mean and optimality gap (threshold gamma) of a (runs, tasks) matrix, as one array."""
    from rliable import metrics

    return lambda x: np.array([metrics.aggregate_median(x), metrics.aggregate_iqm(x), metrics.aggregate_mean(x),
                               metrics.aggregate_optimality_gap(x, gamma)])


def rliable_intervals(scores, func, reps: int, seed: int):
    """rliable.library.get_interval_estimates({"x": scores}, func) -> (points, cis), 95% percentile, reproducible:
    rliable 1.2.0's stratified bootstraps draw their indices from numpy's GLOBAL generator (np.random.choice in
    update_indices) and ignore the random_state they are given, so the global generator is seeded with `seed` for
    the call and restored afterwards."""
    from rliable import library as rly

    state = np.random.get_state()
    np.random.seed(seed)
    try:
        with warnings.catch_warnings():  # arch 7 deprecates random_state, which rliable 1.2.0 passes
            warnings.simplefilter("ignore", FutureWarning)
            points, cis = rly.get_interval_estimates({"x": scores}, func, reps=reps,
                                                     random_state=np.random.RandomState(seed))
    finally:
        np.random.set_state(state)
    return points["x"], cis["x"]


def interval_estimates(matrix: np.ndarray, func, reps: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(points, lows, highs) of func's outputs: rliable's 95% percentile stratified bootstrap on the matrix, seeded
    with `seed` (rliable_intervals). With fewer than two runs per task the interval is not defined: lows/highs are
    NaN."""
    point = np.atleast_1d(np.asarray(func(matrix), dtype=float))
    if matrix.shape[0] < 2:
        return point, np.full_like(point, np.nan), np.full_like(point, np.nan)
    _, cis = rliable_intervals(matrix, func, reps, seed)
    ci = np.asarray(cis, dtype=float).reshape(2, -1)
    return point, ci[0], ci[1]


def aggregate(values_by_task: dict[str, list[float]], reps: int, seed: int,
              gamma: float = 1.0) -> dict[str, tuple[float, float, float]]:
    """{statistic: (point, lo, hi)} for median, IQM, mean and optimality gap across tasks (rliable; see
    score_matrix for unequal runs per task). {} without scores; NaN bounds with fewer than two runs per task."""
    matrix, _, _ = score_matrix(values_by_task)
    if not matrix.size:
        return {}
    point, lo, hi = interval_estimates(matrix, aggregate_funcs(gamma), reps, seed)
    return {name: (float(p), float(a), float(b)) for name, p, a, b in zip(STAT_NAMES, point, lo, hi)}


def fmt_ci(v):
    point, lo, hi = v
    if math.isnan(point):
        return "—"
    if math.isnan(lo) or math.isnan(hi):
        return f"{point:.3f} [CI not defined]"
    return f"{point:.3f} [{lo:.3f}, {hi:.3f}]"


def step_unit(algo: str) -> str:
    """What a run's step counts: agent steps on Atari (one action = 4 frames), frames on DMC (action-repeated)."""
    return "frames" if algo in DMC_ALGOS else "agent steps"


def frames_axis(algo: str) -> tuple[float, str]:
    """(multiplier, label) of the x axis of the aggregate curves: PQN is plotted over environment frames as the HR
    v2 and Hadamax papers plot it (4 per agent step), the others in their own step unit."""
    if algo == "pqn":
        return 4.0, "environment frames (4 per agent step)"
    return 1.0, step_unit(algo)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("runs_dir", help="directory holding one sub-directory per run (e.g. runs)")
    p.add_argument("--out", default="results", help="output directory (tables .md/.csv, figures .png/.pdf)")
    p.add_argument("--reps", type=int, default=2000, help="stratified-bootstrap resamples for the aggregate CIs")
    p.add_argument("--curve-reps", type=int, default=200, help="stratified-bootstrap resamples per curve point")
    p.add_argument("--curve-points", type=int, default=50,
                   help="windows per learning curve: episode returns are averaged over windows of horizon/N steps")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (rliable draws from numpy's global generator: seeded with it per call)")
    p.add_argument("--layer", default="latent",
                   help="layer whose metrics the Fig. 2 layout and the dormant tables show")
    p.add_argument("--dominance-layer", default=None,
                   help="layer for the dominance scatter (None: fc1 for DrQ, the layer before the critic's "
                        "penultimate one, as in the dominance paper; latent otherwise)")
    p.add_argument("--poi-reps", type=int, default=200,
                   help="bootstrap resamples for the probability-of-improvement CIs (rliable's Mann-Whitney per task "
                        "and resample is slow: about 4 ms per task)")
    p.add_argument("--dormant-test", choices=sorted(DORMANT_TESTS), default="kde",
                   help="the dormancy test of the dormant-fraction table: kde (the HR papers') or score (ReDo's "
                        "score <= tau, --redo-tau of the run or of a probe.py setting)")
    p.add_argument("--metrics-from", default=None, metavar="SETTING",
                   help="draw and tabulate the representation metrics scripts/probe.py recomputed from the runs' "
                        "snapshots (runs/NAME/probe/SETTING/, e.g. own, redo_tau=0.025, kde_threshold=10) in place "
                        "of the inline ones; a run without that setting has no metrics here (a warning names it)")
    p.add_argument("--formats", default="png,pdf", help="figure formats, comma-separated")
    p.add_argument("--dpi", type=int, default=plots.DPI, help="resolution of the PNG figures")
    return p.parse_args(argv)


def load_runs(runs_dir: str, now: float, metrics_from: str | None = None
              ) -> tuple[list[RunData], list[tuple[str, str]]]:
    """Every run directory under runs_dir; a directory that cannot be read (corrupt args.json or event file) is
    reported in the second list as (name, error) and skipped. metrics_from: see --metrics-from."""
    runs, broken = [], []
    for d in sorted(glob.glob(os.path.join(runs_dir, "*", ""))):
        try:
            r = load_run(d, now, metrics_from)
        except Exception as e:  # noqa: BLE001 - one bad directory must not abort the analysis
            broken.append((os.path.basename(d.rstrip("/")), f"{type(e).__name__}: {e}".splitlines()[0][:200]))
            continue
        if r is not None:
            runs.append(r)
    return runs, broken


def main(argv=None) -> int:
    a = parse_args(argv)
    MRQ_TABLE2_CELLS.clear()
    if not os.path.isdir(a.runs_dir):
        sys.exit(f"error: runs_dir {a.runs_dir!r} is not a directory")
    now = time.time()
    runs, broken = load_runs(a.runs_dir, now, a.metrics_from)
    for name, err in broken:
        print(f"warning: skipped {name}: cannot read it ({err})", file=sys.stderr)
    if a.metrics_from:
        without = [r.name for r in runs if not any(t.startswith("representation/") for t in r.scalars)]
        print(f"representation metrics from probe/{a.metrics_from}/ (scripts/probe.py)"
              + (f"; {len(without)} runs have none: {', '.join(without[:5])}" if without else ""), flush=True)
        if without:
            print(f"warning: {len(without)} runs have no probe/{a.metrics_from}/: run scripts/probe.py on them",
                  file=sys.stderr)
    if not runs:
        print(f"error: no run directories (with args.json) under {a.runs_dir!r}"
              + (f"; {len(broken)} could not be read" if broken else ""), file=sys.stderr)
        return 1
    score_tag = {r.name: ("eval/episodic_return" if r.algo in EVAL_SCORED else "charts/episodic_return") for r in runs}
    done = [r for r in runs if r.status == "finished" and score_tag[r.name] in r.scalars]
    no_episode = [r for r in runs if r.status == "finished" and r not in done]
    left_out = [r for r in runs if r.status != "finished"]
    print(f"{len(runs)} runs found: {len(done)} finished, {len(no_episode)} finished without a complete episode, "
          f"{len(left_out)} not finished, {len(broken)} unreadable")
    os.makedirs(a.out, exist_ok=True)
    formats = tuple(f for f in a.formats.split(",") if f)

    metric_tags = sorted({t for r in done for t in r.scalars if t.startswith("representation/")})
    rows = []
    for r in done:
        returns = r.scalars.get("charts/episodic_return", (np.array([]), np.array([])))[1]
        row = {"run": r.name, "algo": r.algo, "config": r.config, "env_id": r.env_id, "game": game_of(r),
               "seed": r.seed, "status": r.status, "last_step": r.last_step, "global_step": r.global_step,
               "wall_seconds": number(r.summary.get("wall_seconds")),
               "probe_share": number(r.summary.get("probe_share")),
               "episodes": len(returns), "final_score": last_fraction_mean(returns), "final_eval": final_eval(r)}
        for tag in metric_tags:
            row[tag] = last_fraction_mean(r.scalars[tag][1]) if tag in r.scalars else math.nan
        rows.append(row)
    rows.sort(key=lambda row: (row["algo"], row["config"], row["game"], row["seed"]))

    by_algo = defaultdict(list)
    for r in done:
        by_algo[r.algo].append(r)
    grids, horizons = {}, {}
    for algo, rs in by_algo.items():
        # every run's horizon: the steps it trained (its summary), else its last logged step; the curves span the
        # longest, each run contributing up to its own horizon (runs of different lengths are listed in tables.md)
        horizons[algo] = {r.name: max(r.last_step, r.global_step) for r in rs}
        horizon = max(horizons[algo].values())
        grids[algo] = np.linspace(horizon / a.curve_points, horizon, a.curve_points)

    agg_rows, poi_rows, figures = [], [], []
    tables = ["# Results", "", f"Runs under `{a.runs_dir}`: {len(done)} finished and scored, "
              f"{len(no_episode)} finished without a complete episode, {len(left_out)} not finished, "
              f"{len(broken)} unreadable (listed at the end). Intervals: 95% stratified-bootstrap CIs (rliable, "
              f"{a.reps} resamples, seed {a.seed}); with fewer than two runs per task the interval is {NOT_DEFINED}.",
              ""]
    for algo, rs in sorted(by_algo.items()):
        kind, bounds = normaliser(algo, rs, lambda r: grids[r.algo])
        kinds = [kind] + (["human_normalized"] if algo in ("dqn", "ppo") else [])
        human_bounds = normaliser("pqn", rs, None)[1]
        for row in rows:
            if row["algo"] == algo:
                score = row["final_eval"] if algo in EVAL_SCORED else row["final_score"]
                row[kind] = normalise(score, row["game"], kind, bounds)
                if "human_normalized" in kinds:
                    row["human_normalized"] = normalise(row["final_score"], row["game"], "human_normalized",
                                                        human_bounds)
        gamma = 1000.0 if kind == "return" else 1.0
        tables += [f"## {algo.upper()}", "", f"Scores: final score per run ({SCORE_DEFINITION[algo in EVAL_SCORED]}), "
                   f"normalised as `{kind}`; median / IQM / mean / optimality gap (threshold {gamma:g}) across "
                   "tasks over the (runs x tasks) score matrix, 95% stratified-bootstrap CI (rliable).", ""]
        tables += ["| config | runs | tasks | score | median | IQM | mean | optimality gap |",
                   "|---|---|---|---|---|---|---|---|"]
        dropped_lines, by_kind = [], {k: ({}, {}) for k in kinds}
        for config in sorted({r.config for r in rs}):
            for k in kinds:
                per_task = per_task_scores(rows, algo, config, k)
                matrix, _, dropped = score_matrix(per_task)
                if not matrix.size:
                    continue
                res = aggregate(per_task, a.reps, a.seed, gamma)
                n = matrix.size
                if dropped:
                    dropped_lines.append(f"- {config} ({k}): {dropped} runs beyond the {matrix.shape[0]} per task "
                                         "that every task has are left out of the aggregate (rliable needs equal "
                                         "runs per task)")
                by_kind[k][0][config] = {STAT_LABELS[s]: v for s, v in res.items()}
                by_kind[k][1][config] = (matrix, _tasks_of(per_task))
                for stat, (pt, lo, hi) in res.items():
                    agg_rows.append({"algo": algo, "config": config, "score": k, "statistic": stat, "value": pt,
                                     "ci_low": lo, "ci_high": hi, "tasks": matrix.shape[1], "runs": n,
                                     "runs_per_task": matrix.shape[0], "runs_dropped": dropped,
                                     "interval": "ok" if matrix.shape[0] >= 2 else NOT_DEFINED})
                tables.append(f"| {config} | {n} | {matrix.shape[1]} | {k} | " +
                              " | ".join(fmt_ci(res[s]) for s in STAT_NAMES) + " |")
        if any(r["algo"] == algo and r["interval"] != "ok" for r in agg_rows):
            tables += ["", "CI not defined: fewer than two runs per task."]
        tables += [""] + dropped_lines + ([""] if dropped_lines else [])
        tables += length_lines(rs, horizons[algo], algo)
        tables += wall_time_lines(rs)
        # the figures' score: the algorithm's own, else human-normalised (a DQN/PPO sweep without ReLU runs has no
        # baseline normalisation)
        fig_kind, fig_bounds = kind, bounds
        if not by_kind[kind][0] and "human_normalized" in by_kind and by_kind["human_normalized"][0]:
            fig_kind, fig_bounds = "human_normalized", human_bounds
            tables += [f"No `{kind}` scores (no ReLU runs to normalise by): the figures show `{fig_kind}`.", ""]
        estimates, matrices = by_kind[fig_kind]
        poi = improvement(matrices, algo, fig_kind, a.poi_reps, a.seed)
        poi_rows += poi
        tables += improvement_lines(poi)
        tables += table1(rows, algo, a.layer, a.out, a.dormant_test, a.metrics_from) + table2(rows, algo, kind, a.out)
        tables += table2_column(agg_rows, algo, kind) + published_table(rows, algo)
        tables += mrq_table2(rows, algo, a.reps, a.seed)
        figures += plot_aggregates(estimates, matrices, poi, algo, fig_kind, gamma, a, formats)
        figures += plot_curves(rs, grids[algo], fig_kind, fig_bounds, algo, a, formats)
        figures += plot_game_curves(rs, grids[algo], algo, a, formats)
        figures += plot_final_bars(rows, algo, fig_kind, a, formats)
        figures += plot_representation(rs, grids[algo], fig_kind, fig_bounds, algo, a, formats)
        figures += plot_metrics(rs, algo, a, formats)
        figures += plot_dominance(rows, algo, a, formats)

    tables += hr_v2_table2(agg_rows, rows, a.out)
    tables += ["## Runs finished without a complete episode", "", f"{len(no_episode)} runs (finished, but no "
               "episode/evaluation ended, so no score; e.g. a horizon shorter than one episode)."]
    tables += [f"- `{r.name}`: finished, last step {r.last_step}, no complete episode" for r in no_episode]
    tables += ["", "## Runs left out (not finished)", "", f"{len(left_out)} runs."]
    tables += [f"- `{r.name}`: {r.status}, last step {r.last_step}" for r in left_out]
    tables += ["", "## Run directories that could not be read (skipped)", "", f"{len(broken)} directories."]
    tables += [f"- `{name}`: {err}" for name, err in broken]
    write_csv(os.path.join(a.out, "results.csv"), rows)
    write_csv(os.path.join(a.out, "aggregates.csv"), agg_rows)
    write_csv(os.path.join(a.out, "probability_of_improvement.csv"), poi_rows)
    with open(os.path.join(a.out, "tables.md"), "w") as f:
        f.write("\n".join(tables) + "\n")
    print(f"wrote {a.out}/results.csv, aggregates.csv, probability_of_improvement.csv, tables.md and "
          f"{len(figures)} figure files")
    return 0


SCORE_DEFINITION = {False: "mean return of its last 5% of training episodes",
                    True: "mean evaluation return over the final 5% of training"}


def _tasks_of(per_task):
    return sorted(t for t, v in per_task.items() if len(v))


def per_task_scores(rows, algo, config, key) -> dict[str, list[float]]:
    """{game: [score of each seed, by seed]} of one configuration (rows are sorted by seed)."""
    per_task = defaultdict(list)
    for row in rows:
        if row["algo"] == algo and row["config"] == config and not math.isnan(row.get(key, math.nan)):
            per_task[row["game"]].append(row[key])
    return per_task


def length_lines(rs, horizons, algo) -> list[str]:
    """Runs of different lengths are reported (the curves span the longest; nothing is cut to the shortest)."""
    lengths = sorted(set(horizons.values()))
    if len(lengths) < 2:
        return []
    lines = [f"Runs of different lengths ({step_unit(algo)}): {lengths[0]} to {lengths[-1]}. The curves span the "
             "longest run; each point aggregates the runs that logged a value there.", ""]
    short = sorted((h, name) for name, h in horizons.items() if h < lengths[-1])
    return lines + [f"- `{name}`: {h}" for h, name in short] + [""]


BASELINE_OF = {"dqn": ("relu", "tanh"), "ppo": ("relu", "tanh"), "pqn": ("relu",), "simbav2": ("baseline",),
               "mrq": ("baseline",), "drq": ("none",)}


def baseline_config(algo, configs) -> str | None:
    return next((c for c in BASELINE_OF.get(algo, ()) if c in configs), None)


def improvement(matrices, algo, kind, reps, seed) -> list[dict]:
    """rliable's probability of improvement P(X > Y) of every configuration X over the algorithm's baseline Y
    (relu for DQN/PPO/PQN, baseline for SimbaV2/MR.Q, none for DrQ) on the tasks both have, with its 95% CI."""
    from rliable import metrics

    base = baseline_config(algo, matrices)
    out = []
    if base is None:
        return out
    ym, ytasks = matrices[base]
    for config, (xm, xtasks) in sorted(matrices.items()):
        if config == base:
            continue
        common_tasks = [t for t in xtasks if t in ytasks]
        if not common_tasks:
            continue
        x = xm[:, [xtasks.index(t) for t in common_tasks]]
        y = ym[:, [ytasks.index(t) for t in common_tasks]]
        point = float(metrics.probability_of_improvement(x, y))
        lo = hi = math.nan
        if min(x.shape[0], y.shape[0]) >= 2:
            _, cis = rliable_intervals((x, y), lambda a, b: np.array([metrics.probability_of_improvement(a, b)]),
                                       reps, seed)
            lo, hi = (float(v) for v in np.asarray(cis).ravel())
        out.append({"algo": algo, "config": config, "baseline": base, "score": kind, "value": point,
                    "ci_low": lo, "ci_high": hi, "tasks": len(common_tasks),
                    "interval": "ok" if not math.isnan(lo) else NOT_DEFINED})
    return out


def improvement_lines(poi) -> list[str]:
    if not poi:
        return []
    lines = [f"### Probability of improvement over `{poi[0]['baseline']}` (rliable, `{poi[0]['score']}`)", "",
             "| config | P(config > baseline) [95% CI] | tasks |", "|---|---|---|"]
    lines += [f"| {p['config']} | {fmt_ci((p['value'], p['ci_low'], p['ci_high']))} | {p['tasks']} |" for p in poi]
    return lines + [""]


def write_table(out_dir, stem, header, rows) -> None:
    """A table's CSV beside tables.md: out_dir/stem.csv."""
    with open(os.path.join(out_dir, f"{stem}.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
def final_eval(r: RunData) -> float:
    """Final evaluation return: for EVAL_SCORED algorithms the mean over the final 5% of training (at least the last
    evaluation; HR v2 App. D.3), else the mean of the last 10 evaluations."""
    if "eval/episodic_return" not in r.scalars:
        return math.nan
    steps, values = r.scalars["eval/episodic_return"]
    if r.algo in EVAL_SCORED:
        last = values[steps >= 0.95 * r.global_step]
        return float(np.mean(last)) if len(last) else float(values[-1])
    return float(np.mean(values[-10:]))


def table2_column(agg_rows, algo, kind):
    """HR v2 Table 2's column for an algorithm with configurations baseline / hr / widen: IQM over (task, seed) of the
    normalised score with its 95% CI, beside the paper's (on its own benchmark)."""
    iqm = {r["config"]: r for r in agg_rows if r["algo"] == algo and r["score"] == kind and r["statistic"] == "iqm"}
    if algo not in PAPER_TABLE2 or not any(c in iqm for c in ("baseline", "hr", "widen")):
        return []
    lines = [f"### Table 2 ({algo.upper()}): IQM `{kind}` score, parameter-matched widen", "",
             "| variant | ours: IQM [95% CI] | tasks | runs | paper |", "|---|---|---|---|---|"]
    for config, label, paper in zip(("baseline", "hr", "widen"), ("Baseline", "+ HR", "+ Widen"), PAPER_TABLE2[algo]):
        r = iqm.get(config)
        ours = (f"{r['value']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}] | {r['tasks']} | {r['runs']}" if r
                else "— | — | —")
        lines.append(f"| {label} | {ours} | {paper:.2f} |")
    return lines + ["", "The paper's numbers are on 14 HumanoidBench tasks (success-normalised); ours on the tasks "
                        "above (dm_control: return / 1000).", ""]


def published_table(rows, algo):
    """Per task: mean final eval return of each configuration (seeds) next to the published return (SimbaV2, MR.Q)."""
    if algo not in PUBLISHED:
        return []
    name, published = PUBLISHED[algo]
    mine = [r for r in rows if r["algo"] == algo and not math.isnan(r["final_eval"])]
    configs = sorted({r["config"] for r in mine}, key=lambda c: (c != "baseline", c))
    if not mine:
        return []
    lines = [f"### {name} per task: mean final eval return (seeds) and the published {name} return at 1M frames", "",
             "| task | published | " + " | ".join(configs) + " |", "|---" * (len(configs) + 2) + "|"]
    for task in sorted({r["game"] for r in mine}):
        cells = []
        for c in configs:
            v = [r["final_eval"] for r in mine if r["game"] == task and r["config"] == c]
            cells.append(f"{np.mean(v):.1f} (n={len(v)})" if v else "—")
        pub = published.get(task)
        lines.append(f"| {task} | {pub if pub is not None else '—'} | " + " | ".join(cells) + " |")
    return lines + [""]


MRQ_TABLE2_CELLS: dict = {}  # filled by mrq_table2 for hr_v2_table2: {"iqm": [(pt, lo, hi) per variant]}


def mrq_table2(rows, algo, reps, seed):
    """HR v2 Table 2's MR.Q column: on the 7 hard DMC-Visual tasks, each run's final eval return over its task's
    baseline mean, averaged over seeds per task, then IQM and mean across tasks; 95% stratified-bootstrap CIs by
    rliable (seeds resampled within each task of the (runs, tasks) matrix)."""
    from rliable import metrics

    if algo != "mrq":
        return []
    mine = [r for r in rows if r["algo"] == "mrq" and r["game"] in DMCV_HARD
            and not math.isnan(r.get("baseline_normalized", math.nan))]
    if not mine:
        return []
    lines = ["### Table 2 (MR.Q): baseline-normalised final eval return on the 7 hard DMC-Visual tasks", "",
             "| variant | ours: IQM [95% CI] | ours: mean [95% CI] | tasks | runs | paper |",
             "|---|---|---|---|---|---|"]

    def of_task_means(x):  # (runs, tasks) -> IQM and mean of the per-task means
        means = np.mean(x, axis=0)
        return np.array([metrics.aggregate_iqm(means), np.mean(means)])

    MRQ_TABLE2_CELLS.clear()
    cells_of = []
    for config, label, paper in zip(("baseline", "hr", "widen"), ("Baseline", "+ HR", "+ Widen"), MRQ_PAPER_TABLE2):
        per_task = per_task_scores(mine, "mrq", config, "baseline_normalized")
        matrix, tasks, _ = score_matrix(per_task)
        if not matrix.size:
            lines.append(f"| {label} | — | — | — | — | {paper:.2f} |")
            cells_of.append((math.nan,) * 3)
            continue
        pt, lo, hi = interval_estimates(matrix, of_task_means, reps, seed)
        cells = [fmt_ci((pt[i], lo[i], hi[i])) for i in range(2)]
        cells_of.append((float(pt[0]), float(lo[0]), float(hi[0])))
        lines.append(f"| {label} | {cells[0]} | {cells[1]} | {len(tasks)} | {matrix.size} | {paper:.2f} |")
    MRQ_TABLE2_CELLS["iqm"] = cells_of
    return lines + ["", "Normalised per task by the baseline's mean final eval return, so the baseline's per-task "
                        "means are 1 by construction; its CI shows the seed spread.", ""]


def wall_time_lines(rs: list[RunData]) -> list[str]:
    """Compute spent, from the runs' summaries (wall time over every process of a resumed run)."""
    hours = [number(r.summary.get("wall_seconds")) / 3600 for r in rs]
    hours = [h for h in hours if not math.isnan(h)]
    if not hours:
        return []
    return [f"Wall time (runs/NAME/finished) of {len(hours)} of {len(rs)} runs: median {np.median(hours):.2f} h "
            f"per run, {sum(hours):.1f} h in all.", ""]


def per_game_mean(rows, algo, config, key):
    per_task = defaultdict(list)
    for row in rows:
        if row["algo"] == algo and row["config"] == config and not math.isnan(row.get(key, math.nan)):
            per_task[row["game"]].append(row[key])
    return float(np.mean([np.mean(v) for v in per_task.values()])) if per_task else math.nan


# HR v1 Section 3 / Table 1: the dormant probability of a product of two independent neurons, each dormant with
# probability p (tanh and sigmoid: p/2 towards each end). tanh: both must saturate; ReLU: either zero kills it;
# sigmoid: 1 - (1 - p/2)^2 + (p/2)^2 = p (no change).
DORMANT_PREDICTION = (("tanh", "tanh", "hr_tanh", lambda p: p * p, "p^2"),
                      ("ReLU", "relu", "hr_relu", lambda p: 1 - (1 - p) ** 2, "1-(1-p)^2"),
                      ("sigmoid", "sigmoid", "hr_sigmoid", lambda p: p, "p"))


DORMANT_TESTS = {"kde": "KDE-peak test", "score": "ReDo score <= tau"}


def table1(rows, algo, layer, out_dir=None, test="kde", metrics_from=None):
    """HR v1 Table 2 / HR v2 Table 1: the final dormant fraction (`test`: KDE-peak test, or ReDo score <= tau) of
    `layer` without (p) and with HR for tanh, ReLU and sigmoid, next to the independence prediction; games averaged
    after seeds. Also written to out_dir/table_dormant_<algo>.csv. metrics_from: the probe.py setting the values
    come from (named in the title), None for the inline metrics."""
    key = f"representation/{layer}/dormant_{test}"
    lines, csv_rows = [], []
    for act, base, hr, predict, formula in DORMANT_PREDICTION:
        p = per_game_mean(rows, algo, base, key)
        q = per_game_mean(rows, algo, hr, key)
        if math.isnan(p) and math.isnan(q):
            continue
        pred = predict(p) if not math.isnan(p) else math.nan
        cell = lambda v: "—" if math.isnan(v) else f"{v:.3f}"  # noqa: E731
        diff = f"{100 * (q - p) / p:+.0f}%" if not (math.isnan(p) or math.isnan(q)) and p > 0 else "—"
        lines.append(f"| {act} | {cell(p)} | {cell(q)} | {formula} = {cell(pred)} | {diff} |")
        csv_rows.append([act, base, hr, p, q, formula, pred])
    if not any(not math.isnan(r[3]) and not math.isnan(r[4]) for r in csv_rows):
        return []
    if out_dir:
        write_table(out_dir, f"table_dormant_{algo}", ["activation", "config", "hr_config", "without_hr_p",
                                                        "with_hr_measured", "prediction", "with_hr_predicted"],
                    csv_rows)
    source = f", recomputed from snapshots (`{metrics_from}`)" if metrics_from else ""
    return [f"### Dormant fractions ({algo.upper()}; HR v1 Table 2, HR v2 Table 1): `{layer}`, "
            f"{DORMANT_TESTS[test]}, final{source}", "", "| activation | without HR (p) | with HR (measured) | with HR (predicted) | difference |",
            "|---|---|---|---|---|", *lines, "",
            f"Final value: mean of the last 5% of probes per run, seeds then games averaged. Prediction: two "
            f"independent neurons each dormant with probability p. CSV: `table_dormant_{algo}.csv`.", ""]


def table2(rows, algo, kind, out_dir=None):
    """HR v2 Table 2's DQN column (and the same for PPO): mean normalised score over games (seeds averaged) of
    baseline, +HR, +widen, +2HR per activation. Also written to out_dir/table2_<algo>.csv."""
    lines, csv_rows = [], []
    for act in ("tanh", "relu"):
        configs = (act, f"hr_{act}", f"widen_{act}", f"2hr_{act}")
        cells = [per_game_mean(rows, algo, c, kind) for c in configs]
        if sum(not math.isnan(c) for c in cells) >= 2:
            lines.append(f"| {act} | " + " | ".join("—" if math.isnan(c) else f"{c:.3f}" for c in cells) + " |")
            csv_rows.append([act, *cells])
    if not lines:
        return []
    if out_dir:
        write_table(out_dir, f"table2_{algo}", ["activation", "baseline", "hr", "widen", "2hr"], csv_rows)
    return [f"### Table 2 ({algo.upper()}; HR v2): mean `{kind}` score over games", "",
            "| activation | baseline | + HR | + widen | + 2HR |", "|---|---|---|---|---|", *lines, "",
            f"CSV: `table2_{algo}.csv`.", ""]


def hr_v2_table2(agg_rows, rows, out_dir) -> list[str]:
    """HR v2 Table 2 as the paper lays it out: Baseline / + HR / + Widen / + 2HR per algorithm. DQN: mean
    baseline-normalised score (rliable, over the (runs, games) matrix) of tanh / hr_tanh / widen_tanh / 2hr_tanh;
    SimbaV2: IQM task-normalised score; MR.Q: IQM baseline-normalised score on the 7 hard tasks (seeds averaged per
    task). Written to out_dir/table2_hr_v2.{md,csv} when any algorithm has two of the variants."""
    variants = ("Baseline", "+ HR", "+ Widen", "+ 2HR")
    cols = {}
    mean = {r["config"]: r for r in agg_rows if r["algo"] == "dqn" and r["statistic"] == "mean"
            and r["score"] == "baseline_normalized"}
    dqn = [mean.get(c) for c in ("tanh", "hr_tanh", "widen_tanh", "2hr_tanh")]
    if sum(v is not None for v in dqn) >= 2:
        cols["DQN (mean)"] = [(v["value"], v["ci_low"], v["ci_high"]) if v else (math.nan,) * 3 for v in dqn]
    iqm = {(r["algo"], r["config"]): r for r in agg_rows if r["statistic"] == "iqm"
           and r["score"] == "task_normalized"}
    simba = [iqm.get(("simbav2", c)) for c in ("baseline", "hr", "widen")]
    if sum(v is not None for v in simba) >= 2:
        cols["SimbaV2 (IQM)"] = [(v["value"], v["ci_low"], v["ci_high"]) if v else (math.nan,) * 3
                                 for v in simba] + [(math.nan,) * 3]
    mrq = MRQ_TABLE2_CELLS.get("iqm")
    if mrq and sum(not math.isnan(v[0]) for v in mrq) >= 2:
        cols["MR.Q (IQM, hard)"] = list(mrq) + [(math.nan,) * 3]
    if not cols:
        return []
    names = list(cols)
    lines = ["## HR v2 Table 2: baseline, + HR, + widen, + 2HR", "", "| variant | " + " | ".join(names) + " |",
             "|---" * (len(names) + 1) + "|"]
    csv_rows = []
    for i, v in enumerate(variants):
        lines.append(f"| {v} | " + " | ".join(fmt_ci(cols[n][i]) for n in names) + " |")
        csv_rows.append([v] + [x for n in names for x in cols[n][i]])
    lines += ["", "Paper: DQN 0.91 / 1.03 / 0.49 / 1.01; SimbaV2 0.71 / 0.84 / 0.76; MR.Q 1.00 / 1.17 / 0.97. "
              "CSV: `table2_hr_v2.csv`.", ""]
    write_table(out_dir, "table2_hr_v2", ["variant"] + [f"{n} {x}" for n in names for x in ("value", "ci_low",
                                                                                         "ci_high")], csv_rows)
    with open(os.path.join(out_dir, "table2_hr_v2.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return lines


def write_csv(path, rows):
    keys = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys or ["empty"])
        w.writeheader()
        for row in rows:
            w.writerow(row)



# ---------------------------------------------------------------------------------------------------------------
# Figures (scripts/plots.py: column-width figures, PNG + PDF, one colour per configuration)
# ---------------------------------------------------------------------------------------------------------------
DORMANT_DEFINITION = {"dormant_kde": "dormant fraction\n(KDE-peak test)",
                      "dormant_score": "dormant fraction\n(ReDo score $\\leq\\tau$)"}


def _save(fig, a, stem, formats):
    return plots.save(fig, a.out, stem, formats, dpi=a.dpi)


def _legend(fig, axes):
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h), labels.append(lab)
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3), bbox_to_anchor=(0.5, 1.0))


def aggregate_curve(per_task_curves: dict[str, list[np.ndarray]], grid, stat: str, reps: int, seed: int):
    """Pointwise rliable `stat` ("median" or "iqm") across tasks with its stratified-bootstrap CI: at each window,
    the runs with a value there (score_matrix of them); NaN where no run has one, NaN bounds with < 2 runs/task."""
    from rliable import metrics

    func = {"median": metrics.aggregate_median, "iqm": metrics.aggregate_iqm, "mean": metrics.aggregate_mean}[stat]
    point, lo, hi = (np.full(len(grid), np.nan) for _ in range(3))
    for i in range(len(grid)):
        per_task = {g: [c[i] for c in cs if not math.isnan(c[i])] for g, cs in per_task_curves.items()}
        matrix, _, _ = score_matrix(per_task)
        if matrix.size:
            p, a_, b_ = interval_estimates(matrix, lambda x: np.array([func(x)]), reps, seed)
            point[i], lo[i], hi[i] = p[0], a_[0], b_[0]
    return point, lo, hi


def _draw_interval_curve(ax, x, point, lo, hi, label, color):
    ok = ~np.isnan(point)
    if ok.any() and np.isnan(lo[ok]).all():
        label = f"{label} (< 2 runs per task: no interval)"
    ax.plot(x[ok], point[ok], label=label, color=color, marker="o" if ok.sum() == 1 else None, markersize=3)
    band = ok & ~np.isnan(lo)
    if band.any():
        ax.fill_between(x, np.where(band, lo, np.nan), np.where(band, hi, np.nan), color=color, alpha=0.2,
                        linewidth=0)


def plot_curves(rs, grid, kind, bounds, algo, a, formats):
    """Median and IQM across tasks of the normalised score over training (HR v2: PQN 51-game curves; Hadamax: the
    median human-normalised score over frames), 95% stratified-bootstrap bands."""
    tag = "eval/episodic_return" if algo in EVAL_SCORED else "charts/episodic_return"
    curves = _curves_by_config(rs, grid, tag, lambda r, c: normalise(c, game_of(r), kind, bounds))
    if not curves:
        return []
    scale, xlabel = frames_axis(algo)
    fig, axes = plots.figure(ncols=2, width="full", height=2.4)
    for ax, stat in zip(axes, ("median", "iqm")):
        for config, per_task in sorted(curves.items()):
            point, lo, hi = aggregate_curve(per_task, grid, stat, a.curve_reps, a.seed)
            _draw_interval_curve(ax, grid * scale, point, lo, hi, config, plots.color(config))
        plots.label(ax, xlabel, f"{STAT_LABELS[stat]} " + ("return" if kind == "return" else
                                                              f"{kind.replace('_', '-')} score"))
    fig.suptitle(f"{algo.upper()}: {len({game_of(r) for r in rs})} tasks, 95% stratified-bootstrap CI; "
                 f"returns averaged over windows of {grid[0] * scale:,.0f} {xlabel.split(' (')[0]}", y=1.0)
    _legend(fig, axes)
    return _save(fig, a, f"curves_{algo}", formats)


def plot_game_curves(rs, grid, algo, a, formats):
    """Per-game learning curves (HR v1 per-game figure): the return (eval return for SimbaV2 / MR.Q) averaged over
    windows, mean over seeds with a standard-error band, drawn at the windows where episodes ended."""
    tag = "eval/episodic_return" if algo in EVAL_SCORED else "charts/episodic_return"
    games = sorted({game_of(r) for r in rs})
    cols = min(4, len(games))
    nrows = -(-len(games) // cols)
    fig, axes = plots.figure(nrows, cols, width="full", height=1.7 * nrows + 0.5)
    unit = step_unit(algo)
    for ax, game in zip(axes, games):
        for config in sorted({r.config for r in rs}):
            cs = [(grid, curve(r, grid, tag)) for r in rs if game_of(r) == game and r.config == config
                  and tag in r.scalars]
            if cs:
                cs = [(s[~np.isnan(v)], v[~np.isnan(v)]) for s, v in cs]
                plots.curve_band(ax, cs, label=config, color=plots.color(config))
        plots.label(ax, unit, "eval return" if tag.startswith("eval") else "episode return", title=game)
    for ax in axes[len(games):]:
        ax.axis("off")
    fig.suptitle(f"{algo.upper()}: per-game {'evaluation ' if tag.startswith('eval') else ''}return, mean over "
                 f"seeds with standard error", y=1.0)
    _legend(fig, axes)
    return _save(fig, a, f"{'tasks' if algo in EVAL_SCORED else 'games'}_{algo}", formats)


def plot_final_bars(rows, algo, kind, a, formats):
    """Per-game bars of the final normalised score (Hadamax per-game bars), mean over seeds, standard-error bars
    (none with one seed)."""
    mine = [r for r in rows if r["algo"] == algo and not math.isnan(r.get(kind, math.nan))]
    if not mine:
        return []
    games = sorted({r["game"] for r in mine})
    configs = sorted({r["config"] for r in mine})
    values, errors = {}, {}
    for c in configs:
        vals = [[r[kind] for r in mine if r["game"] == g and r["config"] == c] for g in games]
        values[c] = [float(np.mean(v)) if v else math.nan for v in vals]
        errors[c] = [float(np.std(v, ddof=1) / math.sqrt(len(v))) if len(v) > 1 else math.nan for v in vals]
    width = "column" if len(games) <= 4 else "full"
    fig, axes = plots.figure(width=width, height=2.4 if len(games) <= 12 else 3.0)
    plots.bar_plot(axes[0], games, values, errors, ylabel=f"final {kind.replace('_', '-')} score",
                   rotate=0 if len(games) <= 4 else 90)
    axes[0].set_title(f"{algo.upper()}: per game, mean over seeds (error bar: s.e.; none with 1 seed)")
    return _save(fig, a, f"final_{algo}", formats)


def plot_aggregates(estimates, matrices, poi, algo, kind, gamma, a, formats):
    """rliable's aggregate intervals (median, IQM, mean, optimality gap), performance profiles and probability of
    improvement over the baseline, each in its own file."""
    from rliable import library as rly

    paths = []
    if not estimates:
        return paths
    label = kind.replace("_", "-") + " score"
    fig = plots.interval_plot(estimates, [STAT_LABELS[s] for s in STAT_NAMES], xlabel=label,
                              title=f"{algo.upper()}: 95% stratified-bootstrap CIs (rliable)")
    paths += _save(fig, a, f"aggregates_{algo}", formats)

    allv = np.concatenate([m.ravel() for m, _ in matrices.values()])
    taus = np.linspace(min(0.0, float(allv.min())), max(float(allv.max()), gamma if kind != "return" else 0), 101)
    profiles = {}
    for config, (m, _) in sorted(matrices.items()):
        func = lambda x: np.asarray(rly.score_distributions(x, taus))  # noqa: E731 - rliable's run score profile
        if m.shape[0] >= 2:
            pts, cis = rliable_intervals(m, func, a.curve_reps, a.seed)
            profiles[config] = (pts, cis[0], cis[1])
        else:
            profiles[config] = (func(m), None, None)
    fig, axes = plots.figure()
    plots.profile_plot(axes[0], taus, profiles, xlabel=f"{label} " + r"($\tau$)")
    axes[0].set_title(f"{algo.upper()}: performance profile")
    paths += _save(fig, a, f"profiles_{algo}", formats)

    if poi:
        est = {p["config"]: {f"P(config > {p['baseline']})": (p["value"], p["ci_low"], p["ci_high"])} for p in poi}
        fig = plots.interval_plot(est, xlabel="probability of improvement", width="column", xlim=(0, 1),
                                  title=f"{algo.upper()}: over {poi[0]['baseline']} (rliable, 95% CI)")
        fig.axes[0].axvline(0.5, color="k", linestyle=":", linewidth=0.8)
        paths += _save(fig, a, f"improvement_{algo}", formats)
    return paths


def _curves_by_config(rs, grid, tag, transform=lambda r, c: c):
    out = defaultdict(lambda: defaultdict(list))
    for r in rs:
        if tag in r.scalars:
            out[r.config][game_of(r)].append(transform(r, curve(r, grid, tag)))
    return out


def _logged(rs, config, tag, transform=lambda r, v: v):
    """Each run's (steps, values) of tag as logged (representation probes: no windowing)."""
    return [(r.scalars[tag][0], transform(r, r.scalars[tag][1])) for r in rs if r.config == config and tag in r.scalars]


def _metric_panel(ax, rs, tag, ylabel, unit, transform=lambda r, v: v):
    drawn = False
    for config in sorted({r.config for r in rs}):
        cs = _logged(rs, config, tag, transform)
        if cs:
            plots.curve_band(ax, cs, label=config, color=plots.color(config))
            drawn = True
    plots.label(ax, unit, ylabel)
    return drawn


def plot_representation(rs, grid, kind, bounds, algo, a, formats):
    """HR v2 Figure 2's layout: score, dormant fraction (KDE-peak test) and effective rank of `--layer` over
    training, mean over games and seeds with a standard-error band (the metrics at the probe steps logged)."""
    layer = a.layer
    tag = "eval/episodic_return" if algo in EVAL_SCORED else "charts/episodic_return"
    metric_tags = [f"representation/{layer}/dormant_kde", f"representation/{layer}/srank"]
    if not any(t in r.scalars for r in rs for t in metric_tags):
        return []
    unit = step_unit(algo)
    fig, axes = plots.figure(ncols=3, width="full", height=2.2)
    for config in sorted({r.config for r in rs}):
        cs = [(grid, normalise(curve(r, grid, tag), game_of(r), kind, bounds)) for r in rs if r.config == config]
        cs = [(s[~np.isnan(v)], v[~np.isnan(v)]) for s, v in cs]
        plots.curve_band(axes[0], cs, label=config, color=plots.color(config))
    plots.label(axes[0], unit, "return" if kind == "return" else f"{kind.replace('_', '-')} score")
    _metric_panel(axes[1], rs, metric_tags[0], DORMANT_DEFINITION["dormant_kde"], unit)
    _metric_panel(axes[2], rs, metric_tags[1], "effective rank\n(delta 0.01)", unit)
    fig.suptitle(f"{algo.upper()}: layer {layer}, mean over games and seeds, standard-error band", y=1.0)
    _legend(fig, axes)
    return _save(fig, a, f"representation_{algo}", formats)


def plot_metrics(rs, algo, a, formats):
    """HR v1's representation curves: dormant fraction by both definitions, effective rank, and the hidden bias
    (output contribution of dormant `latent` neurons), at the probe steps, mean over games and seeds."""
    layer = a.layer
    panels = [(f"representation/{layer}/dormant_kde", DORMANT_DEFINITION["dormant_kde"]),
              (f"representation/{layer}/dormant_score", DORMANT_DEFINITION["dormant_score"]),
              (f"representation/{layer}/srank", "effective rank\n(delta 0.01)"),
              ("representation/hidden_bias", "hidden bias (dormant neurons'\noutput contribution)")]
    panels = [(t, y) for t, y in panels if any(t in r.scalars for r in rs)]
    if not panels:
        return []
    unit = step_unit(algo)
    cols = min(2, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plots.figure(nrows, cols, width="full" if cols > 1 else "column", height=2.0 * nrows + 0.3)
    for ax, (tag, ylabel) in zip(axes, panels):
        _metric_panel(ax, rs, tag, ylabel, unit)
    for ax in axes[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{algo.upper()}: layer {layer}, mean over games and seeds, standard-error band", y=1.0)
    _legend(fig, axes)
    return _save(fig, a, f"metrics_{algo}", formats)


def plot_dominance(rows, algo, a, formats):
    """Dominance paper's Fig. 9: largest activation score against return, srank and dormant share, one point per
    configuration averaged over seeds and tasks."""
    layer = a.dominance_layer or ("fc1" if algo == "drq" else "latent")
    x_key = f"representation/{layer}/max_score"
    mine = [r for r in rows if r["algo"] == algo and not math.isnan(r.get(x_key, math.nan))]
    if not mine:
        return []
    ys = [("final_eval" if algo in EVAL_SCORED else "final_score", "final return"),
          (f"representation/{layer}/srank", "effective rank"),
          (f"representation/{layer}/dormant_score", DORMANT_DEFINITION["dormant_score"])]
    fig, axes = plots.figure(ncols=3, width="full", height=2.2)
    for ax, (key, ylabel) in zip(axes, ys):
        for config in sorted({r["config"] for r in mine}):
            x = per_game_mean(mine, algo, config, x_key)
            y = per_game_mean(mine, algo, config, key)
            ax.scatter([x], [y], label=config, color=plots.color(config), s=12)
        plots.label(ax, f"largest activation score ({layer})", ylabel)
    fig.suptitle(f"{algo.upper()}: one point per configuration, averaged over seeds and tasks", y=1.0)
    _legend(fig, axes)
    return _save(fig, a, f"dominance_{algo}", formats)


if __name__ == "__main__":
    sys.exit(main())
