"""Tests for scripts/gpu_check.py, the prepared GPU check: its judgements on synthetic results with known answers
(flags, losses, parameters against a reference, checkpoint matching, fallback lines, targets, the probe), the
configuration table against the scripts' real flags, the device commands against their limits, and one end-to-end
--dry-run on the CPU (pqn: equivalence, speed with the envpool ceiling and Hadamax, the probe, the report)."""
import dataclasses
import json
import os
import re
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "scripts"))
import bench  # noqa: E402
import gpu_check as gc  # noqa: E402


# ---------------------------------------------------------------------------------------------------------------
# flags and the configuration table


def test_flags_optional_dropped_and_overrides_replace():
    assert gc.split_flags("--a 1 ?--b 2 3 --c") == [("--a", ["1"], False), ("--b", ["2", "3"], True),
                                                     ("--c", [], False)]
    assert gc.resolve_flags("--a 1 ?--b 2 --c", {"--a", "--c"}) == ["--a", "1", "--c"]
    assert gc.resolve_flags("--a 1 ?--b 2", None) == ["--a", "1", "--b", "2"]  # None: keep every optional flag
    # an override replaces the earlier occurrence (tyro would otherwise see the flag twice)
    assert gc.resolve_flags("--total-timesteps 2600 --seed 3", None, "--total-timesteps 1") == \
        ["--seed", "3", "--total-timesteps", "1"]
    with pytest.raises(ValueError):
        gc.split_flags("1 --a")


def test_script_flags_read_from_the_args_dataclass(tmp_path):
    (tmp_path / "toy_hr.py").write_text("from dataclasses import dataclass\n\n@dataclass\nclass Args:\n"
                                        "    total_timesteps: int = 1_000\n    save_model: bool = False\n"
                                        "    metrics_every: int = 50\n")
    flags = gc.script_flags("toy_hr.py", repo=str(tmp_path))
    assert flags == {"--total-timesteps": 1000, "--save-model": False, "--no-save-model": None,
                     "--metrics-every": 50}


def test_discovery_classifies_configured_unconfigured_and_absent(tmp_path):
    for name in ("dqn_atari_hr.py", "drq_dmc_dominance.py", "new_thing_hr.py", "helper.py"):
        (tmp_path / name).write_text("")
    plan = gc.plan_scripts("all", None, repo=str(tmp_path))
    assert plan["check"] == ["dqn_atari_hr.py", "drq_dmc_dominance.py"]
    assert plan["unconfigured"] == ["new_thing_hr.py"]
    assert set(plan["absent"]) == set(gc.SCRIPTS) - {"dqn_atari_hr.py", "drq_dmc_dominance.py"}
    assert gc.plan_scripts("atari", None, repo=str(tmp_path))["check"] == ["dqn_atari_hr.py"]
    assert gc.plan_scripts("dmc", ["drq"], repo=str(tmp_path))["check"] == ["drq_dmc_dominance.py"]


def test_every_training_script_in_the_repository_has_a_config_line():
    assert gc.plan_scripts("all", None)["unconfigured"] == [], "add a line to SCRIPTS in scripts/gpu_check.py"


@pytest.mark.parametrize("file", sorted(gc.SCRIPTS))
def test_config_lines_use_flags_the_scripts_have(file):
    """Every flag of the table (optional `?` flags aside) and every flag the check adds exists in the script's Args."""
    if not os.path.exists(os.path.join(REPO, file)):
        pytest.skip(f"{file} is not in this checkout")
    cfg = gc.SCRIPTS[file]
    have = set(gc.script_flags(file))
    added = "--seed --save-model --run-name --compile --cudagraphs --total-timesteps --metrics-every --no-cuda"
    texts = [cfg.equiv, cfg.dry, cfg.dry_sps.split(maxsplit=2)[2], cfg.sps, added, gc.FAST, gc.PLAIN]
    if cfg.ref.startswith("init:"):
        texts.append(cfg.ref[len("init:"):])
    for text in texts:
        for name, _, optional in gc.split_flags(text):
            assert optional or name in have, f"{file}: {name} is not one of its flags"
    assert cfg.part in ("atari", "dmc") and (cfg.ref == "checkpoint" or cfg.ref.startswith("init:"))
    warm, window = cfg.dry_sps.split()[:2]
    assert int(warm) >= 1 and int(window) >= 1


def test_plan_lists_every_run_of_the_gpu_check(capsys):
    assert gc.main(["--plan", "--part", "all"]) == 0
    out = capsys.readouterr().out
    for file in gc.plan_scripts("all", None)["check"]:
        cfg = gc.SCRIPTS[file]
        f, key = re.escape(file), gc.key_of(file)
        assert re.search(rf"^eq +fast +python {f} .*--compile auto --cudagraphs auto --run-name eq_{key}_fast  # \+ "
                         rf"HARNESS_COUNT_SYNCS=1$", out, re.M)  # item syncs: the fast run counts its host syncs
        assert re.search(rf"^eq +plain +python {f} .*--compile off --cudagraphs off --run-name eq_{key}_plain$", out,
                         re.M)
        assert (re.search(rf"^eq +ref +python {f} ", out, re.M) is not None) == cfg.ref.startswith("init")
        assert re.search(rf"^cpu +cpu +python {f} .*--compile off --cudagraphs off --no-cuda --run-name", out, re.M)
        # resume: killed after its first checkpoint, resumed and killed again, resumed on the CPU to the end
        assert re.search(rf"^resume +killed python {f} .*--run-name resume_{key}_killed  # SIGKILL after checkpoint 1$",
                         out, re.M)
        assert re.search(rf"^resume +killed python {f} .* --resume --run-name resume_{key}_killed  # SIGKILL after",
                         out, re.M)
        assert re.search(rf"^resume +killed python {f} .* --resume --no-cuda --run-name resume_{key}_killed$", out, re.M)
        assert re.search(rf"^resume +full +python {f} ", out, re.M)
        assert len(re.findall(rf"^variants +v\d+ +python {f} ", out, re.M)) == len(cfg.variants) >= 2
        for tag in ("a", "b", "off"):  # determinism: two identical runs, and one without it (its cost)
            assert re.search(rf"^det +{tag} +python {f} .*--run-name det_{key}_{tag}$", out, re.M)
        assert re.search(rf"^speed on/off python {f} ", out, re.M)
    assert "--learning-rate 1e-30" in out  # PPO's and PQN's reference runs
    assert re.search(r"^probe .*pqn_atari_hr.py --env-id Breakout-v5 ", out, re.M)
    assert "speed off    python pqn_atari_hr.py --encoder hadamax" in out



@pytest.mark.parametrize("file", sorted(gc.SCRIPTS))
def test_every_switch_of_every_script_has_a_variant_run(file):
    """A flag added later that switches the network or the algorithm (bool, choice or string) fails here until a
    variant run of SCRIPTS sets it (or it joins NOT_VARIANTS with the item that covers it)."""
    assert gc.uncovered_switches(file) == [], f"add them to the variants of {file} in scripts/gpu_check.py"


def test_switches_are_read_from_the_args_dataclass(tmp_path):
    (tmp_path / "toy_hr.py").write_text(
        "from dataclasses import dataclass\nfrom typing import Literal, Optional\nKind = Literal['a', 'b', 'c']\n\n"
        "@dataclass\nclass Args:\n    cuda: bool = True\n    hr: bool = False\n    kind: Kind = 'a'\n"
        "    enc: Literal['x', 'y'] = 'x'\n    act: str = 'relu'\n    note: Optional[str] = None\n    lr: float = 1e-3\n")
    assert gc.switch_flags("toy_hr.py", repo=str(tmp_path)) == {
        "cuda": [True, False], "hr": [True, False], "kind": ["a", "b", "c"], "enc": ["x", "y"], "act": None,
        "note": None}
    cfg = gc.Check("atari", "", "", "", "", variants=("--hr --kind b --act tanh", "--enc y --note n"))
    gc.SCRIPTS["toy_hr.py"] = cfg
    try:
        assert gc.uncovered_switches("toy_hr.py", repo=str(tmp_path)) == ["--kind c"]  # cuda: NOT_VARIANTS
        gc.SCRIPTS["toy_hr.py"] = dataclasses.replace(cfg, variants=("--hr --kind b --kind c", "--no-hr"))
        assert gc.uncovered_switches("toy_hr.py", repo=str(tmp_path)) == ["--enc", "--act", "--note"]
    finally:
        del gc.SCRIPTS["toy_hr.py"]


# ---------------------------------------------------------------------------------------------------------------
# items 2-6: the judges, on synthetic results with known answers


def _tb(**tags):
    """{tag: [(wall, step, value)]} from tag=[(step, value), ...] (tags spelled with __ for /)."""
    return {t.replace("__", "/"): [(0.0, s, v) for s, v in pts] for t, pts in tags.items()}


def test_judge_cpu_same_data_is_tight_other_data_bounded():
    cfg_same = gc.Check("atari", "", "", "", "", losses="losses/td_loss", same_data=True)
    dev = _tb(losses__td_loss=[(10, 1.0), (20, 2.0)])
    assert gc.judge_cpu(cfg_same, dev, _tb(losses__td_loss=[(10, 1.005), (20, 2.0)]))["reasons"] == []
    bad = gc.judge_cpu(cfg_same, dev, _tb(losses__td_loss=[(10, 1.05), (20, 2.0)]))["reasons"]
    assert bad and "first logged loss differs" in bad[0]  # 0.05 / median 1.5 = 3.3e-2 > 1e-2
    cfg_other = dataclasses.replace(cfg_same, same_data=False)
    assert gc.judge_cpu(cfg_other, dev, _tb(losses__td_loss=[(10, 1.5), (20, 2.0)]))["reasons"] == []
    assert gc.judge_cpu(cfg_other, dev, _tb(losses__td_loss=[(10, 1.0), (20, float("nan"))]))["reasons"] == [
        "non-finite loss"]
    assert gc.judge_cpu(cfg_same, dev, {})["reasons"] == ["losses missing: losses/td_loss"]


def test_judge_determinism_bit_for_bit():
    a = _tb(losses__q=[(1, 0.5), (2, 0.25)], losses__v=[(1, 3.0)])
    assert gc.judge_determinism(a, a) == {"reasons": [], "points": 3, "max_rel": 0.0}
    b = _tb(losses__q=[(1, 0.5), (2, 0.25 + 2.5e-8)], losses__v=[(1, 3.0)])
    out = gc.judge_determinism(a, b)
    assert out["max_rel"] == pytest.approx(1e-7) and out["reasons"] == ["losses differ (max relative 1.00e-07)"]
    c = _tb(losses__q=[(1, 0.5)], losses__v=[(1, 3.0)])
    assert "losses logged at other steps: losses/q" in gc.judge_determinism(a, c)["reasons"]
    assert "no loss logged" in gc.judge_determinism({}, {})["reasons"]


def test_judge_resume_steps_and_values_before_the_kill():
    cfg = gc.Check("atari", "", "", "", "", losses="losses/td_loss")
    full = _tb(losses__td_loss=[(100, 1.0), (200, 2.0), (300, 3.0), (400, 4.0)])
    stages = [{"killed": True, "rc": -9, "text": "checkpoint: step 150"},
              {"killed": True, "rc": -9, "text": "resumed runs/x from step 150\ncheckpoint: step 300"},
              {"killed": False, "rc": 0, "text": "resumed runs/x from step 300"}]
    same_steps = _tb(losses__td_loss=[(100, 1.0), (200, 2.5), (300, 2.9), (400, 4.4)])  # fresh episodes later
    out = gc.judge_resume(full, same_steps, 150, stages, cfg)
    assert out["reasons"] == [] and out["kills"] == 2 and out["before_kill_max_rel"] == 0.0
    lost = _tb(losses__td_loss=[(100, 1.0), (300, 3.0), (400, 4.0)])
    assert "lost [200]" in gc.judge_resume(full, lost, 150, stages, cfg)["reasons"][0]
    changed = _tb(losses__td_loss=[(100, 1.1), (200, 2.0), (300, 3.0), (400, 4.0)])
    assert "before the first kill differ" in gc.judge_resume(full, changed, 150, stages, cfg)["reasons"][0]
    ran_through = [{"killed": False, "rc": 0, "text": ""}]
    assert "ended before both kills" in gc.judge_resume(full, full, None, ran_through, cfg)["reasons"][0]
    no_resume = stages[:1] + [dict(stages[1], text="checkpoint: step 300"), stages[2]]
    assert gc.judge_resume(full, full, 150, no_resume, cfg)["reasons"] == ["stage 2 did not resume"]


def test_judge_syncs_against_the_action_reads():
    finished = {"host_syncs": {"total": 900, "iterations": 100, "per_iteration": 17.5, "per_step": 17.5 / 128}}
    assert gc.judge_syncs(finished, 16, "cuda")["reasons"] == []  # 16 reads x 1.1 + 0.5 = 18.1
    assert gc.judge_syncs(finished, 15, "cuda")["reasons"] == ["17.50 syncs per loop iteration > 17 (the action "
                                                               "reads: 15)"]
    assert "syncs per loop iteration > 1.6" in gc.judge_syncs(finished, 1, "cuda")["reasons"][0]
    assert gc.judge_syncs(finished, 1, "cpu")["status"] == "n/a"
    assert gc.judge_syncs({}, 1, "cuda")["reasons"] == ["no host_syncs in the run's finished summary"]
    cfg = gc.Check("atari", "", "", "", "", reads="--num-steps")
    assert gc.expected_reads(cfg, ["--num-envs", "8", "--num-steps", "16"]) == 16.0
    assert gc.expected_reads(gc.Check("atari", "", "", "", ""), []) == 1.0


def test_a_broken_renderer_spares_the_state_tasks(tmp_path):
    """Without a working EGL the pixel scripts are not run (one reason each); SimbaV2's state tasks still are."""
    check = gc.GpuCheck(gc.parse_args(["--dry-run", "--workdir", str(tmp_path)]))
    check.results["preflight"] = {"errors": {"render": "ImportError: Cannot initialize a headless EGL display."}}
    assert check.broken_imports("simbav2_dmc_hr.py") == [] and check.broken_imports("dqn_atari_hr.py") == []
    for file in ("drq_dmc_dominance.py", "mrq_dmc_hr.py"):
        assert check.broken_imports(file) == ["render: ImportError: Cannot initialize a headless EGL display."]

def test_kill_after_checkpoints(tmp_path):
    """run_proc's SIGKILL after the N-th checkpoint line (the resume item's pre-emption)."""
    code = "import time\nfor i in range(1, 50):\n    print(f'checkpoint: step {i}', flush=True)\n    time.sleep(0.05)\n"
    res = gc.run_proc([sys.executable, "-c", code], str(tmp_path), str(tmp_path / "k.log"), 60,
                      kill_after_checkpoints=3)
    assert res["killed"] and res["rc"] == -9 and 3 <= len(gc.CHECKPOINT_LINE.findall(res["text"])) < 49


def test_forked_runs_keep_kill_timeout_env_and_cwd(tmp_path):
    """--dry-run's runs forked from a server (scripts/forks.py): the SIGKILL after N checkpoints and the timeout hit the
    run, a child of the server, not the server (the next run still starts from it); the run's argv, environment
    variables, working directory, exit status and output are its own."""
    import forks

    script = tmp_path / "toy.py"
    script.write_text("import os, sys, time\n"  # the server imports it as a module: the run is under __main__
                      "if __name__ == '__main__':\n"
                      "    print('pid', os.getpid(), 'cwd', os.getcwd(), 'env', os.environ.get('HARNESS_COUNT_SYNCS'),"
                      " 'argv', sys.argv[1:], flush=True)\n"
                      "    for i in range(1, 1000 if sys.argv[1] != 'quick' else 1):\n"
                      "        print(f'checkpoint: step {i}', flush=True)\n        time.sleep(0.05)\n"
                      "    print('stderr line', file=sys.stderr)\n    sys.exit(3)\n")
    run_dir = tmp_path / "runs_here"
    run_dir.mkdir()
    server = forks.Forks(str(script), cwd=str(tmp_path), env=dict(os.environ), workers=4, preload=())
    try:
        cmd = [sys.executable, str(script)]
        env = dict(os.environ, HARNESS_COUNT_SYNCS="1")
        killed = gc.run_proc([*cmd, "long"], str(run_dir), str(tmp_path / "k.log"), 60, env,
                             kill_after_checkpoints=3, forks=server)
        assert killed["killed"] and killed["rc"] == -9 and killed["forked"], killed["text"]
        assert 3 <= len(gc.CHECKPOINT_LINE.findall(killed["text"])) < 999
        pid = int(killed["text"].split()[1])
        assert pid != server.proc.pid and server.proc.poll() is None  # the run was killed, the server lives on
        timed = gc.run_proc([*cmd, "long"], str(run_dir), str(tmp_path / "t.log"), 1.0, env, forks=server)
        assert timed["timed_out"] and timed["rc"] == -9 and server.proc.poll() is None
        quick = gc.run_proc([*cmd, "quick"], str(run_dir), str(tmp_path / "q.log"), 60, env, forks=server)
        assert quick["rc"] == 3 and not quick["killed"] and not quick["timed_out"]
        assert f"cwd {run_dir} env 1 argv ['quick']" in quick["text"] and "stderr line" in quick["text"]
    finally:
        server.close()

# ---------------------------------------------------------------------------------------------------------------
# item 1: the comparisons


def test_compare_params_as_a_share_of_the_movement():
    rng = np.random.default_rng(0)
    ref = {"w": rng.normal(size=(4, 3)), "b": rng.normal(size=3)}
    step = {k: 0.1 * rng.normal(size=v.shape) for k, v in ref.items()}
    plain = {k: ref[k] + step[k] for k in ref}
    movement = np.sqrt(sum((s ** 2).sum() for s in step.values()))
    same = gc.compare_params(plain, plain, ref)
    assert same["ratio"] == 0 and same["finite"] and same["movement"] == pytest.approx(movement)
    noise = {k: v + 1e-4 for k, v in plain.items()}
    near = gc.compare_params(noise, plain, ref)
    assert near["ratio"] == pytest.approx(1e-4 * np.sqrt(15) / movement)
    assert near["worst"] == "w" and near["max_abs"] == pytest.approx(1e-4)
    stuck = gc.compare_params(ref, plain, ref)  # a fast run whose updates never happened
    assert stuck["ratio"] == pytest.approx(1.0)
    bad = gc.compare_params({"w": plain["w"] * np.nan, "b": plain["b"]}, plain, ref)
    assert not bad["finite"]
    assert gc.compare_params({"w": plain["w"]}, plain, ref)["missing"] == ["b"]


def _scalars(values, tag="losses/td_loss", step0=100, every=100):
    return {tag: [(0.0, step0 + i * every, v) for i, v in enumerate(values)]}


def test_compare_losses_relative_to_the_typical_size():
    plain = _scalars([2.0, 1.0, 1.0, 0.5])
    res = gc.compare_losses(_scalars([2.0, 1.01, 1.0, 0.5]), plain)
    tag = res["tags"]["losses/td_loss"]
    assert tag["scale"] == pytest.approx(1.0) and tag["first"] == 0.0 and tag["points"] == 4
    assert res["max"] == pytest.approx(0.01) and res["median"] == pytest.approx(0.0)
    # near-zero losses are judged against their typical magnitude, not against zero
    res = gc.compare_losses(_scalars([1e-3, -1e-3, 2e-3]), _scalars([1e-3, -1e-3, 2.1e-3]))
    assert res["max"] == pytest.approx(0.1e-3 / 1e-3)
    assert gc.compare_losses(_scalars([1.0]), _scalars([1.0], tag="losses/other"), ["losses/td_loss"])["missing"] \
        == ["losses/td_loss"]


def test_match_in_checkpoint_finds_the_online_network():
    model = {"fc.weight": np.ones((2, 2)), "fc.bias": np.zeros(2)}
    ckpt = {"target_network.fc.weight": np.full((2, 2), 7.0), "target_network.fc.bias": np.zeros(2),
            "q_network.fc.weight": np.full((2, 2), 3.0), "q_network.fc.bias": np.ones(2),
            "optimizer.state.0.exp_avg": np.zeros((2, 2))}
    got = gc.match_in_checkpoint(model, ckpt)
    assert got["fc.weight"][0, 0] == 3.0 and got["fc.bias"][0] == 1.0
    assert gc.match_in_checkpoint(model, {"agent.fc.weight": np.ones((3, 2))}) is None


def _run(rc=0, text="done\n", summary=None):
    return {"rc": rc, "text": text, "timed_out": False, "wall": 1.0, "summary": summary}


def test_judge_equivalence():
    cfg = gc.SCRIPTS["pqn_atari_hr.py"]
    losses = gc.compare_losses(_scalars([1.0, 1.0, 1.0]), _scalars([1.0, 1.0, 1.0]))
    params = {"ratio": 0.01, "missing": [], "shape_mismatch": [], "finite": True}
    fast = {"compile": True, "cudagraphs": True, "device": "cuda"}
    assert gc.judge_equivalence(cfg, {"fast": _run(summary=fast), "plain": _run()}, losses, params, "cuda") == []
    warned = _run(text="warning: CUDA-graph capture of train_step failed (RuntimeError: x); running it eagerly\n",
                  summary=fast)
    assert "CUDA-graph capture" in gc.judge_equivalence(cfg, {"fast": warned, "plain": _run()}, losses, params,
                                                        "cuda")[0]
    eager = {"compile": True, "cudagraphs": False}
    assert "did not use the fast paths" in gc.judge_equivalence(cfg, {"fast": _run(summary=eager), "plain": _run()},
                                                                losses, params, "cuda")[0]
    compile_only = gc.Check("dmc", "", "init:", "", "1 1", graphs=False)  # a script without CUDA graphs
    assert gc.judge_equivalence(compile_only, {"fast": _run(summary=eager), "plain": _run()}, losses, params,
                                "cuda") == []
    assert gc.judge_equivalence(cfg, {"fast": _run(summary=fast), "plain": _run()}, losses, dict(params, ratio=0.5),
                                "cuda")[0].startswith("parameters differ by 5.00e-01")
    off = gc.compare_losses(_scalars([1.01, 1.0, 1.0]), _scalars([1.0, 1.0, 1.0]))
    assert gc.judge_equivalence(cfg, {"fast": _run(summary=fast), "plain": _run()}, off, params,
                                "cuda")[0].startswith("first logged loss differs")
    crashed = gc.judge_equivalence(cfg, {"fast": _run(rc=1, text="error: boom\n"), "plain": _run()}, None, None,
                                   "cuda")
    assert crashed == ["fast run exit 1: error: boom"]


def test_fallback_lines_fail_other_warnings_do_not():
    text = ("step 1\nwarning: torch.compile of td_loss failed (BackendCompilerFailed: x); running it eagerly\n"
            "warning: --eval-episodes 0: no evaluation episode will be played\n  warning: indented is not a line\n")
    assert gc.warnings_in(text) == ["warning: torch.compile of td_loss failed (BackendCompilerFailed: x); running it "
                                    "eagerly"]
    assert gc.other_warnings_in(text) == ["warning: --eval-episodes 0: no evaluation episode will be played"]
    log = ("W1129 08:46:00.486000 14304 site-packages/torch/_dynamo/exc.py:713] [0/0] Backend compiler exception\n"
           "W1129 08:46:00.486000 14304 site-packages/torch/_dynamo/exc.py:713] [0/0]   Explanation: x\n")
    assert gc.compile_notes_in(log) == ["Backend compiler exception"] and gc.warnings_in(log) == []  # counted only


def test_compare_models_with_both_references(tmp_path):
    check = gc.GpuCheck(gc.parse_args(["--dry-run", "--out-dir", str(tmp_path / "out"),
                                       "--workdir", str(tmp_path / "work")]))
    net = {"fc.weight": torch.zeros(2, 2), "fc.bias": torch.zeros(2)}
    moved = {k: v + 1.0 for k, v in net.items()}
    dirs = {t: tmp_path / t for t in ("fast", "plain", "ref")}
    for d in dirs.values():
        d.mkdir()
    torch.save(moved, dirs["plain"] / "x.cleanrl_model")
    torch.save({k: v + 0.01 for k, v in moved.items()}, dirs["fast"] / "x.cleanrl_model")
    torch.save(net, dirs["ref"] / "x.cleanrl_model")
    init = gc.SCRIPTS["dqn_atari_hr.py"]
    out = check.compare_models(init, {k: str(v) for k, v in dirs.items()})
    assert out["ratio"] == pytest.approx(0.01) and out["movement"] == pytest.approx(np.sqrt(6))
    halfway = {k: v + 0.5 for k, v in net.items()}  # checkpoint.pt of the run, network under state["agent"]
    for t in ("fast", "plain"):
        torch.save({"format": 3, "state": {"agent": halfway, "optimizer": {"state": {}}}}, dirs[t] / "checkpoint.pt")
    at_checkpoint = gc.Check("atari", "", "checkpoint", "", "1 1")
    out = check.compare_models(at_checkpoint, {k: str(v) for k, v in dirs.items()})
    assert out["ratio"] == pytest.approx(0.01 / 0.5) and out["mid_ratio"] == 0.0
    os.remove(dirs["fast"] / "x.cleanrl_model")
    assert "no saved model" in check.compare_models(init, {k: str(v) for k, v in dirs.items()})["error"]


# ---------------------------------------------------------------------------------------------------------------
# items 2 and 3: targets, the probe, the verdict


def _row(**kw):
    row = {"sps_on": None, "sps_off": None, "scaled": False, "projected": None, "pct_ceiling": None, "errors": []}
    row.update(kw)
    return row


def test_targets_use_the_default_cadence_and_time_ratios():
    rows = {"pqn": _row(sps_on=30_000, sps_off=31_000, pct_ceiling=0.85),
            "pqn/hadamax": _row(sps_off=12_400),  # 31,000 / 12,400 = 2.5x PQN's time per step
            "ppo": _row(sps_on=4_000, sps_off=6_000, scaled=True, projected=0.9),  # 5,400 at the default cadence
            "dqn": _row(sps_on=900, sps_off=1_000)}
    got = {t["target"].split()[0]: t for t in gc.evaluate_targets(rows, False, list(gc.SCRIPTS))}
    assert got["PQN"]["status"] == "PASS" and got["PQN"]["ratio"] == pytest.approx(0.85 / 0.8)
    assert got["Hadamax"]["value"] == pytest.approx(2.5) and got["Hadamax"]["status"] == "FAIL"
    assert got["Hadamax"]["ratio"] == pytest.approx(0.8)
    assert got["PPO"]["value"] == pytest.approx(5400) and got["PPO"]["status"] == "PASS"
    assert got["DQN"]["value"] == 900 and got["DQN"]["status"] == "FAIL"
    assert all(t["status"] == "n/a" for t in gc.evaluate_targets(rows, True, list(gc.SCRIPTS)))
    assert [t["target"][:3] for t in gc.evaluate_targets({}, False, ["dqn_atari_hr.py"])] == ["DQN"]
    assert gc.evaluate_targets({}, False, ["dqn_atari_hr.py"])[0]["status"] == "FAIL"  # not measured


def test_probe_curve_and_judgement():
    rising = [(s, 1.5 + s / 100_000) for s in range(10_000, 1_000_001, 10_000)]
    curve = gc.probe_curve(rising, [(500_000, 4.0)])
    assert len(curve) == 10 and curve[0]["train"] < curve[-1]["train"] and curve[4]["eval"] == 4.0
    assert gc.judge_probe(curve)[0] == "PASS"
    flat = gc.probe_curve([(s, 1.5) for s in range(10_000, 1_000_001, 10_000)], [])
    assert gc.judge_probe(flat)[0] == "FAIL"
    assert gc.judge_probe([])[0] == "FAIL" and gc.probe_curve([], []) == []


def test_overall_and_report_render():
    res = {"part": "atari", "dry_run": False, "equivalence": {}, "speed": {"rows": {}}, "targets": [],
           "probe": None, "warnings": [], "other_warnings": ["warning: x"], "runs": [], "skipped": [], "notes": [],
           "scripts": {"check": [], "unconfigured": ["new_hr.py"], "absent": ["mrq_dmc_hr.py"]},
           "preflight": {"cuda": True}}
    assert gc.overall(res) == "FAIL: no SCRIPTS line for new_hr.py"
    res["scripts"]["unconfigured"] = []
    assert gc.overall(res) == "PASS"
    res["warnings"] = [{"run": "eq_pqn_fast", "line": "warning: torch.compile of act failed; running it eagerly"}]
    assert gc.overall(res) == "FAIL: 1 fallback warning(s)"
    header = {"date": "d", "argv": "--part atari", "gpu": "NVIDIA H200", "cpus": 16, "python": "3.12",
              "torch": "2.11", "torch_cuda": "13.0", "versions": {}, "render": None, "device": "cuda"}
    text = gc.render_report(res, header)
    assert "**Overall: FAIL: 1 fallback warning(s)**" in text and "### Fallback warnings" in text
    assert "| 1. equivalence `mrq_dmc_hr.py` | absent |" in text and "Other `warning:` lines" in text


# ---------------------------------------------------------------------------------------------------------------
# the device commands and the wheels


def test_device_commands_fit_the_machine():
    for part, call in gc.DEVICE_CALLS.items():
        assert len(call["command"]) < 2000 and 0 < call["timeout_s"] <= 600
        assert call["timeout_s"] >= gc.PARTS[part]["deadline"] + 20  # the check reports before the call is cut
        assert f"--part {part} --out-dir $OUT" in call["command"] and f".whl/{part}/*.whl" in call["command"]
        assert len(call["carry"]) <= 8 and call["command"] in gc.device_calls_text()
    with open(os.path.join(REPO, ".gitignore")) as f:
        ignored = f.read().split()
    assert "/.whl/" in ignored and "/.gl/" in ignored  # wheels and debs are never committed
    with open(os.path.join(REPO, "scripts", "gpu_wheels.sh")) as f:
        wheels = f.read()
    for folder in ("atari", "dmc"):
        assert f".whl/{folder}" in wheels
    assert subprocess.run(["bash", "-n", os.path.join(REPO, "scripts", "gpu_wheels.sh")]).returncode == 0


def test_docs_section_matches_the_device_commands():
    with open(os.path.join(REPO, "docs", "running.md")) as f:
        readme = f.read()
    section = readme.split("## Checking a GPU", 1)[1].split("\n## ", 1)[0]
    for call in gc.DEVICE_CALLS.values():
        assert call["command"] in section


# ---------------------------------------------------------------------------------------------------------------
# end to end, on the CPU


def test_judge_snapshots_known_answers():
    """probe.py's values against the inline ones: equal within SNAPSHOT_TOL at the common steps, a gap named; the
    known answer at --redo-tau 1e9; a run with no common step fails; the CPU's gap is reported, not judged."""
    inline = {"representation/latent/srank": [(0, 100, 5.0), (0, 200, 6.0)], "losses/td_loss": [(0, 100, 1.0)],
              "representation/latent/dormant_score": [(0, 100, 0.25), (0, 200, 0.5)]}
    own = {"representation/latent/srank": [(0, 100, 5.0), (0, 200, 6.0000001)],
           "representation/latent/dormant_score": [(0, 100, 0.25), (0, 200, 0.5)]}
    high = {"representation/latent/dormant_score": [(0, 100, 1.0), (0, 200, 1.0)]}
    ok = gc.judge_snapshots(inline, own, high)
    assert ok["reasons"] == [] and ok["steps"] == [100, 200] and ok["max_abs"] == pytest.approx(1e-7)
    off = {**own, "representation/latent/srank": [(0, 100, 5.0), (0, 200, 6.01)]}
    assert gc.judge_snapshots(inline, off, high)["reasons"] == [
        "representation/latent/srank at step 200: inline 6, recomputed 6.01"]
    low = {"representation/latent/dormant_score": [(0, 100, 1.0), (0, 200, 0.5)]}
    assert gc.judge_snapshots(inline, own, low)["reasons"] == ["--redo-tau 1e9: a dormant_score below 1"]
    later = {t: [(0, 300, v) for _, _, v in pts[:1]] for t, pts in own.items()}
    assert "no step with both an inline probe and a snapshot" in gc.judge_snapshots(inline, later, high)["reasons"]
    assert gc.judge_snapshots(inline, {"representation/latent/srank": own["representation/latent/srank"]},
                              high)["reasons"][0].startswith("tags differ: recomputed 1, inline 2")
    cpu = {**own, "representation/latent/dormant_score": [(0, 100, 0.5), (0, 200, 0.5)]}
    assert gc.judge_snapshots(inline, own, high, cpu)["cpu_max_abs"] == 0.25


def test_every_scripts_first_variant_probes_and_keeps_snapshots():
    for file, cfg in gc.SCRIPTS.items():
        assert gc.snapshot_flags(cfg.variants[0]).startswith("--snapshot-every "), file


def test_dry_run_end_to_end(tmp_path):
    """The CPU rehearsal of the whole check, every script and every item, as CI runs it: equivalence (fast vs plain,
    eager both on the CPU: bit for bit), cpu, resume (two SIGKILLs and two resumes per script), the variant runs, the
    host-sync counts, determinism, the speed runs with the envpool ceilings and Hadamax, the probe, the report, the
    JSON and the log archive. Any failed or skipped item fails CI."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "gpu_check.py"), "--dry-run", "--part",
                           "all", "--out-dir", str(out), "--probe-seconds", "12"],  # the probe is stopped by SIGTERM
                          capture_output=True, text=True, timeout=1500,
                          env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    report = (out / "GPU_RESULTS_all_dry.md").read_text()
    res = json.loads((out / "gpu_check_all_dry.json").read_text())
    files = sorted(gc.SCRIPTS)
    assert sorted(res["equivalence"]) == files and not res["skipped"] and res["warnings"] == []
    for file, eq in res["equivalence"].items():
        assert eq["status"] == "PASS" and eq["params"]["ratio"] == 0.0 and eq["params"]["movement"] > 0, file
        assert eq["losses"]["points"] >= 2 and eq["losses"]["max"] == 0.0, file  # eager both: bit for bit
    items = res["items"]
    assert list(items) == ["equivalence+", "cpu", "resume", "variants", "snapshots", "syncs", "determinism"]
    pairs = [f"{f} {label}" for f in files for label, _, _ in gc.more_pairs(gc.SCRIPTS[f], gc.FAST)]
    assert sorted(items["equivalence+"]) == sorted(pairs) and len(pairs) == 13
    assert all(e["status"] == "PASS" and e["first"] == 0.0 for e in items["equivalence+"].values())
    assert items["equivalence+"]["dqn_atari_hr.py greedy"]["eval"] == 0.0  # DQN's greedy evaluation ran
    for item, per in list(items.items())[1:]:
        assert sorted(per) == files, item
        for file, e in per.items():
            assert e["status"] == ("n/a" if item == "syncs" else "PASS"), (item, file, e)
    for file in files:
        assert items["cpu"][file]["first"] == 0.0  # the dry run's "device" is the CPU: the same computation
        assert items["resume"][file]["kills"] == 2 and items["resume"][file]["before_kill_max_rel"] == 0.0
        assert len(items["variants"][file]["runs"]) == len(gc.SCRIPTS[file].variants)
        assert items["determinism"][file]["points"] >= 2 and items["determinism"][file]["max_rel"] == 0.0
        assert items["syncs"][file]["per_iteration"] == 0.0  # counted, and the CPU has none
        assert items["snapshots"][file]["steps"] and "cpu_max_abs" not in items["snapshots"][file]
    rows = res["speed"]["rows"]
    assert {"dqn", "ppo", "pqn", "pqn/hadamax", "drq"} <= set(rows) and rows["pqn"]["sps_on"]
    assert res["speed"]["ceilings"]["pqn"]["sps"] and all(t["status"] == "n/a" for t in res["targets"])
    assert res["probe"]["status"] == "n/a" and res["probe"]["stopped"]
    for heading in ("**Overall: PASS**", "| 4. resume `mrq_dmc_hr.py` | PASS |", "### 1. Equivalence", "### 9. Speed",
                    "### 10. Learning probe", "| 6. snapshots `drq_dmc_dominance.py` | PASS |",
                    "| 2. equivalence+ `dqn_atari_hr.py greedy` | PASS |"):
        assert heading in report
    assert report in proc.stdout and "gpu_check part all: PASS" in proc.stdout
    with tarfile.open(out / "logs_all_dry.tar.gz") as tar:
        names = tar.getnames()
    # --dry-run: the plain run stands for both sides of the equivalence (no fast run on the CPU)
    assert "eq_pqn_plain.log" in names and "runs/eq_pqn_plain/finished" in names and "eq_pqn_fast.log" not in names
    assert "resume_drq_killed_3.log" in names
    assert sorted(os.listdir(out)) == ["GPU_RESULTS_all_dry.md", "gpu_check_all_dry.json", "logs_all_dry.tar.gz"]
