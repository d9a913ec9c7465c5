"""Sweep launchers: the commands they print, skip/resume/restart of earlier runs (a restart moved aside by the
script's harness, not by the launcher), GPU spreading, the SLURM array."""
import glob
import json
import os
import subprocess
import sys


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))
import sweep  # noqa: E402


def launcher(name, *args, cwd, env=None):
    full_env = {k: v for k, v in os.environ.items() if k not in ("ALGO", "GAMES", "CONFIGS", "SEEDS", "EXTRA", "N",
                                                                   "SNAPSHOT_EVERY")}
    full_env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + full_env["PATH"]  # `python` = this venv
    full_env.update(env or {})
    proc = subprocess.run(["bash", os.path.join(REPO, "scripts", name), *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [line for line in proc.stdout.splitlines() if line and not line.startswith("#")], proc.stdout


def test_atari8_dry_run_prints_200_commands(tmp_path):
    cmds, _ = launcher("run_atari8.sh", "--dry-run", cwd=tmp_path)
    assert len(cmds) == 8 * 5 * 5
    games = {c.split("--env-id ")[1].split()[0] for c in cmds}
    assert {"BreakoutNoFrameskip-v4", "SeaquestNoFrameskip-v4", "VideoPinballNoFrameskip-v4"} <= games
    assert len(games) == 8
    one = [c for c in cmds if "__BreakoutNoFrameskip-v4__hr_tanh__s3" in c]
    assert len(one) == 1
    assert "dqn_atari_hr.py --env-id BreakoutNoFrameskip-v4 --seed 3 --exp-name hr_tanh --activation tanh --hr " \
           "--run-name dqn__BreakoutNoFrameskip-v4__hr_tanh__s3" in one[0]


def test_overrides_and_ppo(tmp_path):
    cmds, _ = launcher("run_atari8.sh", "--dry-run", cwd=tmp_path,
                       env={"ALGO": "ppo", "GAMES": "Pong Qbert", "CONFIGS": "relu hr_tanh", "SEEDS": "1 2",
                            "EXTRA": "--total-timesteps 5000"})
    assert len(cmds) == 8
    assert all("ppo_atari_hr.py" in c and "--total-timesteps 5000" in c for c in cmds)
    assert any("--env-id Qbert-v5" in c for c in cmds)


def test_finished_runs_skipped_unfinished_resumed(tmp_path):
    runs = tmp_path / "runs"
    (runs / "dqn__PongNoFrameskip-v4__relu__s1").mkdir(parents=True)
    (runs / "dqn__PongNoFrameskip-v4__relu__s1" / "finished").write_text(json.dumps({"global_step": 10_000_000}))
    (runs / "dqn__PongNoFrameskip-v4__relu__s2").mkdir()  # started, checkpointed, not finished
    (runs / "dqn__PongNoFrameskip-v4__relu__s2" / "checkpoint.pt").write_bytes(b"")
    (runs / "dqn__PongNoFrameskip-v4__relu__s3").mkdir()  # started, killed before its first checkpoint
    (runs / "dqn__PongNoFrameskip-v4__relu__s3" / "events.out.tfevents.1.host").write_bytes(b"x")
    (runs / "dqn__PongNoFrameskip-v4__relu__s5").mkdir()  # finished by an older version: an empty marker
    (runs / "dqn__PongNoFrameskip-v4__relu__s5" / "finished").write_text("")
    cmds, out = launcher("run_atari8.sh", "--dry-run", "--games", "Pong", "--configs", "relu", "--seeds",
                         "1 2 3 4 5", cwd=tmp_path)
    assert len(cmds) == 3
    assert "skip dqn__PongNoFrameskip-v4__relu__s1 (finished)" in out
    assert "skip dqn__PongNoFrameskip-v4__relu__s5 (finished)" in out
    assert "dqn__PongNoFrameskip-v4__relu__s3 stopped before its first checkpoint: starting over" in out
    # the launcher moves nothing itself (the script does, under its lock), and a dry run touches nothing
    assert (runs / "dqn__PongNoFrameskip-v4__relu__s3" / "events.out.tfevents.1.host").exists()
    assert sorted(p.name for p in runs.iterdir()) == [f"dqn__PongNoFrameskip-v4__relu__s{i}" for i in (1, 2, 3, 5)]

    def command_of(seed):
        return [c for c in cmds if f"--run-name dqn__PongNoFrameskip-v4__relu__s{seed}" in c][0]

    assert command_of(2).endswith("--resume")
    assert "--resume" not in command_of(3)  # nothing to resume from: restarts
    assert "--resume" not in command_of(4)  # never started


def test_pqn51_and_dmc_grids(tmp_path):
    cmds, _ = launcher("run_pqn_atari51.sh", "--dry-run", cwd=tmp_path)
    assert len(cmds) == 51 * 4 * 5
    assert not any("MontezumaRevenge" in c for c in cmds)
    assert any("--encoder hadamax" in c for c in cmds)
    cmds, _ = launcher("run_dmc_dominance.sh", "--dry-run", cwd=tmp_path)
    assert len(cmds) == 12 * 7 * 6
    assert any("--env-id reacher-easy_masked" in c and "--mitigation lnwd" in c for c in cmds)


def test_simbav2_grid_and_its_slurm_array(tmp_path):
    cmds, _ = launcher("run_simbav2.sh", "--dry-run", cwd=tmp_path)
    assert len(cmds) == 7 * 3 * 5  # the hard dm_control tasks x {baseline, hr, widen} x 5 seeds
    assert {c.split("--env-id ")[1].split()[0] for c in cmds} == set(sweep.SIMBAV2_TASKS)
    one = [c for c in cmds if c.endswith("--run-name simbav2__dog-run__widen__s4")]
    assert len(one) == 1 and "simbav2_dmc_hr.py --env-id dog-run --seed 4 --exp-name widen --widen " in one[0]
    assert sum("--hr " in c for c in cmds) == 7 * 5  # the baseline has no variant flag:
    assert sum("--exp-name baseline --run-name" in c for c in cmds) == 7 * 5
    cmds, _ = launcher("run_simbav2.sh", "--dry-run", cwd=tmp_path, env={"TASKS": "humanoid-run", "SEEDS": "1",
                                                                          "CONFIGS": "hr_critic hr_shared"})
    assert [c.split("--exp-name ")[1].split(" --run-name")[0] for c in cmds] == [
        "hr_critic --hr --hr-networks critic", "hr_shared --hr --hr-scaler shared"]
    _, out = launcher("run_simbav2.sh", "--slurm", "--dry-run", "--seeds", "1 2", cwd=tmp_path)
    assert "#SBATCH --array=0-41%64" in out and "sweep.py simbav2 --algo simbav2" in out
    proc = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "sweep.py"), "simbav2", "--dry-run",
                           "--configs", "hr_actor"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode != 0 and "unknown SimbaV2 configuration 'hr_actor'" in proc.stderr


def test_mrq_grid_all_28_tasks_and_its_slurm_array(tmp_path):
    cmds, _ = launcher("run_mrq_dmcv.sh", "--dry-run", cwd=tmp_path)
    assert len(cmds) == 7 * 3 * 5  # the paper's 7 hard DMC-Visual tasks x {baseline, hr, widen} x 5 seeds
    assert {c.split("--env-id ")[1].split()[0] for c in cmds} == {f"{d}-{t}" for d in ("dog",) for t in (
        "run", "stand", "trot", "walk")} | {"humanoid-run", "humanoid-stand", "humanoid-walk"}
    one = [c for c in cmds if c.endswith("--run-name mrq__humanoid-walk__widen__s2")]
    assert len(one) == 1 and "mrq_dmc_hr.py --env-id humanoid-walk --seed 2 --exp-name widen --widen " in one[0]
    assert sum("--exp-name hr --hr --run-name" in c for c in cmds) == 7 * 5
    cmds, _ = launcher("run_mrq_dmcv.sh", "--all", "--dry-run", "--configs", "baseline", "--seeds", "1", cwd=tmp_path)
    tasks = [c.split("--env-id ")[1].split()[0] for c in cmds]
    assert len(tasks) == len(set(tasks)) == 28 and set(sweep.DMCV_HARD) < set(tasks)
    assert {"walker-walk", "cartpole-swingup_sparse", "quadruped-run", "finger-turn_hard"} < set(tasks)
    cmds, _ = launcher("run_mrq_dmcv.sh", "--dry-run", cwd=tmp_path, env={"GAMES": "dog-run", "SEEDS": "3",
                                                                          "CONFIGS": "hr_all widen_all"})
    assert [c.split("--exp-name ")[1].split(" --run-name")[0] for c in cmds] == [
        "hr_all --hr --hr-layers all", "widen_all --widen --hr-layers all"]
    _, out = launcher("run_mrq_dmcv.sh", "--all", "--slurm", "--dry-run", "--seeds", "1 2", cwd=tmp_path)
    assert "#SBATCH --array=0-167%64" in out and "sweep.py mrq --algo mrq" in out  # 28 x 3 x 2 runs
    proc = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "sweep.py"), "mrq", "--dry-run",
                           "--configs", "hr_heads"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode != 0 and "unknown MR.Q configuration 'hr_heads'" in proc.stderr


def test_snapshot_every_reaches_every_run_and_the_slurm_tasks(tmp_path):
    cmds, _ = launcher("run_atari8.sh", "--dry-run", "--games", "Pong", "--seeds", "1", "--snapshot-every", "50000",
                       cwd=tmp_path, env={"EXTRA": "--total-timesteps 5000"})
    assert len(cmds) == 5 and all(c.endswith("--total-timesteps 5000 --snapshot-every 50000 --run-name "
                                             + c.split("--run-name ")[1]) for c in cmds)
    cmds, _ = launcher("run_dmc_dominance.sh", "--dry-run", "--games", "cartpole-swingup", "--configs", "none",
                       "--seeds", "0", cwd=tmp_path, env={"SNAPSHOT_EVERY": "10000"})
    assert len(cmds) == 1 and "--snapshot-every 10000" in cmds[0]
    _, out = launcher("run_atari8.sh", "--slurm", "--dry-run", "--games", "Pong", "--seeds", "1",
                      "--snapshot-every", "50000", cwd=tmp_path)
    assert "--extra '--snapshot-every 50000'" in out


def test_slurm_dry_run(tmp_path):
    _, out = launcher("run_atari8.sh", "--slurm", "--dry-run", "--games", "Pong", "--seeds", "1 2", cwd=tmp_path)
    assert "#SBATCH --array=0-9%64" in out
    assert "#SBATCH --requeue" in out
    assert '--task-id "$SLURM_ARRAY_TASK_ID"' in out
    # the array task command resolves to one run
    task, _ = launcher("run_atari8.sh", "--dry-run", "--games", "Pong", "--seeds", "1 2", "--task-id", "9",
                       cwd=tmp_path)
    assert len(task) == 1 and task[0].endswith("--run-name dqn__PongNoFrameskip-v4__hr_relu__s2")


def test_bad_config_is_rejected(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "sweep.py"), "atari8", "--dry-run",
                           "--configs", "nonsense"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode != 0 and "unknown configuration 'nonsense'" in proc.stderr


def test_local_run_spreads_over_gpus_and_skips_on_relaunch(tmp_path, monkeypatch):
    fake = tmp_path / "fake_train.py"
    fake.write_text(
        "import os, sys\n"
        "name = sys.argv[sys.argv.index('--run-name') + 1]\n"
        "os.makedirs(f'runs/{name}', exist_ok=True)\n"
        "open(f'runs/{name}/gpu', 'w').write(os.environ.get('CUDA_VISIBLE_DEVICES', ''))\n"
        "open(f'runs/{name}/finished', 'w').write('{\"global_step\": 1}')\n")
    runs = [sweep.Run(f"fake__s{i}", str(fake), ["--seed", str(i)]) for i in range(4)]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    runs_dir = str(tmp_path / "runs")
    assert sweep.run_local(runs, runs_dir, jobs=2, dry_run=False) == 0
    gpus = [(tmp_path / "runs" / f"fake__s{i}" / "gpu").read_text() for i in range(4)]
    assert gpus == ["0", "1", "0", "1"]
    assert all(sweep.plan(r, runs_dir) == "skip" for r in runs)




def test_restart_of_a_partial_run_is_moved_aside_by_the_harness(tmp_path, monkeypatch):
    """A run killed before its first checkpoint (events, no checkpoint), relaunched by the sweep on a real harness
    script: the script moves it to runs/NAME.partial-<unix time> and starts fresh; its `finished` JSON then makes the
    next relaunch skip it."""
    toy = os.path.join(REPO, "tests", "toy_harness_script.py")  # the harness tests' toy training script
    runs_dir = tmp_path / "runs"
    partial = runs_dir / "toy__s1"
    partial.mkdir(parents=True)
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(partial))
    w.add_scalar("charts/SPS", 99.0, 0)
    w.close()
    run = sweep.Run("toy__s1", toy, ["--seed", "1", "--total-timesteps", "300", "--checkpoint-every", "0"])
    assert sweep.plan(run, str(runs_dir)) == "restart"
    assert "--resume" not in sweep.prepare(run, str(runs_dir))
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    assert sweep.run_local([run], str(runs_dir), jobs=1, dry_run=False) == 0
    aside = glob.glob(str(runs_dir / "toy__s1.partial-*"))
    assert len(aside) == 1 and aside[0].rsplit("-", 1)[1].isdigit()
    assert glob.glob(os.path.join(aside[0], "events.out.tfevents.*"))  # the old events, kept aside
    with open(partial / "finished") as f:
        assert json.load(f)["global_step"] == 300
    assert sweep.plan(run, str(runs_dir)) == "skip" and sweep.prepare(run, str(runs_dir)) is None
