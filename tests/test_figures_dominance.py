"""scripts/figures_dominance.py on synthetic DrQ runs whose every plotted number can be computed by hand."""
import json
import os
import sys

import numpy as np
import pytest
from scipy.stats import trim_mean

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))
import figures_dominance as fd  # noqa: E402

TOTAL = 100_000  # frames per run
EVALS = np.arange(1, 11) * 10_000  # eval every 10k frames
PROBES = np.array([25_000, 50_000, 75_000, 100_000])
NONSPARSE = ["cartpole-swingup", "walker-walk"]  # action repeat 8 and 2 (jaxrl's table)
SPARSE = ["cartpole-balance_sparse_narrow", "reacher-easy_masked"]  # 2 (as cartpole-balance_sparse) and 4
TASKS = NONSPARSE + SPARSE
REPEAT = {"cartpole-swingup": 8, "walker-walk": 2, "cartpole-balance_sparse_narrow": 2, "reacher-easy_masked": 4}
BASE = {"none": 100.0, "ln": 300.0, "lnwd": 400.0, "hlgauss": 200.0, "prune": 50.0}


def eval_return(config, task, seed, step):
    return BASE[config] + 10.0 * TASKS.index(task) + seed + step / 10_000


def probe(config, task, seed, metric, i):
    """Value of a representation metric at probe i (0..3)."""
    c, t = list(BASE).index(config), TASKS.index(task)
    return {"max_score": 10.0 * (c + 1) + t + seed + i, "saturated": 0.1 * i + 0.01 * seed,
            "dormant_score": 0.05 * (c + 1) + 0.01 * t + 0.001 * seed * i, "srank": 100.0 - 10 * c - t - seed - i,
            "grad": 1.0 / (1 + i + seed)}[metric]


def write_run(root, name, args, scalars, finished=True):
    from torch.utils.tensorboard import SummaryWriter

    d = root / name
    d.mkdir(parents=True)
    (d / "args.json").write_text(json.dumps(args))
    w = SummaryWriter(str(d))
    for tag, points in scalars.items():
        for step, value in points:
            w.add_scalar(tag, value, int(step))
    w.close()
    if finished:
        (d / "finished").write_text(json.dumps({"global_step": TOTAL, "wall_seconds": 1.0}))
    return d


def drq_run(root, config, task, seed, nan_at=None, exp_name=None, **extra):
    """A DrQ run as scripts/sweep.py names it (drq__<task>__<exp name>__s<seed>), mitigation `config`."""
    args = {"exp_name": exp_name or config, "env_id": task, "seed": seed, "mitigation": config,
            "total_timesteps": TOTAL, "action_repeat": None, **extra}
    scalars = {"eval/episodic_return": [(s, eval_return(config, task, seed, s)) for s in EVALS]}
    for layer in ("fc1", "fc2"):
        for metric in ("max_score", "saturated", "dormant_score", "srank"):
            scalars[f"representation/{layer}/{metric}"] = [
                (s, float("nan") if (layer, metric, i) == nan_at else probe(config, task, seed, metric, i)
                 + (0.5 if layer == "fc2" and metric == "max_score" else 0.0)) for i, s in enumerate(PROBES)]
        scalars[f"grad/{layer}"] = [(s, probe(config, task, seed, "grad", i) * (2 if layer == "fc2" else 1))
                                    for i, s in enumerate(PROBES)]
    name = f"drq__{task}__{exp_name or config}__s{seed}"
    return write_run(root, name, args, scalars)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    base = tmp_path_factory.mktemp("dominance")
    main, other = base / "runs", base / "other" / "runs"
    for task in TASKS:
        for config in ("none", "ln", "lnwd", "hlgauss"):
            for seed in (1, 2):
                # DrQ seed 2 on the narrow cartpole: fc1 fully saturated at the last probe, its score NaN
                nan = ("fc1", "max_score", 3) if (task, config, seed) == (SPARSE[0], "none", 2) else None
                drq_run(main, config, task, seed, nan_at=nan)
    drq_run(main, "none", "walker-walk", 3)  # a third seed on one task only: the aggregates use the first two
    drq_run(main, "prune", "walker-walk", 1)  # prune on one task only: left out of the aggregates
    stopped = write_run(main, "drq__walker-walk__none__s9", {"mitigation": "none", "env_id": "walker-walk", "seed": 9},
                        {"eval/episodic_return": [(1000, 1e6)]}, finished=False)  # a stopped run: never drawn
    for f in stopped.iterdir():
        os.utime(f, (1, 1))
    (main / "drq__broken__none__s1").mkdir()
    (main / "drq__broken__none__s1" / "args.json").write_text("{not json")  # a corrupt run dir: skipped
    write_run(main, "dqn__Pong__relu__s1", {"target_network_frequency": 1000, "env_id": "PongNoFrameskip-v4"},
              {"charts/episodic_return": [(1000, 1.0)]})  # not a DrQ run: ignored
    # the sweep's configurations ln_switch (--ln-from-step, agent steps) and resnet18 (--encoder resnet18)
    for seed in (1, 2):
        drq_run(main, "none", "reacher-easy_masked", seed, exp_name="ln_switch", ln_from_step=12_500)
    drq_run(main, "none", "cartpole-balance_sparse_narrow", 1, exp_name="ln_switch", ln_from_step=20_000)
    drq_run(other, "none", "cartpole-balance_sparse_narrow", 1, exp_name="resnet18", encoder="resnet18")  # a 2nd dir
    out = base / "figures"
    a = fd.parse_args([str(main), str(other), "--out", str(out), "--reps", "200"])
    save = fd.plots.save
    with pytest.MonkeyPatch.context() as mp:  # a test-sized PNG: the figures' numbers are what is checked
        mp.setattr(fd.plots, "save", lambda fig, out_dir, stem: save(fig, out_dir, stem, dpi=60))
        drawn = fd.draw_figures(a)
    return out, drawn, main


STEMS = ["fig02_sparse_max_score_saturation", "fig03_masked_max_score_saturation", "fig05_aggregate_all_tasks",
         "fig06_task_curves", "fig07_aggregate_nonsparse", "fig08_aggregate_sparse", "fig09_dominance_scatter",
         "fig10_ln_from_step_masked_reacher", "fig11_hlgauss_masked_reacher", "fig12_resnet18_max_score_saturation",
         "fig13_gradient_magnitude", "fig14_dominance_scatter_per_run", "fig15_ln_vs_lnwd",
         "fig16_ln_from_step_other_tasks"]


def test_every_figure_written_and_indexed(swept):
    out, drawn, _ = swept
    for stem in STEMS:
        for ext in ("png", "pdf"):
            assert (out / f"{stem}.{ext}").stat().st_size > 1000, stem
    index = (out / "FIGURES.md").read_text()
    for stem in STEMS:
        assert f"`{stem}.png`" in index
    assert "Fig. 4" in index and "CIFAR-10" in index
    assert "| Fig. 17 |" in index and "skipped" in index.split("| Fig. 17 |")[1].split("\n")[0]
    assert "--configs ln_switch --games reacher-easy_masked" in index and "--configs resnet18" in index
    assert "drq__broken__none__s1: unreadable" in index and "drq__walker-walk__none__s9: stopped" in index
    assert "Fig. 17" not in drawn and "Fig. 2" in drawn


def test_fig2_sparse_dynamics_over_agent_steps(swept):
    _, drawn, _ = swept
    d = drawn["Fig. 2"]
    assert {t for t, _ in d} == set(SPARSE)
    x, y = d[(SPARSE[1], "representation/fc1/max_score")]["drq__reacher-easy_masked__none__s1"]
    assert x.tolist() == (PROBES / 4).tolist()  # frames / reacher's action repeat 4
    assert y.tolist() == [probe("none", SPARSE[1], 1, "max_score", i) for i in range(4)]
    x, y = d[(SPARSE[0], "representation/fc2/saturated")]["drq__cartpole-balance_sparse_narrow__none__s2"]
    assert x.tolist() == (PROBES / 2).tolist()
    assert y == pytest.approx([100 * (0.1 * i + 0.02) for i in range(4)])  # percent
    # the NaN probe (fully saturated fc1) carries the last finite score forward, as the paper's App. B.1
    _, y = d[(SPARSE[0], "representation/fc1/max_score")]["drq__cartpole-balance_sparse_narrow__none__s2"]
    assert y.tolist() == [probe("none", SPARSE[0], 2, "max_score", i) for i in (0, 1, 2, 2)]
    assert set(drawn["Fig. 3"]) == {(SPARSE[1], "representation/fc1/max_score"),
                                    (SPARSE[1], "representation/fc2/saturated"), (SPARSE[1], "marks")}
    # these args.json have no reward_mask_steps (the older script): masked for half the frames, 50k / 4
    assert drawn["Fig. 3"][(SPARSE[1], "marks")] == [12_500] and d[(SPARSE[0], "marks")] == []


def final_return(config, task, seed):
    return np.mean([eval_return(config, task, seed, s) for s in (90_000, 100_000)])  # last 10% of 100k frames


@pytest.mark.parametrize("fig,tasks", [("Fig. 5", TASKS), ("Fig. 7", NONSPARSE), ("Fig. 8", SPARSE)])
def test_aggregates_match_hand_median_iqm_mean(swept, fig, tasks):
    _, drawn, _ = swept
    d = drawn[fig]
    assert d["tasks"] == sorted(tasks) and d["dropped"] == (["prune"] if "walker-walk" in tasks else [])
    assert d["runs_per_task"] == {"none": 2, "lnwd": 2, "hlgauss": 2}  # walker-walk's third DrQ seed left out
    assert list(d["estimates"]) == ["none", "lnwd", "hlgauss"]  # the paper's approaches present on every task
    for config in ("none", "lnwd", "hlgauss"):
        m = np.array([[final_return(config, t, s) for t in sorted(tasks)] for s in (1, 2)])
        want = {"median": np.median(m.mean(0)), "iqm": trim_mean(m.ravel(), 0.25), "mean": m.mean()}
        for stat, value in want.items():
            pt, lo, hi = d["estimates"][config][stat]
            assert pt == pytest.approx(value)
            assert m.min() - 1e-9 <= lo <= pt <= hi <= m.max() + 1e-9


def test_fig6_and_fig15_task_curves_mean_and_std_over_seeds(swept):
    _, drawn, _ = swept
    x, mean, lo, hi = drawn["Fig. 6"]["walker-walk"]["none"]  # seeds 1, 2 and 3
    assert x.tolist() == EVALS.tolist()  # frames
    vals = np.array([[eval_return("none", "walker-walk", s, e) for e in EVALS] for s in (1, 2, 3)])
    assert mean == pytest.approx(vals.mean(0))
    assert hi - mean == pytest.approx(np.full(10, 1.0)) and mean - lo == pytest.approx(np.full(10, 1.0))  # sd of 1,2,3
    assert set(drawn["Fig. 6"]["walker-walk"]) == {"none", "lnwd", "hlgauss", "prune"}  # the paper's approaches
    assert set(drawn["Fig. 15"]["cartpole-swingup"]) == {"ln", "lnwd"}
    _, mean, lo, hi = drawn["Fig. 15"]["cartpole-swingup"]["ln"]
    assert mean[-1] == pytest.approx(BASE["ln"] + 1.5 + 10) and hi[-1] - mean[-1] == pytest.approx(np.sqrt(0.5))


def point(config, task, seed):
    """Hand final values: the probes in the last 10% of frames are only the one at 100k (index 3)."""
    score = probe(config, task, seed, "max_score", 3)
    if (task, config, seed) == (SPARSE[0], "none", 2):
        score = probe(config, task, seed, "max_score", 2)  # NaN there: carried forward
    return (score, probe(config, task, seed, "srank", 3), final_return(config, task, seed),
            100 * probe(config, task, seed, "dormant_score", 3))  # percent, as the paper plots it


def test_fig9_one_point_per_approach_with_next_layer_dormant_share(swept):
    _, drawn, _ = swept
    d = drawn["Fig. 9"]
    assert list(d) == ["none", "lnwd", "hlgauss", "prune"]  # ln is not one of the paper's approaches
    seeds = {t: (1, 2, 3) if t == "walker-walk" else (1, 2) for t in TASKS}
    want = np.mean([np.mean([point("none", t, s) for s in seeds[t]], axis=0) for t in TASKS], axis=0)
    assert d["none"] == pytest.approx(tuple(want))
    assert d["prune"] == pytest.approx(point("prune", "walker-walk", 1))
    _, drawn14, _ = swept
    per_run = drawn14["Fig. 14"]["reacher-easy_masked"]["drq__reacher-easy_masked__hlgauss__s2"]
    assert per_run[0] == "hlgauss" and per_run[1:] == pytest.approx(point("hlgauss", "reacher-easy_masked", 2))


def test_ln_from_step_resnet_hlgauss_and_gradient_figures(swept):
    out, drawn, _ = swept
    d10 = drawn["Fig. 10"]
    assert set(d10[("reacher-easy_masked", "eval/episodic_return")]) == {
        "drq__reacher-easy_masked__ln_switch__s1", "drq__reacher-easy_masked__ln_switch__s2"}
    x, y = d10[("reacher-easy_masked", "eval/episodic_return")]["drq__reacher-easy_masked__ln_switch__s2"]
    assert x.tolist() == (EVALS / 4).tolist() and y.tolist() == [eval_return("none", SPARSE[1], 2, e) for e in EVALS]
    assert d10[("reacher-easy_masked", "marks")] == [12_500, 12_500]  # --ln-from-step (agent steps), unmasking
    assert {t for t, _ in drawn["Fig. 16"]} == {SPARSE[0]} and drawn["Fig. 16"][(SPARSE[0], "marks")] == [20_000]
    assert {t for t, _ in drawn["Fig. 12"]} == {SPARSE[0]}  # only the resnet18 run, not the main grid's
    assert list(drawn["Fig. 12"][(SPARSE[0], "representation/fc1/max_score")]) == [
        "drq__cartpole-balance_sparse_narrow__resnet18__s1"]
    d11 = drawn["Fig. 11"]
    _, y = d11[("reacher-easy_masked", "representation/fc2/dormant_score")]["drq__reacher-easy_masked__hlgauss__s1"]
    assert y == pytest.approx([100 * probe("hlgauss", SPARSE[1], 1, "dormant_score", i) for i in range(4)])
    d13 = drawn["Fig. 13"]
    x, y = d13[(SPARSE[0], "grad/fc2")]["drq__cartpole-balance_sparse_narrow__none__s1"]
    assert x.tolist() == (PROBES / 2).tolist() and y == pytest.approx([2 / (2 + i) for i in range(4)])


def test_missing_figures_are_skipped_with_the_runs_they_need(tmp_path, capsys):
    runs = tmp_path / "runs"
    drq_run(runs, "ln", "walker-walk", 1)  # LN alone is in none of the figures (Fig. 15 needs LNWD beside it)
    assert fd.main([str(runs), "--out", str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    for fig in ("2", "3", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16"):
        assert f"Fig. {fig} skipped: needs " in text
    assert "Fig. 10 skipped: needs runs with --ln-from-step" in text
    assert "Fig. 12 skipped: needs runs with --encoder resnet18" in text
    assert "Fig. 15 skipped: needs runs with --mitigation ln and --mitigation lnwd" in text
    assert sorted(os.listdir(tmp_path / "out")) == ["FIGURES.md"]


def test_missing_or_empty_runs_dir_is_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        fd.main([str(tmp_path / "nope")])
    with pytest.raises(SystemExit, match="no DrQ runs"):
        fd.main([str(tmp_path)])


def test_mask_lift_in_agent_steps():
    class R:
        env_id = "reacher-easy_masked"
        args = {"reward_mask_steps": 500_000, "learning_starts": 1000, "action_repeat": None}
    assert fd.mask_lift(R) == 501_000  # the 500,000th update runs at agent step 1000 + 499,999
    R.args = {"total_timesteps": 2_000_000, "action_repeat": None}  # the older script: half of the frames
    assert fd.mask_lift(R) == 250_000 and fd.action_repeat(R) == 4
    R.env_id, R.args = "cartpole-swingup_sparse", {"action_repeat": None}
    assert fd.action_repeat(R) == 2  # jaxrl's table by full task id: only cartpole-swingup itself is 8
