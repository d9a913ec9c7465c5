#!/usr/bin/env python
"""Regenerate docs/: every figure layout of scripts/analyze.py (and scripts/figures_dominance.py) from a tiny CPU sweep.

    python scripts/make_gallery.py            # about 10 minutes on two free CPU cores (--jobs 2), 18 on one
    python scripts/make_gallery.py --quick    # fewer steps (about 5 minutes on two cores), to check the pipeline

The sweep: two games (Breakout, Asterix), two seeds, and
- DQN (dqn_atari_hr.py): relu, tanh, hr_tanh (the ReLU runs set the baseline normalisation, tanh vs HR(tanh) fills
  the dormant-fraction table) -- HR v1 / v2 figures;
- PQN (pqn_atari_hr.py): relu vs hr_relu (PQN + HR; with --hadamax: relu vs hadamax, Hadamax-PQN, whose encoder
  trains at about 1 agent step/s on a CPU core) -- the Hadamax / HR v2 PQN layouts: median and IQM human-normalised
  score over frames, per-game bars;
- DrQ (drq_dmc_dominance.py; only when scripts/figures_dominance.py exists and not --no-dominance), for the dominance
  paper's figure layouts: cartpole-swingup, cartpole-balance_sparse_narrow and reacher-easy_masked (its reward
  unmasked after a tenth of the run) x none / lnwd / ln x two seeds, and one run each of HL-Gauss and LayerNorm
  switched on part-way on the masked reacher, LayerNorm switched on part-way and the ResNet-18 encoder on
  cartpole-balance_sparse_narrow.
A few thousand steps each: the numbers mean nothing, the figures show each layout. Runs go to --runs-dir (default: a
temporary directory, removed at the end unless --keep); a run already finished there is not trained again. Then
analyze.py (and figures_dominance.py) write to <runs-dir>/results, and the PNGs are copied to --docs (default docs/)
with docs/README.md, the gallery page listing each figure and the command that made it.
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GAMES = ("Breakout", "Asterix")  # short random-policy episodes: a few thousand steps hold complete games
SEEDS = (1, 2)
# one dense and one sparse task; --action-repeat 8 on both (jaxrl's for cartpole-swingup; the sparse task's default 2
# would need four times the agent steps)
DRQ_TASKS = ("cartpole-swingup", "cartpole-balance_sparse_narrow", "reacher-easy_masked")  # 1 dense, 2 sparse
DRQ_CONFIGS = ("none", "lnwd", "ln")

# what each figure shows (analyze.py's file stems; <algo> is appended)
DESCRIPTIONS = {
    "curves": "Median and IQM normalised score across games over training, 95% stratified-bootstrap bands (rliable). "
              "PQN: human-normalised over environment frames (HR v2 51-game curves, Hadamax Atari-57 curve).",
    "games": "Per-game learning curves: episode return, mean over seeds with standard-error band (HR v1).",
    "tasks": "Per-task evaluation-return curves, mean over seeds with standard-error band.",
    "final": "Per-game bars of the final normalised score, mean over seeds with standard error (Hadamax per-game bars).",
    "representation": "HR v2 Figure 2's layout: score, dormant fraction (KDE-peak test) and effective rank of `latent`.",
    "metrics": "HR v1 representation curves: dormant fraction by the KDE-peak test and by the ReDo score, effective "
               "rank, hidden bias of dormant neurons.",
    "aggregates": "Median, IQM, mean and optimality gap with 95% stratified-bootstrap CIs (rliable).",
    "profiles": "Performance profiles (rliable score distributions) with 95% CI bands.",
    "improvement": "Probability of improvement over the baseline configuration (rliable), 95% CI.",
    "dominance": "Largest activation score against return, srank and dormant share (dominance paper's Fig. 9).",
}


def sweep(quick: bool, with_drq: bool, hadamax: bool = False) -> list[tuple[str, str, list[str]]]:
    """[(script, run name, flags)] of the tiny sweep."""
    dqn_steps, pqn_steps, drq_frames = (800, 1536, 1600) if quick else (1500, 2048, 2000)
    runs = []
    for game in GAMES:
        for seed in SEEDS:
            for config, flags in (("relu", ["--activation", "relu"]), ("tanh", ["--activation", "tanh"]),
                                  ("hr_tanh", ["--activation", "tanh", "--hr"])):
                runs.append(("dqn_atari_hr.py", f"dqn__{game}__{config}__s{seed}", [
                    "--env-id", f"{game}NoFrameskip-v4", "--exp-name", config, "--seed", str(seed), *flags,
                    "--total-timesteps", str(dqn_steps), "--learning-starts", str(dqn_steps // 4),
                    "--buffer-size", "5000", "--metrics-every", str(dqn_steps // 4), "--metrics-batch", "256"]))
            for config, flags in (("relu", []), ("hadamax", ["--encoder", "hadamax"]) if hadamax else
                                  ("hr_relu", ["--hr"])):
                runs.append(("pqn_atari_hr.py", f"pqn__{game}__{config}__s{seed}", [
                    "--env-id", f"{game}-v5", "--exp-name", config, "--seed", str(seed), *flags,
                    "--total-timesteps", str(pqn_steps), "--num-envs", "4", "--num-steps", "32",
                    "--num-minibatches", "4", "--metrics-every", str(pqn_steps // 4), "--metrics-batch", "128"]))
    if with_drq:
        agent_steps = drq_frames // 8  # every DrQ run at action repeat 8
        mask = agent_steps // 10  # reacher-easy_masked: the critic's reward unmasked after this many gradient steps
        lifted = agent_steps - 50 + mask  # learning starts at agent step agent_steps - 50: the first unmasked update

        def drq(task, config, seed, *flags):
            runs.append(("drq_dmc_dominance.py", f"drq__{task}__{config}__s{seed}", [
                "--env-id", task, "--exp-name", config, "--seed", str(seed), *flags, "--action-repeat", "8",
                "--total-timesteps", str(drq_frames), "--learning-starts", str(agent_steps - 50),
                "--reward-mask-steps", str(mask), "--batch-size", "32", "--buffer-size", "5000",
                "--eval-every", str(drq_frames // 2), "--eval-episodes", "1", "--metrics-every", str(drq_frames // 10),
                "--metrics-batch", "128"]))

        for task in DRQ_TASKS:  # the main grid: Figs. 2, 3, 5-9, 13-15
            for seed in SEEDS:
                for config in DRQ_CONFIGS:
                    drq(task, config, seed, "--mitigation", config)
        drq("reacher-easy_masked", "hlgauss", 1, "--mitigation", "hlgauss")  # Fig. 11
        drq("reacher-easy_masked", "ln_switch", 1, "--mitigation", "none", "--ln-from-step", str(lifted))  # Fig. 10
        drq("cartpole-balance_sparse_narrow", "ln_switch", 1, "--mitigation", "none",
            "--ln-from-step", str(agent_steps - 25))  # Fig. 16
        drq("cartpole-balance_sparse_narrow", "resnet18", 1, "--mitigation", "none", "--encoder", "resnet18")  # Fig. 12
    return runs


def train(work: str, runs, jobs: int) -> list[str]:
    """Run the sweep in work/runs (jobs at a time); a run already finished is skipped. Returns the failed runs."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    todo = [r for r in runs if not os.path.exists(os.path.join(work, "runs", r[1], "finished"))]
    print(f"{len(runs)} runs, {len(runs) - len(todo)} already finished, {jobs} at a time", flush=True)
    running, failed = [], []
    os.makedirs(os.path.join(work, "logs"), exist_ok=True)
    while todo or running:
        while todo and len(running) < jobs:
            script, name, flags = todo.pop(0)
            if os.path.isdir(os.path.join(work, "runs", name)):  # a broken earlier try: start it again
                shutil.rmtree(os.path.join(work, "runs", name))
            log = open(os.path.join(work, "logs", f"{name}.log"), "w")
            cmd = [sys.executable, os.path.join(REPO, script), "--run-name", name, "--no-cuda", *flags]
            running.append((name, subprocess.Popen(cmd, cwd=work, stdout=log, stderr=subprocess.STDOUT, env=env),
                            log, time.time()))
        time.sleep(1)
        for item in list(running):
            name, proc, log, t0 = item
            if proc.poll() is not None:
                log.close()
                running.remove(item)
                print(f"  {name}: {'ok' if proc.returncode == 0 else f'FAILED (exit {proc.returncode})'} "
                      f"in {time.time() - t0:.0f}s", flush=True)
                if proc.returncode != 0:
                    failed.append(name)
    return failed


# The head of docs/README.md: the documentation's index, above the gallery this script draws
INDEX = ["# Documentation", "",
         "[Back to the README](../README.md). One page per training script, each with the same eight sections "
         "(overview, usage, implemented variants, logged metrics, implementation details, fidelity, cost, results):",
         "",
         "| page | what it covers |", "|---|---|",
         "| [dqn_atari_hr.md](dqn_atari_hr.md) | DQN on Atari, every network variant of the HR papers |",
         "| [ppo_atari_hr.md](ppo_atari_hr.md) | PPO on Atari (envpool), HR on the shared representation |",
         "| [pqn_atari_hr.md](pqn_atari_hr.md) | PQN on Atari (official recipe), HR, Hadamax, CReLU, ReDo |",
         "| [drq_dmc_dominance.md](drq_dmc_dominance.md) | DrQ on pixel DMC, the neuron-dominance paper and its "
         "figures |",
         "| [simbav2_dmc_hr.md](simbav2_dmc_hr.md) | SimbaV2 on state-based control, HR and its widen |",
         "| [mrq_dmc_hr.md](mrq_dmc_hr.md) | MR.Q on DMC-Visual, HR on the encoder and its widen |",
         "| [running.md](running.md) | runs/, resume and checkpoints, sweeps (local, SLURM), analysis, benchmarks, "
         "GPU fast paths, checking a GPU, tests |",
         "| [bad-input.md](bad-input.md) | every refusal, as the tests run it |", "",
         "The figures below are drawn from a tiny CPU sweep; the dominance paper's are in "
         "[their section](#scriptsfigures_dominancepy-the-neuron-dominance-papers-figures-drq).", ""]


def gallery_page(docs: str, sections: list[tuple[str, str, list[str]]]) -> str:
    lines = [*INDEX, "# Figure gallery", "",
             "Every figure layout the analysis scripts draw, from a tiny CPU sweep (two games, two seeds, a few "
             "thousand steps): the numbers mean nothing, the layouts are those a full sweep gets. Regenerate with",
             "", "    python scripts/make_gallery.py", "",
             "which trains the sweep, runs the commands below and copies the PNGs here (the analysis also writes "
             "PDFs and the tables, not kept here). The sweep: Breakout and Asterix, seeds 1 and 2; DQN relu / tanh "
             "/ hr_tanh; PQN relu / hr_relu (PQN + HR stands in for Hadamax-PQN, whose encoder trains at about one "
             "agent step per second on a CPU core; `--hadamax` uses it); DrQ none / lnwd / ln on cartpole-swingup, "
             "cartpole-balance_sparse_narrow and reacher-easy_masked plus single HL-Gauss, LayerNorm-switch and "
             "ResNet-18 runs for the dominance figures. See "
             "[running.md](running.md#analysis-from-runs-to-the-papers-tables-and-figures) for what each file holds in "
             "a real sweep.", ""]
    for title, command, pngs in sections:
        lines += [f"## {title}", "", f"    {command}", ""]
        for png in pngs:
            stem = os.path.splitext(os.path.basename(png))[0]
            desc = DESCRIPTIONS.get(stem.rsplit("_", 1)[0], "")
            lines += [f"### `{stem}`", "", desc, "", f"![{stem}]({os.path.relpath(png, docs)})", ""]
    path = os.path.join(docs, "README.md")
    with open(path, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=type(
        "F", (argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter), {}))
    p.add_argument("--quick", action="store_true", help="fewer steps (checks the pipeline)")
    p.add_argument("--runs-dir", default=None,
                   help="working directory (its runs/ holds the sweep); None: a temporary one")
    p.add_argument("--keep", action="store_true", help="keep the temporary working directory")
    p.add_argument("--docs", default=os.path.join(REPO, "docs"), help="where the PNGs and README.md go")
    p.add_argument("--jobs", type=int, default=2, help="training runs at a time (one CPU thread each)")
    p.add_argument("--no-dominance", action="store_true", help="skip the DrQ sweep and figures_dominance.py")
    p.add_argument("--hadamax", action="store_true",
                   help="PQN's second configuration is Hadamax-PQN (--encoder hadamax) instead of PQN + HR: the "
                        "real Hadamax layout, but its encoder trains at about 1 agent step/s on one CPU core")
    p.add_argument("--skip-train", action="store_true", help="only analyse the runs already in --runs-dir")
    a = p.parse_args(argv)
    dominance = os.path.exists(os.path.join(REPO, "scripts", "figures_dominance.py")) and not a.no_dominance
    work = os.path.abspath(a.runs_dir) if a.runs_dir else tempfile.mkdtemp(prefix="gallery_")
    os.makedirs(work, exist_ok=True)
    t0 = time.time()
    try:
        if not a.skip_train:
            failed = train(work, sweep(a.quick, dominance, a.hadamax), a.jobs)
            if failed:
                print(f"warning: {len(failed)} runs failed (logs in {work}/logs): {', '.join(failed)}",
                      file=sys.stderr)
        runs = os.path.join(work, "runs")
        results = os.path.join(work, "results")
        shutil.rmtree(results, ignore_errors=True)
        analyze_cmd = ["scripts/analyze.py", "RUNS", "--out", "results", "--reps", "500", "--curve-reps", "100",
                       "--curve-points", "5", "--dpi", "150"]
        subprocess.run([sys.executable, os.path.join(REPO, analyze_cmd[0]), runs, "--out", results,
                        *analyze_cmd[4:]], check=True, cwd=REPO)
        if os.path.isdir(a.docs):
            for old in glob.glob(os.path.join(a.docs, "**", "*.png"), recursive=True):
                os.remove(old)
        os.makedirs(a.docs, exist_ok=True)
        sections = []
        pngs = []
        for png in sorted(glob.glob(os.path.join(results, "*.png"))):
            pngs.append(shutil.copy(png, a.docs))
        sections.append(("scripts/analyze.py: HR v1, HR v2 and Hadamax layouts (every algorithm in the sweep)",
                         "python " + " ".join(analyze_cmd).replace("RUNS", "runs"), pngs))
        if dominance and glob.glob(os.path.join(runs, "drq__*")):
            dom_out = os.path.join(results, "dominance")
            cmd = ["scripts/figures_dominance.py", "RUNS", "--out", "results/dominance", "--configs", *DRQ_CONFIGS,
                   "--reps", "500"]
            r = subprocess.run([sys.executable, os.path.join(REPO, cmd[0]), runs, "--out", dom_out, *cmd[4:]],
                               cwd=REPO, env={**os.environ, "PLOTS_DPI": "150"})
            if r.returncode == 0:
                os.makedirs(os.path.join(a.docs, "dominance"), exist_ok=True)
                dpngs = [shutil.copy(png, os.path.join(a.docs, "dominance"))
                         for png in sorted(glob.glob(os.path.join(dom_out, "*.png")))]
                sections.append(("scripts/figures_dominance.py: the neuron-dominance paper's figures (DrQ)",
                                 "PLOTS_DPI=150 python " + " ".join(cmd).replace("RUNS", "runs"), dpngs))
            else:
                print("warning: figures_dominance.py failed; its figures are not in the gallery", file=sys.stderr)
        page = gallery_page(a.docs, sections)
        print(f"wrote {page} and {sum(len(s[2]) for s in sections)} figures in {time.time() - t0:.0f}s")
    finally:
        if not a.runs_dir and not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
