#!/usr/bin/env python
"""Every figure of the neuron-dominance paper (Wu et al., papers/neuron_dominance_drq.md) from DrQ sweeps.

    python scripts/figures_dominance.py runs --out results/dominance
    python scripts/figures_dominance.py runs other_sweep/runs --out results/dominance   # several runs dirs

Reads every run directory under each RUNS_DIR (args.json and TensorBoard events, via scripts/analyze.py); DrQ runs
are those whose args.json has the key `mitigation`. Only finished runs (runs/NAME/finished) enter unless
--include-unfinished; a run directory that cannot be read is skipped with one line. Writes, to --out, one PNG and
one PDF per figure and FIGURES.md, the index: each figure, its files, and the sweep command that produces its runs
(or the one line saying which runs it needs, when the sweep lacks them).

Runs are grouped by their flags, not their names: the main grid (`--encoder drq`, no `--ln-from-step`) draws
Figs. 2, 3, 5-9, 11, 13-15 (and 17); runs with `--ln-from-step N` (N > 0; the sweep's configuration `ln_switch`)
draw Figs. 10 and 16; runs with `--encoder resnet18` (configuration `resnet18`) draw Fig. 12. FIGURES.md gives the
scripts/run_dmc_dominance.sh command for each figure's runs.

Step units. drq_dmc_dominance.py logs at environment frames. The per-run dynamics figures (2, 3, 10-13, 16, 17) are
drawn over agent steps = frames / action repeat (jaxrl's loop counter; one gradient step per agent step from
--learning-starts on, so gradient step g is agent step learning_starts + g - 1), the unit of --ln-from-step and,
up to that offset, of the paper's masking (500k gradient steps); the performance figures (6, 15) over environment
frames, as jaxrl logs returns. Each axis label names its unit. The action repeat is the run's --action-repeat, else
jaxrl's PlaNet table keyed by the full task id (a modified task uses the task it modifies).

Per-run numbers (Figs. 5-9, 14): the final return is the mean eval/episodic_return over the evaluations in the last
--final-fraction of the run's frames (at least the last evaluation); a final metric is the mean of the probes in the
same window (NaN probes carried forward from the last finite one, as the paper's App. B.1 does for Fig. 2).
Aggregates (Figs. 5, 7, 8): rliable's median, IQM and mean of the final returns over (run, task) with 95%
stratified-bootstrap CIs; a configuration enters a panel only when it has runs on every task of that panel, with the
same number of runs per task (the first seeds, when some tasks have more).
"""
from __future__ import annotations

import argparse
import glob
import math
import os
import sys
import time
from collections import defaultdict

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import analyze  # noqa: E402

import plots  # noqa: E402  (the shared plotting module: figure sizes, save, colours, bands, intervals)
from sweep import DMC_ACTION_REPEAT  # noqa: E402  (jaxrl's action repeat by task id; tested against the script's)

# the paper's approaches (Figs. 5-9, 14) and their names in its legends
PAPER_CONFIGS = ("none", "lnwd", "hlgauss", "reset", "redo", "prune")
LABELS = {"none": "DrQ", "ln": "LN", "lnwd": "LNWD", "hlgauss": "HL-Gauss", "reset": "Reset", "redo": "ReDo",
          "prune": "Pruning"}
ORDER = ("none", "ln", "lnwd", "hlgauss", "reset", "redo", "prune")
AGENT_STEPS = "agent steps (frames / action repeat)"
FRAMES = "environment steps (frames)"
MAX_SCORE, SAT, DORMANT, SRANK = "max_score", "saturated", "dormant_score", "srank"
RETURN = "eval/episodic_return"
SWEEP = "scripts/run_dmc_dominance.sh"
SEEDS8 = '--seeds "1 2 3 4 5 6 7 8"'
SPARSE_FIG2 = "cartpole-swingup_sparse cartpole-balance_sparse_narrow finger-spin_fast reacher-easy_masked"


def rep_tag(layer: str, metric: str) -> str:
    return f"representation/{layer}/{metric}"


# ---------------------------------------------------------------- runs


def task(r) -> str:
    return r.env_id


def mitigation(r) -> str:
    return str(r.args.get("mitigation", "none"))


def encoder(r) -> str:
    return str(r.args.get("encoder") or "drq")


def ln_from_step(r) -> int:
    return int(r.args.get("ln_from_step") or 0)


def is_sparse(t: str) -> bool:
    """The paper's sparse-reward tasks: DMC's *_sparse and the modified ones (App. B.1)."""
    return "sparse" in t or t.endswith("_fast") or t.endswith("_masked")


def is_masked(t: str) -> bool:
    return t.endswith("_masked")


def action_repeat(r) -> int:
    """The run's --action-repeat, else jaxrl's PlaNet table by task id (a modified task: the task it modifies)."""
    if r.args.get("action_repeat"):
        return int(r.args["action_repeat"])
    return DMC_ACTION_REPEAT.get(task(r), 2)


def mask_lift(r) -> float:
    """Agent step at which reacher-easy_masked's critic first sees the reward: after --reward-mask-steps gradient
    steps, which start at agent step --learning-starts (both in agent steps since issue 14); a run of the older
    script (no reward_mask_steps in its args.json) was masked for the first half of its frames."""
    if "reward_mask_steps" in r.args:
        return float(r.args.get("learning_starts") or 0) + float(r.args["reward_mask_steps"])
    return float(r.args.get("total_timesteps", 0)) / 2 / action_repeat(r)


def ffill(values: np.ndarray) -> np.ndarray:
    """Carry the last finite value forward over NaN/inf (paper App. B.1); leading NaNs stay."""
    out = np.array(values, dtype=float)
    last = np.nan
    for i, v in enumerate(out):
        if math.isfinite(v):
            last = v
        else:
            out[i] = last
    return out


def series(r, tag: str, agent: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of a tag, NaN carried forward; steps in agent steps when `agent`, else frames."""
    steps, values = r.scalars.get(tag, (np.array([]), np.array([])))
    steps = np.asarray(steps, dtype=float)
    if agent:
        steps = steps / action_repeat(r)
    return steps, ffill(values)


def final_value(r, tag: str, fraction: float) -> float:
    """Mean of the tag's values logged in the last `fraction` of the run's frames (at least its last value)."""
    steps, values = series(r, tag)
    if not len(steps):
        return math.nan
    horizon = max(float(r.global_step), float(steps[-1]))
    sel = steps >= (1 - fraction) * horizon
    vals = values[sel] if sel.any() else values[-1:]
    vals = vals[np.isfinite(vals)]
    return float(vals.mean()) if len(vals) else math.nan


def load_runs(dirs: list[str], include_unfinished: bool) -> tuple[list, list[str]]:
    """DrQ runs under the given runs dirs, and one line per run dir skipped (unreadable, or not finished)."""
    now = time.time()
    runs, notes = [], []
    for root in dirs:
        for d in sorted(glob.glob(os.path.join(root, "*", ""))):
            if not os.path.exists(os.path.join(d, "args.json")):
                continue
            try:
                r = analyze.load_run(d, now)
                if not isinstance(r.args, dict):
                    raise ValueError("args.json is not a JSON object")
            except Exception as e:  # a corrupt run dir: say so, go on
                notes.append(f"skipped {d.rstrip('/')}: unreadable ({type(e).__name__}: {str(e)[:120]})")
                continue
            if "mitigation" not in r.args:
                continue
            if r.status != "finished" and not include_unfinished:
                notes.append(f"skipped {d.rstrip('/')}: {r.status} (--include-unfinished draws it)")
                continue
            runs.append(r)
    return runs, notes


def main_grid(runs):
    return [r for r in runs if encoder(r) == "drq" and ln_from_step(r) == 0]


def order_key(config: str):
    base = config[3:] if config.startswith("hr_") else config
    return (config.startswith("hr_"), ORDER.index(base) if base in ORDER else len(ORDER), config)


def label(config: str) -> str:
    if config.startswith("hr_"):
        return "HR+" + LABELS.get(config[3:], config[3:])
    return LABELS.get(config, config)


def by_seed(rs):
    return sorted(rs, key=lambda r: (r.seed, r.path))


# ---------------------------------------------------------------- plotting helpers not in plots.py


def panels(nrows: int, ncols: int, width=None):
    """plots.figure as a 2-D array of axes, a column wide for one column of panels, else at least a page wide."""
    if width is None:
        width = plots.COLUMN_WIDTH if ncols == 1 else max(plots.FULL_WIDTH, 1.7 * ncols)
    fig, axes = plots.figure(nrows, ncols, width=width)
    return fig, axes.reshape(nrows, ncols)


def title(fig, text: str):
    """A suptitle wrapped to the figure's width."""
    import textwrap

    fig.suptitle(textwrap.fill(text, width=max(40, int(fig.get_figwidth() * 15)), break_on_hyphens=False))


def seed_color(i: int):
    import matplotlib

    return matplotlib.colormaps["tab10"](i % 10)


def mean_std(values: np.ndarray):
    """plots.pointwise statistic: the mean with a +-1 standard deviation (ddof 1) band, as the paper's Fig. 6."""
    m = float(np.mean(values))
    if len(values) < 2:
        return m, math.nan, math.nan
    sd = float(np.std(values, ddof=1))
    return m, m - sd, m + sd


# ---------------------------------------------------------------- figures
# Each returns (the plotted numbers, the files written), or (None, None) when the sweep lacks its runs.


def dynamics_figure(runs, tasks, rows, out, stem, caption, vlines=None):
    """One column per task, one row per panel (tag, y label, scale); one line per run (its seed), over agent
    steps. `vlines(run)` -> [(agent step, label)] marks events (reward unmasked, LayerNorm switched on).
    Returns {(task, tag): {run name: (x, y)}, (task, "marks"): [agent steps marked]}."""
    fig, axes = panels(len(rows), len(tasks))
    data = {}
    for j, t in enumerate(tasks):
        rs = by_seed([r for r in runs if task(r) == t])
        for i, (tag, ylabel, scale) in enumerate(rows):
            ax = axes[i][j]
            if i:
                ax.sharex(axes[0][j])  # one x axis per task (column)
            data[(t, tag)] = {}
            for k, r in enumerate(rs):
                x, y = series(r, tag, agent=True)
                if not len(x):
                    continue
                y = y * scale
                data[(t, tag)][r.name] = (x, y)
                ax.plot(x, y, color=seed_color(k), label=f"seed {r.seed}",  # one point: a marker, else invisible
                        **({"marker": "o", "markersize": 3} if len(x) == 1 else {}))
            xmax = max((float(x[-1]) for x, _ in data[(t, tag)].values()), default=0.0)
            marks = sorted({m for r in rs for m in vlines(r)}) if vlines else []
            data[(t, "marks")] = []
            for x0, text in marks:
                if x0 <= xmax:  # an event past the logged steps (a short run) is not drawn
                    ax.axvline(x0, color="gray", ls=MARK_STYLE.get(text, "--"), lw=0.8, label=text)
                    data[(t, "marks")].append(x0)
            plots.label(ax, "", ylabel if j == 0 else "", t if i == 0 else None)
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend()
    fig.supxlabel(AGENT_STEPS)
    title(fig, caption)
    return data, plots.save(fig, out, stem)


DOMINANCE_PANELS = [(rep_tag("fc1", MAX_SCORE), "largest activation score (fc1)", 1.0),
                    (rep_tag("fc2", SAT), "saturated neurons in fc2 (%)", 100.0)]


MARK_STYLE = {"reward unmasked": ":", "LayerNorm on": "--"}


def mask_mark(r):
    return [(mask_lift(r), "reward unmasked")] if is_masked(task(r)) else []


def fig2(runs, out):
    rs = [r for r in main_grid(runs) if r.config == "none" and is_sparse(task(r))]
    tasks = sorted({task(r) for r in rs}, key=lambda t: (is_masked(t), t))
    if not tasks:
        return None, None
    return dynamics_figure(rs, tasks, DOMINANCE_PANELS, out, "fig02_sparse_max_score_saturation",
                           "Fig. 2: largest activation score (fc1) and saturation of the next layer (fc2), DrQ, "
                           "single runs", mask_mark)


def fig3(runs, out):
    rs = [r for r in main_grid(runs) if r.config == "none" and is_masked(task(r))]
    tasks = sorted({task(r) for r in rs})
    if not tasks:
        return None, None
    return dynamics_figure(rs, tasks, DOMINANCE_PANELS, out, "fig03_masked_max_score_saturation",
                           "Fig. 3: masked reward (the critic sees reward 0 until the dashed line: --reward-mask-steps "
                           "updates), DrQ, single runs",
                           mask_mark)


def final_scores(runs, configs, tasks, fraction):
    """{config: {task: [final return per run, by seed]}}."""
    out = defaultdict(lambda: defaultdict(list))
    for r in by_seed(runs):
        if r.config in configs and task(r) in tasks:
            v = final_value(r, RETURN, fraction)
            if math.isfinite(v):
                out[r.config][task(r)].append(v)
    return out


def aggregate_figure(runs, configs, task_filter, out, stem, caption, a):
    """rliable's median, IQM and mean of the final returns with 95% stratified-bootstrap CIs (analyze.aggregate: a
    (runs, tasks) matrix per configuration, the first seeds when some task has more runs). Returns {"estimates":
    {config: {stat: (point, lo, hi)}}, "tasks", "runs_per_task": {config: n}, "dropped": configs lacking a task}."""
    rs = main_grid(runs)
    tasks = sorted({task(r) for r in rs if task_filter(task(r)) and r.config in configs})
    scores = final_scores(rs, configs, tasks, a.final_fraction)
    kept = [c for c in sorted(scores, key=order_key) if all(scores[c].get(t) for t in tasks)]
    if not tasks or not kept:
        return None, None
    est = {c: analyze.aggregate({t: scores[c][t] for t in tasks}, a.reps, a.seed) for c in kept}
    runs_per_task = {c: min(len(scores[c][t]) for t in tasks) for c in kept}
    names = {"median": "Median", "iqm": "IQM", "mean": "Mean"}
    fig = plots.interval_plot({c: {names[k]: est[c][k] for k in names} for c in kept},
                              metrics=list(names.values()), xlabel="final eval return", configs=kept)
    fig.axes[0].set_yticklabels([label(c) for c in kept])
    for ax in fig.axes:
        ax.use_sticky_edges = False  # a bar's left end is sticky: keep a margin beside the lowest interval
        ax.margins(x=0.1)
        ax.invert_yaxis()  # the baseline first, at the top
    lo, hi = min(runs_per_task.values()), max(runs_per_task.values())
    runs_text = f"{lo}" if lo == hi else f"{lo}-{hi}"
    title(fig, f"{caption}: {len(tasks)} task{'s' * (len(tasks) != 1)}, {runs_text} runs per task, "
               f"95% stratified-bootstrap CIs (rliable)")
    dropped = sorted(set(scores) - set(kept), key=order_key)
    return {"estimates": {c: {k: est[c][k] for k in names} for c in kept}, "tasks": tasks,
            "runs_per_task": runs_per_task, "dropped": dropped}, plots.save(fig, out, stem)


def task_curves_figure(runs, configs, out, stem, caption, tasks=None):
    """One panel per task: eval return per configuration, mean over seeds with a +-1 std band, over frames.
    Returns {task: {config: (steps, mean, std)}}."""
    rs = [r for r in main_grid(runs) if r.config in configs and RETURN in r.scalars]
    tasks = tasks or sorted({task(r) for r in rs}, key=lambda t: (is_sparse(t), t))
    tasks = [t for t in tasks if any(task(r) == t for r in rs)]
    if not tasks:
        return None, None
    cols = min(4, len(tasks))
    fig, axes = panels(-(-len(tasks) // cols), cols, width=max(plots.FULL_WIDTH, 2.2 * cols) if cols > 1 else None)
    data, handles = {}, {}
    for ax, t in zip(axes.flat, tasks):
        data[t] = {}
        for c in sorted({r.config for r in rs if task(r) == t}, key=order_key):
            curves = [series(r, RETURN) for r in rs if task(r) == t and r.config == c]
            x, m, lo, hi, _ = plots.pointwise(curves, mean_std)
            data[t][c] = (x, m, lo, hi)
            handles[c] = plots.curve_band(ax, curves, label=label(c), color=plots.color(c), stat=mean_std)
        plots.label(ax, "", "eval episodic return" if ax in axes[:, 0] else "", t)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    fig.supxlabel(FRAMES)
    order = sorted(handles, key=order_key)
    fig.legend([handles[c] for c in order], [handles[c].get_label() for c in order], loc="upper center",
               ncol=min(len(order), 4), bbox_to_anchor=(0.5, 0.0))
    title(fig, caption)
    return data, plots.save(fig, out, stem)


def run_point(r, a):
    """(largest score of fc1, srank of --srank-layer, final return, dormant % of fc2) of one run."""
    f = a.final_fraction
    return (final_value(r, rep_tag("fc1", MAX_SCORE), f), final_value(r, rep_tag(a.srank_layer, SRANK), f),
            final_value(r, RETURN, f), 100 * final_value(r, rep_tag("fc2", DORMANT), f))


def scatter_axes(axes, a, xlabel=True):
    for ax, ylabel in zip(axes, (f"srank ({a.srank_layer})", "final eval return", "dormant neurons in fc2 (%)")):
        ax.set_xlabel("largest activation score (fc1)" if xlabel else "")
        ax.set_ylabel(ylabel)


def fig9(runs, configs, out, a):
    """One point per approach: per task mean over seeds, then mean over tasks. Returns {config: (x, srank, ret,
    dormant)}."""
    rs = [r for r in main_grid(runs) if r.config in configs]
    per = defaultdict(lambda: defaultdict(list))
    for r in rs:
        per[r.config][task(r)].append(run_point(r, a))
    data = {}
    for c in sorted(per, key=order_key):
        task_means = [np.nanmean(np.array(v), axis=0) for _, v in sorted(per[c].items())]
        pt = np.nanmean(np.array(task_means), axis=0)
        if math.isfinite(pt[0]):
            data[c] = tuple(float(v) for v in pt)
    if not data:
        return None, None
    fig, axes = panels(1, 3, width=plots.FULL_WIDTH)
    for c, (x, *ys) in data.items():
        for ax, y in zip(axes[0], ys):
            ax.scatter([x], [y], color=plots.color(c), label=label(c), s=20)
    scatter_axes(axes[0], a)
    axes[0][0].legend()
    title(fig, "Fig. 9: one point per approach, final values averaged over seeds and tasks")
    return data, plots.save(fig, out, "fig09_dominance_scatter")


def fig14(runs, configs, out, a):
    """Per task (rows) the Fig. 9 panels with one point per run. Returns {task: {run name: (config, x, srank, ret,
    dormant)}}."""
    rs = [r for r in main_grid(runs) if r.config in configs]
    tasks = sorted({task(r) for r in rs}, key=lambda t: (is_sparse(t), t))
    if not tasks:
        return None, None
    fig, axes = panels(len(tasks), 3, width=plots.FULL_WIDTH)
    data, handles = {}, {}
    for k, (row, t) in enumerate(zip(axes, tasks)):
        data[t] = {}
        for r in by_seed([r for r in rs if task(r) == t]):
            x, *ys = run_point(r, a)
            data[t][r.name] = (r.config, x, *ys)
            for ax, y in zip(row, ys):
                handles[r.config] = ax.scatter([x], [y], color=plots.color(r.config), s=12, label=label(r.config))
        scatter_axes(row, a, xlabel=k == len(tasks) - 1)
        row[0].set_title(t, loc="left")
    order = sorted(handles, key=order_key)
    fig.legend([handles[c] for c in order], [label(c) for c in order], loc="upper center", ncol=min(len(order), 6),
               bbox_to_anchor=(0.5, 0.0))
    title(fig, "Fig. 14: one point per run, final values")
    return data, plots.save(fig, out, "fig14_dominance_scatter_per_run")


LN_PANELS = [(RETURN, "eval episodic return", 1.0)] + DOMINANCE_PANELS


def ln_mark(r):
    return [(float(ln_from_step(r)), "LayerNorm on")] + mask_mark(r)


def fig10(runs, out, masked: bool):
    rs = [r for r in runs if ln_from_step(r) > 0 and encoder(r) == "drq" and not r.args.get("hr")
          and (task(r) == "reacher-easy_masked") == masked]
    tasks = sorted({task(r) for r in rs})
    if not tasks:
        return None, None
    num, stem = (10, "fig10_ln_from_step_masked_reacher") if masked else (16, "fig16_ln_from_step_other_tasks")
    return dynamics_figure(rs, tasks, LN_PANELS, out, stem,
                           f"Fig. {num}: LayerNorm switched on part-way (--ln-from-step), single runs", ln_mark)


HLG_PANELS = [(RETURN, "eval episodic return", 1.0), (rep_tag("fc1", SAT), "saturated neurons in fc1 (%)", 100.0),
              (rep_tag("fc2", SAT), "saturated neurons in fc2 (%)", 100.0),
              (rep_tag("fc2", DORMANT), "dormant neurons in fc2 (%)", 100.0)]


def fig11(runs, out, reacher: bool):
    rs = [r for r in main_grid(runs) if r.config == "hlgauss" and is_masked(task(r))
          and (task(r) == "reacher-easy_masked") == reacher]
    tasks = sorted({task(r) for r in rs})
    if not tasks:
        return None, None
    num, stem = (11, "fig11_hlgauss_masked_reacher") if reacher else (17, "fig17_hlgauss_other_masked_tasks")
    return dynamics_figure(rs, tasks, HLG_PANELS, out, stem,
                           f"Fig. {num}: HL-Gauss with the critic's reward masked, single runs", mask_mark)


def fig12(runs, out):
    rs = [r for r in runs if encoder(r) == "resnet18" and mitigation(r) == "none" and not r.args.get("hr")
          and ln_from_step(r) == 0]
    tasks = sorted({task(r) for r in rs}, key=lambda t: (not is_sparse(t), t))
    if not tasks:
        return None, None
    return dynamics_figure(rs, tasks, DOMINANCE_PANELS, out, "fig12_resnet18_max_score_saturation",
                           "Fig. 12: DrQ-ResNet18, largest activation score (fc1) and saturation (fc2), single runs",
                           mask_mark)


GRAD_PANELS = [("grad/fc1", "mean |dL/dW| of fc1", 1.0), ("grad/fc2", "mean |dL/dW| of fc2 (next layer)", 1.0)]


def fig13(runs, out, tasks_wanted):
    rs = [r for r in main_grid(runs) if r.config == "none" and task(r) in tasks_wanted]
    tasks = [t for t in tasks_wanted if any(task(r) == t for r in rs)]
    if not tasks:
        return None, None
    return dynamics_figure(rs, tasks, GRAD_PANELS, out, "fig13_gradient_magnitude",
                           "Fig. 13: mean gradient magnitude reaching fc1 (the dominant neuron's layer) and fc2 "
                           "(the subsequent layer), DrQ, single runs")


# ---------------------------------------------------------------- the figure list and its index


def figure_specs(a):
    """(id, title, needs, sweep command, draw(runs) -> (data, paths) or (None, None))."""
    paper = " ".join(a.configs)
    main_cmd = SWEEP  # the default grid: 12 tasks x 7 mitigations x 6 seeds (reacher-easy_masked 4M frames)
    return [
        ("Fig. 2", "largest activation score of fc1 and saturation of fc2 over training on the sparse tasks",
         "DrQ runs (--mitigation none) on the sparse tasks",
         f'{SWEEP} --configs none --games "{SPARSE_FIG2}" {SEEDS8}', lambda runs: fig2(runs, a.out)),
        ("Fig. 3", "masked reacher: largest score of fc1 and saturation of fc2, mask lift marked",
         "DrQ runs (--mitigation none) on reacher-easy_masked",
         f'{SWEEP} --configs none --games reacher-easy_masked {SEEDS8}', lambda runs: fig3(runs, a.out)),
        ("Fig. 5", "median, IQM, mean of final return with 95% CIs, all tasks",
         f"runs of the configurations in --configs ({paper})", main_cmd,
         lambda runs: aggregate_figure(runs, a.configs, lambda t: True, a.out, "fig05_aggregate_all_tasks",
                                       "Fig. 5: all tasks", a)),
        ("Fig. 6", "per-task learning curves per approach (mean over seeds, +-1 std)",
         f"runs of the configurations in --configs ({paper})", main_cmd,
         lambda runs: task_curves_figure(runs, a.configs, a.out, "fig06_task_curves",
                                         "Fig. 6: eval return, mean over seeds with +-1 std")),
        ("Fig. 7", "median, IQM, mean with 95% CIs, non-sparse tasks",
         f"runs of the configurations in --configs ({paper}) on non-sparse tasks", main_cmd,
         lambda runs: aggregate_figure(runs, a.configs, lambda t: not is_sparse(t), a.out,
                                       "fig07_aggregate_nonsparse", "Fig. 7: non-sparse tasks", a)),
        ("Fig. 8", "median, IQM, mean with 95% CIs, sparse tasks",
         f"runs of the configurations in --configs ({paper}) on sparse tasks", main_cmd,
         lambda runs: aggregate_figure(runs, a.configs, is_sparse, a.out, "fig08_aggregate_sparse",
                                       "Fig. 8: sparse tasks", a)),
        ("Fig. 9", "largest score (fc1) against srank, return and the next layer's (fc2) dormant %, "
                   "one point per approach", f"runs of the configurations in --configs ({paper})", main_cmd,
         lambda runs: fig9(runs, a.configs, a.out, a)),
        ("Fig. 10", "LayerNorm switched on part-way on the masked reacher: return, largest score (fc1), saturation "
                    "(fc2), single runs", "runs with --ln-from-step N (N > 0) on reacher-easy_masked",
         f'{SWEEP} --configs ln_switch --games reacher-easy_masked {SEEDS8}', lambda runs: fig10(runs, a.out, True)),
        ("Fig. 11", "HL-Gauss on the masked reacher: return, saturation of fc1 and fc2, dormant % of fc2",
         "HL-Gauss runs (--mitigation hlgauss) on reacher-easy_masked",
         f'{SWEEP} --configs hlgauss --games reacher-easy_masked {SEEDS8}',
         lambda runs: fig11(runs, a.out, True)),
        ("Fig. 12", "ResNet-18 encoder: largest score (fc1) and saturation (fc2) on sparse tasks, single runs",
         "runs with --encoder resnet18 (--mitigation none)",
         f'{SWEEP} --configs resnet18 --games "cartpole-swingup_sparse cartpole-balance_sparse_narrow" {SEEDS8}',
         lambda runs: fig12(runs, a.out)),
        ("Fig. 13", "mean gradient magnitude reaching fc1 and fc2 (grad/fc1, grad/fc2), single runs",
         f"DrQ runs (--mitigation none) on {' or '.join(a.grad_tasks)}",
         f'{SWEEP} --configs none --games {a.grad_tasks[0]} {SEEDS8}',
         lambda runs: fig13(runs, a.out, a.grad_tasks)),
        ("Fig. 14", "Fig. 9 per task, one point per run",
         f"runs of the configurations in --configs ({paper})", main_cmd,
         lambda runs: fig14(runs, a.configs, a.out, a)),
        ("Fig. 15", "LN against LNWD, per-task learning curves", "runs with --mitigation ln and --mitigation lnwd",
         main_cmd, lambda runs: task_curves_figure(
             [r for r in runs if r.config in ("ln", "lnwd")], ("ln", "lnwd"), a.out, "fig15_ln_vs_lnwd",
             "Fig. 15: LN against LNWD, eval return, mean over seeds with +-1 std")
         if {"ln", "lnwd"} <= {r.config for r in main_grid(runs)} else (None, None)),
        ("Fig. 16", "LayerNorm switched on part-way on other tasks (paper: two more reward non-stationary tasks)",
         "runs with --ln-from-step N (N > 0) on tasks other than reacher-easy_masked",
         f'{SWEEP} --configs ln_switch --games "cartpole-swingup_sparse cartpole-balance_sparse_narrow" {SEEDS8}',
         lambda runs: fig10(runs, a.out, False)),
        ("Fig. 17", "HL-Gauss with a masked reward on other tasks (paper App. C.5)",
         "HL-Gauss runs on masked tasks other than reacher-easy_masked (the script has no other masked task)",
         "(none: drq_dmc_dominance.py masks the reward only on reacher-easy_masked)",
         lambda runs: fig11(runs, a.out, False)),
    ]


FIG4 = ("Fig. 4 (a dominant neuron created by hand in a CIFAR-10 classifier) is not drawn: it needs the CIFAR-10 "
        "data set, which cannot be downloaded here, and a supervised training script this project does not have.")


def write_index(out, items, runs_dirs, notes):
    lines = ["# Neuron-dominance paper figures", "",
             f"Drawn by `python scripts/figures_dominance.py {' '.join(runs_dirs)} --out {out}` from "
             f"{', '.join(runs_dirs)}. Sweep commands run from the repository root and write to runs/ "
             f"(`{SWEEP}` alone runs the default grid: 12 tasks x 7 mitigations x 6 seeds).", "",
             "| figure | content | files | runs it needs | sweep command |", "|---|---|---|---|---|"]
    for fid, what, needs, cmd, paths, status in items:
        files = "<br>".join(f"`{os.path.basename(p)}`" for p in paths) if paths else f"skipped: {status}"
        lines.append(f"| {fid} | {what} | {files} | {needs} | `{cmd}` |")
        if fid == "Fig. 3":
            lines.append("| Fig. 4 | CIFAR-10: a dominant neuron created by hand | not drawn (below) | — | — |")
    lines += ["", FIG4, "", "Units: per-run dynamics figures over agent steps = frames / action repeat (the unit of "
              "--ln-from-step; gradient step g is agent step learning_starts + g - 1, so the reward of "
              "reacher-easy_masked is unmasked at agent step learning_starts + reward_mask_steps, marked); "
              "learning curves over environment frames. "
              "NaN probes (a fully saturated layer has no ReDo scores) are carried forward from the last finite "
              "value, as the paper's App. B.1 does.", ""]
    if notes:
        lines += ["## Run directories left out", ""] + [f"- {n}" for n in notes] + [""]
    path = os.path.join(out, "FIGURES.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs_dirs", nargs="+", metavar="RUNS_DIR",
                   help="directories holding one sub-directory per run (the main sweep's runs, and the LN-from-step "
                        "and ResNet-18 sweeps' runs)")
    p.add_argument("--out", default="results/dominance", help="output directory (default: %(default)s)")
    p.add_argument("--configs", nargs="+", default=list(PAPER_CONFIGS),
                   help="configurations in Figs. 5-9 and 14 (default: the paper's, %(default)s)")
    p.add_argument("--grad-tasks", nargs="+", default=["cartpole-balance_sparse_narrow", "cartpole-balance_sparse"],
                   help="tasks of Fig. 13 (default: %(default)s; the paper's modified cartpole-balance_sparse)")
    p.add_argument("--srank-layer", default="fc1",
                   help="layer whose srank Figs. 9 and 14 show (default: %(default)s, the layer holding the "
                        "largest score, the matrix of the paper's Theorem 2)")
    p.add_argument("--final-fraction", type=float, default=0.1,
                   help="final values are means over the last this fraction of each run's frames (default: "
                        "%(default)s)")
    p.add_argument("--reps", type=int, default=2000,
                   help="stratified-bootstrap resamples for the aggregate CIs (default: %(default)s, as analyze.py)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: %(default)s)")
    p.add_argument("--include-unfinished", action="store_true", help="also draw runs that have not finished")
    a = p.parse_args(argv)
    return a


def draw_figures(a) -> dict:
    """Draw every figure the runs allow, write the index; returns {figure id: the plotted numbers}."""
    for d in a.runs_dirs:
        if not os.path.isdir(d):
            sys.exit(f"error: runs dir {d!r} does not exist")
    if not 0 < a.final_fraction <= 1:
        sys.exit(f"error: --final-fraction must be in (0, 1], got {a.final_fraction}")
    runs, notes = load_runs(a.runs_dirs, a.include_unfinished)
    for n in notes:
        print(n)
    if not runs:
        sys.exit(f"error: no DrQ runs (a run dir whose args.json has the key 'mitigation') under "
                 f"{', '.join(a.runs_dirs)}")
    print(f"{len(runs)} DrQ runs")
    os.makedirs(a.out, exist_ok=True)
    items, drawn = [], {}
    for fid, title, needs, cmd, draw in figure_specs(a):
        data, paths = draw(runs)
        if data is None:
            print(f"{fid} skipped: needs {needs}: {cmd}")
            items.append((fid, title, needs, cmd, [], f"the sweep has no {needs}"))
            continue
        print(f"{fid}: {', '.join(paths)}")
        items.append((fid, title, needs, cmd, paths, "drawn"))
        drawn[fid] = data
    print(f"wrote {write_index(a.out, items, a.runs_dirs, notes)}")
    return drawn


def main(argv=None) -> int:
    draw_figures(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
