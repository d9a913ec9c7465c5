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
              {"representation/latent/dormant_kde": [(100_000, 0.95)]},
              finished={"global_step": TOTAL + 500, "wall_seconds": 3600.0})  # only the older summary's keys
    write_run(runs, "dqn__Pong__hr_tanh__s1", dqn_args("hr_tanh", "Pong", 1), [(s, 0.0) for s in STEPS],
              {"representation/latent/dormant_kde": [(100_000, 0.2)]}, finished="")  # an older empty marker
    # a crashed run and a directory without args: listed / ignored, never in the numbers
    stopped = write_run(runs, "dqn__Pong__relu__s2", dqn_args("relu", "Pong", 2), [(1000, 1e6)], finished=False)
    for f in stopped.iterdir():
        os.utime(f, (1, 1))
    # its first try, stopped before its first checkpoint and moved aside by the harness when it started again
    write_run(runs, "dqn__Pong__relu__s2.partial-1700000000", dqn_args("relu", "Pong", 2), [(1000, 1e6)],
              finished=False)
    (runs / "_sweep_logs").mkdir()
    out = base / "results"
    assert analyze.main([str(runs), "--out", str(out), "--reps", "300", "--curve-reps", "20",
                         "--curve-points", "10"]) == 0
    with open(out / "results.csv") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    return out, rows


def test_results_csv_final_scores(analysed):
    _, rows = analysed
    assert len(rows) == 9  # the stopped run and the one moved aside are left out
    assert "dqn__Pong__relu__s2" not in rows and not any(".partial-" in name for name in rows)
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
    assert "`dqn__Pong__relu__s2.partial-1700000000`: moved aside, last step 1000" in text
    assert "2 runs." in text
    # wall time from the 8 runs whose summary has it (s1: 1 h each, five runs; s2: 2 h, three); not the empty marker
    assert "Wall time (runs/NAME/finished) of 8 of 9 runs: median 1.00 h per run, 11.0 h in all." in text


def test_results_csv_reads_the_summary(analysed):
    _, rows = analysed
    r = rows["dqn__Breakout__relu__s2"]
    assert int(r["global_step"]) == TOTAL + 500 and int(r["last_step"]) == TOTAL  # trained past its last episode
    assert float(r["wall_seconds"]) == 7200.0 and float(r["probe_share"]) == pytest.approx(0.01)
    short = rows["dqn__Breakout__hr_relu__s1"]  # {global_step, wall_seconds} only
    assert int(short["global_step"]) == TOTAL + 500 and float(short["wall_seconds"]) == 3600.0
    assert short["probe_share"] == "nan"
    old = rows["dqn__Pong__hr_tanh__s1"]  # an empty `finished`: still finished; steps from its last event
    assert old["status"] == "finished" and int(old["global_step"]) == TOTAL
    assert old["wall_seconds"] == "nan" and old["probe_share"] == "nan"


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


SIMBA_BASE = {"baseline": {"humanoid-run": 100, "dog-run": 400}, "hr": {"humanoid-run": 150, "dog-run": 500},
              "widen": {"humanoid-run": 120, "dog-run": 420}}


def simba_final(config, task, seed):
    return SIMBA_BASE[config][task] + 10 * seed + 10  # the mean of the evaluations at 960k and 1M frames


@pytest.fixture(scope="module")
def simba_analysed(tmp_path_factory):
    """SimbaV2 runs: 2 tasks x {baseline, hr, widen} x 2 seeds, 1M frames; evaluations at 500k (outside the final
    5%: must not count), 960k and 1M frames."""
    base = tmp_path_factory.mktemp("simba")
    runs = base / "runs"
    for config in SIMBA_BASE:
        for task in ("humanoid-run", "dog-run"):
            for seed in (1, 2):
                v = SIMBA_BASE[config][task] + 10 * seed
                args = {"c_shift": 3.0, "exp_name": config, "env_id": task, "seed": seed, "hr": config == "hr",
                        "widen": config == "widen", "total_timesteps": 1_000_000}
                write_run(runs, f"simbav2__{task}__{config}__s{seed}", args, [(s * 10, 1.0) for s in STEPS],
                          {"representation/latent/srank": [(1_000_000, 300.0)]},
                          finished=summary(seed, global_step=1_000_000),
                          evals=[(500_000, 0.0), (960_000, v), (1_000_000, v + 20)])
    out = base / "results"
    assert analyze.main([str(runs), "--out", str(out), "--reps", "200", "--curve-reps", "10",
                         "--curve-points", "5"]) == 0
    with open(out / "results.csv") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    return out, rows


def test_simbav2_scores_are_final_5pct_evals_normalised_by_the_dmc_range(simba_analysed):
    _, rows = simba_analysed
    assert len(rows) == 12
    r = rows["simbav2__dog-run__hr__s2"]
    assert (r["algo"], r["config"], r["game"]) == ("simbav2", "hr", "dog-run")
    assert float(r["final_eval"]) == pytest.approx(simba_final("hr", "dog-run", 2))
    assert float(r["task_normalized"]) == pytest.approx(simba_final("hr", "dog-run", 2) / 1000)


def test_simbav2_iqm_and_table2_column(simba_analysed):
    out, _ = simba_analysed
    with open(out / "aggregates.csv") as f:
        agg = {(r["algo"], r["config"], r["statistic"]): r for r in csv.DictReader(f)}
    text = (out / "tables.md").read_text()
    assert "### Table 2 (SIMBAV2): IQM `task_normalized` score, parameter-matched widen" in text
    for config, label, paper in (("baseline", "Baseline", "0.71"), ("hr", "+ HR", "0.84"), ("widen", "+ Widen", "0.76")):
        scores = [simba_final(config, t, s) / 1000 for t in ("humanoid-run", "dog-run") for s in (1, 2)]
        iqm = agg[("simbav2", config, "iqm")]
        assert float(iqm["value"]) == pytest.approx(trim_mean(scores, 0.25))  # IQM over (task, seed)
        assert float(iqm["ci_low"]) <= float(iqm["value"]) <= float(iqm["ci_high"])
        assert (f"| {label} | {float(iqm['value']):.3f} [{float(iqm['ci_low']):.3f}, {float(iqm['ci_high']):.3f}] "
                f"| 2 | 4 | {paper} |") in text
    assert "| task | published | baseline | hr | widen |" in text
    assert "| humanoid-run | 195 | 125.0 (n=2) | 175.0 (n=2) | 145.0 (n=2) |" in text
    assert "| dog-run | 563 | 425.0 (n=2) | 525.0 (n=2) | 445.0 (n=2) |" in text
    path = out / "tasks_simbav2.png"
    assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_simbav2_labels_and_algorithm():
    assert analyze.algorithm_of({"c_shift": 3.0, "hr": True}, "x") == "simbav2"
    assert analyze.algorithm_of({"exp_name": "simbav2_dmc_hr"}, "x") == "simbav2"
    label = analyze.config_label
    assert label({"exp_name": "simbav2_dmc_hr", "hr": True, "hr_networks": "both"}, "simbav2") == "hr"
    assert label({"widen": True, "hr_networks": "critic"}, "simbav2") == "widen_critic"
    assert label({"hr": True, "hr_networks": "critic", "hr_scaler": "shared"}, "simbav2") == "hr_critic_shared"
    assert label({"hr": False, "widen": False}, "simbav2") == "baseline"


MRQ_BASE = {"baseline": {"dog-run": 50.0, "humanoid-walk": 2.0, "walker-walk": 900.0},
            "hr": {"dog-run": 80.0, "humanoid-walk": 3.0, "walker-walk": 950.0},
            "widen": {"dog-run": 45.0, "humanoid-walk": 2.5, "walker-walk": 910.0}}


def mrq_final(config, task, seed):
    return MRQ_BASE[config][task] * (0.95 if seed == 1 else 1.05)  # seeds average to MRQ_BASE


@pytest.fixture(scope="module")
def mrq_analysed(tmp_path_factory):
    """MR.Q runs: 2 hard tasks + walker-walk x {baseline, hr, widen} x 2 seeds, 1M frames; evaluations at 500k
    (outside the final 5%: must not count), 960k and 1M frames."""
    base = tmp_path_factory.mktemp("mrq")
    runs = base / "runs"
    for config in MRQ_BASE:
        for task in MRQ_BASE[config]:
            for seed in (1, 2):
                v = mrq_final(config, task, seed)
                args = {"enc_horizon": 5, "exp_name": config, "env_id": task, "seed": seed, "hr": config == "hr",
                        "widen": config == "widen", "hr_layers": "zs", "total_timesteps": 1_000_000}
                write_run(runs, f"mrq__{task}__{config}__s{seed}", args, [(s * 10, 1.0) for s in STEPS],
                          {"representation/zs/srank": [(1_000_000, 300.0)]},
                          finished=summary(seed, global_step=1_000_000),
                          evals=[(500_000, 0.0), (960_000, v - 1), (1_000_000, v + 1)])
    out = base / "results"
    assert analyze.main([str(runs), "--out", str(out), "--reps", "200", "--curve-reps", "10",
                         "--curve-points", "5"]) == 0
    with open(out / "results.csv") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    return out, rows


def test_mrq_scores_are_final_evals_over_the_baseline_mean(mrq_analysed):
    _, rows = mrq_analysed
    assert len(rows) == 18
    r = rows["mrq__dog-run__hr__s2"]
    assert (r["algo"], r["config"], r["game"]) == ("mrq", "hr", "dog-run")
    assert float(r["final_eval"]) == pytest.approx(mrq_final("hr", "dog-run", 2))
    assert float(r["baseline_normalized"]) == pytest.approx(80 * 1.05 / 50)
    assert float(rows["mrq__walker-walk__baseline__s1"]["baseline_normalized"]) == pytest.approx(0.95)


def test_mrq_table2_column_on_the_hard_tasks_and_published_returns(mrq_analysed):
    out, _ = mrq_analysed
    text = (out / "tables.md").read_text()
    assert "### Table 2 (MR.Q): baseline-normalised final eval return on the 7 hard DMC-Visual tasks" in text
    # seeds averaged per task (dog-run, humanoid-walk; walker-walk is not a hard task), then across the 2 tasks
    for label, task_means, paper in (("Baseline", (1.0, 1.0), "1.00"), ("+ HR", (80 / 50, 3 / 2), "1.17"),
                                     ("+ Widen", (45 / 50, 2.5 / 2), "0.97")):
        line = [ln for ln in text.splitlines() if ln.startswith(f"| {label} | ") and ln.endswith(f"| {paper} |")]
        assert len(line) == 1, label
        cells = [c.strip() for c in line[0].strip("|").split("|")]
        assert float(cells[1].split()[0]) == pytest.approx(np.mean(task_means), abs=1e-3)  # IQM of 2 = their mean
        assert float(cells[2].split()[0]) == pytest.approx(np.mean(task_means), abs=1e-3)
        lo, hi = (float(x) for x in cells[2].split("[")[1].rstrip("]").split(","))
        assert lo <= np.mean(task_means) + 1e-3 and hi >= np.mean(task_means) - 1e-3
        assert cells[3:5] == ["2", "4"]
    assert "### MR.Q per task: mean final eval return (seeds) and the published MR.Q return at 1M frames" in text
    assert "| dog-run | 60.2 | 50.0 (n=2) | 80.0 (n=2) | 45.0 (n=2) |" in text
    assert "| walker-walk | 970.3 | 900.0 (n=2) | 950.0 (n=2) | 910.0 (n=2) |" in text
    assert (out / "tasks_mrq.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(analyze.MRQ_PUBLISHED) == 28 and set(analyze.DMCV_HARD) <= set(analyze.MRQ_PUBLISHED)


def test_mrq_labels_and_algorithm():
    assert analyze.algorithm_of({"enc_horizon": 5, "hr": True}, "x") == "mrq"
    assert analyze.algorithm_of({"exp_name": "mrq_dmc_hr"}, "x") == "mrq"
    label = analyze.config_label
    assert label({"exp_name": "mrq_dmc_hr", "hr": True, "hr_layers": "zs"}, "mrq") == "hr"
    assert label({"widen": True, "hr_layers": "zsa,convs"}, "mrq") == "widen_zsa_convs"
    assert label({"hr": True, "hr_layers": "all"}, "mrq") == "hr_all"
    assert label({"hr": False, "widen": False, "hr_layers": "all"}, "mrq") == "baseline"
