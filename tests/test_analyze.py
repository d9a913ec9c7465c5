"""scripts/analyze.py on synthetic runs whose every number can be computed by hand."""
import csv
import json
import os
import sys

import numpy as np
import pytest
from scipy.stats import trim_mean

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))
import analyze  # noqa: E402

TOTAL = 100_000


def write_run(runs, name, args, returns, metrics=None, finished=True, evals=None):
    """A run directory as the training scripts write it: args.json, one event file, the finished marker."""
    from torch.utils.tensorboard import SummaryWriter

    d = runs / name
    d.mkdir(parents=True)
    (d / "args.json").write_text(json.dumps({"total_timesteps": TOTAL, **args}))
    w = SummaryWriter(str(d))
    for step, value in returns:
        w.add_scalar("charts/episodic_return", value, step)
    for tag, points in (metrics or {}).items():
        for step, value in points:
            w.add_scalar(tag, value, step)
    for step, value in evals or []:
        w.add_scalar("eval/episodic_return", value, step)
    w.close()
    if finished:
        (d / "finished").write_text("")
    return d


STEPS = np.arange(1, 101) * 1000  # 100 episodes, one every 1000 steps: 10 per curve window of 10k steps


def dqn_args(config, game, seed):
    flags = {"relu": dict(activation="relu", hr=False), "hr_tanh": dict(activation="tanh", hr=True),
             "tanh": dict(activation="tanh", hr=False), "hr_relu": dict(activation="relu", hr=True)}[config]
    return {"target_network_frequency": 1000, "exp_name": config, "env_id": f"{game}NoFrameskip-v4", "seed": seed, **flags}


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    base = tmp_path_factory.mktemp("analyze")
    runs = base / "runs"
    # Breakout ReLU: seed 1 returns step/1000, seed 2 twice that. Window means: 5.5, 15.5, ..., 95.5 (and x2).
    for seed, scale in ((1, 1.0), (2, 2.0)):
        write_run(runs, f"dqn__Breakout__relu__s{seed}", dqn_args("relu", "Breakout", seed),
                  [(s, scale * s / 1000) for s in STEPS],
                  {"representation/latent/dormant_kde": [(50_000, 0.5), (100_000, 0.6)]})
        # tanh+HR on Breakout: constant 150 and 50
        write_run(runs, f"dqn__Breakout__hr_tanh__s{seed}", dqn_args("hr_tanh", "Breakout", seed),
                  [(s, 150.0 if seed == 1 else 50.0) for s in STEPS],
                  {"representation/latent/dormant_kde": [(100_000, 0.09)]})
        write_run(runs, f"dqn__Breakout__tanh__s{seed}", dqn_args("tanh", "Breakout", seed),
                  [(s, 20.0) for s in STEPS], {"representation/latent/dormant_kde": [(100_000, 0.3)]})
    # Pong ReLU: one seed, returns -21 for the first half, 21 after: window means -21 .. 21
    write_run(runs, "dqn__Pong__relu__s1", dqn_args("relu", "Pong", 1),
              [(s, -21.0 if s <= 50_000 else 21.0) for s in STEPS],
              {"representation/latent/dormant_kde": [(100_000, 0.8)]})
    write_run(runs, "dqn__Breakout__hr_relu__s1", dqn_args("hr_relu", "Breakout", 1), [(s, 10.0) for s in STEPS],
              {"representation/latent/dormant_kde": [(100_000, 0.95)]})
    write_run(runs, "dqn__Pong__hr_tanh__s1", dqn_args("hr_tanh", "Pong", 1), [(s, 0.0) for s in STEPS],
              {"representation/latent/dormant_kde": [(100_000, 0.2)]})
    # a crashed run and a directory without args: listed / ignored, never in the numbers
    stopped = write_run(runs, "dqn__Pong__relu__s2", dqn_args("relu", "Pong", 2), [(1000, 1e6)], finished=False)
    for f in stopped.iterdir():
        os.utime(f, (1, 1))
    (runs / "_sweep_logs").mkdir()
    out = base / "results"
    assert analyze.main([str(runs), "--out", str(out), "--reps", "300", "--curve-reps", "20",
                         "--curve-points", "10"]) == 0
    with open(out / "results.csv") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    return out, rows


def test_results_csv_final_scores(analysed):
    _, rows = analysed
    assert len(rows) == 9  # the stopped run is left out
    assert "dqn__Pong__relu__s2" not in rows
    r = rows["dqn__Breakout__relu__s1"]
    assert r["algo"] == "dqn" and r["config"] == "relu" and r["game"] == "Breakout" and r["seed"] == "1"
    assert float(r["final_score"]) == pytest.approx(np.mean([96, 97, 98, 99, 100]))  # last 5% of 100 episodes
    assert float(rows["dqn__Breakout__relu__s2"]["final_score"]) == pytest.approx(196.0)
    # final metric = mean of the last 5% of probes (here: the last of two)
    assert float(r["representation/latent/dormant_kde"]) == pytest.approx(0.6)


def test_baseline_and_human_normalisation(analysed):
    _, rows = analysed
    lo, hi = 5.5, 191.0  # min / max over both ReLU seeds' window means on Breakout
    assert float(rows["dqn__Breakout__relu__s1"]["baseline_normalized"]) == pytest.approx((98 - lo) / (hi - lo))
    assert float(rows["dqn__Breakout__hr_tanh__s1"]["baseline_normalized"]) == pytest.approx((150 - lo) / (hi - lo))
    assert float(rows["dqn__Pong__hr_tanh__s1"]["baseline_normalized"]) == pytest.approx(0.5)  # (0 + 21) / 42
    assert float(rows["dqn__Pong__hr_tanh__s1"]["human_normalized"]) == pytest.approx(20.7 / 35.3)
    assert float(rows["dqn__Breakout__hr_tanh__s2"]["human_normalized"]) == pytest.approx((50 - 1.7) / 28.8)


def test_aggregates_by_hand(analysed):
    out, _ = analysed
    with open(out / "aggregates.csv") as f:
        agg = {(r["config"], r["score"], r["statistic"]): r for r in csv.DictReader(f)}
    lo, hi = 5.5, 191.0
    breakout = [(150 - lo) / (hi - lo), (50 - lo) / (hi - lo)]
    pong = [0.5]
    mean = agg[("hr_tanh", "baseline_normalized", "mean")]
    assert float(mean["value"]) == pytest.approx((np.mean(breakout) + 0.5) / 2)
    assert float(agg[("hr_tanh", "baseline_normalized", "median")]["value"]) == pytest.approx(
        np.median([np.mean(breakout), 0.5]))
    assert float(agg[("hr_tanh", "baseline_normalized", "iqm")]["value"]) == pytest.approx(
        trim_mean(breakout + pong, 0.25))
    assert float(mean["ci_low"]) <= float(mean["value"]) <= float(mean["ci_high"])
    assert mean["tasks"] == "2" and mean["runs"] == "3"
    # Pong has one seed, so the bootstrap can only move Breakout: the CI is bounded by its two extremes
    assert float(mean["ci_low"]) >= (breakout[1] + 0.5) / 2 - 1e-9
    assert float(mean["ci_high"]) <= (breakout[0] + 0.5) / 2 + 1e-9


def test_tables_md(analysed):
    out, _ = analysed
    text = (out / "tables.md").read_text()
    # Table 1: tanh p = 0.3 (both games? only Breakout has tanh) -> predicted 0.09; HR measured mean over games
    # of per-game means: Breakout 0.09, Pong 0.2 -> 0.145. ReLU: Breakout 0.6, Pong 0.8 -> 0.7 vs 1-(0.3)^2.
    assert "| tanh | 0.300 | 0.145 | p^2 = 0.090 |" in text
    assert "| ReLU | 0.700 | 0.950 | 1-(1-p)^2 = 0.910 |" in text
    lo, hi = 5.5, 191.0
    tanh_base = (20 - lo) / (hi - lo)
    hr = (np.mean([(150 - lo) / (hi - lo), (50 - lo) / (hi - lo)]) + 0.5) / 2
    assert f"| tanh | {tanh_base:.3f} | {hr:.3f} | — | — |" in text
    assert "`dqn__Pong__relu__s2`: stopped" in text
    assert "1 runs." in text


def test_figures_written(analysed):
    out, _ = analysed
    for name in ("curves_dqn.png", "representation_dqn.png"):
        path = out / name
        assert path.exists() and path.stat().st_size > 10_000, name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_curve_windows():
    run = analyze.RunData("x", "x", {}, "dqn", "relu", "Pong", 1, "finished",
                          {"charts/episodic_return": (np.array([5, 15, 16, 45]), np.array([1.0, 2.0, 4.0, 8.0]))})
    # windows (-inf,10], (10,20], (20,30], (30,40], (40,50]: empty windows carry the last value forward
    np.testing.assert_allclose(analyze.curve(run, np.array([10, 20, 30, 40, 50])), [1, 3, 3, 3, 8])


def test_config_labels_for_hand_made_runs():
    assert analyze.config_label({"exp_name": "dqn_atari_hr", "activation": "tanh", "hr": True}, "dqn") == "hr_tanh"
    assert analyze.config_label({"activation": "tanh", "hr": True, "hidden_layers": 2}, "dqn") == "2hr_tanh"
    assert analyze.config_label({"activation": "relu", "hidden_dim": 1024}, "dqn") == "widen_relu"
    assert analyze.config_label({"activation": "tanh", "layernorm": True}, "dqn") == "tanh_ln"
    assert analyze.config_label({"encoder": "hadamax"}, "pqn") == "hadamax"
    assert analyze.config_label({"mitigation": "lnwd", "hr": True}, "drq") == "hr_lnwd"


def test_algorithm_from_args():
    assert analyze.algorithm_of({"clip_coef": 0.1}, "x") == "ppo"
    assert analyze.algorithm_of({"q_lambda": 0.65, "clip_coef": 0.1}, "x") == "pqn"
    assert analyze.algorithm_of({"mitigation": "none"}, "x") == "drq"
    assert analyze.algorithm_of({"exp_name": "dqn_atari_hr"}, "x") == "dqn"
    assert analyze.algorithm_of({}, "ppo__Pong-v5__relu__s1") == "ppo"


def test_bad_runs_dir(tmp_path):
    with pytest.raises(SystemExit, match="not a directory"):
        analyze.main([str(tmp_path / "missing")])
