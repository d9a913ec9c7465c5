"""Shared plotting for the papers' figures (scripts/analyze.py, scripts/figures_dominance.py).

Every figure is sized for a paper: `figure()` makes one a column (3.25 in) or a page (6.75 in) wide with 8 pt text,
`save()` writes it as PNG (300 dpi) and PDF. Curves are drawn at the steps the runs logged, never on a
forward-filled grid; a band is drawn only where at least two seeds have a value, and a curve with a single seed says
so in its legend ("1 seed: no interval"). A configuration has the same colour in every figure (`color()`).

    import plots
    fig, axes = plots.figure(ncols=2)                                   # a column wide, two panels
    plots.curve_band(axes[0], [(steps_s1, values_s1), (steps_s2, values_s2)], label="hr_tanh")
    plots.label(axes[0], "agent steps", "return")
    plots.save(fig, "results", "curves_dqn")                            # -> [results/curves_dqn.png, .pdf]

    fig = plots.interval_plot({"relu": {"IQM": (0.9, 0.8, 1.0)}, "hr_tanh": {"IQM": (1.1, 1.0, 1.2)}},
                              xlabel="baseline-normalised score")
"""
from __future__ import annotations

import math
import os
import zlib
from typing import Callable, Iterable, Sequence

import numpy as np

COLUMN_WIDTH = 3.25  # inches: one column of a two-column paper (NeurIPS/ICML/ICLR text is 5.5-6.75 in)
FULL_WIDTH = 6.75  # inches: the full text width
FONT_SIZE = 8  # points: readable when the figure is printed at its width
DPI = int(os.environ.get("PLOTS_DPI", 300))  # PNG resolution; PLOTS_DPI=150 for lighter files (the docs gallery)
NO_INTERVAL = "1 seed: no interval"

# Fixed colours for the configurations the sweeps use (a colour-blind-safe palette, Okabe-Ito + tab10); any other
# name gets a colour from its hash, so it is the same in every figure and every run of the script.
_PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442",
            "#8c564b", "#7f7f7f", "#bcbd22", "#17becf", "#9467bd", "#d62728", "#2ca02c", "#1f77b4"]
CONFIG_COLORS = {
    "relu": "#000000", "baseline": "#000000", "none": "#000000",
    "tanh": "#0072B2", "hr_tanh": "#D55E00", "hr_relu": "#CC79A7", "tanh_ln": "#56B4E9",
    "widen_relu": "#7f7f7f", "widen_tanh": "#7f7f7f", "widen": "#7f7f7f", "2hr_tanh": "#E69F00",
    "sigmoid": "#009E73", "hr_sigmoid": "#8c564b", "hadamax": "#D55E00", "hr": "#D55E00",
    "crelu": "#bcbd22", "redo": "#17becf", "ln": "#56B4E9", "lnwd": "#9467bd", "hlgauss": "#E69F00",
    "reset": "#d62728", "prune": "#2ca02c",
}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def style() -> None:
    """Paper-sized text and thin lines for every figure drawn after this call (figure() calls it)."""
    plt = _plt()
    plt.rcParams.update({"font.size": FONT_SIZE, "axes.titlesize": FONT_SIZE, "axes.labelsize": FONT_SIZE,
                         "xtick.labelsize": FONT_SIZE - 1, "ytick.labelsize": FONT_SIZE - 1,
                         "legend.fontsize": FONT_SIZE - 1, "figure.titlesize": FONT_SIZE + 1,
                         "lines.linewidth": 1.2, "axes.linewidth": 0.6, "axes.spines.top": False,
                         "axes.spines.right": False, "legend.frameon": False, "pdf.fonttype": 42})


def figure(nrows: int = 1, ncols: int = 1, width: float | str = "column", height: float | None = None,
           sharex: bool = False, sharey: bool = False):
    """A figure a column wide ("column", 3.25 in), a page wide ("full", 6.75 in) or `width` inches, with nrows x
    ncols panels of about 4:3 unless `height` (inches, whole figure) is given. Returns (fig, axes) with axes a flat
    1-D numpy array (row-major), also for a single panel."""
    style()
    plt = _plt()
    w = {"column": COLUMN_WIDTH, "full": FULL_WIDTH}.get(width, width) if isinstance(width, str) else float(width)
    if height is None:
        height = nrows * min(0.75 * w / ncols + 0.35, 2.6)
    fig, axes = plt.subplots(nrows, ncols, figsize=(w, height), squeeze=False, sharex=sharex, sharey=sharey)
    return fig, axes.ravel()


def save(fig, out_dir: str, stem: str, formats: Sequence[str] = ("png", "pdf"), dpi: int = DPI) -> list[str]:
    """Write fig to out_dir/stem.<fmt> for each format (PNG and PDF by default), close it, return the paths."""
    os.makedirs(out_dir, exist_ok=True)
    try:
        fig.tight_layout()
    except Exception:  # noqa: BLE001 - a layout warning must not lose the figure
        pass
    paths = []
    for fmt in formats:
        path = os.path.join(out_dir, f"{stem}.{fmt}")
        fig.savefig(path, dpi=dpi, bbox_inches="tight")
        paths.append(path)
    _plt().close(fig)
    return paths


def color(config: str, configs: Iterable[str] | None = None) -> str:
    """The colour of a configuration, the same in every figure (configs is accepted for older callers, unused)."""
    if config in CONFIG_COLORS:
        return CONFIG_COLORS[config]
    return _PALETTE[zlib.crc32(str(config).encode()) % len(_PALETTE)]


def label(ax, xlabel: str, ylabel: str, title: str | None = None) -> None:
    """Axis labels (say the unit: 'agent steps', 'frames', 'environment frames') and an optional panel title."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4), useMathText=True)


def _mean_se(values: np.ndarray):
    m = float(np.mean(values))
    if len(values) < 2:
        return m, math.nan, math.nan
    se = float(np.std(values, ddof=1) / math.sqrt(len(values)))
    return m, m - se, m + se


def pointwise(curves: Sequence[tuple[np.ndarray, np.ndarray]],
              stat: Callable[[np.ndarray], tuple[float, float, float]] = _mean_se):
    """Per-seed curves (steps_i, values_i) of any lengths and steps -> (steps, point, lo, hi, n) over the union of
    the logged steps: at each step, `stat` of the values of the seeds that logged that step (NaN values skipped);
    lo/hi are NaN where fewer than two seeds have a value. `stat(values) -> (point, lo, hi)`; the default is the
    mean with a standard-error interval."""
    curves = [(np.asarray(s), np.asarray(v, dtype=float)) for s, v in curves if len(s)]
    if not curves:
        return (np.array([]),) * 4 + (np.array([], dtype=int),)
    steps = np.unique(np.concatenate([s for s, _ in curves]))
    point, lo, hi = (np.full(len(steps), np.nan) for _ in range(3))
    n = np.zeros(len(steps), dtype=int)
    lookup = [dict(zip(s.tolist(), v.tolist())) for s, v in curves]
    for i, x in enumerate(steps.tolist()):
        vals = np.array([d[x] for d in lookup if x in d and not math.isnan(d[x])])
        n[i] = len(vals)
        if len(vals):
            point[i], lo[i], hi[i] = stat(vals)
            if len(vals) < 2:
                lo[i] = hi[i] = math.nan
    return steps, point, lo, hi, n


def curve_band(ax, curves: Sequence[tuple[np.ndarray, np.ndarray]], label: str | None = None,
               color: str | None = None, stat: Callable | None = None, alpha: float = 0.2, **plot_kw):
    """Draw one configuration: the pointwise `stat` (default mean, band = standard error) over seeds at the steps
    they logged (each seed's (steps, values) may differ in length and steps; a step contributes from the seeds that
    logged it). No band where fewer than two seeds have a value; with a single seed the legend label says
    "1 seed: no interval"; a curve of a single point is drawn as a marker. Returns the Line2D."""
    steps, point, lo, hi, n = pointwise(curves, stat or _mean_se)
    if label is not None and len(n) and n.max() < 2:
        label = f"{label} ({NO_INTERVAL})"
    ok = ~np.isnan(point)
    if ok.sum() == 1:  # a single logged point is drawn as a marker (a line of one point is invisible)
        plot_kw = {"marker": "o", "markersize": 3, **plot_kw}
    line, = ax.plot(steps[ok], point[ok], label=label, color=color, **plot_kw)
    band = ~np.isnan(lo) & ~np.isnan(hi)
    if band.any():
        ax.fill_between(steps, np.where(band, lo, np.nan), np.where(band, hi, np.nan), alpha=alpha,
                        color=line.get_color(), linewidth=0)
    return line


def interval_plot(estimates: dict[str, dict[str, tuple[float, float, float]]], metrics: Sequence[str] | None = None,
                  xlabel: str = "score", width: float | str = "full", configs: Sequence[str] | None = None,
                  title: str | None = None, xlim: tuple[float, float] | None = None):
    """rliable-style aggregate intervals: one panel per metric (e.g. Median, IQM, Mean, Optimality Gap), one row per
    configuration, a bar from the CI's low to high end and a tick at the point estimate. estimates:
    {config: {metric: (point, lo, hi)}}; a NaN interval (fewer than two runs per task) is drawn as the point alone
    with "no CI" beside it. xlim: the same x range on every panel (e.g. (0, 1) for probabilities). Returns the figure
    (pass it to save())."""
    configs = list(configs or estimates)
    metrics = list(metrics or dict.fromkeys(m for c in configs for m in estimates[c]))
    plt = _plt()
    fig, axes = figure(ncols=len(metrics), width=width, height=1.0 + 0.25 * max(len(configs), 2))
    for ax, metric in zip(axes, metrics):
        for y, config in enumerate(configs):
            point, lo, hi = estimates[config].get(metric, (math.nan,) * 3)
            c = color(config)
            if not (math.isnan(lo) or math.isnan(hi)):
                ax.barh(y, hi - lo, left=lo, height=0.6, color=c, alpha=0.75)
            elif not math.isnan(point):
                ax.annotate("no CI", (point, y), xytext=(4, 0), textcoords="offset points", va="center",
                            fontsize=FONT_SIZE - 2)
            if not math.isnan(point):
                ax.vlines(point, y - 0.3, y + 0.3, color="k", linewidth=1.2)
        ax.set_yticks(range(len(configs)))
        ax.set_yticklabels(configs if ax is axes[0] else [""] * len(configs))
        ax.set_ylim(-0.6, len(configs) - 0.4)
        ax.set_title(metric)
        ax.set_xlabel(xlabel)
        ax.grid(axis="x", alpha=0.3)
        if xlim is not None:
            ax.set_xlim(*xlim)
    if title:
        fig.suptitle(title)
    del plt
    return fig


def profile_plot(ax, taus: np.ndarray, profiles: dict[str, tuple[np.ndarray, np.ndarray | None, np.ndarray | None]],
                 xlabel: str = "normalised score (tau)"):
    """Performance profiles (rliable): per configuration the fraction of runs with score > tau, with its CI band
    where given (lo/hi None or NaN: no band)."""
    for config, (y, lo, hi) in profiles.items():
        line, = ax.plot(taus, y, label=config, color=color(config))
        if lo is not None and hi is not None and not np.isnan(lo).all():
            ax.fill_between(taus, lo, hi, alpha=0.2, color=line.get_color(), linewidth=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(r"fraction of runs with score $>\tau$")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5))


def bar_plot(ax, names: Sequence[str], values: dict[str, Sequence[float]], errors: dict[str, Sequence[float]] | None
             = None, ylabel: str = "", rotate: int = 90):
    """Grouped bars: one group per name (e.g. game), one bar per configuration (values[config][i]), optional
    symmetric error bars (NaN: none)."""
    configs = list(values)
    width = 0.8 / max(len(configs), 1)
    x = np.arange(len(names))
    for k, config in enumerate(configs):
        err = None if errors is None else np.nan_to_num(np.asarray(errors[config], dtype=float), nan=0.0)
        ax.bar(x + (k - (len(configs) - 1) / 2) * width, values[config], width, label=config, color=color(config),
               yerr=err, error_kw={"linewidth": 0.6})
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=rotate, fontsize=FONT_SIZE - 2)
    ax.set_ylabel(ylabel)
    ax.axhline(0, color="k", linewidth=0.5)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5))
