#!/usr/bin/env python
"""Turn runs/ into the papers' tables and figures.

    python scripts/analyze.py runs --out results

Reads every run directory under RUNS_DIR (its args.json and TensorBoard event files), groups runs by algorithm,
configuration, environment and seed, and writes to --out:
- results.csv      one row per run: status, final score (mean of the last 5% of training episodes), final eval
                   return, final value (mean of the last 5% of probes) of every representation metric.
- aggregates.csv   per algorithm and configuration: mean / median / IQM with 95% stratified-bootstrap CIs of
                   baseline-normalised (DQN/PPO, HR papers eq. 5) and human-normalised (Atari) scores, raw return (DMC).
- tables.md        the aggregates, HR papers' Table 1 (dormant fraction without/with HR next to the predicted p^2 and
                   1-(1-p)^2) and Table 2 (baseline, +HR, +widen, +2HR), and the runs left out.
- curves_<algo>.png           learning curves, IQM over runs and games with 95% CI bands, per configuration.
- representation_<algo>.png   score, dormant fraction and srank of `latent` over training (the papers' Fig. 2 layout).
- dominance_<algo>.png        largest activation score against return, srank and dormant share, one point per
                              configuration averaged over seeds and tasks (dominance paper's Fig. 9).
- tasks_<algo>.png            per-task eval/episodic_return curves, mean and standard error over seeds (SimbaV2).

SimbaV2 is scored as the HR v2 paper scores it (App. D.3): the mean evaluation return over the final 5% of training,
task-normalised (dm_control: return / 1000; MuJoCo: (return - random) / (TD3 - random)), IQM over (task, seed) with a
95% stratified-bootstrap CI; tables.md adds its Table 2 column (baseline, + HR, + widen, beside the paper's) and the
per-task returns beside SimbaV2's published ones.

MR.Q (DMC-Visual) is scored the same way on its evaluation returns; its normalised score is baseline-normalised as the
HR v2 paper's Table 2 reads (baseline = 1.00): per task, the return over the baseline configuration's mean (over
seeds) final eval return. tables.md adds its Table 2 column on the 7 hard tasks (seeds averaged per task, then IQM and
mean across tasks with 95% stratified-bootstrap CIs, beside the paper's 1.00 / 1.17 / 0.97) and the per-task returns
beside MR.Q's published ones (all 28 tasks).

Only finished runs (runs/NAME/finished, the JSON summary the scripts write on a clean exit) enter the numbers; runs
still going or stopped, and runs/NAME.partial-<time> directories (a run stopped before its first checkpoint, moved
aside when it was started again) are counted and listed in tables.md, never mixed in. From the summary come each
run's step count (the curves' horizon), wall time and probe share; an older `finished` that is not JSON (an empty
marker) still marks the run finished, its step count then read from its last logged step.

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
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

SCRIPT_ALGO = {"dqn_atari_hr": "dqn", "ppo_atari_hr": "ppo", "pqn_atari_hr": "pqn", "drq_dmc_dominance": "drq",
               "simbav2_dmc_hr": "simbav2", "mrq_dmc_hr": "mrq"}
KNOWN_CONFIGS = {"relu", "tanh", "tanh_ln", "hr_tanh", "hr_relu", "widen_relu", "widen_tanh", "2hr_tanh", "hadamax",
                 "crelu", "redo", "none", "ln", "lnwd", "hlgauss", "reset", "prune",
                 "baseline", "hr", "widen", "hr_critic", "widen_critic", "hr_shared"}
# Algorithms scored on their evaluation episodes, as their papers do (the mean eval return over the final 5% of
# training, HR v2 App. D.3), with per-task curves of eval/episodic_return; the others on training episodes.
EVAL_SCORED = {"simbav2", "mrq"}
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
        out[tag] = (np.array([e.step for e in events], dtype=np.int64), np.array([e.value for e in events], dtype=float))
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


def load_run(run_dir: str, now: float) -> RunData | None:
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
    """Mean of the tag's values in each window (grid[i-1], grid[i]], carried forward over empty windows."""
    steps, values = run.scalars.get(tag, (np.array([]), np.array([])))
    out = np.full(len(grid), np.nan)
    last = np.nan
    lo = -np.inf
    for i, hi in enumerate(grid):
        sel = (steps > lo) & (steps <= hi)
        if sel.any():
            last = float(values[sel].mean())
        out[i] = last
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


def task_means(values_by_task: dict[str, list[float]]) -> list[np.ndarray]:
    return [np.asarray(v, dtype=float) for _, v in sorted(values_by_task.items()) if len(v)]


def mean_of_task_means(tasks):
    return float(np.mean([np.mean(t) for t in tasks]))


def median_of_task_means(tasks):
    return float(np.median([np.mean(t) for t in tasks]))


STATISTICS = {"mean": mean_of_task_means, "median": median_of_task_means, "iqm": common.iqm}


def aggregate(values_by_task: dict[str, list[float]], reps: int, seed: int) -> dict[str, tuple[float, float, float]]:
    tasks = task_means(values_by_task)
    if not tasks:
        return {}
    return {name: common.bootstrap_ci(tasks, stat, reps=reps, alpha=0.05, seed=seed) for name, stat in STATISTICS.items()}


def fmt_ci(v):
    point, lo, hi = v
    return f"{point:.3f} [{lo:.3f}, {hi:.3f}]"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs_dir", help="directory holding one sub-directory per run (e.g. runs)")
    p.add_argument("--out", default="results", help="output directory")
    p.add_argument("--reps", type=int, default=2000, help="bootstrap resamples for the aggregate CIs")
    p.add_argument("--curve-reps", type=int, default=200, help="bootstrap resamples per curve point")
    p.add_argument("--curve-points", type=int, default=50, help="points per learning curve")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--layer", default="latent", help="layer whose metrics the Fig. 2 layout and Table 1 show")
    p.add_argument("--dominance-layer", default=None,
                   help="layer for the dominance scatter (default: fc1 for DrQ, the layer before the critic's "
                        "penultimate one, as in the dominance paper; latent otherwise)")
    a = p.parse_args(argv)
    if not os.path.isdir(a.runs_dir):
        sys.exit(f"error: runs_dir {a.runs_dir!r} is not a directory")
    os.makedirs(a.out, exist_ok=True)
    now = time.time()
    runs = [r for d in sorted(glob.glob(os.path.join(a.runs_dir, "*", ""))) if (r := load_run(d, now)) is not None]
    done = [r for r in runs if r.status == "finished" and "charts/episodic_return" in r.scalars]
    left_out = [r for r in runs if r not in done]
    print(f"{len(runs)} runs found: {len(done)} finished, {len(left_out)} left out")

    metric_tags = sorted({t for r in done for t in r.scalars if t.startswith("representation/")})
    rows = []
    for r in done:
        row = {"run": r.name, "algo": r.algo, "config": r.config, "env_id": r.env_id, "game": game_of(r),
               "seed": r.seed, "status": r.status, "last_step": r.last_step, "global_step": r.global_step,
               "wall_seconds": number(r.summary.get("wall_seconds")),
               "probe_share": number(r.summary.get("probe_share")),
               "episodes": len(r.scalars["charts/episodic_return"][1]),
               "final_score": last_fraction_mean(r.scalars["charts/episodic_return"][1]),
               "final_eval": final_eval(r)}
        for tag in metric_tags:
            row[tag] = last_fraction_mean(r.scalars[tag][1]) if tag in r.scalars else math.nan
        rows.append(row)

    by_algo = defaultdict(list)
    for r in done:
        by_algo[r.algo].append(r)
    grids = {}
    for algo, rs in by_algo.items():
        # the steps each run trained (its summary), else its --total-timesteps (an older marker)
        horizon = min(max(r.last_step, int(number(r.summary.get("global_step"), r.args.get("total_timesteps", 0))))
                      for r in rs)
        grids[algo] = np.linspace(horizon / a.curve_points, horizon, a.curve_points)

    agg_rows, tables = [], ["# Results", ""]
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
        tables += [f"## {algo.upper()}", "", f"Scores: final score per run, normalised as `{kind}`; "
                   "per-task means, then mean / median / IQM across tasks, 95% stratified-bootstrap CI.", ""]
        tables += ["| config | runs | tasks | score | mean | median | IQM |", "|---|---|---|---|---|---|---|"]
        for config in sorted({r.config for r in rs}):
            for k in kinds:
                per_task = defaultdict(list)
                for row in rows:
                    if row["algo"] == algo and row["config"] == config and not math.isnan(row.get(k, math.nan)):
                        per_task[row["game"]].append(row[k])
                res = aggregate(per_task, a.reps, a.seed)
                if not res:
                    continue
                n = sum(len(v) for v in per_task.values())
                for stat, (pt, lo, hi) in res.items():
                    agg_rows.append({"algo": algo, "config": config, "score": k, "statistic": stat, "value": pt,
                                     "ci_low": lo, "ci_high": hi, "tasks": len(per_task), "runs": n})
                tables.append(f"| {config} | {n} | {len(per_task)} | {k} | {fmt_ci(res['mean'])} | "
                              f"{fmt_ci(res['median'])} | {fmt_ci(res['iqm'])} |")
        tables.append("")
        tables += wall_time_lines(rs)
        tables += table1(rows, algo, a.layer) + table2(rows, algo, kind) + table2_column(agg_rows, algo, kind)
        tables += published_table(rows, algo) + mrq_table2(rows, algo, a.reps, a.seed)
        plot_curves(rs, grids[algo], kind, bounds, algo, a)
        if algo in EVAL_SCORED:
            plot_task_curves(rs, grids[algo], algo, a)
        plot_representation(rs, grids[algo], kind, bounds, algo, a)
        plot_dominance(rows, algo, a)

    tables += ["## Runs left out (not finished)", "", f"{len(left_out)} runs."]
    tables += [f"- `{r.name}`: {r.status}, last step {r.last_step}" for r in left_out]
    write_csv(os.path.join(a.out, "results.csv"), rows)
    write_csv(os.path.join(a.out, "aggregates.csv"), agg_rows)
    with open(os.path.join(a.out, "tables.md"), "w") as f:
        f.write("\n".join(tables) + "\n")
    print(f"wrote {a.out}/results.csv, aggregates.csv, tables.md and figures")
    return 0


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


def mrq_table2(rows, algo, reps, seed):
    """HR v2 Table 2's MR.Q column: on the 7 hard DMC-Visual tasks, each run's final eval return over its task's
    baseline mean, averaged over seeds per task, then IQM and mean across tasks (95% stratified-bootstrap CIs)."""
    if algo != "mrq":
        return []
    mine = [r for r in rows if r["algo"] == "mrq" and r["game"] in DMCV_HARD
            and not math.isnan(r.get("baseline_normalized", math.nan))]
    if not mine:
        return []
    lines = ["### Table 2 (MR.Q): baseline-normalised final eval return on the 7 hard DMC-Visual tasks", "",
             "| variant | ours: IQM [95% CI] | ours: mean [95% CI] | tasks | runs | paper |",
             "|---|---|---|---|---|---|"]

    def of_task_means(stat):
        return lambda tasks: stat([float(np.mean(t)) for t in tasks])

    for config, label, paper in zip(("baseline", "hr", "widen"), ("Baseline", "+ HR", "+ Widen"), MRQ_PAPER_TABLE2):
        per_task = defaultdict(list)
        for r in mine:
            if r["config"] == config:
                per_task[r["game"]].append(r["baseline_normalized"])
        if not per_task:
            lines.append(f"| {label} | — | — | — | — | {paper:.2f} |")
            continue
        tasks = task_means(per_task)
        cells = [fmt_ci(common.bootstrap_ci(tasks, of_task_means(stat), reps=reps, seed=seed))
                 for stat in (common.iqm, np.mean)]
        lines.append(f"| {label} | {cells[0]} | {cells[1]} | {len(tasks)} | {sum(len(t) for t in tasks)} | "
                     f"{paper:.2f} |")
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


def table1(rows, algo, layer):
    """HR papers' Table 1: dormant fraction of `layer` without and with HR, next to the independence prediction."""
    key = f"representation/{layer}/dormant_kde"
    lines = []
    for act, base, hr, predict, formula in (("tanh", "tanh", "hr_tanh", lambda p: p * p, "p^2"),
                                            ("ReLU", "relu", "hr_relu", lambda p: 1 - (1 - p) ** 2, "1-(1-p)^2")):
        p = per_game_mean(rows, algo, base, key)
        q = per_game_mean(rows, algo, hr, key)
        if not (math.isnan(p) or math.isnan(q)):
            lines.append(f"| {act} | {p:.3f} | {q:.3f} | {formula} = {predict(p):.3f} |")
    if not lines:
        return []
    return [f"### Table 1 ({algo.upper()}): dormant fraction of `{layer}` (KDE test, final)", "",
            "| activation | without HR (p) | with HR (measured) | with HR (predicted) |", "|---|---|---|---|",
            *lines, ""]


def table2(rows, algo, kind):
    """HR papers' Table 2: baseline, +HR, +widen, +2HR (mean normalised score over games)."""
    lines = []
    for act in ("tanh", "relu"):
        cells = [per_game_mean(rows, algo, c, kind) for c in (act, f"hr_{act}", f"widen_{act}", f"2hr_{act}")]
        if sum(not math.isnan(c) for c in cells) >= 2:
            lines.append(f"| {act} | " + " | ".join("—" if math.isnan(c) else f"{c:.3f}" for c in cells) + " |")
    if not lines:
        return []
    return [f"### Table 2 ({algo.upper()}): mean `{kind}` score", "",
            "| activation | baseline | + HR | + widen | + 2HR |", "|---|---|---|---|---|", *lines, ""]


def write_csv(path, rows):
    keys = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys or ["empty"])
        w.writeheader()
        for row in rows:
            w.writerow(row)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _color(config: str, configs: list[str]):
    import matplotlib

    return matplotlib.colormaps["tab10"](sorted(configs).index(config) % 10)


def _band(ax, x, per_task_curves: dict[str, list[np.ndarray]], reps, seed, label, stat=common.iqm, color=None):
    ys, los, his = [], [], []
    for i in range(len(x)):
        tasks = {g: [c[i] for c in cs if not math.isnan(c[i])] for g, cs in per_task_curves.items()}
        tasks = {g: v for g, v in tasks.items() if v}
        if not tasks:
            ys.append(np.nan), los.append(np.nan), his.append(np.nan)
            continue
        pt, lo, hi = common.bootstrap_ci(task_means(tasks), stat, reps=reps, seed=seed)
        ys.append(pt), los.append(lo), his.append(hi)
    line, = ax.plot(x, ys, label=label, color=color, marker="o", markersize=2.5)
    ax.fill_between(x, los, his, alpha=0.2, color=line.get_color())


def _curves_by_config(rs, grid, tag, transform=lambda r, c: c):
    out = defaultdict(lambda: defaultdict(list))
    for r in rs:
        if tag in r.scalars:
            out[r.config][game_of(r)].append(transform(r, curve(r, grid, tag)))
    return out


def plot_curves(rs, grid, kind, bounds, algo, a):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    curves = _curves_by_config(rs, grid, "charts/episodic_return",
                               lambda r, c: normalise(c, game_of(r), kind, bounds))
    configs = sorted({r.config for r in rs})
    for config, per_task in sorted(curves.items()):
        _band(ax, grid, per_task, a.curve_reps, a.seed, config, color=_color(config, configs))
    ax.set(xlabel="environment steps", ylabel=f"IQM {kind.replace('_', '-')} score", title=f"{algo.upper()}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(a.out, f"curves_{algo}.png"), dpi=120)
    plt.close(fig)


def plot_task_curves(rs, grid, algo, a, tag="eval/episodic_return"):
    """One panel per task: `tag` of each configuration, mean over seeds with a standard-error band."""
    plt = _plt()
    tasks = sorted({game_of(r) for r in rs})
    configs = sorted({r.config for r in rs})
    cols = min(4, len(tasks))
    fig, axes = plt.subplots(-(-len(tasks) // cols), cols, figsize=(4 * cols, 3 * -(-len(tasks) // cols)),
                             squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        for config in configs:
            cs = np.array([curve(r, grid, tag) for r in rs if game_of(r) == task and r.config == config and
                           tag in r.scalars])
            if not len(cs):
                continue
            n = np.maximum((~np.isnan(cs)).sum(0), 1)  # seeds with a value at each point (NaN: not evaluated yet)
            mean = np.nansum(cs, 0) / n
            mean[np.isnan(cs).all(0)] = np.nan
            se = np.sqrt(np.nansum((cs - mean) ** 2, 0) / n / n)
            ax.plot(grid, mean, label=config, color=_color(config, configs))
            ax.fill_between(grid, mean - se, mean + se, alpha=0.2, color=_color(config, configs))
        ax.set(title=task, xlabel="environment steps", ylabel=tag.split("/")[-1])
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{algo.upper()}: {tag}, mean over seeds with standard error")
    fig.tight_layout()
    fig.savefig(os.path.join(a.out, f"tasks_{algo}.png"), dpi=120)
    plt.close(fig)


def plot_representation(rs, grid, kind, bounds, algo, a):
    plt = _plt()
    panels = [("charts/episodic_return", f"{kind.replace('_', '-')} score"),
              (f"representation/{a.layer}/dormant_kde", f"dormant fraction ({a.layer})"),
              (f"representation/{a.layer}/srank", f"effective rank ({a.layer})")]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for ax, (tag, ylabel) in zip(axes, panels):
        transform = (lambda r, c: normalise(c, game_of(r), kind, bounds)) if tag.startswith("charts/") \
            else (lambda r, c: c)
        configs = sorted({r.config for r in rs})
        for config, per_task in sorted(_curves_by_config(rs, grid, tag, transform).items()):
            _band(ax, grid, per_task, a.curve_reps, a.seed, config, stat=mean_of_task_means,
                  color=_color(config, configs))
        ax.set(xlabel="environment steps", ylabel=ylabel)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{algo.upper()}: mean over games and seeds, 95% bootstrap CI")
    fig.tight_layout()
    fig.savefig(os.path.join(a.out, f"representation_{algo}.png"), dpi=120)
    plt.close(fig)


def plot_dominance(rows, algo, a):
    layer = a.dominance_layer or ("fc1" if algo == "drq" else "latent")
    x_key = f"representation/{layer}/max_score"
    mine = [r for r in rows if r["algo"] == algo and not math.isnan(r.get(x_key, math.nan))]
    if not mine:
        return
    plt = _plt()
    ys = [("final_score", "return"), (f"representation/{layer}/srank", "srank"),
          (f"representation/{layer}/dormant_score", "dormant share")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (key, label) in zip(axes, ys):
        for config in sorted({r["config"] for r in mine}):
            x = per_game_mean(mine, algo, config, x_key)
            y = per_game_mean(mine, algo, config, key)
            ax.scatter([x], [y], label=config)
            ax.annotate(config, (x, y), fontsize=7)
        ax.set(xlabel=f"largest activation score ({layer})", ylabel=label)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{algo.upper()}: one point per configuration, averaged over seeds and tasks")
    fig.tight_layout()
    fig.savefig(os.path.join(a.out, f"dominance_{algo}.png"), dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
