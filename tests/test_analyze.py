"""scripts/analyze.py on synthetic runs whose every number can be computed by hand, and whose aggregates must equal
rliable called directly on the same score matrix."""
import csv
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from scipy.stats import trim_mean

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))
import analyze  # noqa: E402

TOTAL = 100_000
STEPS = np.arange(1, 101) * 1000  # 100 episodes, one every 1000 steps: 10 per curve window of 10k steps
REPS, CURVE_REPS, POI_REPS, SEED = 200, 20, 100, 0
PNG = b"\x89PNG\r\n\x1a\n"


def summary(seed, **extra):
    """runs/NAME/finished as harness.Run.finish writes it; this run trained 500 steps past its last episode."""
    return {"script": "dqn_atari_hr.py", "global_step": TOTAL + 500, "steps_this_process": TOTAL + 500,
            "wall_seconds": 3600.0 * seed, "wall_seconds_this_process": 3600.0 * seed, "sps": 27.9,
            "probe_seconds": 36.0, "n_probes": 4, "probe_share": 0.01, "last_return": 1.0,
            "peak_host_rss_bytes": 2 ** 30, "device": "cpu", "compile": False, "cudagraphs": False,
            "finished_at": "2025-01-01T00:00:00+0000", **extra}


def write_run(runs, name, args, returns, metrics=None, finished=True, evals=None):
    """A run directory as the training scripts write it: args.json, one event file, and `finished`: True = the
    harness's JSON summary, a dict = that JSON, a str = that text (an older marker), False = none."""
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
    if finished is True:
        finished = summary(args.get("seed", 1))
    if finished is not False:
        (d / "finished").write_text(finished if isinstance(finished, str) else json.dumps(finished))
    return d


def run_analyze(runs, out, *extra):
    assert analyze.main([str(runs), "--out", str(out), "--reps", str(REPS), "--curve-reps", str(CURVE_REPS),
                         "--curve-points", "10", "--seed", str(SEED), "--poi-reps", str(POI_REPS), "--dpi", "60",
                         *extra]) == 0
    with open(out / "results.csv") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    with open(out / "aggregates.csv") as f:
        agg = {(r["algo"], r["config"], r["score"], r["statistic"]): r for r in csv.DictReader(f)}
    return out, rows, agg


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def rliable_direct(matrix, gamma=1.0, reps=REPS, seed=SEED):
    """rliable called directly: median, IQM, mean, optimality gap with 95% stratified-bootstrap CIs."""
    from rliable import library as rly, metrics

    func = lambda x: np.array([metrics.aggregate_median(x), metrics.aggregate_iqm(x),  # noqa: E731
                               metrics.aggregate_mean(x), metrics.aggregate_optimality_gap(x, gamma)])
    np.random.seed(seed)  # rliable 1.2.0 resamples with numpy's global generator, whatever random_state says
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        points, cis = rly.get_interval_estimates({"m": np.asarray(matrix, float)}, func, reps=reps,
                                                 random_state=np.random.RandomState(seed))
    return points["m"], cis["m"]



def test_intervals_do_not_depend_on_numpys_global_generator():
    """rliable 1.2.0 draws its bootstrap indices from numpy's global generator (its random_state is ignored): the
    same --seed must give the same interval whatever that generator's state, and leave that state as it was."""
    matrix = np.random.default_rng(1).normal(size=(5, 3))
    func = analyze.aggregate_funcs()
    got = []
    for state in (1, 2):
        np.random.seed(state)
        before = np.random.get_state()[1].copy()
        got.append(analyze.interval_estimates(matrix, func, REPS, SEED))
        assert (np.random.get_state()[1] == before).all()
    np.testing.assert_array_equal(got[0][1], got[1][1])
    np.testing.assert_array_equal(got[0][2], got[1][2])
    np.testing.assert_allclose(got[0][1:], rliable_direct(matrix)[1])

# ---------------------------------------------------------------------------------------------------------------
# The DQN sweep of the HR papers: 8 configurations x {Breakout, Pong} x seeds {1, 2}
# ---------------------------------------------------------------------------------------------------------------
GAMES = ("Breakout", "Pong")
FLAGS = {"relu": dict(activation="relu", hr=False), "tanh": dict(activation="tanh", hr=False),
         "sigmoid": dict(activation="sigmoid", hr=False), "hr_tanh": dict(activation="tanh", hr=True),
         "hr_relu": dict(activation="relu", hr=True), "hr_sigmoid": dict(activation="sigmoid", hr=True),
         "widen_tanh": dict(activation="tanh", hidden_dim=1024), "2hr_tanh": dict(activation="tanh", hr=True,
                                                                                   hidden_layers=2)}
# constant return of (config, game) for seed 1; seed 2 adds 10 (Breakout) or 2 (Pong)
RETURN = {"tanh": (20.0, -5.0), "hr_tanh": (150.0, 0.0), "hr_relu": (10.0, -10.0), "sigmoid": (30.0, -1.0),
          "hr_sigmoid": (40.0, 1.0), "widen_tanh": (15.0, -15.0), "2hr_tanh": (140.0, 3.0)}
# final dormant fraction (KDE) of `latent` per (config, game); seed 2 adds 0.02
DORMANT = {"relu": (0.6, 0.8), "hr_relu": (0.9, 0.95), "tanh": (0.3, 0.4), "hr_tanh": (0.1, 0.2),
           "sigmoid": (0.4, 0.5), "hr_sigmoid": (0.45, 0.5), "widen_tanh": (0.3, 0.3), "2hr_tanh": (0.1, 0.1)}
BOUNDS = {"Breakout": (5.5, 191.0), "Pong": (-21.0, 21.0)}  # ReLU curves' window means: min, max over both seeds


def relu_return(game, seed, step):
    if game == "Breakout":  # seed 1: step/1000, seed 2 twice that; window means 5.5 .. 95.5 and 11 .. 191
        return seed * step / 1000
    return -21.0 if step <= 50_000 else 21.0


def final_return(config, game, seed):
    if config == "relu":
        return float(np.mean([relu_return(game, seed, s) for s in STEPS[-5:]]))  # last 5% of 100 episodes
    return RETURN[config][GAMES.index(game)] + (seed - 1) * (10.0 if game == "Breakout" else 2.0)


def normalised(config, game, seed):
    lo, hi = BOUNDS[game]
    return (final_return(config, game, seed) - lo) / (hi - lo)


def dormant(config, game, seed):
    return DORMANT[config][GAMES.index(game)] + 0.02 * (seed - 1)


def dqn_args(config, game, seed):
    return {"target_network_frequency": 1000, "exp_name": config, "env_id": f"{game}NoFrameskip-v4", "seed": seed,
            **FLAGS[config]}


@pytest.fixture(scope="module")
def dqn(tmp_path_factory):
    base = tmp_path_factory.mktemp("dqn")
    runs = base / "runs"
    for config in FLAGS:
        for game in GAMES:
            for seed in (1, 2):
                returns = [(s, relu_return(game, seed, s) if config == "relu" else final_return(config, game, seed))
                           for s in STEPS]
                d = dormant(config, game, seed)
                metrics = {"representation/latent/dormant_kde": [(50_000, 0.5), (100_000, d)],
                           "representation/latent/dormant_score": [(50_000, 0.4), (100_000, d / 2)],
                           "representation/latent/srank": [(50_000, 100.0), (100_000, 200.0 * (1 - d))],
                           "representation/hidden_bias": [(50_000, 1.0), (100_000, 10 * d)]}
                write_run(runs, f"dqn__{game}__{config}__s{seed}", dqn_args(config, game, seed), returns, metrics)
    return run_analyze(runs, base / "results")


def test_results_csv_final_scores_and_normalisation(dqn):
    _, rows, _ = dqn
    assert len(rows) == len(FLAGS) * 4
    r = rows["dqn__Breakout__relu__s1"]
    assert r["algo"] == "dqn" and r["config"] == "relu" and r["game"] == "Breakout" and r["seed"] == "1"
    assert float(r["final_score"]) == pytest.approx(np.mean([96, 97, 98, 99, 100]))
    assert float(rows["dqn__Breakout__relu__s2"]["final_score"]) == pytest.approx(196.0)
    assert float(r["representation/latent/dormant_kde"]) == pytest.approx(0.6)  # the last of two probes
    for config in FLAGS:
        for game in GAMES:
            for seed in (1, 2):
                row = rows[f"dqn__{game}__{config}__s{seed}"]
                assert row["config"] == config
                assert float(row["baseline_normalized"]) == pytest.approx(normalised(config, game, seed))
    assert float(rows["dqn__Pong__hr_tanh__s1"]["human_normalized"]) == pytest.approx(20.7 / 35.3)
    assert float(rows["dqn__Breakout__hr_tanh__s2"]["human_normalized"]) == pytest.approx((160 - 1.7) / 28.8)


def test_aggregates_equal_rliable_on_the_same_matrix(dqn):
    _, _, agg = dqn
    for config in ("relu", "hr_tanh", "tanh"):
        matrix = [[normalised(config, g, s) for g in GAMES] for s in (1, 2)]  # (runs, tasks)
        points, cis = rliable_direct(matrix)
        for i, stat in enumerate(("median", "iqm", "mean", "optimality_gap")):
            row = agg[("dqn", config, "baseline_normalized", stat)]
            assert float(row["value"]) == pytest.approx(points[i])
            assert float(row["ci_low"]) == pytest.approx(cis[0][i]) and float(row["ci_high"]) == pytest.approx(
                cis[1][i])
            assert row["tasks"] == "2" and row["runs"] == "4" and row["interval"] == "ok"
        m = np.array(matrix)  # and by hand
        assert float(agg[("dqn", config, "baseline_normalized", "mean")]["value"]) == pytest.approx(m.mean())
        assert float(agg[("dqn", config, "baseline_normalized", "median")]["value"]) == pytest.approx(
            np.median(m.mean(0)))
        assert float(agg[("dqn", config, "baseline_normalized", "iqm")]["value"]) == pytest.approx(
            trim_mean(m.ravel(), 0.25))
        assert float(agg[("dqn", config, "baseline_normalized", "optimality_gap")]["value"]) == pytest.approx(
            np.mean(1 - np.minimum(m, 1)))


def test_probability_of_improvement_equals_rliable(dqn):
    from rliable import library as rly, metrics

    out, _, _ = dqn
    poi = {r["config"]: r for r in read_csv(out / "probability_of_improvement.csv")}
    assert set(poi) == set(FLAGS) - {"relu"} and poi["hr_tanh"]["baseline"] == "relu"
    x = np.array([[normalised("hr_tanh", g, s) for g in GAMES] for s in (1, 2)])
    y = np.array([[normalised("relu", g, s) for g in GAMES] for s in (1, 2)])
    # hr_tanh beats relu on Breakout in 2 of 4 pairs (150, 160 vs 98, 196) and loses on Pong (0, 2 vs 21, 21)
    assert float(poi["hr_tanh"]["value"]) == pytest.approx((2 / 4 + 0) / 2)
    np.random.seed(SEED)  # rliable's global-generator draws (see rliable_direct)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        _, cis = rly.get_interval_estimates({"p": (x, y)}, lambda a, b: np.array([
            metrics.probability_of_improvement(a, b)]), reps=POI_REPS, random_state=np.random.RandomState(SEED))
    assert float(poi["hr_tanh"]["ci_low"]) == pytest.approx(cis["p"][0][0])
    assert float(poi["hr_tanh"]["ci_high"]) == pytest.approx(cis["p"][1][0])


def test_dormant_table_hr_v1_table2(dqn):
    out, _, _ = dqn
    text = (out / "tables.md").read_text()

    def p(config):  # seeds averaged per game, then games
        return np.mean([np.mean([dormant(config, g, s) for s in (1, 2)]) for g in GAMES])

    tanh, relu, sig = p("tanh"), p("relu"), p("sigmoid")
    assert (f"| tanh | {tanh:.3f} | {p('hr_tanh'):.3f} | p^2 = {tanh ** 2:.3f} | "
            f"{100 * (p('hr_tanh') - tanh) / tanh:+.0f}% |") in text
    assert f"| ReLU | {relu:.3f} | {p('hr_relu'):.3f} | 1-(1-p)^2 = {1 - (1 - relu) ** 2:.3f} |" in text
    assert f"| sigmoid | {sig:.3f} | {p('hr_sigmoid'):.3f} | p = {sig:.3f} |" in text
    table = {r["activation"]: r for r in read_csv(out / "table_dormant_dqn.csv")}
    assert float(table["tanh"]["without_hr_p"]) == pytest.approx(tanh)
    assert float(table["ReLU"]["with_hr_predicted"]) == pytest.approx(1 - (1 - relu) ** 2)
    assert float(table["sigmoid"]["with_hr_measured"]) == pytest.approx(p("hr_sigmoid"))


def test_hr_v2_table2(dqn):
    out, _, _ = dqn

    def mean_score(config):
        return np.mean([np.mean([normalised(config, g, s) for s in (1, 2)]) for g in GAMES])

    cells = [mean_score(c) for c in ("tanh", "hr_tanh", "widen_tanh", "2hr_tanh")]
    text = (out / "tables.md").read_text()
    assert "| tanh | " + " | ".join(f"{c:.3f}" for c in cells) + " |" in text
    table = read_csv(out / "table2_dqn.csv")
    assert [float(table[0][k]) for k in ("baseline", "hr", "widen", "2hr")] == pytest.approx(cells)
    combined = (out / "table2_hr_v2.md").read_text()
    for variant, value in zip(("Baseline", "+ HR", "+ Widen", "+ 2HR"), cells):
        assert f"| {variant} | {value:.3f} [" in combined
    assert [r["variant"] for r in read_csv(out / "table2_hr_v2.csv")] == ["Baseline", "+ HR", "+ Widen", "+ 2HR"]


def test_every_figure_written(dqn):
    out, _, _ = dqn
    for stem in ("curves_dqn", "games_dqn", "final_dqn", "representation_dqn", "metrics_dqn", "aggregates_dqn",
                 "profiles_dqn", "improvement_dqn"):
        for ext in ("png", "pdf"):
            path = out / f"{stem}.{ext}"
            assert path.exists() and path.stat().st_size > 2_000, path
        assert (out / f"{stem}.png").read_bytes()[:8] == PNG
        assert (out / f"{stem}.pdf").read_bytes()[:5] == b"%PDF-"


def test_help_shows_defaults():
    out = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "analyze.py"), "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "(default: results)" in out and "(default: 2000)" in out and "(default: png,pdf)" in out


# ---------------------------------------------------------------------------------------------------------------
# What a researcher trips over: PQN runs of different lengths, one seed, no episode, corrupt, unfinished
# ---------------------------------------------------------------------------------------------------------------
def pqn_args(config, game, seed):
    return {"q_lambda": 0.65, "exp_name": config, "env_id": f"{game}-v5", "seed": seed,
            "encoder": "hadamax" if config == "hadamax" else "nature"}


@pytest.fixture(scope="module")
def edge(tmp_path_factory):
    base = tmp_path_factory.mktemp("edge")
    runs = base / "runs"
    for game, ret in (("Breakout", 30.0), ("Pong", 0.0)):
        for seed in (1, 2):  # relu: seed 2 on Breakout stopped at half the horizon (finished: a shorter run)
            steps = STEPS[:50] if (game, seed) == ("Breakout", 2) else STEPS
            fin = summary(seed, global_step=int(steps[-1]))
            write_run(runs, f"pqn__{game}__relu__s{seed}", pqn_args("relu", game, seed),
                      [(s, ret + seed) for s in steps], {"representation/latent/dormant_kde": [(int(steps[-1]), .5)]},
                      finished=fin)
        write_run(runs, f"pqn__{game}__hadamax__s1", pqn_args("hadamax", game, 1),  # hadamax: one seed only
                  [(s, 2 * ret + 5) for s in STEPS], {"representation/latent/dormant_kde": [(TOTAL, 0.2)]})
    # a DQN sweep without ReLU runs: no baseline normalisation, so its figures show human-normalised scores
    for seed in (1, 2):
        write_run(runs, f"dqn__Pong__tanh__s{seed}", dqn_args("tanh", "Pong", seed), [(s, float(seed)) for s in STEPS])
    # finished, but no episode ended (a horizon shorter than one game)
    write_run(runs, "pqn__Pong__hadamax__s2", pqn_args("hadamax", "Pong", 2), [],
              {"representation/latent/srank": [(1000, 5.0)]}, finished=summary(2, global_step=1000))
    # crashed, and its first try moved aside; a directory without args; two corrupt ones
    stopped = write_run(runs, "pqn__Pong__relu__s3", pqn_args("relu", "Pong", 3), [(1000, 1e6)], finished=False)
    for f in stopped.iterdir():
        os.utime(f, (1, 1))
    write_run(runs, "pqn__Pong__relu__s3.partial-1700000000", pqn_args("relu", "Pong", 3), [(1000, 1e6)],
              finished=False)
    (runs / "_sweep_logs").mkdir()
    (runs / "corrupt_args").mkdir()
    (runs / "corrupt_args" / "args.json").write_text("{not json")
    (runs / "corrupt_args" / "finished").write_text("{}")
    return run_analyze(runs, base / "results")


def test_one_seed_interval_not_defined(edge):
    out, rows, agg = edge
    iqm = agg[("pqn", "hadamax", "human_normalized", "iqm")]
    assert iqm["ci_low"] == "nan" and iqm["ci_high"] == "nan" and iqm["interval"].startswith("not defined")
    hns = [(2 * 30 + 5 - 1.7) / (30.5 - 1.7), (5 + 20.7) / (14.6 + 20.7)]  # Breakout, Pong
    assert float(iqm["value"]) == pytest.approx(np.mean(hns))  # IQM of 2 values
    text = (out / "tables.md").read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("| hadamax |"))
    assert line.count("[CI not defined]") == 4 and "CI not defined: fewer than two runs per task." in text
    assert agg[("pqn", "relu", "human_normalized", "iqm")]["interval"] == "ok"
    for stem in ("curves_pqn", "aggregates_pqn", "final_pqn", "games_pqn"):
        assert (out / f"{stem}.png").stat().st_size > 2_000


def test_runs_of_different_lengths_are_reported_not_cut(edge):
    out, rows, agg = edge
    assert int(rows["pqn__Breakout__relu__s2"]["global_step"]) == 50_000
    assert float(rows["pqn__Breakout__relu__s2"]["final_score"]) == pytest.approx(32.0)
    text = (out / "tables.md").read_text()
    assert "Runs of different lengths (agent steps): 50000 to 100500." in text
    assert "- `pqn__Breakout__relu__s2`: 50000" in text
    # the aggregate uses both relu seeds on both games (runs of different lengths are not dropped)
    assert agg[("pqn", "relu", "human_normalized", "mean")]["runs"] == "4"


def test_without_relu_runs_dqn_figures_fall_back_to_human_normalised(edge):
    out, rows, agg = edge
    assert rows["dqn__Pong__tanh__s1"]["baseline_normalized"] == "nan"
    assert float(agg[("dqn", "tanh", "human_normalized", "mean")]["value"]) == pytest.approx((1.5 + 20.7) / 35.3)
    assert "No `baseline_normalized` scores (no ReLU runs to normalise by): the figures show `human_normalized`." in (
        out / "tables.md").read_text()
    for stem in ("curves_dqn", "aggregates_dqn", "final_dqn"):
        assert (out / f"{stem}.png").stat().st_size > 2_000


def test_no_episode_corrupt_unfinished_are_listed(edge, capsys):
    out, rows, _ = edge
    assert "pqn__Pong__hadamax__s2" not in rows and "pqn__Pong__relu__s3" not in rows
    text = (out / "tables.md").read_text()
    assert "- `pqn__Pong__hadamax__s2`: finished, last step 1000, no complete episode" in text
    assert "- `pqn__Pong__relu__s3`: stopped, last step 1000" in text
    assert "- `pqn__Pong__relu__s3.partial-1700000000`: moved aside, last step 1000" in text
    assert "- `corrupt_args`: JSONDecodeError" in text
    assert "1 finished without a complete episode, 2 not finished, 1 unreadable" in text


def test_empty_or_missing_runs_dir_is_an_error(tmp_path, capsys):
    (tmp_path / "runs").mkdir()
    assert analyze.main([str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no run directories")
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit, match="not a directory"):
        analyze.main([str(tmp_path / "missing")])


def test_curve_windows_do_not_forward_fill():
    run = analyze.RunData("x", "x", {}, "dqn", "relu", "Pong", 1, "finished",
                          {"charts/episodic_return": (np.array([5, 15, 16, 45]), np.array([1.0, 2.0, 4.0, 8.0]))})
    # windows (-inf,10], (10,20], (20,30], (30,40], (40,50]: empty windows are gaps, not the last value
    np.testing.assert_allclose(analyze.curve(run, np.array([10, 20, 30, 40, 50])), [1, 3, np.nan, np.nan, 8])


def test_score_matrix_keeps_equal_runs_per_task():
    matrix, tasks, dropped = analyze.score_matrix({"b": [1.0, 2.0, 3.0], "a": [4.0, 5.0], "c": []})
    assert tasks == ["a", "b"] and dropped == 1
    np.testing.assert_allclose(matrix, [[4, 1], [5, 2]])


# ---------------------------------------------------------------------------------------------------------------
# Loading, summaries, labels (the interface scripts/figures_dominance.py imports)
# ---------------------------------------------------------------------------------------------------------------
def test_read_finished_tolerates_older_markers(tmp_path):
    assert analyze.read_finished(str(tmp_path)) is None  # not finished
    for text, expected in (("", {}), ("done\n", {}), ("[1, 2]", {}), ('{"global_step": 7}', {"global_step": 7})):
        (tmp_path / "finished").write_text(text)
        assert analyze.read_finished(str(tmp_path)) == expected
    run = analyze.RunData("x", "x", {}, "dqn", "relu", "Pong", 1, "finished",
                          {"charts/episodic_return": (np.array([5, 45]), np.array([1.0, 8.0]))})
    assert run.global_step == 45  # no summary: its last logged step
    run.summary = {"global_step": 50}
    assert run.global_step == 50
    run.summary = {"global_step": "garbage"}
    assert run.global_step == 45
    assert np.isnan(analyze.number(None)) and np.isnan(analyze.number("x")) and analyze.number(float("inf"), 3) == 3


def test_load_run_and_summary_fields(tmp_path):
    runs = tmp_path / "runs"
    d = write_run(runs, "dqn__Pong__relu__s2", dqn_args("relu", "Pong", 2), [(1000, 1.0), (2000, 3.0)],
                  finished={"global_step": 2500, "wall_seconds": 3600.0})
    r = analyze.load_run(str(d), 0.0)
    assert (r.algo, r.config, r.env_id, r.seed, r.status) == ("dqn", "relu", "PongNoFrameskip-v4", 2, "finished")
    assert r.global_step == 2500 and r.last_step == 2000
    steps, values = analyze.read_event_scalars(str(d))["charts/episodic_return"]
    assert steps.tolist() == [1000, 2000] and values.tolist() == [1.0, 3.0]
    assert analyze.load_run(str(tmp_path), 0.0) is None  # no args.json


def test_config_labels_for_hand_made_runs():
    assert analyze.config_label({"exp_name": "dqn_atari_hr", "activation": "tanh", "hr": True}, "dqn") == "hr_tanh"
    assert analyze.config_label({"activation": "tanh", "hr": True, "hidden_layers": 2}, "dqn") == "2hr_tanh"
    assert analyze.config_label({"activation": "relu", "hidden_dim": 1024}, "dqn") == "widen_relu"
    assert analyze.config_label({"activation": "tanh", "layernorm": True}, "dqn") == "tanh_ln"
    assert analyze.config_label({"activation": "sigmoid", "hr": True}, "dqn") == "hr_sigmoid"
    assert analyze.config_label({"encoder": "hadamax"}, "pqn") == "hadamax"
    assert analyze.config_label({"mitigation": "lnwd", "hr": True}, "drq") == "hr_lnwd"


def test_algorithm_from_args():
    assert analyze.algorithm_of({"clip_coef": 0.1}, "x") == "ppo"
    assert analyze.algorithm_of({"q_lambda": 0.65, "clip_coef": 0.1}, "x") == "pqn"
    assert analyze.algorithm_of({"mitigation": "none"}, "x") == "drq"
    assert analyze.algorithm_of({"exp_name": "dqn_atari_hr"}, "x") == "dqn"
    assert analyze.algorithm_of({}, "ppo__Pong-v5__relu__s1") == "ppo"
    assert analyze.algorithm_of({"c_shift": 3.0, "hr": True}, "x") == "simbav2"
    assert analyze.algorithm_of({"enc_horizon": 5, "hr": True}, "x") == "mrq"
    assert analyze.algorithm_of({"exp_name": "mrq_dmc_hr"}, "x") == "mrq"


def test_simbav2_and_mrq_labels():
    label = analyze.config_label
    assert label({"exp_name": "simbav2_dmc_hr", "hr": True, "hr_networks": "both"}, "simbav2") == "hr"
    assert label({"widen": True, "hr_networks": "critic"}, "simbav2") == "widen_critic"
    assert label({"hr": True, "hr_networks": "critic", "hr_scaler": "shared"}, "simbav2") == "hr_critic_shared"
    assert label({"hr": False, "widen": False}, "simbav2") == "baseline"
    assert label({"exp_name": "mrq_dmc_hr", "hr": True, "hr_layers": "zs"}, "mrq") == "hr"
    assert label({"widen": True, "hr_layers": "zsa,convs"}, "mrq") == "widen_zsa_convs"
    assert label({"hr": True, "hr_layers": "all"}, "mrq") == "hr_all"
    assert label({"hr": False, "widen": False, "hr_layers": "all"}, "mrq") == "baseline"


# ---------------------------------------------------------------------------------------------------------------
# SimbaV2 and MR.Q (HR v2 Table 2's other columns): scored on final-5% evaluation returns
# ---------------------------------------------------------------------------------------------------------------
SIMBA_BASE = {"baseline": {"humanoid-run": 100, "dog-run": 400}, "hr": {"humanoid-run": 150, "dog-run": 500},
              "widen": {"humanoid-run": 120, "dog-run": 420}}
MRQ_BASE = {"baseline": {"dog-run": 50.0, "humanoid-walk": 2.0, "walker-walk": 900.0},
            "hr": {"dog-run": 80.0, "humanoid-walk": 3.0, "walker-walk": 950.0},
            "widen": {"dog-run": 45.0, "humanoid-walk": 2.5, "walker-walk": 910.0}}


def simba_final(config, task, seed):
    return SIMBA_BASE[config][task] + 10 * seed + 10  # the mean of the evaluations at 960k and 1M frames


def mrq_final(config, task, seed):
    return MRQ_BASE[config][task] * (0.95 if seed == 1 else 1.05)  # seeds average to MRQ_BASE


@pytest.fixture(scope="module")
def dmc(tmp_path_factory):
    """SimbaV2 (2 tasks) and MR.Q (2 hard tasks + walker-walk) x {baseline, hr, widen} x 2 seeds, 1M frames, in one
    runs/; evaluations at 500k (outside the final 5%: must not count), 960k and 1M frames."""
    base = tmp_path_factory.mktemp("dmc")
    runs = base / "runs"
    for algo, table, key in (("simbav2", SIMBA_BASE, {"c_shift": 3.0}), ("mrq", MRQ_BASE, {"enc_horizon": 5})):
        for config in table:
            for task in table[config]:
                for seed in (1, 2):
                    if algo == "simbav2":
                        v = SIMBA_BASE[config][task] + 10 * seed
                        evals = [(500_000, 0.0), (960_000, v), (1_000_000, v + 20)]
                    else:
                        v = mrq_final(config, task, seed)
                        evals = [(500_000, 0.0), (960_000, v - 1), (1_000_000, v + 1)]
                    args = {**key, "exp_name": config, "env_id": task, "seed": seed, "hr": config == "hr",
                            "widen": config == "widen", "hr_layers": "zs", "total_timesteps": 1_000_000}
                    write_run(runs, f"{algo}__{task}__{config}__s{seed}", args, [(s * 10, 1.0) for s in STEPS],
                              {"representation/latent/srank": [(1_000_000, 300.0)]},
                              finished=summary(seed, global_step=1_000_000), evals=evals)
    return run_analyze(runs, base / "results")


def test_simbav2_final_evals_iqm_and_table2_column(dmc):
    out, rows, agg = dmc
    r = rows["simbav2__dog-run__hr__s2"]
    assert (r["algo"], r["config"], r["game"]) == ("simbav2", "hr", "dog-run")
    assert float(r["final_eval"]) == pytest.approx(simba_final("hr", "dog-run", 2))
    assert float(r["task_normalized"]) == pytest.approx(simba_final("hr", "dog-run", 2) / 1000)
    text = (out / "tables.md").read_text()
    assert "### Table 2 (SIMBAV2): IQM `task_normalized` score, parameter-matched widen" in text
    for config, label, paper in (("baseline", "Baseline", "0.71"), ("hr", "+ HR", "0.84"), ("widen", "+ Widen", "0.76")):
        matrix = [[simba_final(config, t, s) / 1000 for t in ("dog-run", "humanoid-run")] for s in (1, 2)]
        points, cis = rliable_direct(matrix)
        iqm = agg[("simbav2", config, "task_normalized", "iqm")]
        assert float(iqm["value"]) == pytest.approx(trim_mean(np.ravel(matrix), 0.25)) == pytest.approx(points[1])
        assert float(iqm["ci_low"]) == pytest.approx(cis[0][1]) and float(iqm["ci_high"]) == pytest.approx(cis[1][1])
        assert (f"| {label} | {float(iqm['value']):.3f} [{float(iqm['ci_low']):.3f}, {float(iqm['ci_high']):.3f}] "
                f"| 2 | 4 | {paper} |") in text
    assert "| humanoid-run | 195 | 125.0 (n=2) | 175.0 (n=2) | 145.0 (n=2) |" in text
    assert (out / "tasks_simbav2.png").read_bytes()[:8] == PNG


def test_mrq_table2_column_equals_rliable(dmc):
    from rliable import metrics

    out, rows, _ = dmc
    assert float(rows["mrq__dog-run__hr__s2"]["baseline_normalized"]) == pytest.approx(80 * 1.05 / 50)
    assert float(rows["mrq__walker-walk__baseline__s1"]["baseline_normalized"]) == pytest.approx(0.95)
    text = (out / "tables.md").read_text()
    assert "### Table 2 (MR.Q): baseline-normalised final eval return on the 7 hard DMC-Visual tasks" in text
    for config, label, paper in (("baseline", "Baseline", "1.00"), ("hr", "+ HR", "1.17"), ("widen", "+ Widen", "0.97")):
        matrix = np.array([[mrq_final(config, t, s) / MRQ_BASE["baseline"][t] for t in ("dog-run", "humanoid-walk")]
                           for s in (1, 2)])
        from rliable import library as rly
        np.random.seed(SEED)  # rliable's global-generator draws (see rliable_direct)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            pts, cis = rly.get_interval_estimates(
                {"m": matrix}, lambda x: np.array([metrics.aggregate_iqm(x.mean(0)), x.mean(0).mean()]), reps=REPS,
                random_state=np.random.RandomState(SEED))
        line = next(ln for ln in text.splitlines() if ln.startswith(f"| {label} | ") and ln.endswith(f"| {paper} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        for cell, i in ((cells[1], 0), (cells[2], 1)):  # IQM, mean: point [low, high]
            got = [float(x) for x in cell.replace("[", "").replace("]", "").replace(",", "").split()]
            assert got == pytest.approx([pts["m"][i], cis["m"][0][i], cis["m"][1][i]], abs=1.5e-3)
        assert cells[3:5] == ["2", "4"]
    assert "| dog-run | 60.2 | 50.0 (n=2) | 80.0 (n=2) | 45.0 (n=2) |" in text
    combined = (out / "table2_hr_v2.md").read_text()
    assert "SimbaV2 (IQM)" in combined and "MR.Q (IQM, hard)" in combined
    assert (out / "tasks_mrq.png").read_bytes()[:8] == PNG
    assert len(analyze.MRQ_PUBLISHED) == 28 and set(analyze.DMCV_HARD) <= set(analyze.MRQ_PUBLISHED)
