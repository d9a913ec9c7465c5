#!/usr/bin/env python
"""Seed sweeps for the training scripts: build the grid of runs, then run it locally or on SLURM.

The bash launchers (scripts/run_atari8.sh, run_pqn_atari51.sh, run_dmc_dominance.sh) call this with a sweep name;
environment variables or flags override games/tasks, configurations, seeds and extra flags.

Every run gets a deterministic name, `<algo>__<env>__<config>__s<seed>`, so relaunching the same sweep:
- skips runs that finished (runs/NAME/finished exists: the JSON summary the script writes on a clean exit),
- resumes runs that started and wrote a checkpoint (`--resume`); a run stopped before its first checkpoint starts
  over (the script moves its directory aside to runs/NAME.partial-<unix time> first, as any fresh start does),
- starts the rest.
Local mode runs N jobs at a time and spreads them round-robin over the visible GPUs (CUDA_VISIBLE_DEVICES per job).
SLURM mode writes one job-array script (one array task per run; requeue-safe because each task relaunches through
this file, which resumes) from scripts/slurm_template.sbatch and submits it with sbatch.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# The HR papers name Breakout, Seaquest and VideoPinball among their 8 games; the other five are our choice of
# common non-exploration games (see docs/running.md, "Sweeps and analysis").
ATARI8 = ["Breakout", "Seaquest", "VideoPinball", "Pong", "SpaceInvaders", "BeamRider", "Qbert", "Enduro"]

ATARI_CONFIGS = {  # name -> flags (papers' Fig. 2 configurations first, then the Table 2 ablations)
    "relu": "--activation relu",
    "tanh": "--activation tanh",
    "tanh_ln": "--activation tanh --layernorm",
    "hr_tanh": "--activation tanh --hr",
    "hr_relu": "--activation relu --hr",
    "sigmoid": "--activation sigmoid",  # HR v1 Table 2's sigmoid rows
    "hr_sigmoid": "--activation sigmoid --hr",
    "widen_relu": "--activation relu --hidden-dim 1024",
    "widen_tanh": "--activation tanh --hidden-dim 1024",
    "2hr_tanh": "--activation tanh --hr --hidden-layers 2",
    "hadamax": "--encoder hadamax",
    "crelu": "--activation crelu",
    "redo": "--redo",
}

# The dominance paper's 4 sparse tasks plus 8 common non-sparse DMC tasks (the paper does not list its 8; see
# docs/drq_dmc_dominance.md).
DMC_TASKS = ["cartpole-swingup_sparse", "cartpole-balance_sparse_narrow", "finger-spin_fast", "reacher-easy_masked",
             "cartpole-swingup", "cartpole-balance", "reacher-easy", "finger-spin", "cheetah-run", "walker-walk",
             "walker-run", "ball_in_cup-catch"]
DMC_MITIGATIONS = ["none", "ln", "lnwd", "hlgauss", "reset", "redo", "prune"]
# Run lengths (--total-timesteps, frames). The paper gives none: jaxrl train_pixels' max_steps (500k frames) for every
# task, except reacher-easy_masked: 4M frames = 1M agent steps at its action repeat 4, so the critic's reward is masked
# in the first 500k gradient steps (paper App. B.1), about the first half of the run as the paper's Fig. 3 caption
# says, and the second half shows whether the agent recovers (Figs. 3, 6, 10, 11). EXTRA="--total-timesteps N" wins.
DMC_TOTAL_TIMESTEPS = {"reacher-easy_masked": 4_000_000}
DMC_DEFAULT_TOTAL_TIMESTEPS = 500_000
# Configurations beside the mitigations, not in the default grid (CONFIGS="ln_switch resnet18"):
#   ln_switch  DrQ whose critic LayerNorm is switched on part-way (paper Figs. 10, 16): on reacher-easy_masked at agent
#              step 501,000, the step of the first unmasked update (learning starts at agent step 1000, so gradient
#              step 500,001); on any other task half-way through the run
#   resnet18   DrQ with the ResNet-18 encoder (paper Fig. 12; the paper shows 2 sparse tasks, e.g.
#              TASKS="cartpole-swingup_sparse cartpole-balance_sparse_narrow")
DMC_EXTRA_CONFIGS = ["ln_switch", "resnet18"]
# jaxrl's action repeat by full task name (drq_dmc_dominance.PLANET_ACTION_REPEAT; tests/test_drq_dmc_dominance.py
# checks they agree), keyed here by the ids our sweep uses; any other task 2
DMC_ACTION_REPEAT = {"cartpole-swingup": 8, "reacher-easy": 4, "reacher-easy_masked": 4, "cheetah-run": 4,
                     "ball_in_cup-catch": 4}

# SimbaV2: the 7 hard dm_control state tasks stand in for HumanoidBench (not installable; see docs/simbav2_dmc_hr.md);
# configurations:
# the paper's Table 2 (baseline, +HR, +widen) first, then the open choices of where HR goes.
SIMBAV2_TASKS = ["humanoid-stand", "humanoid-walk", "humanoid-run", "dog-stand", "dog-walk", "dog-trot", "dog-run"]
SIMBAV2_CONFIGS = {"baseline": "", "hr": "--hr", "widen": "--widen", "hr_critic": "--hr --hr-networks critic",
                   "widen_critic": "--widen --hr-networks critic", "hr_shared": "--hr --hr-scaler shared"}

# MR.Q on DMC-Visual: the paper's 7 hard tasks (Table 2) by default, the full 28 (App. D.4) as the game set `all`;
# configurations: Table 2 (baseline, +HR on the zs projection, +widen) first, then HR at the other encoder sites.
DMCV_HARD = ["dog-run", "dog-stand", "dog-trot", "dog-walk", "humanoid-run", "humanoid-stand", "humanoid-walk"]
DMCV_TASKS = ["acrobot-swingup", "ball_in_cup-catch", "cartpole-balance", "cartpole-balance_sparse", "cartpole-swingup",
              "cartpole-swingup_sparse", "cheetah-run", "finger-spin", "finger-turn_easy", "finger-turn_hard",
              "fish-swim", "hopper-hop", "hopper-stand", "pendulum-swingup", "quadruped-run", "quadruped-walk",
              "reacher-easy", "reacher-hard", "walker-run", "walker-stand", "walker-walk", *DMCV_HARD]
MRQ_CONFIGS = {"baseline": "", "hr": "--hr", "widen": "--widen", "hr_convs": "--hr --hr-layers convs",
               "hr_zsa": "--hr --hr-layers zsa", "hr_all": "--hr --hr-layers all",
               "widen_all": "--widen --hr-layers all"}


def _pqn_games():
    import common

    return list(common.ATARI_51)


SWEEPS = {
    # name: (default algo, {algo: script}, env-id pattern per algo, default games, default configs, default seeds)
    "atari8": dict(algos={"dqn": "dqn_atari_hr.py", "ppo": "ppo_atari_hr.py"},
                   env={"dqn": "{game}NoFrameskip-v4", "ppo": "{game}-v5"},
                   games=lambda: ATARI8, configs=["relu", "tanh", "tanh_ln", "hr_tanh", "hr_relu"],
                   seeds=[1, 2, 3, 4, 5], default_algo="dqn"),
    "pqn51": dict(algos={"pqn": "pqn_atari_hr.py"}, env={"pqn": "{game}-v5"}, games=_pqn_games,
                  configs=["relu", "tanh", "hr_tanh", "hadamax"], seeds=[1, 2, 3, 4, 5], default_algo="pqn"),
    "dmc": dict(algos={"drq": "drq_dmc_dominance.py"}, env={"drq": "{game}"}, games=lambda: DMC_TASKS,
                configs=DMC_MITIGATIONS, seeds=[1, 2, 3, 4, 5, 6], default_algo="drq"),
    "simbav2": dict(algos={"simbav2": "simbav2_dmc_hr.py"}, env={"simbav2": "{game}"}, games=lambda: SIMBAV2_TASKS,
                    configs=["baseline", "hr", "widen"], seeds=[1, 2, 3, 4, 5], default_algo="simbav2"),
    # game_sets: names that stand for a list of games (--games all)
    "mrq": dict(algos={"mrq": "mrq_dmc_hr.py"}, env={"mrq": "{game}"}, games=lambda: DMCV_HARD,
                configs=["baseline", "hr", "widen"], seeds=[1, 2, 3, 4, 5], default_algo="mrq",
                game_sets={"hard": DMCV_HARD, "all": DMCV_TASKS}),
}


@dataclass
class Run:
    name: str
    script: str
    args: list[str]

    def command(self, runs_dir: str, resume: bool) -> list[str]:
        cmd = [sys.executable, os.path.join(REPO, self.script), *self.args, "--run-name", self.name]
        return cmd + (["--resume"] if resume else [])


def config_flags(sweep: str, config: str) -> str:
    if sweep == "mrq":
        if config not in MRQ_CONFIGS:
            raise SystemExit(f"error: unknown MR.Q configuration {config!r}; choose from {list(MRQ_CONFIGS)}")
        return MRQ_CONFIGS[config]
    if sweep == "simbav2":
        if config not in SIMBAV2_CONFIGS:
            raise SystemExit(f"error: unknown SimbaV2 configuration {config!r}; choose from {list(SIMBAV2_CONFIGS)}")
        return SIMBAV2_CONFIGS[config]
    if sweep == "dmc":
        if config == "resnet18":
            return "--mitigation none --encoder resnet18"
        if config == "ln_switch":
            return "--mitigation none --ln-from-step {ln_from_step}"  # filled per task by dmc_flags
        if config not in DMC_MITIGATIONS and not config.startswith("hr_"):
            raise SystemExit(f"error: unknown DMC configuration {config!r}; choose from {DMC_MITIGATIONS} "
                             f"(prefix hr_ for --hr, e.g. hr_lnwd) or {DMC_EXTRA_CONFIGS}")
        mitigation = config[3:] if config.startswith("hr_") else config
        return f"--mitigation {mitigation}" + (" --hr" if config.startswith("hr_") else "")
    if config not in ATARI_CONFIGS:
        raise SystemExit(f"error: unknown configuration {config!r}; choose from {sorted(ATARI_CONFIGS)}")
    return ATARI_CONFIGS[config]


def dmc_flags(task: str, config: str) -> str:
    """A DrQ run's flags: its length (DMC_TOTAL_TIMESTEPS), then its configuration's."""
    total = DMC_TOTAL_TIMESTEPS.get(task, DMC_DEFAULT_TOTAL_TIMESTEPS)
    flags = config_flags("dmc", config)
    if config == "ln_switch":  # agent steps: the mask's end on reacher-easy_masked (learning starts 1000), else half
        step = 500_000 + 1000 if task == "reacher-easy_masked" else total // DMC_ACTION_REPEAT.get(task, 2) // 2
        flags = flags.format(ln_from_step=step)
    return f"--total-timesteps {total} {flags}"


def build_runs(sweep: str, algo: str, games: list[str], configs: list[str], seeds: list[int], extra: str) -> list[Run]:
    spec = SWEEPS[sweep]
    if algo not in spec["algos"]:
        raise SystemExit(f"error: --algo {algo!r} is not part of sweep {sweep!r}; choose from {sorted(spec['algos'])}")
    runs = []
    for game in games:
        env_id = spec["env"][algo].format(game=game)
        for config in configs:
            flags = dmc_flags(game, config) if sweep == "dmc" else config_flags(sweep, config)
            for seed in seeds:
                name = f"{algo}__{env_id}__{config}__s{seed}"
                args = ["--env-id", env_id, "--seed", str(seed), "--exp-name", config, *shlex.split(flags),
                        *shlex.split(extra)]
                runs.append(Run(name, spec["algos"][algo], args))
    return runs


def plan(run: Run, runs_dir: str) -> str:
    """'skip' (finished), 'resume' (has a checkpoint), 'restart' (started, no checkpoint yet) or 'start'."""
    d = os.path.join(runs_dir, run.name)
    if os.path.exists(os.path.join(d, "finished")):  # the end-of-run summary (JSON) harness.Run.finish writes
        return "skip"
    if os.path.exists(os.path.join(d, "checkpoint.pt")):
        return "resume"
    return "restart" if os.path.exists(d) else "start"


def prepare(run: Run, runs_dir: str) -> list[str] | None:
    """The command for a run, None if it finished. A restart is launched fresh like a start: the script itself (the
    harness, one rule for every way a run is started) moves a directory holding events but no checkpoint aside to
    runs/NAME.partial-<unix time>, after taking its lock, so a run still going is never moved."""
    action = plan(run, runs_dir)
    if action == "skip":
        return None
    if action == "restart":
        print(f"# {run.name} stopped before its first checkpoint: starting over (the script moves its events aside "
              f"to runs/{run.name}.partial-<time>)", flush=True)
    return run.command(runs_dir, action == "resume")


def visible_gpus() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip()]
    if shutil.which("nvidia-smi") is None:
        return []
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU")]


def run_local(runs: list[Run], runs_dir: str, jobs: int, dry_run: bool) -> int:
    gpus = visible_gpus()
    todo = []
    for run in runs:
        cmd = prepare(run, runs_dir)
        if cmd is None:
            print(f"# skip {run.name} (finished)")
            continue
        env = {}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[len(todo) % len(gpus)]
        todo.append((run, cmd, env))
    if dry_run:
        for run, cmd, env in todo:
            prefix = "".join(f"{k}={v} " for k, v in env.items())
            print(prefix + shlex.join(cmd))
        print(f"# {len(todo)} commands ({len(runs) - len(todo)} finished runs skipped)")
        return 0
    os.makedirs(runs_dir, exist_ok=True)
    logs = os.path.join(runs_dir, "_sweep_logs")
    os.makedirs(logs, exist_ok=True)

    def launch(item):
        run, cmd, env = item
        with open(os.path.join(logs, run.name + ".log"), "a") as log:
            print(f"start {run.name}", flush=True)
            rc = subprocess.run(cmd, cwd=os.path.dirname(os.path.abspath(runs_dir)),
                                env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT).returncode
            print(f"{'done' if rc == 0 else f'FAILED (exit {rc})'} {run.name}", flush=True)
            return rc

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        codes = list(pool.map(launch, todo))
    failed = sum(c != 0 for c in codes)
    print(f"# {len(todo) - failed} runs ok, {failed} failed; logs in {logs}")
    return 1 if failed else 0


def slurm_script(sweep_argv: list[str], n_runs: int, template: str, max_parallel: int) -> str:
    with open(template) as f:
        text = f.read()
    task_cmd = shlex.join([sys.executable, os.path.abspath(__file__), *sweep_argv, "--task-id", "$SLURM_ARRAY_TASK_ID"])
    task_cmd = task_cmd.replace("'$SLURM_ARRAY_TASK_ID'", '"$SLURM_ARRAY_TASK_ID"')
    return (text.replace("{ARRAY}", f"0-{n_runs - 1}%{max_parallel}").replace("{REPO}", REPO)
            .replace("{COMMAND}", task_cmd))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", choices=sorted(SWEEPS))
    p.add_argument("--algo", default=None, help="algorithm of the sweep (atari8: dqn or ppo); env ALGO")
    p.add_argument("--games", default=None, help="space-separated games or DMC tasks; env GAMES (TASKS for dmc)")
    p.add_argument("--configs", default=None, help="space-separated configuration names; env CONFIGS")
    p.add_argument("--seeds", default=None, help="space-separated seeds; env SEEDS")
    p.add_argument("--extra", default=None, help="extra flags for every run, e.g. '--total-timesteps 20000'; env EXTRA")
    p.add_argument("--snapshot-every", type=int, default=None,
                   help="keep network snapshots every N steps (each script's --snapshot-every, in its step unit) for "
                        "scripts/probe.py; env SNAPSHOT_EVERY")
    p.add_argument("--runs-dir", default=None, help="where runs/ lives (default ./runs); env RUNS_DIR")
    p.add_argument("-j", "--jobs", type=int, default=None, help="runs at a time (local); env N (default 1)")
    p.add_argument("--dry-run", action="store_true", help="print the commands (or the sbatch script) and exit")
    p.add_argument("--slurm", action="store_true", help="submit a SLURM job array instead of running locally")
    p.add_argument("--slurm-template", default=os.path.join(REPO, "scripts", "slurm_template.sbatch"))
    p.add_argument("--max-parallel", type=int, default=64, help="SLURM array throttle (%%N)")
    p.add_argument("--task-id", type=int, default=None, help="(SLURM array task) run only the run with this index")
    a = p.parse_args(argv)
    spec = SWEEPS[a.sweep]
    env = os.environ
    algo = a.algo or env.get("ALGO") or spec["default_algo"]
    games = (a.games or env.get("GAMES") or env.get("TASKS") or "").split() or spec["games"]()
    games = [g for name in games for g in spec.get("game_sets", {}).get(name, [name])]  # e.g. mrq: --games all
    configs = (a.configs or env.get("CONFIGS") or "").split() or spec["configs"]
    seeds = [int(s) for s in (a.seeds or env.get("SEEDS") or "").split()] or spec["seeds"]
    extra = a.extra if a.extra is not None else env.get("EXTRA", "")
    snapshot_every = a.snapshot_every if a.snapshot_every is not None else env.get("SNAPSHOT_EVERY")
    if snapshot_every not in (None, ""):
        extra = f"{extra} --snapshot-every {snapshot_every}".strip()  # the SLURM tasks get it through --extra
    runs_dir = os.path.abspath(a.runs_dir or env.get("RUNS_DIR") or "runs")
    jobs = a.jobs or int(env.get("N", "1"))
    if os.path.basename(runs_dir) != "runs":
        raise SystemExit(f"error: --runs-dir must be a directory named 'runs' (the scripts write to ./runs), "
                         f"got {runs_dir}")
    runs = build_runs(a.sweep, algo, games, configs, seeds, extra)

    if a.task_id is not None:  # one SLURM array task
        if not 0 <= a.task_id < len(runs):
            raise SystemExit(f"error: --task-id {a.task_id} out of range 0..{len(runs) - 1}")
        cmd = prepare(runs[a.task_id], runs_dir)
        if cmd is None:
            print(f"{runs[a.task_id].name} already finished")
            return 0
        print(shlex.join(cmd), flush=True)
        if a.dry_run:
            return 0
        os.makedirs(runs_dir, exist_ok=True)
        return subprocess.run(cmd, cwd=os.path.dirname(runs_dir)).returncode

    if a.slurm:
        sweep_argv = [a.sweep, "--algo", algo, "--games", " ".join(games), "--configs", " ".join(configs),
                      "--seeds", " ".join(map(str, seeds)), "--extra", extra, "--runs-dir", runs_dir]
        text = slurm_script(sweep_argv, len(runs), a.slurm_template, a.max_parallel)
        if a.dry_run:
            print(text)
            return 0
        os.makedirs(os.path.join(runs_dir, "_sweep_logs"), exist_ok=True)
        path = os.path.join(runs_dir, "_sweep_logs", f"{a.sweep}_{algo}_{int(time.time())}.sbatch")
        with open(path, "w") as f:
            f.write(text)
        return subprocess.run(["sbatch", path], cwd=os.path.dirname(runs_dir)).returncode
    return run_local(runs, runs_dir, jobs, a.dry_run)


if __name__ == "__main__":
    sys.exit(main())
