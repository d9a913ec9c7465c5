"""scripts/plots.py: the shared figure helpers (analyze.py, figures_dominance.py)."""
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import plots  # noqa: E402


def test_pointwise_at_logged_steps_of_different_lengths():
    a = (np.array([10, 20, 30]), np.array([1.0, 2.0, 3.0]))
    b = (np.array([10, 20, 30, 40]), np.array([3.0, 4.0, np.nan, 7.0]))
    steps, point, lo, hi, n = plots.pointwise([a, b])
    assert steps.tolist() == [10, 20, 30, 40] and n.tolist() == [2, 2, 1, 1]
    np.testing.assert_allclose(point, [2, 3, 3, 7])
    se = np.std([1.0, 3.0], ddof=1) / math.sqrt(2)
    np.testing.assert_allclose(lo[:2], [2 - se, 3 - se]) and np.testing.assert_allclose(hi[:2], [2 + se, 3 + se])
    assert np.isnan(lo[2:]).all() and np.isnan(hi[2:]).all()  # one seed: no interval


def test_curve_band_labels_a_single_seed(tmp_path):
    fig, axes = plots.figure(ncols=2)
    assert len(axes) == 2 and fig.get_figwidth() == plots.COLUMN_WIDTH
    line = plots.curve_band(axes[0], [(np.array([1, 2, 3]), np.array([1.0, 2.0, 3.0]))], label="relu")
    assert line.get_label() == f"relu ({plots.NO_INTERVAL})"
    assert line.get_xdata().tolist() == [1, 2, 3] and not axes[0].collections  # no band
    two = plots.curve_band(axes[1], [(np.array([1, 2]), np.array([1.0, 2.0])), (np.array([1, 2, 3]),
                                                                                np.array([2.0, 3.0, 5.0]))],
                           label="hr_tanh", color=plots.color("hr_tanh"))
    assert two.get_label() == "hr_tanh" and two.get_xdata().tolist() == [1, 2, 3] and axes[1].collections
    paths = plots.save(fig, str(tmp_path), "curves")
    assert [os.path.basename(p) for p in paths] == ["curves.png", "curves.pdf"]
    assert all(os.path.getsize(p) > 1000 for p in paths)


def test_interval_profile_bar_plots_and_colors(tmp_path):
    fig = plots.interval_plot({"relu": {"IQM": (0.9, 0.8, 1.0), "Median": (1.0, math.nan, math.nan)},
                               "hr_tanh": {"IQM": (1.1, 1.0, 1.2), "Median": (1.2, 1.1, 1.3)}}, xlabel="score")
    assert [ax.get_title() for ax in fig.axes] == ["IQM", "Median"]
    assert any(t.get_text() == "no CI" for t in fig.axes[1].texts)
    assert os.path.getsize(plots.save(fig, str(tmp_path), "agg", formats=("png",))[0]) > 1000
    fig, axes = plots.figure()
    taus = np.linspace(0, 1, 5)
    plots.profile_plot(axes[0], taus, {"relu": (np.linspace(1, 0, 5), None, None)})
    plots.bar_plot(plots.figure()[1][0], ["Pong", "Breakout"], {"relu": [1.0, 2.0]}, {"relu": [0.1, math.nan]})
    assert plots.color("relu") == plots.color("relu", ["x"]) and plots.color("my_cfg") == plots.color("my_cfg")
    assert plots.color("tanh") != plots.color("hr_tanh")


def test_gallery_sweep_and_page(tmp_path):
    """scripts/make_gallery.py: two games x two seeds x its configurations; the page lists each PNG it is given."""
    import make_gallery

    runs = make_gallery.sweep(quick=True, with_drq=True)
    names = [name for _, name, _ in runs]
    # DQN 3 + PQN 2 configurations x 2 games x 2 seeds; DrQ 3 tasks x 3 mitigations x 2 seeds + 4 single runs
    assert len(names) == len(set(names)) == 2 * 2 * (3 + 2) + 3 * 3 * 2 + 4
    drq = {name: flags for _, name, flags in runs if name.startswith("drq")}
    masked = drq["drq__reacher-easy_masked__ln_switch__s1"]  # LayerNorm on at the first update with the reward seen
    learning_starts, mask = (int(masked[masked.index(f) + 1]) for f in ("--learning-starts", "--reward-mask-steps"))
    assert int(masked[masked.index("--ln-from-step") + 1]) == learning_starts + mask
    assert "--encoder" in drq["drq__cartpole-balance_sparse_narrow__resnet18__s1"]
    assert {n.split("__")[1] for n in names if n.startswith("dqn")} == set(make_gallery.GAMES)
    assert {n.split("__")[2] for n in names if n.startswith("pqn")} == {"relu", "hr_relu"}
    hadamax = [n for _, n, _ in make_gallery.sweep(False, False, hadamax=True) if n.startswith("pqn")]
    assert {n.split("__")[2] for n in hadamax} == {"relu", "hadamax"}
    (tmp_path / "curves_dqn.png").write_bytes(b"png")
    page = make_gallery.gallery_page(str(tmp_path), [("analyze", "python scripts/analyze.py runs",
                                                      [str(tmp_path / "curves_dqn.png")])])
    text = open(page).read()
    assert "python scripts/make_gallery.py" in text and "![curves_dqn](curves_dqn.png)" in text
    assert make_gallery.DESCRIPTIONS["curves"] in text
