"""One prepared GPU check: the fast paths (torch.compile, CUDA graphs, pinned uploads) proven and timed on one GPU.

What it checks, per part (one device command each; docs/running.md "Checking a GPU"): the items of ITEMS below, in
that order. 1. equivalence: every training script runs a few hundred updates from the same seed twice, with the fast
paths (--compile auto --cudagraphs auto: on with CUDA) and without; the losses (TensorBoard events) and the
parameters after them (the --save-model file) must agree within tolerances justified below, the fast run must say it
used the fast paths, and any `warning:` fallback line fails the check. 2-8, on tiny budgets beside it:
equivalence+, cpu, resume, variants, snapshots, syncs, determinism. 9. speed: steady-state SPS with metrics on and
off for the default recipes (scripts/bench.py's full mode with short budgets), the envpool ceiling on the machine's
cores, peak GPU memory, and the ratios against the GPU targets (PQN >= 80% of the envpool ceiling, Hadamax <= 2x
PQN's time, PPO >= 5,000 SPS, DQN >= 1,000 SPS with metrics on). 10. probe: PQN on Breakout for a fixed wall-clock
time, its return curve printed (a broken update is a flat line). Then one markdown report (bench/GPU_RESULTS.md's
format) in --out-dir, with pass/fail per item, plus the results as JSON and the runs' logs.

Parts: `atari` (dqn, ppo, pqn; the probe), `dmc` (drq and the other dm_control scripts), `all` (both). Each part keeps
to its --deadline (seconds from start): the equivalence runs and the probe share the machine first (nothing is timed
there), then the speed runs go one at a time in priority order; one that would not fit is reported as skipped.
Training scripts are found by name (`*_hr.py`, `drq_*.py` in the repository root) and configured in SCRIPTS below,
one line each; a script without a line is reported as not checked (a failure), a line without its script as absent.

The dry run's equivalence and item runs are processes forked from a server per script that imported its modules once
(scripts/forks.py; --fresh-processes: not), the same runs without seconds of imports each; a GPU check always starts
fresh processes (no fork after CUDA is initialised; its runs are timed).

    python scripts/gpu_check.py --dry-run                # the CPU: tiny budgets, same code paths (gpu_check_out/)
    python scripts/gpu_check.py --part atari --out-dir $OUT   # on the GPU machine (the device commands below)
    python scripts/gpu_check.py --plan --part all        # print every command the GPU check would run, run nothing
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import glob
import io
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (scripts/bench.py: budgets, one measured run, the speed table)

REPO = bench.REPO

# ---------------------------------------------------------------------------------------------------------------
# Tolerances of the equivalence check (item 1), and why.
#
# Both runs start from the same parameters (same seed; initialised on the CPU, then moved) and, by construction of
# the flags below, see the same data: DQN and PQN act uniformly at random (--start-e 1 --end-e 1), so their data
# never depend on the network; PPO samples its actions and DrQ adds Gaussian noise to its actor's, with the same
# random numbers in both runs (torch.compile's own RNG is switched to eager's: EQUIV_SITE below). What still differs:
#   - rounding: the compiled kernels fuse elementwise work and reorder sums (fp32: ~1e-7 relative per op); convs run
#     in TF32 in both runs (cuDNN's default, allow_tf32), ~5e-4 relative (unit roundoff 2**-11) if compile ends up
#     with another conv algorithm; matmuls stay fp32 (PyTorch's default, the scripts do not change it);
#   - atomics: the backward of gather / index (scatter-add with atomicAdd on CUDA) sums in a different order on every
#     call, so even two plain CUDA runs differ at the 1e-7 level;
#   - amplification: Adam / RAdam divide by the root of the second moment, so a rounding difference in a gradient
#     near zero becomes a parameter difference of order lr, and differences grow as training goes on; a sampled
#     action whose two best Gumbel-perturbed logits are within rounding of each other (PPO), or a continuous action
#     fed through MuJoCo (DrQ), can make one environment's trajectory differ from then on.
# Hence three measures, each with room for the above and far below what a broken fast path gives:
#   FIRST_LOSS_TOL: |fast - plain| / (typical |plain|) of each compared loss at the first logged point (the first
#     updates, same data, same start): rounding plus TF32 only, 1e-3 (2x TF32's unit roundoff).
#   loss_tol: the median of the same over all logged points: default 2% (5% where trajectories can part: PPO and
#     the continuous-control scripts).
#   param_tol: ||theta_fast - theta_plain|| / ||theta_plain - theta_init||, the difference after the run as a share
#     of how far training moved the parameters. theta_init comes from a reference run of the same seed that stops
#     before it changes anything: fewer steps than learning starts, or (PPO, PQN, which always update) one rollout of
#     one or two steps with --learning-rate 1e-30 (the network's initialisation does not depend on the number of
#     envs; checked on the CPU: equal to 1e-29). Default 5%; 15% for PQN, PPO and the dm_control scripts.
#   Calibration (this project's 2-core CPU, --compile on against --compile off, flags as below, eager's random
#   numbers): DQN after 400 updates: losses first 3e-8, median 5e-8, max 4e-4; parameters 0.7% of their movement.
#   PQN after 256 gradient steps (16 envs x 32 steps, 16 minibatches a rollout): losses first 0, median 2e-4, max
#   4e-3; parameters 4.5% of their movement, spread evenly over every layer (3-5% each): rounding differences grow
#   through RAdam on LayerNorm'd layers, so PQN gets 3x that as its tolerance. A stale input of a CUDA graph, a
#   learning rate that never reaches the graph (a schedule stuck at its first value alone doubles PQN's movement), an
#   optimizer step outside the capture or a target network read from a copy each give ratios of order 1, and loss
#   differences far above 2% within a few logged points.
FIRST_LOSS_TOL = 1e-3
LOSS_TOL = 0.02
PARAM_TOL = 0.05
FAST = "--compile auto --cudagraphs auto"  # auto = on with CUDA (what a user gets), off on the CPU of --dry-run
PLAIN = "--compile off --cudagraphs off"


@dataclasses.dataclass(frozen=True)
class Check:
    """How one training script is checked. Flag strings: a flag written `?--name` is dropped (with its values) when
    the script has no such flag (for scripts whose flags are not settled yet)."""
    part: str  # the device command that checks it: "atari" or "dmc"
    equiv: str  # flags of both equivalence runs (a few hundred updates; --save-model --seed 1 are added)
    ref: str  # the movement reference: "init:FLAGS" (a run that changes nothing: its saved model = the initial
    #           parameters; FLAGS override equiv), or "checkpoint" (runs/NAME/checkpoint.pt, which the run keeps,
    #           at --checkpoint-every: for a script that cannot stop before its first update)
    dry: str  # equiv's flags for --dry-run (tiny, CPU)
    dry_sps: str  # --dry-run speed runs: "WARM-UP WINDOW flags" (steps or frames after learning starts)
    losses: str = ""  # loss tags compared (space-separated); "" = every losses/* tag
    param_tol: float = PARAM_TOL
    loss_tol: float = LOSS_TOL
    sps: str = ""  # extra flags of the speed runs (bench.py's full budget times sps_scale, default recipe otherwise)
    sps_scale: float = 0.1
    sps_budget: str = ""  # "WARM-UP WINDOW" for scripts bench.py does not know (its full budget otherwise)
    hadamax: bool = False  # also time --encoder hadamax (metrics off) against the default (the Hadamax target)
    graphs: bool = True  # the script has CUDA graphs (the fast run must report cudagraphs on), else compile only
    unit: str = "steps"  # what --total-timesteps counts
    # items 2-6 run on `dry`'s tiny budgets, on the device:
    ckpt: str = ""  # resume: the checkpoint cadence of the killed-and-resumed run (two checkpoints before the end, the
    #               second after learning starts: the optimizer state is saved and restored)
    variants: tuple = ()  # every-variant: flag sets, each run once (their flags, with every value of a choice flag,
    #                       must cover the script's switches: tests/test_gpu_check.py reads them from its Args)
    same_data: bool = False  # CPU vs CUDA: True when both see the same data (the host RNG drives every draw)
    pixels: bool = True  # dm_control scripts: renders (needs MuJoCo's renderer; SimbaV2's state tasks do not)
    reads: str = "1"  # host syncs: action reads per loop iteration, "1" or the flag that gives them (--num-steps)
    more: tuple = ()  # equivalence on `dry`'s budgets too: (label, flags) pairs, fast vs plain with those flags (the
    #                   Hadamax encoder, greedy acting, the evaluation functions); "graphs" (CUDA graphs without
    #                   compile) is added for every script with graphs


# One line per training script. Keys: the file names `*_hr.py` / `drq_*.py` in the repository root.
# fmt: off
SCRIPTS = {  # noqa: E501
    "dqn_atari_hr.py": Check("atari", "--total-timesteps 2600 --learning-starts 1000 --buffer-size 10000 --start-e 1 --end-e 1 --metrics-every 0 --checkpoint-every 0 --eval-episodes 0", "init:--total-timesteps 1", "--total-timesteps 400 --learning-starts 100 --buffer-size 1000 --batch-size 8 --start-e 1 --end-e 1 --metrics-every 0 --checkpoint-every 0 --eval-episodes 0", "1 100 --learning-starts 100 --buffer-size 1000 --batch-size 8 --metrics-batch 64", losses="losses/td_loss losses/q_values", sps="--learning-starts 5000",
                             ckpt="--checkpoint-every 150", same_data=True,
                             more=(("hadamax", "--encoder hadamax"), ("greedy", "--start-e 0 --end-e 0 --save-model --eval-episodes 1 --eval-epsilon 0")),
                             variants=("--metrics-every 150 --metrics-batch 32 --activation tanh --hr --hr-layers all --hr-branches 3 --combine sum --hidden-layers 2 --layernorm --conv-activation gelu --save-model --eval-episodes 1 --eval-epsilon 0.0",
                                       "--activation crelu --hr")),
    "ppo_atari_hr.py": Check("atari", "--total-timesteps 20480 --checkpoint-every 0 --metrics-every 0 --eval-episodes 1", "init:--num-envs 1 --num-steps 2 --num-minibatches 1 --update-epochs 1 --total-timesteps 2 --learning-rate 1e-30", "--num-envs 2 --num-steps 16 --num-minibatches 2 --update-epochs 2 --total-timesteps 128 --checkpoint-every 0 --metrics-every 0 --eval-episodes 1", "32 64 --num-envs 2 --num-steps 16 --num-minibatches 2 --update-epochs 1 --metrics-batch 32", losses="losses/value_loss losses/policy_loss losses/entropy", param_tol=0.15, loss_tol=0.05,
                             ckpt="--checkpoint-every 32", reads="--num-steps",
                             more=(("hadamax", "--encoder hadamax"), ("eval", "--save-model --eval-episodes 1")),
                             variants=("--metrics-every 64 --metrics-batch 16 --activation tanh --hr --hr-layers all --hr-branches 3 --combine sum --hidden-layers 2 --layernorm --conv-activation gelu --no-anneal-lr --no-norm-adv --no-clip-vloss --target-kl 0.5",
                                       "--activation crelu --hr")),
    "pqn_atari_hr.py": Check("atari", "--total-timesteps 32768 --start-e 1 --end-e 1 --checkpoint-every 0 --metrics-every 0", "init:--num-envs 1 --num-steps 1 --num-minibatches 1 --update-epochs 1 --total-timesteps 1 --learning-rate 1e-30", "--num-envs 8 --num-test-envs 2 --num-steps 16 --num-minibatches 4 --update-epochs 1 --total-timesteps 512 --start-e 1 --end-e 1 --checkpoint-every 0 --metrics-every 0 --torch-threads 1", "128 256 --num-envs 8 --num-test-envs 2 --num-steps 16 --num-minibatches 4 --update-epochs 1 --metrics-batch 64 --torch-threads 1", losses="losses/td_loss losses/q_values", param_tol=0.15, hadamax=True,
                             ckpt="--checkpoint-every 128", reads="--num-steps",
                             more=(("hadamax", "--encoder hadamax"), ("greedy", "--start-e 0 --end-e 0")),
                             variants=("--metrics-every 256 --metrics-batch 32 --activation tanh --hr --hr-layers last --hr-branches 3 --combine sum --hidden-layers 2 --no-layernorm --conv-activation gelu --no-anneal-lr --save-model",
                                       "--activation crelu --redo --redo-interval 1 --no-redo-reset-optimizer --metrics-batch 64")),
    "drq_dmc_dominance.py": Check("dmc", "--env-id cartpole-swingup --total-timesteps 6400 --learning-starts 200 --buffer-size 10000 --log-every 200 --eval-every 0 --metrics-every 0 --checkpoint-every 0", "init:--total-timesteps 8", "--env-id cartpole-swingup --total-timesteps 320 --learning-starts 10 --batch-size 8 --buffer-size 500 --log-every 16 --eval-every 0 --metrics-every 0 --checkpoint-every 0", "8 32 --env-id cartpole-swingup --learning-starts 10 --batch-size 8 --buffer-size 500 --log-every 8 --eval-every 0 --checkpoint-every 0 --metrics-batch 16", losses="losses/qf_loss losses/actor_loss losses/qf1_values", param_tol=0.15, loss_tol=0.05, sps_scale=0.25, unit="frames",
                             ckpt="--checkpoint-every 104", more=(("eval", "--eval-every 160 --eval-episodes 1"),),
                             variants=("--metrics-every 160 --metrics-batch 16 --mitigation ln --hr --eval-every 160 --eval-episodes 1 --save-model",
                                       "--mitigation lnwd --ln-from-step 20", "--mitigation hlgauss --hl-target-entropy",
                                       "--mitigation reset --reset-every 20", "--mitigation redo --redo-every 5",
                                       "--mitigation prune --prune-every 5 --prune-distribution uniform",
                                       "--encoder resnet18 --image-size 64")),
    "simbav2_dmc_hr.py": Check("dmc", "--env-id cartpole-swingup --total-timesteps 1400 --learning-starts 1000 --buffer-size 10000 --log-every 50 --eval-every 0 --metrics-every 0 --checkpoint-every 0", "init:--total-timesteps 2", "--env-id cartpole-swingup ?--critic-hidden-dim 16 ?--actor-hidden-dim 8 --batch-size 16 --total-timesteps 240 --learning-starts 100 --buffer-size 1000 --log-every 10 --eval-every 0 --metrics-every 0 --checkpoint-every 0", "20 40 --env-id cartpole-swingup ?--critic-hidden-dim 16 ?--actor-hidden-dim 8 --batch-size 16 --learning-starts 200 --buffer-size 1000 --log-every 10 --eval-every 0 --checkpoint-every 0 --metrics-batch 32", losses="losses/qf_loss losses/actor_loss losses/qf1_values", param_tol=0.15, loss_tol=0.05, sps="--learning-starts 2000 --log-every 100 --eval-every 0 --checkpoint-every 0", sps_scale=1.0, sps_budget="500 3000", graphs=False, unit="frames", pixels=False,
                             ckpt="--checkpoint-every 80",
                             more=(("eval", "--eval-every 240 --eval-episodes 1"),),
                             variants=("--metrics-every 240 --metrics-batch 16 --hr --hr-networks critic --hr-scaler shared --kde-scale raw --cdq on --no-normalize-observation --no-normalize-reward --eval-every 240 --eval-episodes 1 --save-model",
                                       "--widen --hr-networks both --cdq off")),
    "mrq_dmc_hr.py": Check("dmc", "--env-id cartpole-swingup --total-timesteps 1600 --learning-starts 1000 --buffer-size 10000 ?--target-update-freq 100 --log-every 50 --eval-every 0 --metrics-every 0 --checkpoint-every 0", "init:--total-timesteps 2", "--env-id cartpole-swingup --batch-size 8 ?--target-update-freq 5 ?--zs-dim 32 ?--za-dim 16 ?--zsa-dim 32 ?--enc-hdim 32 ?--value-hdim 32 ?--policy-hdim 32 --buffer-size 200 --learning-starts 60 --total-timesteps 120 --log-every 20 --eval-every 0 --metrics-every 0 --checkpoint-every 0", "20 40 --env-id cartpole-swingup --batch-size 8 ?--target-update-freq 5 ?--zs-dim 32 ?--za-dim 16 ?--zsa-dim 32 ?--enc-hdim 32 ?--value-hdim 32 ?--policy-hdim 32 --buffer-size 200 --learning-starts 60 --log-every 20 --eval-every 0 --checkpoint-every 0 --metrics-batch 8", losses="losses/value_loss losses/policy_loss losses/encoder_loss", param_tol=0.15, loss_tol=0.05, sps="--learning-starts 2000 --log-every 100 --eval-every 0 --checkpoint-every 0", sps_scale=1.0, sps_budget="300 1500", graphs=False, unit="frames",
                             ckpt="--checkpoint-every 40",
                             more=(("eval", "--eval-every 120 --eval-episodes 1"),),
                             variants=("--metrics-every 120 --metrics-batch 8 --hr --hr-layers all --eval-every 120 --eval-episodes 1 --save-model",
                                       "--widen")),
}
# fmt: on
SCRIPT_GLOBS = ("*_hr.py", "drq_*.py")

# item 10: the learning probe (part atari), stopped with SIGTERM after --probe-seconds; its events survive (the harness
# closes TensorBoard on SIGTERM). 2M steps: epsilon decays over the first 200k, so the curve rises within the probe.
PROBE_SCRIPT = "pqn_atari_hr.py"
PROBE = "--env-id Breakout-v5 --total-timesteps 2000000 --metrics-every 0 --checkpoint-every 0"
# --dry-run: a budget no CPU finishes within the probe's seconds, so the SIGTERM stop is what ends it, as on a GPU
PROBE_DRY = ("--env-id Breakout-v5 --num-envs 8 --num-test-envs 2 --num-steps 16 --num-minibatches 4 --update-epochs 1 "
             "--total-timesteps 1048576 --metrics-every 0 --checkpoint-every 0 --torch-threads 1")

# item 9: the GPU targets, as (name, script key, value(rows) -> float, target, higher is better)
def _at_default(row: Optional[dict]) -> Optional[float]:
    """SPS with metrics on at the script's default probe cadence: measured, or projected when the window was too
    short for it (bench.py's `on / off at default cadence`)."""
    if not row:
        return None
    if not row.get("scaled"):
        return row.get("sps_on")
    return row["sps_off"] * row["projected"] if row.get("sps_off") and row.get("projected") else None


def _hadamax_time(rows: dict) -> Optional[float]:
    base, had = rows.get("pqn"), rows.get("pqn/hadamax")
    if not base or not had or not base.get("sps_off") or not had.get("sps_off"):
        return None
    return base["sps_off"] / had["sps_off"]  # Hadamax's time per step over PQN's (metrics off, same budget)


TARGETS = [
    ("PQN >= 80% of the envpool ceiling (metrics on, default cadence)", "pqn",
     lambda rows: (rows.get("pqn") or {}).get("pct_ceiling"), 0.80, True),
    ("Hadamax <= 2x PQN's time per step (metrics off)", "pqn", _hadamax_time, 2.0, False),
    ("PPO >= 5,000 SPS (metrics on, default cadence)", "ppo", lambda rows: _at_default(rows.get("ppo")), 5000.0, True),
    ("DQN >= 1,000 SPS (metrics on, default cadence)", "dqn", lambda rows: _at_default(rows.get("dqn")), 1000.0, True),
]

# per part: seconds from start to the report (the device command's timeout_s leaves ~30 s above it), the share the
# equivalence phase (with the probe beside it) may take, and the probe's wall-clock time
PARTS = {"atari": {"deadline": 420, "equiv": 250, "probe": 150},
         "dmc": {"deadline": 300, "equiv": 220, "probe": 0},
         "all": {"deadline": 570, "equiv": 330, "probe": 150}}
DRY = {"deadline": 900, "equiv": 700, "probe": 25}  # a safety net: the rehearsal runs everything
SPS_RUN_ESTIMATE = {"gpu": 40.0, "dry": 12.0}  # seconds one speed run takes (start-up and compile included)
REPORT_RESERVE = 15.0  # seconds kept for the report and the log archive

# The device commands (docs/running.md "Checking a GPU"): what `run` gets as command, carry and timeout_s.
INSTALL = ("python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "
           ".whl/{part}/*.whl && export PYTHONPATH=/tmp/site || exit; ")
EGL = ("(ldconfig -p | grep -q libEGL.so.1 && ldconfig -p | grep -q libOpenGL.so.0) || { for f in .gl/*.deb; do "
       "dpkg -x $f /; done; ldconfig; }; v=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json; [ -f $v ] && "
       "export __EGL_VENDOR_LIBRARY_FILENAMES=$v; export MUJOCO_GL=egl; ")
CHECK = "PYTHONUNBUFFERED=1 python3 scripts/gpu_check.py --part {part} --out-dir $OUT"
DEVICE_CALLS = {
    "atari": {"carry": [".whl/atari"], "timeout_s": 450, "command": INSTALL.format(part="atari") +
              CHECK.format(part="atari")},
    "dmc": {"carry": [".whl/dmc", ".gl"], "timeout_s": 330, "command": EGL + INSTALL.format(part="dmc") +
            CHECK.format(part="dmc")},
}


def device_calls_text() -> str:
    lines = ["device commands (first, here: bash scripts/gpu_wheels.sh; then one `run` call each, back to back):"]
    for part, call in DEVICE_CALLS.items():
        lines += [f"  {part}: carry {json.dumps(call['carry'])}, timeout_s {call['timeout_s']}",
                  f"    {call['command']}"]
    return "\n".join(lines)


# torch.compile draws its random numbers with its own generator unless told otherwise: the equivalence runs get
# eager's (torch._inductor.config.fallback_random), so both runs act on the same random numbers (checked on the CPU:
# PQN's compiled and eager runs then play the same episodes). torch.randint inside a compiled function then becomes a
# graph break (dynamo logs it; it runs eagerly, inside the CUDA graph where there is one): the equivalence runs check
# everything compiled except the random draws, whose stream differs by design. Put on PYTHONPATH for those runs only;
# it runs a sitecustomize it shadows, if any.
EQUIV_SITE = '''"""Written by scripts/gpu_check.py for its equivalence runs: torch.compile draws eager's random numbers.
"""
import importlib.util as _u
import os as _os
import sys as _sys

_here = _os.path.dirname(_os.path.abspath(__file__))
for _p in _sys.path:
    _f = _os.path.join(_p or ".", "sitecustomize.py")
    if _os.path.abspath(_p or ".") != _here and _os.path.isfile(_f):
        _spec = _u.spec_from_file_location("_gpu_check_shadowed_sitecustomize", _f)
        _spec.loader.exec_module(_u.module_from_spec(_spec))
        break
import torch._inductor.config as _inductor_config  # noqa: E402

_inductor_config.fallback_random = True
'''


# ---------------------------------------------------------------------------------------------------------------
# Flags


def split_flags(text: str) -> list:
    """'--a 1 ?--b 2 3 --c' -> [('--a', ['1'], False), ('--b', ['2', '3'], True), ('--c', [], False)]."""
    out = []
    for tok in shlex.split(text):
        if tok.startswith("--") or tok.startswith("?--"):
            out.append((tok.lstrip("?"), [], tok.startswith("?")))
        elif out:
            out[-1][1].append(tok)
        else:
            raise ValueError(f"flag string {text!r} does not start with a flag")
    return out


def resolve_flags(text: str, available: Optional[set] = None, *overrides: str) -> list:
    """The argv of a flag string: optional flags the script lacks dropped (`available` = its flags, script_flags;
    None = keep all), then each override string's flags replacing earlier occurrences of the same flag."""
    merged: dict = {}
    for part in (text, *overrides):
        for name, values, optional in split_flags(part):
            if optional and available is not None and name not in available:
                continue
            merged.pop(name, None)
            merged[name] = values
    return [tok for name, values in merged.items() for tok in (name, *values)]


_FLAGS: dict = {}
_FLAGS_LOCK = threading.Lock()


def script_flags(file: str, repo: str = REPO) -> dict:
    """{flag: default} of a training script's command line, read from its source: the fields of its `Args` dataclass
    (a bool field also gives --no-NAME). Reading the file imports nothing of it and costs no interpreter start; a
    script without such a class falls back to its --help. Cached."""
    path = os.path.join(repo, file)
    with _FLAGS_LOCK:
        if path not in _FLAGS:
            _FLAGS[path] = _flags_from_source(path)
            if not _FLAGS[path]:
                _FLAGS[path] = _flags_from_help(path)
        return _FLAGS[path]


def _flags_from_source(path: str) -> dict:
    import ast

    try:
        with open(path) as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError):
        return {}
    flags = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "Args":
            for st in node.body:
                if isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name):
                    name = "--" + st.target.id.replace("_", "-")
                    try:
                        flags[name] = ast.literal_eval(st.value) if st.value is not None else None
                    except ValueError:
                        flags[name] = None
                    if isinstance(st.annotation, ast.Name) and st.annotation.id == "bool":
                        flags["--no-" + name[2:]] = None
    return flags


def _flags_from_help(path: str) -> dict:
    try:
        proc = subprocess.run([sys.executable, path, "--help"], capture_output=True, text=True, timeout=180,
                              cwd=tempfile.gettempdir())
        text = proc.stdout + proc.stderr
    except (OSError, subprocess.SubprocessError):
        return {}
    flags = {}
    for m in re.finditer(r"^\s*(--[a-z0-9][a-z0-9-]*)\b(.*?)(?=^\s*--|\Z)", text, re.S | re.M):
        d = re.search(r"\(default: (-?\d+)\)", m.group(2))
        flags[m.group(1)] = int(d.group(1)) if d else None
    return flags


# ---------------------------------------------------------------------------------------------------------------
# Discovery


def key_of(file: str) -> str:
    return os.path.basename(file).split("_")[0]


def discover(repo: str = REPO) -> list:
    """Training scripts in the repository root: `*_hr.py` and `drq_*.py`."""
    found = {os.path.basename(f) for g in SCRIPT_GLOBS for f in glob.glob(os.path.join(repo, g))}
    return sorted(found)


def plan_scripts(part: str, keys: Optional[list], repo: str = REPO) -> dict:
    """{'check': [files to check], 'unconfigured': [files without a SCRIPTS line], 'absent': [lines without a file]}
    for the part (all = every part) and the --scripts keys (None = all)."""
    found = discover(repo)
    want = (lambda f: keys is None or key_of(f) in keys)
    in_part = (lambda f: part == "all" or SCRIPTS[f].part == part)
    return {"check": [f for f in found if f in SCRIPTS and in_part(f) and want(f)],
            "unconfigured": [f for f in found if f not in SCRIPTS and want(f)],
            "absent": [f for f in SCRIPTS if f not in found and in_part(f) and want(f)]}


# ---------------------------------------------------------------------------------------------------------------
# Running children


WARNING_RE = re.compile(r"^warning:.*$", re.M)
# A fallback line: a fast path gave up and the run went on without it (the harness's `warning: torch.compile of X
# failed (...); running it eagerly` and `warning: CUDA-graph capture of X failed (...); running it eagerly`, or any
# script's own words for the same). Each fails the check. Other `warning:` lines (about flags the check sets on
# purpose, e.g. `--eval-episodes 0`) are listed in the report and fail nothing.
FALLBACK_RE = re.compile(r"eager|fall(s|ing)? ?back|compil|cuda.?graph|graph capture|capture of|inductor|dynamo|"
                         r"triton|pinned|capturable", re.I)


def warnings_in(text: str) -> list:
    """The fallback `warning:` lines of a run's output."""
    return [w for w in WARNING_RE.findall(text or "") if FALLBACK_RE.search(w)]


def other_warnings_in(text: str) -> list:
    return [w for w in WARNING_RE.findall(text or "") if not FALLBACK_RE.search(w)]


# torch.compile's own warnings (graph breaks, recompilations, a backend that gave up on one op): not fallbacks of the
# scripts, so they fail nothing, but the report counts them per run (a graph break in a speed run costs time)
COMPILE_NOTE_RE = re.compile(r"^[WE]\d{4} [\d:.]+ +\d+ \S*torch/_(?:dynamo|inductor)\S*\] (?:\[[^\]]*\] )?([^\s\[].*)$",
                             re.M)


def compile_notes_in(text: str) -> list:
    return COMPILE_NOTE_RE.findall(text or "")


def last_line(text: str) -> str:
    lines = [ln for ln in (text or "").strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


CHECKPOINT_LINE = re.compile(r"^checkpoint: step \d+", re.M)  # the harness prints it once the file is in place


def run_proc(cmd: list, cwd: str, log_path: str, timeout: float, env: Optional[dict] = None,
             term_after: Optional[float] = None, kill_after_checkpoints: int = 0, forks=None) -> dict:
    """Run cmd in its own session with stdout+stderr to log_path. term_after: SIGTERM then (the scripts stop with their
    events written); past `timeout` (or 60 s after the SIGTERM): SIGKILL. kill_after_checkpoints N: SIGKILL (a
    pre-empted job: no clean-up) as soon as the run has printed N checkpoint lines. forks: a fork server of cmd's
    script (scripts/forks.py; cmd is [python, script, *argv]): the run is a process forked from it, with cmd's argv,
    cwd and env, in its own session like a fresh one, so the signals above hit the run (and only the run) the same way;
    it starts without paying the imports."""
    start = time.monotonic()
    terminated_at, timed_out, killed = None, False, False
    with open(log_path, "w") as log:
        if forks is None:
            proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            pid, poll, wait = proc.pid, proc.poll, proc.wait
        else:
            forks.submit(log_path, cmd[2:], cwd=cwd, env=env, log=log_path)
            pid = forks.pid(log_path)
            lost = [-1, 0.0]  # the server ended without a word of this run: a failed run

            def poll():
                end = forks.poll(log_path) or (lost if forks.ended else None)
                return None if end is None else end[0]

            def wait():
                return (forks.wait(log_path) or lost)[0]
        while poll() is None:
            elapsed = time.monotonic() - start
            if kill_after_checkpoints:
                with open(log_path, errors="replace") as f:
                    if len(CHECKPOINT_LINE.findall(f.read())) >= kill_after_checkpoints:
                        _signal_group(pid, signal.SIGKILL)
                        wait()
                        killed = True
                        break
            if term_after is not None and terminated_at is None and elapsed > term_after:
                _signal_group(pid, signal.SIGTERM)
                terminated_at = elapsed
            if elapsed > timeout or (terminated_at is not None and elapsed > terminated_at + 60):
                _signal_group(pid, signal.SIGKILL)
                wait()
                timed_out = True
                break
            time.sleep(0.2)
    with open(log_path, errors="replace") as f:
        text = f.read()
    return {"cmd": cmd, "rc": poll(), "text": text, "wall": time.monotonic() - start, "timed_out": timed_out,
            "terminated": terminated_at is not None, "killed": killed, "log": log_path, "forked": forks is not None}


def _signal_group(pid: int, sig) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# ---------------------------------------------------------------------------------------------------------------
# Item 1: equivalence


def flatten_tensors(obj, prefix: str = "") -> dict:
    """{dotted path: float64 numpy array} of every floating-point tensor in nested dicts / lists."""
    import torch

    out = {}
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point():
            out[prefix] = obj.detach().to("cpu", torch.float64).numpy()
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten_tensors(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(flatten_tensors(v, f"{prefix}.{i}" if prefix else str(i)))
    return out


def find_model(run_dir: str) -> Optional[str]:
    """The saved model of a finished run (--save-model): the one *.cleanrl_model or *.pt that is not a checkpoint."""
    files = [f for pat in ("*.cleanrl_model", "*.pt") for f in glob.glob(os.path.join(run_dir, pat))
             if not os.path.basename(f).startswith("checkpoint")]
    return files[0] if len(files) == 1 else None


def load_flat(path: str) -> dict:
    import torch

    return flatten_tensors(torch.load(path, map_location="cpu", weights_only=False))


def match_in_checkpoint(model: dict, ckpt_flat: dict) -> Optional[dict]:
    """The model's tensors inside a checkpoint's flattened state: the prefix P (e.g. 'agent.', 'network.') such that
    P + name holds a tensor of the same shape for every name of the model; online networks before target ones."""
    if not model:
        return None
    first = next(iter(model))
    prefixes = {k[: len(k) - len(first)] for k in ckpt_flat
                if k.endswith(first) and (len(k) == len(first) or k[-len(first) - 1] == ".")}
    for p in sorted(prefixes, key=lambda p: ("target" in p, len(p))):
        if all(p + k in ckpt_flat and ckpt_flat[p + k].shape == v.shape for k, v in model.items()):
            return {k: ckpt_flat[p + k] for k in model}
    return None


def compare_params(fast: dict, plain: dict, ref: Optional[dict]) -> dict:
    """||fast - plain|| and, with ref, as a share of ||plain - ref|| (how far training moved the parameters)."""
    out = {"n_tensors": len(plain), "missing": sorted(set(plain) ^ set(fast)), "ratio": None}
    keys = [k for k in plain if k in fast and fast[k].shape == plain[k].shape]
    out["shape_mismatch"] = sorted(k for k in plain if k in fast and fast[k].shape != plain[k].shape)
    out["finite"] = bool(all(np.isfinite(fast[k]).all() and np.isfinite(plain[k]).all() for k in keys))
    diff2 = {k: float(((fast[k] - plain[k]) ** 2).sum()) for k in keys}
    out["diff"] = math.sqrt(sum(diff2.values()))
    out["norm"] = math.sqrt(sum(float((plain[k] ** 2).sum()) for k in keys))
    out["max_abs"] = max((float(np.abs(fast[k] - plain[k]).max()) for k in keys if fast[k].size), default=0.0)
    out["worst"] = max(diff2, key=diff2.get) if diff2 else None
    if ref is not None:
        rkeys = [k for k in keys if k in ref and ref[k].shape == plain[k].shape]
        out["ref_missing"] = sorted(set(keys) - set(rkeys))
        out["movement"] = math.sqrt(sum(float(((plain[k] - ref[k]) ** 2).sum()) for k in rkeys))
        out["ratio"] = out["diff"] / out["movement"] if out["movement"] > 0 else None
    return out


def compare_losses(fast: dict, plain: dict, tags: Optional[list] = None) -> dict:
    """Per loss tag, at the steps both runs logged: |fast - plain| / scale with scale = the median |plain| of the tag
    over the run (so losses near zero are judged against their typical size). {'tags': {tag: {...}}, 'first', 'median',
    'max' (the worst tag's), 'points'}. Scalars as bench.read_scalars returns them: {tag: [(wall, step, value)]}."""
    tags = tags or sorted(t for t in plain if t.startswith("losses/"))
    res = {"tags": {}, "first": None, "median": None, "max": None, "points": 0, "missing": []}
    for tag in tags:
        if tag not in plain or tag not in fast:
            res["missing"].append(tag)
            continue
        p = {s: v for _, s, v in plain[tag]}
        f = {s: v for _, s, v in fast[tag]}
        steps = sorted(set(p) & set(f))
        if not steps:
            res["missing"].append(tag)
            continue
        scale = max(float(np.median([abs(p[s]) for s in steps])), 1e-8)
        rel = [abs(f[s] - p[s]) / scale if math.isfinite(f[s]) and math.isfinite(p[s]) else math.inf for s in steps]
        res["tags"][tag] = {"points": len(steps), "only_fast": len(set(f) - set(p)), "only_plain": len(set(p) - set(f)),
                            "first": rel[0], "median": float(np.median(rel)), "max": max(rel), "scale": scale,
                            "first_step": steps[0]}
    if res["tags"]:
        for k in ("first", "median", "max"):
            res[k] = max(t[k] for t in res["tags"].values())
        res["points"] = min(t["points"] for t in res["tags"].values())
    return res


def judge_equivalence(cfg: Check, runs: dict, losses: Optional[dict], params: Optional[dict], device: str) -> list:
    """Reasons the equivalence of one script fails ([] = pass)."""
    bad = []
    for tag, r in runs.items():
        if r is None:
            continue
        if r["rc"] != 0:
            bad.append(f"{tag} run exit {r['rc']}{' (timeout)' if r['timed_out'] else ''}: {last_line(r['text'])}")
        for w in warnings_in(r["text"]):
            bad.append(f"{tag} run: {w}")
    fast = (runs.get("fast") or {}).get("summary") or {}
    if device == "cuda" and fast and not (fast.get("compile") and (fast.get("cudagraphs") or not cfg.graphs)):
        bad.append(f"fast run did not use the fast paths (compile {fast.get('compile')}, cudagraphs "
                   f"{fast.get('cudagraphs')})")
    if bad:
        return bad
    if losses is None or not losses["tags"]:
        bad.append("no loss logged by both runs")
    else:
        if losses["missing"]:
            bad.append(f"losses missing: {', '.join(losses['missing'])}")
        if losses["points"] < 2:
            bad.append(f"only {losses['points']} logged loss point(s)")
        if losses["first"] > FIRST_LOSS_TOL:
            bad.append(f"first logged loss differs by {losses['first']:.2e} > {FIRST_LOSS_TOL:.0e}")
        if losses["median"] > cfg.loss_tol:
            bad.append(f"losses differ by {losses['median']:.2e} (median) > {cfg.loss_tol}")
    if params is None:
        bad.append("no saved parameters to compare")
    else:
        if params.get("error"):
            bad.append(params["error"])
        elif params["missing"] or params["shape_mismatch"]:
            bad.append(f"parameter names differ: {(params['missing'] + params['shape_mismatch'])[:3]}")
        elif not params["finite"]:
            bad.append("non-finite parameters")
        elif params["ratio"] is None:
            bad.append("no movement reference (did any update happen?)" if params.get("movement") == 0 else
                       "no movement reference")
        elif params["ratio"] > cfg.param_tol:
            bad.append(f"parameters differ by {params['ratio']:.2e} of their movement > {cfg.param_tol}")
    return bad


# ---------------------------------------------------------------------------------------------------------------
# Items 2-6: every other path a user runs on the device, on `dry`'s tiny budgets. Each item is a job builder (the
# runs it needs, which go beside the equivalence runs in phase A) and a judge of their results; ITEMS lists them in
# the order they run and are reported, the most important first.


@dataclasses.dataclass
class Job:
    """One run of a script (several stages for a killed-and-resumed run: the same run name, one after the other)."""
    item: str
    file: str
    tag: str
    stages: list  # [(argv, kills)]: kills N > 0: SIGKILL the stage once it has printed N checkpoint lines
    env: dict = dataclasses.field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.item}_{key_of(self.file)}_{self.tag}"


SYNC_ENV = {"HARNESS_COUNT_SYNCS": "1"}  # harness.SyncCounter: the eq fast run counts its host syncs
CPU_TOL = {"same": 1e-2, "other": 1.0}  # CPU vs CUDA, first logged loss: same data (rounding, TF32 convs) / not
RESUME_TOL = 1e-5  # resume: losses before the first kill against the uninterrupted run (same process history)
SYNC_SLACK = (1.1, 0.5)  # host syncs per loop iteration allowed: reads x 1.1 + 0.5 (logging, probes amortised)


def more_pairs(cfg: Check, fast: str) -> list:
    """[(label, flags, fast-side flags)] of a script's smaller equivalence pairs."""
    pairs = [(label, flags, fast) for label, flags in cfg.more]
    if cfg.graphs:  # CUDA graphs of the eager code (auto: on with CUDA)
        pairs.append(("graphs", "", "--compile off --cudagraphs auto"))
    return pairs


def judge_more(cfg: Check, fast: dict, plain: dict) -> dict:
    """A smaller pair: the losses as in item 1 (first within FIRST_LOSS_TOL, median within the script's loss_tol), and
    evaluation returns, where logged, within loss_tol of each other (greedy acting on both paths)."""
    res = compare_losses(fast, plain, cfg.losses.split() or None)
    bad = [f"losses missing: {', '.join(res['missing'])}"] if res["missing"] or not res["tags"] else []
    if not bad:
        if res["first"] > FIRST_LOSS_TOL:
            bad.append(f"first logged loss differs by {res['first']:.2e} > {FIRST_LOSS_TOL:.0e}")
        if res["median"] > cfg.loss_tol:
            bad.append(f"losses differ by {res['median']:.2e} (median) > {cfg.loss_tol}")
    ev = compare_losses(fast, plain, ["eval/episodic_return"]) if "eval/episodic_return" in plain else None
    if ev is not None and (ev["missing"] or ev["median"] > cfg.loss_tol):
        bad.append("evaluation returns differ" + (f" by {ev['median']:.2e}" if not ev["missing"] else
                                                   ": logged by one run only"))
    return {"reasons": bad, "first": res["first"], "median": res["median"],
            "eval": None if ev is None or ev["missing"] else ev["median"]}

def loss_tags(scalars: dict, cfg: Check) -> list:
    return cfg.losses.split() or sorted(t for t in scalars if t.startswith("losses/"))


def finite_losses(scalars: dict) -> bool:
    return all(math.isfinite(v) for t, pts in scalars.items() if t.startswith("losses/") for _, _, v in pts)


def run_failures(runs: dict) -> list:
    """Exit codes and fallback lines of finished runs ({tag: run_proc result or [stage results]})."""
    bad = []
    for tag, r in runs.items():
        for i, stage in enumerate(r if isinstance(r, list) else [r]):
            label = tag if not isinstance(r, list) else f"{tag} stage {i + 1}"
            if stage is None:
                bad.append(f"{label}: not run")
                continue
            if stage["rc"] != 0 and not stage.get("killed"):
                bad.append(f"{label} exit {stage['rc']}{' (timeout)' if stage['timed_out'] else ''}: "
                           f"{last_line(stage['text'])}")
            bad += [f"{label}: {w}" for w in warnings_in(stage["text"])]
    return bad


SNAPSHOT_TOL = (1e-4, 1e-6)  # probe.py's own values against the inline ones: rel / abs (tests/conftest.py's)


def snapshot_flags(variant: str) -> str:
    """--snapshot-every at the variant's own probe cadence (its first variant probes: a snapshot at every probe)."""
    m = re.search(r"--metrics-every (\d+)", variant)
    return f"--snapshot-every {m.group(1)}" if m and int(m.group(1)) else ""


def judge_snapshots(inline: dict, own: dict, high_tau: dict, cpu_own: Optional[dict] = None) -> dict:
    """Snapshots taken on the device, recomputed by scripts/probe.py ({tag: [(wall, step, value)]} each): at the run's
    own thresholds every representation/* tag equals the inline one at each step both have (SNAPSHOT_TOL), at least
    one such step; --redo-tau 1e9 makes every dormant_score 1 (known answer). cpu_own: the same recomputed on the
    CPU (a CUDA run: another KDE jitter generator, other rounding): its largest gap is reported, not judged."""
    def by_step(scalars):
        return {t: {step: v for _, step, v in pts} for t, pts in scalars.items() if t.startswith("representation/")}

    want, got, bad, steps, worst = by_step(inline), by_step(own), [], set(), 0.0
    if set(got) != set(want):
        bad.append(f"tags differ: recomputed {len(got)}, inline {len(want)} "
                   f"(e.g. {sorted(set(got) ^ set(want))[:2]})")
    for tag in set(got) & set(want):
        for step in set(got[tag]) & set(want[tag]):
            steps.add(step)
            a, b = want[tag][step], got[tag][step]
            worst = max(worst, abs(a - b))
            if not math.isclose(a, b, rel_tol=SNAPSHOT_TOL[0], abs_tol=SNAPSHOT_TOL[1]):
                bad.append(f"{tag} at step {step}: inline {a:.6g}, recomputed {b:.6g}")
    if not steps:
        bad.append("no step with both an inline probe and a snapshot")
    if any(v != 1.0 for t, pts in by_step(high_tau).items() if t.endswith("/dormant_score") for v in pts.values()):
        bad.append("--redo-tau 1e9: a dormant_score below 1")
    out = {"reasons": bad[:5], "steps": sorted(steps), "max_abs": worst}
    if cpu_own is not None:
        cpu = by_step(cpu_own)
        out["cpu_max_abs"] = max((abs(v - got[t][s]) for t in cpu if t in got for s, v in cpu[t].items()
                                  if s in got[t]), default=None)
    return out


def judge_cpu(cfg: Check, dev: dict, cpu: dict) -> dict:
    """CPU vs CUDA: the plain device run's first logged losses against the CPU's, same flags and seed."""
    res = compare_losses(dev, cpu, cfg.losses.split() or None)
    tol = CPU_TOL["same" if cfg.same_data else "other"]
    bad = [f"losses missing: {', '.join(res['missing'])}"] if res["missing"] or not res["tags"] else []
    if not bad and res["first"] > tol:
        bad.append(f"first logged loss differs by {res['first']:.2e} > {tol:g}")
    if not finite_losses(dev) or not finite_losses(cpu):
        bad.append("non-finite loss")
    return {"reasons": bad, "first": res["first"], "median": res["median"], "tol": tol,
            "same_data": cfg.same_data}


def judge_determinism(a: dict, b: dict) -> dict:
    """Two identical runs: every logged loss equal, bit for bit."""
    tags = sorted(t for t in a if t.startswith("losses/"))
    worst, points = 0.0, 0
    missing = [t for t in tags if t not in b] + [t for t in b if t.startswith("losses/") and t not in a]
    for t in tags:
        va, vb = {s: v for _, s, v in a[t]}, {s: v for _, s, v in b.get(t, [])}
        if set(va) != set(vb):
            missing.append(t)
        for s in set(va) & set(vb):
            points += 1
            if va[s] != vb[s]:
                worst = max(worst, abs(va[s] - vb[s]) / max(abs(va[s]), 1e-12))
    bad = [f"losses logged at other steps: {', '.join(sorted(set(missing)))}"] if missing else []
    if not tags or not points:
        bad.append("no loss logged")
    if worst:
        bad.append(f"losses differ (max relative {worst:.2e})")
    return {"reasons": bad, "points": points, "max_rel": worst}


def judge_resume(full: dict, resumed: dict, first_ckpt: Optional[int], stages: list, cfg: Check) -> dict:
    """A run killed after a checkpoint, resumed on the device, killed again, resumed on the CPU: it ends at the
    uninterrupted run's last step, every loss at the same steps (none lost, none twice), the losses before the first
    kill equal to the uninterrupted run's."""
    bad = []
    if len(stages) < 3 or not all(st.get("killed") for st in stages[:2]):
        bad.append("the run ended before both kills (the checkpoint cadence leaves no two checkpoints before the "
                   "end)" if stages and stages[-1]["rc"] == 0 else "a stage did not reach its kill")
    for i, st in enumerate(stages[1:], 2):
        if "resumed runs/" not in st["text"]:
            bad.append(f"stage {i} did not resume")
    worst = 0.0
    for t in loss_tags(full, cfg):
        f_steps = [s for _, s, _ in full.get(t, [])]
        r_steps = [s for _, s, _ in resumed.get(t, [])]
        if sorted(set(r_steps)) != sorted(f_steps) or len(r_steps) != len(set(r_steps)):
            gap = sorted(set(f_steps) - set(r_steps))[:3]
            dup = sorted({s for s in r_steps if r_steps.count(s) > 1})[:3]
            bad.append(f"{t}: steps differ from the uninterrupted run (lost {gap}, twice {dup})")
        fv = {s: v for _, s, v in full.get(t, [])}
        for _, s, v in resumed.get(t, []):
            if first_ckpt is not None and s <= first_ckpt and s in fv:
                worst = max(worst, abs(v - fv[s]) / max(abs(fv[s]), 1e-12))
    if worst > RESUME_TOL:
        bad.append(f"losses before the first kill differ from the uninterrupted run by {worst:.2e}")
    if not finite_losses(resumed):
        bad.append("non-finite loss")
    return {"reasons": bad, "before_kill_max_rel": worst, "first_checkpoint": first_ckpt,
            "kills": sum(1 for st in stages if st.get("killed"))}


def judge_syncs(summary: Optional[dict], expected: float, device: str) -> dict:
    """Host syncs per loop iteration of the fast run (steady state) against the action reads it needs."""
    syncs = (summary or {}).get("host_syncs")
    if not syncs:
        return {"reasons": ["no host_syncs in the run's finished summary"], "status": "FAIL"}
    limit = expected * SYNC_SLACK[0] + SYNC_SLACK[1]
    out = {"per_iteration": syncs["per_iteration"], "per_step": syncs["per_step"], "expected": expected,
           "limit": limit, "reasons": []}
    if device != "cuda":
        out["status"] = "n/a"  # the CPU has no host syncs to count
    elif syncs["per_iteration"] is None:
        out["reasons"].append("too few loop iterations to measure")
    elif syncs["per_iteration"] > limit:
        out["reasons"].append(f"{syncs['per_iteration']:.2f} syncs per loop iteration > {limit:g} (the action reads: "
                              f"{expected:g})")
    return out


def expected_reads(cfg: Check, argv: list) -> float:
    if cfg.reads.startswith("--"):
        vals = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == cfg.reads]
        return float(vals[-1]) if vals else float(bench.flag([], cfg.reads, 128))
    return float(cfg.reads)


# Switches no variant run needs: the run's plumbing, or what another item covers (cuda: cpu and resume;
# torch_deterministic: determinism; compile/cudagraphs/save_model: equivalence; resume: resume)
NOT_VARIANTS = {"exp_name", "env_id", "run_name", "track", "wandb_project_name", "wandb_entity", "capture_video",
                "cuda", "torch_deterministic", "compile", "cudagraphs", "save_model", "resume"}
# choice flags where one value other than the default proves the path (elementwise functions; --activation crelu,
# which doubles widths, is run on its own)
ANY_VALUE = {"conv_activation"}


def switch_flags(file: str, repo: str = REPO) -> dict:
    """{field: values} of a script's switches, read from its Args: bool fields ([True, False]), Literal fields and
    aliases of one (their values), str fields (None: any value). Numbers (sizes, rates, cadences) are not switches."""
    import ast

    with open(os.path.join(repo, file)) as f:
        tree = ast.parse(f.read())
    aliases = {}
    for node in tree.body:  # Mitigation = Literal["none", ...]
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if isinstance(node.value, ast.Subscript) and ast.unparse(node.value.value) == "Literal":
                aliases[node.targets[0].id] = node.value
    out = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "Args":
            for st in node.body:
                if not (isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name)):
                    continue
                ann = aliases.get(ast.unparse(st.annotation), st.annotation)
                text = ast.unparse(ann)
                if text == "bool":
                    out[st.target.id] = [True, False]
                elif text.startswith("Literal["):
                    out[st.target.id] = list(ast.literal_eval(ann.slice) if isinstance(ann.slice, ast.Tuple)
                                             else [ast.literal_eval(ann.slice)])
                elif text in ("str", "Optional[str]"):
                    out[st.target.id] = None
    return out


def uncovered_switches(file: str, repo: str = REPO) -> list:
    """The switches of a script no variant run (nor a smaller equivalence pair) sets: a bool flag set either way, a Literal flag at every value other
    than its default (the other runs use the default), a str flag at all."""
    cfg = SCRIPTS[file]
    defaults = {k[2:].replace("-", "_"): v for k, v in script_flags(file, repo).items()}
    used: dict = {}
    for text in (*cfg.variants, *(flags for _, flags in cfg.more)):  # the smaller equivalence pairs run them too
        for name, values, _ in split_flags(text):
            field = name[2:].replace("-", "_")
            if field.startswith("no_") and field[3:] in defaults:
                used.setdefault(field[3:], set()).add(False)
            else:
                used.setdefault(field, set()).update(values or [True])
    missing = []
    for field, values in switch_flags(file, repo).items():
        if field in NOT_VARIANTS:
            continue
        if field not in used:
            missing.append(flag_name(field))
        elif values and not isinstance(values[0], bool) and field not in ANY_VALUE:
            missing += [f"{flag_name(field)} {v}" for v in values if v != defaults.get(field) and v not in used[field]]
    return missing


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")

# What each item proves, in the order they run and are reported (docs/running.md "Checking a GPU")
ITEMS = {
    "equivalence": "the fast paths (torch.compile, CUDA graphs) compute what the plain path computes",
    "equivalence+": "the same for the Hadamax encoder, CUDA graphs without compile, greedy acting and evaluation",
    "cpu": "the plain CUDA path's first losses agree with the CPU's on the same flags and seed (pinned uploads)",
    "resume": "killed after a checkpoint, resumed on CUDA, killed, resumed on the CPU: the same steps, to the end",
    "variants": "every variant flag of every script runs on CUDA (a few updates each, metrics and evaluation on once)",
    "snapshots": "snapshots taken on CUDA (the first variant run) give back its inline metrics in scripts/probe.py",
    "syncs": "host syncs per loop iteration in the steady state (the action reads only)",
    "determinism": "two identical runs give identical losses (--torch-deterministic), and what it costs",
    "speed": "steady-state SPS against the GPU targets",
    "probe": "PQN learns Breakout within the probe's minutes",
}


# ---------------------------------------------------------------------------------------------------------------
# The check


class GpuCheck:
    def __init__(self, args):
        self.a = args
        self.dry = args.dry_run
        # the dry run's fast paths are off on the CPU (auto), so one eq run stands for both sides (unless --fast)
        self.one_side = self.dry and not args.fast
        self.part = args.part
        limits = DRY if self.dry else PARTS[self.part]
        self.deadline_s = args.deadline or limits["deadline"]
        self.equiv_s = args.equiv_seconds or limits["equiv"]
        self.probe_s = limits["probe"] if args.probe_seconds is None else args.probe_seconds
        if self.part == "dmc":
            self.probe_s = 0
        self.device, self.device_flags = "cpu", []  # set by preflight()
        self.t0 = time.monotonic()
        self.started = datetime.datetime.now()
        self.out_dir = os.path.abspath(args.out_dir)
        self.workdir = os.path.abspath(args.workdir) if args.workdir else tempfile.mkdtemp(prefix="gpu_check_")
        os.makedirs(self.workdir, exist_ok=True)
        self.results: dict = {"part": self.part, "dry_run": self.dry, "equivalence": {}, "speed": {"rows": {}},
                              "targets": [], "probe": None, "warnings": [], "other_warnings": [], "compile_notes": {},
                              "runs": [], "skipped": [], "notes": [], "items": {}}
        self.lock = threading.Lock()
        # --dry-run: phase A's runs are forked from a server per script that imported its modules once (seconds of
        # each run's time on the CPU). Never on a GPU: forking after CUDA is initialised is unsafe, and the check
        # times real runs there.
        self.use_forks = self.dry and not args.fresh_processes
        self.forks: dict = {}

    # -- bookkeeping ---------------------------------------------------------------------------------------------
    def left(self) -> float:
        return self.deadline_s - (time.monotonic() - self.t0)

    def log(self, *msg, **kw) -> None:
        kw.pop("flush", None)
        with self.lock:
            print(f"[{time.monotonic() - self.t0:6.1f}s]", *msg, flush=True, **kw)

    def record(self, name: str, res: dict) -> dict:
        """Keep what a run left (rc, wall time, warnings) for the report; say any fallback warning loudly."""
        warns = warnings_in(res.get("text", ""))
        others = other_warnings_in(res.get("text", ""))
        notes = compile_notes_in(res.get("text", ""))
        with self.lock:
            if notes:
                self.results["compile_notes"][name] = {"n": len(notes), "first": list(dict.fromkeys(notes))[:2]}
            for w in others:
                if w not in self.results["other_warnings"]:
                    self.results["other_warnings"].append(w)
            self.results["runs"].append({"name": name, "rc": res.get("rc"), "wall": round(res.get("wall", 0.0), 1),
                                         "timed_out": res.get("timed_out"), "cmd": shlex.join(res.get("cmd", [])),
                                         "warnings": warns})
            self.results["warnings"] += [{"run": name, "line": w} for w in warns]
        for w in warns:
            self.log(f"!!! FALLBACK WARNING in {name}: {w}")
        return res

    def env(self, extra: Optional[dict] = None) -> dict:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.update(extra or {})
        return env

    def flags_for(self, file: str, text: str, *overrides: str) -> list:
        available = set(script_flags(file)) if "?--" in " ".join((text, *overrides)) else None
        argv = resolve_flags(text, available, *overrides)
        if self.device_flags:
            argv += self.device_flags
        return argv

    # -- preflight -----------------------------------------------------------------------------------------------
    def preflight(self) -> None:
        parts = ["atari", "dmc"] if self.part == "all" else [self.part]
        mods = {"atari": ["envpool", "gymnasium", "ale_py", "cv2"], "dmc": ["dm_control", "mujoco"]}
        wanted = ["torch", "numpy", "tyro", "tensorboard"] + [m for p in parts for m in mods[p]]
        code = (
            "import importlib, json, os, sys\n"
            "os.environ.setdefault('MUJOCO_GL', 'egl')\n"
            "import importlib.metadata as md\n"
            "out = {'versions': {}, 'errors': {}}\n"
            "dist = {'ale_py': 'ale-py', 'dm_control': 'dm-control', 'cv2': 'opencv-python-headless'}\n"
            f"for m in {wanted!r}:\n"
            "    try:\n"
            "        mod = importlib.import_module(m)\n"
            "        try:\n"
            "            out['versions'][m] = getattr(mod, '__version__', None) or md.version(dist.get(m, m))\n"
            "        except md.PackageNotFoundError:\n"
            "            out['versions'][m] = '?'\n"
            "    except Exception as e:\n"
            "        out['errors'][m] = f'{type(e).__name__}: {e}'.splitlines()[0][:200]\n"
            "try:\n"
            "    import torch\n"
            "    out['cuda'] = torch.cuda.is_available()\n"
            "    out['torch_cuda'] = torch.version.cuda\n"
            "    out['gpu'] = torch.cuda.get_device_name(0) if out['cuda'] else None\n"
            "except Exception as e:\n"
            "    out['cuda'] = False\n"
            f"if {('dmc' in parts)!r} and 'dm_control' not in out['errors']:\n"
            "    try:\n"
            "        from dm_control import suite\n"
            "        img = suite.load('cartpole', 'swingup').physics.render(84, 84, camera_id=0)\n"
            "        out['render'] = f\"{os.environ['MUJOCO_GL']}: {img.shape}, mean {img.mean():.1f}\"\n"
            "    except Exception as e:\n"
            "        out['errors']['render'] = f'{type(e).__name__}: {e}'.splitlines()[0][:200]\n"
            "print('PREFLIGHT ' + json.dumps(out))\n")
        res = run_proc([sys.executable, "-c", code], self.workdir, os.path.join(self.workdir, "preflight.log"), 240,
                       self.env())
        line = next((ln for ln in res["text"].splitlines() if ln.startswith("PREFLIGHT ")), None)
        info = json.loads(line[len("PREFLIGHT "):]) if line else {"errors": {"preflight": last_line(res["text"])},
                                                                   "versions": {}, "cuda": False}
        smi = ""
        if shutil.which("nvidia-smi"):
            try:
                smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                      "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout
            except (OSError, subprocess.SubprocessError):
                pass
        info["nvidia_smi"] = smi.strip()
        info["cpus"] = os.cpu_count()
        self.results["preflight"] = info
        self.device = "cuda" if info.get("cuda") and not self.dry else "cpu"
        # --dry-run on a GPU machine still runs on the CPU
        self.device_flags = ["--no-cuda"] if self.dry and info.get("cuda") else []
        self.log(f"preflight: device {self.device} ({info.get('gpu') or 'no GPU'}), {info['cpus']} CPUs; versions "
                 + ", ".join(f"{k} {v}" for k, v in info["versions"].items())
                 + (f"; render {info['render']}" if info.get("render") else ""))
        for m, e in info.get("errors", {}).items():
            self.log(f"preflight: {m}: {e}")

    def broken_imports(self, file: str) -> list:
        errs = self.results["preflight"].get("errors", {})
        part = SCRIPTS[file].part
        need = ["torch", "numpy", "tyro", "tensorboard", "preflight"] + (
            ["envpool", "gymnasium", "ale_py", "cv2"] if part == "atari" else
            ["dm_control", "mujoco"] + (["render"] if SCRIPTS[file].pixels else []))
        return [f"{m}: {errs[m]}" for m in need if m in errs]

    # -- phase A: equivalence runs (and the probe beside them) ---------------------------------------------------
    def equivalence_jobs(self, files: list) -> list:
        """Every equivalence run: fast (counting its host syncs: item syncs), plain and (init references) ref."""
        jobs = []
        for file in files:
            cfg = SCRIPTS[file]
            base = cfg.dry if self.dry else cfg.equiv
            # --dry-run: auto is off on the CPU, both runs would compute the same thing: the plain run stands for both
            if not self.one_side:
                jobs.append(Job("eq", file, "fast", [(self.flags_for(file, base, "--seed 1 --save-model",
                                                                     self.a.fast or FAST), 0)], dict(SYNC_ENV)))
            jobs.append(Job("eq", file, "plain", [(self.flags_for(file, base, "--seed 1 --save-model", PLAIN), 0)],
                            dict(SYNC_ENV) if self.one_side else {}))
            if cfg.ref.startswith("init:"):
                jobs.append(Job("eq", file, "ref", [(self.flags_for(file, base, "--seed 1 --save-model", PLAIN,
                                                                    cfg.ref[len("init:"):]), 0)]))
        for file in files:  # then the smaller pairs: Hadamax, graphs without compile, greedy acting, evaluation
            for label, flags, fast in more_pairs(SCRIPTS[file], self.a.fast or FAST):
                # --dry-run: auto is off on the CPU, both sides would compute the same thing: one run stands for both
                for side, paths in (("plain", PLAIN),) if self.dry else (("fast", fast), ("plain", PLAIN)):
                    jobs.append(Job("eqx", file, f"{label}_{side}", [(self.flags_for(
                        file, SCRIPTS[file].dry, "--seed 1", flags, paths), 0)]))
        return jobs

    def item_jobs(self, files: list) -> list:
        """The runs of items cpu, resume, variants and determinism (syncs reads the eq fast runs), on `dry`'s tiny
        budgets, in ITEMS order."""
        small = (lambda f, *over: self.flags_for(f, SCRIPTS[f].dry, "--seed 1", *over))
        cpu, resume, variants, det = [], [], [], []
        for f in files:
            cfg = SCRIPTS[f]
            plain = small(f, "--save-model", PLAIN)  # --dry-run: the eq plain run's flags, so that run is det's "a"
            if not self.dry:  # --dry-run: the CPU is the device, det's "a" stands for both sides
                cpu.append(Job("cpu", f, "cpu", [(plain + ["--no-cuda"], 0)]))  # against det's "a", same flags
            ckpt = small(f, "--save-model", cfg.ckpt)
            if not self.dry:  # --dry-run: the eq plain run is the uninterrupted run (the same flags, no checkpoints)
                resume.append(Job("resume", f, "full", [(ckpt, 0)]))
            resume.append(Job("resume", f, "killed", [(ckpt, 1), (ckpt + ["--resume"], 1),
                                                      (ckpt + ["--resume", "--no-cuda"], 0)]))
            variants += [Job("variants", f, f"v{i}", [(small(f, v, snapshot_flags(v) if i == 1 else ""), 0)])
                         for i, v in enumerate(cfg.variants, 1)]
            det += [Job("det", f, t, [(plain, 0)]) for t in (("b",) if self.dry else ("a", "b"))]
            if not self.dry:  # the cost of --torch-deterministic: the same run without it
                det.append(Job("det", f, "off", [(plain + ["--no-torch-deterministic"], 0)]))
        return cpu + resume + variants + det

    def probe_argv(self) -> list:
        return self.flags_for(PROBE_SCRIPT, PROBE_DRY if self.dry else PROBE, "--seed 1 --run-name probe_pqn")

    def fork_server(self, file: str, env_extra: dict):
        """The fork server of `file` (started at its first run, with the environment phase A's runs share), or None:
        fresh processes."""
        if not self.use_forks:
            return None
        import forks  # scripts/forks.py

        with self.lock:
            if file not in self.forks:
                self.forks[file] = forks.Forks(file, cwd=self.workdir, env=self.env(env_extra), workers=64)
            return self.forks[file]

    def close_fork_servers(self) -> None:
        for server in self.forks.values():
            server.close()
        self.forks = {}

    def run_job(self, job: Job, cap: float, env_extra: dict) -> list:
        """The job's stages one after the other (a stage that fails ends the job); [run_proc result] per stage."""
        out = []
        for i, (argv, kills) in enumerate(job.stages):
            cmd = [sys.executable, os.path.join(REPO, job.file), *argv, "--run-name", job.name]
            label = job.name + (f"_{i + 1}" if len(job.stages) > 1 else "")
            forks = self.fork_server(job.file, env_extra)
            self.log(f"  start {label}{' (forked)' if forks else ''}: {shlex.join(cmd[1:])}")
            res = run_proc(cmd, self.workdir, os.path.join(self.workdir, f"{label}.log"), cap,
                           self.env({**env_extra, **job.env}), kill_after_checkpoints=kills, forks=forks)
            self.log(f"  done  {label}: exit {res['rc']}{' (killed after a checkpoint)' if res['killed'] else ''}"
                     f"{' TIMEOUT' if res['timed_out'] else ''} in {res['wall']:.0f}s")
            out.append(self.record(label, res))
            if (res["rc"] != 0 and not res["killed"]) or (kills and not res["killed"]):
                break
        return out

    def phase_a(self, files: list, probe: bool, items: bool = True) -> None:
        """The equivalence runs of `files` and the runs of the other items, several at a time, most important
        first, and (probe) the learning probe beside them; a run that would start too late is skipped (reported)."""
        jobs = self.equivalence_jobs(files) + (self.item_jobs(files) if items else [])
        n = len(jobs) + int(probe)
        if not n:
            return
        share = min(self.equiv_s, self.left() - REPORT_RESERVE)
        end = time.monotonic() + share
        par = self.a.jobs or (2 if self.dry else max(1, min(n, 12)))
        site = os.path.join(self.workdir, "equiv_site")
        os.makedirs(site, exist_ok=True)
        with open(os.path.join(site, "sitecustomize.py"), "w") as f:
            f.write(EQUIV_SITE)
        threads = str(max(1, (os.cpu_count() or 1) // min(n, par)))
        env_extra = {"PYTHONPATH": os.pathsep.join([site] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
        if not self.dry:
            env_extra.update(TORCHINDUCTOR_COMPILE_THREADS=threads, OMP_NUM_THREADS=threads)
        self.log(f"phase A: {len(jobs)} runs (equivalence, then items {', '.join(i for i in ITEMS if i not in ('equivalence', 'speed', 'probe'))})"
                 f"{' + the learning probe' if probe else ''}, {par} at a time, {share:.0f}s")

        def one(job):
            left = end - time.monotonic()
            if left < 20 * len(job.stages):
                with self.lock:
                    self.results["skipped"].append(f"{job.item} {job.name}: not started, {left:.0f}s left of phase A")
                self.log(f"  skip {job.name}: {left:.0f}s left of phase A")
                return job, None
            return job, self.run_job(job, max(20.0, left), env_extra)

        def the_probe():
            argv = self.probe_argv()
            cmd = [sys.executable, os.path.join(REPO, PROBE_SCRIPT), *argv]
            seconds = min(self.probe_s, share - 10)
            self.log(f"  start probe ({seconds:.0f}s): {shlex.join(cmd[1:])}")
            res = run_proc(cmd, self.workdir, os.path.join(self.workdir, "probe_pqn.log"), seconds + 90, self.env(),
                           term_after=seconds)
            self.log(f"  done  probe: exit {res['rc']}{' (stopped by SIGTERM)' if res['terminated'] else ''} in "
                     f"{res['wall']:.0f}s")
            return self.record("probe_pqn", res)

        try:
            with ThreadPoolExecutor(max_workers=par + int(probe)) as pool:
                probe_future = pool.submit(the_probe) if probe else None
                with ThreadPoolExecutor(max_workers=par) as eq_pool:
                    done = list(eq_pool.map(one, jobs))
                probe_res = probe_future.result() if probe_future else None
        finally:
            self.close_fork_servers()
        by: dict = {}
        for job, res in done:
            by.setdefault(job.item, {}).setdefault(job.file, {})[job.tag] = res
        for file in files:
            runs = {t: r[0] for t, r in by.get("eq", {}).get(file, {}).items() if r}
            if self.one_side and "plain" in runs:
                runs["fast"] = runs["plain"]
            self.results["equivalence"][file] = self.evaluate_equivalence(file, runs)
        if items:
            self.evaluate_items(files, by)
        if probe_res is not None:
            self.results["probe"] = self.evaluate_probe(probe_res)

    def run_dir(self, job_name: str) -> str:
        return os.path.join(self.workdir, "runs", job_name)

    def scalars_of(self, job_name: str) -> dict:
        try:
            return bench.read_scalars(self.run_dir(job_name))
        except Exception:  # noqa: BLE001 - no events: judged as missing losses
            return {}

    def evaluate_items(self, files: list, by: dict) -> None:
        """Judge items cpu, resume, variants, syncs and determinism per script into results['items']."""
        items = self.results["items"]
        for file in files:
            cfg, key = SCRIPTS[file], key_of(file)
            got = (lambda item: by.get(item, {}).get(file, {}))
            det = dict(got("det"))
            if self.dry:  # det's "a" is the eq plain run: the same flags on the CPU
                det["a"] = got("eq").get("plain")
            det_a = f"eq_{key}_plain" if self.dry else f"det_{key}_a"

            def entry(runs, judge):
                if any(r is None for r in runs.values()) or not runs:
                    return {"status": "skipped", "reasons": ["not run (no time left)"]}
                bad = run_failures(runs)
                out = judge() if not bad else {"reasons": []}
                out["reasons"] = bad + out["reasons"]
                out.setdefault("status", "FAIL" if out["reasons"] else "PASS")
                return out

            a = (det.get("a") or [None])[0]
            items.setdefault("cpu", {})[file] = entry(
                {"device": a, "cpu": a if self.dry else (got("cpu").get("cpu") or [None])[0]},
                lambda: judge_cpu(cfg, self.scalars_of(det_a), self.scalars_of(det_a if self.dry else f"cpu_{key}_cpu")))
            res = got("resume")
            killed = res.get("killed") or []
            first = None
            if killed:
                m = re.search(r"^checkpoint: step (\d+)", killed[0]["text"], re.M)
                first = int(m.group(1)) if m else None
            items.setdefault("resume", {})[file] = entry(
                {"full": ((got("eq").get("plain") if self.dry else res.get("full")) or [None])[0],
                 "killed": killed or None},
                lambda: judge_resume(self.scalars_of(f"eq_{key}_plain" if self.dry else f"resume_{key}_full"),
                                     self.scalars_of(f"resume_{key}_killed"),
                                     first, killed, cfg))
            var = got("variants")

            def judge_variants():
                bad = []
                for tag, r in sorted(var.items()):
                    sc = self.scalars_of(f"variants_{key}_{tag}")
                    if not any(t.startswith("losses/") for t in sc):
                        bad.append(f"{tag}: no loss logged")
                    elif not finite_losses(sc):
                        bad.append(f"{tag}: non-finite loss")
                return {"reasons": bad, "runs": {t: shlex.join(r[-1]["cmd"][2:]) for t, r in var.items() if r}}

            items.setdefault("variants", {})[file] = entry({t: r[-1] if r else None for t, r in var.items()},
                                                           judge_variants)
            items.setdefault("snapshots", {})[file] = entry({"v1": (var.get("v1") or [None])[-1]},
                                                            lambda: self.judge_snapshots_of(f"variants_{key}_v1"))
            counted = "plain" if self.one_side else "fast"
            fast = (got("eq").get(counted) or [None])[0]
            syncs = judge_syncs(bench.read_finished(self.run_dir(f"eq_{key}_{counted}")), expected_reads(
                cfg, self.flags_for(file, cfg.dry if self.dry else cfg.equiv)), self.device) if fast else None
            items.setdefault("syncs", {})[file] = syncs or {"status": "skipped", "reasons": ["the eq fast run "
                                                                                             "did not run"]}
            if syncs is not None:
                syncs.setdefault("status", "FAIL" if syncs["reasons"] else "PASS")

            def judge_det():
                out = judge_determinism(self.scalars_of(det_a), self.scalars_of(f"det_{key}_b"))
                sps = {t: (bench.read_finished(self.run_dir(det_a if t == "a" else f"det_{key}_{t}")) or {}).get("sps")
                       for t in det}
                if sps.get("a") and sps.get("off"):
                    out["cost"] = sps["off"] / sps["a"] - 1  # the share of time --torch-deterministic adds
                out["nondeterministic_ops"] = [w for r in det.values() if r for w in
                                               other_warnings_in(r[0]["text"]) if "deterministic" in w]
                return out

            items.setdefault("determinism", {})[file] = entry({t: r[0] if r else None for t, r in det.items()},
                                                              judge_det)
            for label, _, _ in more_pairs(cfg, FAST):
                fast_side = "plain" if self.dry else "fast"  # --dry-run: one run stands for both
                pair = {side: (got("eqx").get(f"{label}_{side}") or [None])[0] for side in (fast_side, "plain")}
                items.setdefault("equivalence+", {})[f"{file} {label}"] = entry(
                    pair, lambda label=label, fs=fast_side: judge_more(
                        cfg, self.scalars_of(f"eqx_{key}_{label}_{fs}"), self.scalars_of(f"eqx_{key}_{label}_plain")))
        if "equivalence+" in items:  # reported right after item 1
            items = self.results["items"] = {"equivalence+": items.pop("equivalence+"), **items}
        for item in ("equivalence+", "cpu", "resume", "variants", "snapshots", "syncs", "determinism"):
            for file, e in items.get(item, {}).items():
                self.log(f"{item} {file}: {e['status']}" + (f" ({'; '.join(e['reasons'])})" if e["reasons"] else ""))

    def judge_snapshots_of(self, job_name: str) -> dict:
        """Item snapshots: scripts/probe.py (in this process) on a run's snapshots, on the device, then (CUDA) on the
        CPU; its probe/<setting>/ folders are read apart from the run's own events."""
        import probe as probe_tool  # scripts/probe.py

        run_dir = self.run_dir(job_name)
        inline = bench.read_scalars(run_dir, below=False)
        read = (lambda setting: bench.read_scalars(os.path.join(run_dir, "probe", setting)))
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                probe_tool.probe_run(run_dir, probe_tool.parse_args([run_dir, "--redo-tau", "1e9", "--device",
                                                                     self.device]))
                own, high = read("own"), read("redo_tau=1e+09")
                cpu = None
                if self.device == "cuda":
                    probe_tool.probe_run(run_dir, probe_tool.parse_args([run_dir, "--device", "cpu"]))
                    cpu = read("own")
        except probe_tool.ProbeError as e:
            return {"reasons": [f"scripts/probe.py: {e}"]}
        return judge_snapshots(inline, own, high, cpu)

    def evaluate_equivalence(self, file: str, runs: dict) -> dict:
        cfg = SCRIPTS[file]
        key = key_of(file)
        dirs = {tag: os.path.join(self.workdir, "runs", f"eq_{key}_{tag}") for tag in ("fast", "plain", "ref")}
        if self.one_side:
            dirs["fast"] = dirs["plain"]
        for tag, r in runs.items():
            r["summary"] = bench.read_finished(dirs[tag])
        losses = params = None
        try:
            if all(tag in runs for tag in ("fast", "plain")):
                tags = cfg.losses.split() or None
                losses = compare_losses(bench.read_scalars(dirs["fast"]), bench.read_scalars(dirs["plain"]), tags)
                params = self.compare_models(cfg, dirs)
        except Exception as e:  # noqa: BLE001 - a broken file is a failed check, reported, not a crash
            params = {"error": f"comparison failed: {type(e).__name__}: {e}"}
        bad = judge_equivalence(cfg, runs, losses, params, self.device)
        peak = [bench.peak_gpu_mib(r.get("summary")) for r in runs.values()]
        entry = {"status": "FAIL" if bad else "PASS", "reasons": bad, "losses": losses, "params": params,
                 "fast_paths": bench.fast_paths_of((runs.get("fast") or {}).get("summary")),
                 "peak_gpu_mib": max([p for p in peak if p is not None], default=None),
                 "walls": {t: round(r["wall"], 1) for t, r in runs.items()},
                 "ref": cfg.ref.split(":")[0], "tolerances": {"first_loss": FIRST_LOSS_TOL, "loss": cfg.loss_tol,
                                                              "param": cfg.param_tol}}
        self.log(f"equivalence {file}: {entry['status']}" + (f" ({'; '.join(bad)})" if bad else
                 f" (params {params['ratio']:.2e} of movement, losses first {losses['first']:.1e} median "
                 f"{losses['median']:.1e})"))
        return entry

    def compare_models(self, cfg: Check, dirs: dict) -> dict:
        models = {tag: find_model(dirs[tag]) for tag in ("fast", "plain")}
        if not all(models.values()):
            return {"error": f"no saved model (--save-model) in {[t for t, m in models.items() if not m]}"}
        fast, plain = load_flat(models["fast"]), load_flat(models["plain"])
        ref, mid = None, None
        if cfg.ref.startswith("init:"):
            path = find_model(dirs["ref"])
            if not path:
                return {"error": "the reference run (initial parameters) left no saved model"}
            ref = load_flat(path)
        elif cfg.ref == "checkpoint":
            cks = {tag: os.path.join(dirs[tag], "checkpoint.pt") for tag in ("fast", "plain")}
            if not all(os.path.isfile(p) for p in cks.values()):
                return {"error": "no checkpoint.pt kept by the runs (the movement reference)"}
            import torch

            flat = {tag: flatten_tensors(torch.load(p, map_location="cpu", weights_only=False).get("state"))
                    for tag, p in cks.items()}
            ref = match_in_checkpoint(plain, flat["plain"])
            mid_fast = match_in_checkpoint(plain, flat["fast"])
            if ref is None or mid_fast is None:
                return {"error": "the saved model's tensors are not in checkpoint.pt"}
            mid = compare_params(mid_fast, ref, None)
        out = compare_params(fast, plain, ref)
        if mid is not None and out.get("movement"):
            out["mid_ratio"] = mid["diff"] / out["movement"]  # the same difference halfway, same yardstick
        return out

    # -- item 10: the learning probe -----------------------------------------------------------------------------
    def evaluate_probe(self, res: dict) -> dict:
        run_dir = os.path.join(self.workdir, "runs", "probe_pqn")
        scalars = bench.read_scalars(run_dir) if os.path.isdir(run_dir) else {}
        train = [(s, v) for _, s, v in sorted(scalars.get("charts/episodic_return", []), key=lambda e: e[1])]
        evals = [(s, v) for _, s, v in sorted(scalars.get("eval/episodic_return", []), key=lambda e: e[1])]
        sps = [v for _, _, v in scalars.get("charts/SPS", [])]
        curve = probe_curve(train, evals)
        out = {"points": len(train), "curve": curve, "last_step": max([s for s, _ in train], default=0),
               "sps": sps[-1] if sps else None, "rc": res["rc"], "stopped": res["terminated"]}
        # 130: the harness's exit on SIGTERM (events written); -15: SIGTERM before the harness was listening
        broken = res["rc"] not in (0, 130, -15) or res["timed_out"] or warnings_in(res["text"])
        if broken:
            out["status"], out["why"] = "FAIL", f"exit {res['rc']}: {last_line(res['text'])}"
        elif self.dry:
            out["status"], out["why"] = "n/a", "dry run: too few steps to learn anything"
        else:
            out["status"], out["why"] = judge_probe(curve)
        self.log(f"probe: {out['status']} ({out['why']}); {len(train)} points up to step {out['last_step']:,}")
        return out

    # -- phase B: speed ------------------------------------------------------------------------------------------
    def speed_plan(self, files: list) -> list:
        """[(file, spec, variant, budget, tags)] of the speed measurements, most wanted first: the targets (PQN and
        its ceiling, PPO, DQN, then Hadamax, the slowest run), then the dm_control scripts."""
        order = {"pqn": 0, "ppo": 1, "dqn": 2, "pqn/hadamax": 3, "drq": 4}
        plan = []
        for file in files:
            cfg = SCRIPTS[file]
            spec, budget = self.spec_and_budget(file, cfg)
            plan.append((file, spec, next(iter(spec.variants)), budget, ("on", "off")))
            if cfg.hadamax and "hadamax" in spec.variants:  # ~10x slower than the Nature CNN on a CPU, ~2x on a GPU
                b = self.budget(spec, cfg, bench.VARIANT_SCALE["quick" if self.dry else "full"].get("hadamax", 1.0))
                plan.append((file, spec, "hadamax", b, ("off",)))
        return sorted(plan, key=lambda e: order.get(e[1].key if e[2] == next(iter(e[1].variants))
                                                    else f"{e[1].key}/{e[2]}", 9))

    def spec_and_budget(self, file: str, cfg: Check):
        key = key_of(file)
        spec = bench.SPECS.get(key)
        if spec is None or spec.file != file:  # a script bench.py does not know: a spec from the config and --help
            cadence = script_flags(file).get("--metrics-every")
            cadence = cadence if isinstance(cadence, int) and cadence > 0 else 10_000
            warm, window = (int(x) for x in (cfg.sps_budget or "1000 10000").split())
            spec = bench.Spec(key, file, cfg.unit, cadence, {"default": []}, quick=bench.Budget(1, 1),
                              full=bench.Budget(warm, window, []))
        return spec, self.budget(spec, cfg, 1.0)

    def budget(self, spec, cfg: Check, scale: float):
        if self.dry:
            warm, window, *rest = cfg.dry_sps.split(maxsplit=2)
            args = self.flags_for(spec.file, rest[0] if rest else "")
            return bench.resolve_budget(spec, bench.Budget(int(warm), int(window), args,
                                                           ceiling_steps=10 if spec.envpool else 0), scale)
        extra = self.flags_for(spec.file, cfg.sps) if (cfg.sps or self.device_flags) else []
        return bench.resolve_budget(spec, spec.full, cfg.sps_scale * scale, extra)

    def phase_b(self, files: list) -> None:
        """Speed runs in priority order, one at a time (on the GPU nothing else runs beside a timed run); --dry-run
        runs --jobs of them at a time (its timings mean nothing). A run that would not fit the deadline is skipped."""
        plan = self.speed_plan(files)
        if not plan:
            return
        est = SPS_RUN_ESTIMATE["dry" if self.dry else "gpu"]
        workers = (self.a.jobs or 2) if self.dry else 1
        poll = self.device == "cuda" and shutil.which("nvidia-smi") is not None
        self.log(f"phase B: {sum(len(p[4]) for p in plan)} speed runs, {workers} at a time, {self.left():.0f}s left")
        rows, ceilings = self.results["speed"]["rows"], {}

        def timeout() -> float:  # a GPU run 4x its estimate at most; a dry run whatever the deadline leaves
            return max(20.0, self.left() - REPORT_RESERVE if self.dry else min(est * 4, self.left() - REPORT_RESERVE))

        for file, spec, variant, budget, tags in plan:  # the envpool ceilings first, once per script
            if spec.envpool and spec.key not in ceilings and self.left() - REPORT_RESERVE >= est * 2:
                c = bench.run_ceiling(spec, budget, self.workdir, timeout(), log=self.log)
                ceilings[spec.key] = c
                self.results["speed"].setdefault("ceilings", {})[spec.key] = {k: c[k] for k in ("sps", "envs",
                                                                                                 "test_envs", "rc")}
                self.log(f"  envpool ceiling {spec.key}: {bench.fmt_sps(c['sps'])} SPS")

        def item(entry):
            file, spec, variant, budget, tags = entry
            name = spec.key if variant == next(iter(spec.variants)) else f"{spec.key}/{variant}"
            if self.left() - REPORT_RESERVE < est * len(tags):
                with self.lock:
                    self.results["skipped"].append(f"speed {name}: not enough time left ({self.left():.0f}s)")
                self.log(f"  skip {name}: {self.left():.0f}s left")
                return name, None
            cadence, scaled = bench.choose_cadence(spec.default_cadence, budget.measure, spec.gran(budget.args))
            res = {}
            for tag in tags:
                r = bench.measure(spec, variant, budget, cadence if tag == "on" else 0, self.workdir, timeout(),
                                  tag, poll, log=self.log)
                res[tag] = self.record(f"speed_{name.replace('/', '_')}_{tag}", r)
            if "on" in res:
                row = bench.make_row(spec, variant, budget, res["on"], res["off"], cadence, scaled,
                                     ceilings.get(spec.key), self.device)
            else:  # metrics off only (Hadamax): the columns that need the metrics-on run stay empty
                off = res["off"]
                row = {"script": spec.key, "variant": variant, "device": off.get("device") or self.device,
                       "fast": off.get("fast"), "envs": None, "cadence": 0, "scaled": False,
                       "sps_on": None, "sps_off": off["window"]["sps"] if off["window"] else None, "ratio": None,
                       "share": None, "p": None, "projected": None, "rss_mib": off.get("rss_mib"),
                       "gpu_mib": off.get("gpu_mib"), "ceiling": None, "pct_ceiling": None,
                       "errors": [f"metrics off: rc {off['rc']}"] if off["rc"] != 0 else []}
            for tag, r in res.items():
                row["errors"] += [f"metrics {tag}: {w}" for w in warnings_in(r["text"])]
            row["walls"] = {t: round(r["wall"], 1) for t, r in res.items()}
            self.log(f"  {name}: on {bench.fmt_sps(row.get('sps_on'))}, off {bench.fmt_sps(row.get('sps_off'))} "
                     f"{spec.unit}/s, peak GPU {bench.fmt_mib(row.get('gpu_mib'))}")
            return name, row

        with ThreadPoolExecutor(max_workers=workers) as pool:
            for name, row in pool.map(item, plan):
                if row is not None:
                    rows[name] = row
        self.results["targets"] = evaluate_targets(rows, self.dry, files)

    # -- the whole part ------------------------------------------------------------------------------------------
    def run(self) -> int:
        scripts = plan_scripts(self.part, self.a.scripts)
        self.results["scripts"] = scripts
        self.log(f"gpu_check: part {self.part}{' (dry run, CPU)' if self.dry else ''}, deadline {self.deadline_s:.0f}s,"
                 f" scripts {', '.join(scripts['check']) or 'none'}; workdir {self.workdir}")
        for f in scripts["unconfigured"]:
            self.log(f"!!! {f} has no line in SCRIPTS (scripts/gpu_check.py): not checked")
        self.preflight()
        if self.device != "cuda" and not self.dry:
            self.results["notes"].append("no CUDA device: nothing was run (use --dry-run on a CPU)")
            self.log("!!! no CUDA device visible to torch: stopping (use --dry-run on a CPU)")
            return self.finish()
        files = []
        for f in scripts["check"]:
            broken = self.broken_imports(f)
            if broken:
                self.results["equivalence"][f] = {"status": "FAIL", "reasons": [f"cannot import {b}" for b in broken]}
                self.log(f"!!! {f}: not run, missing packages: {'; '.join(broken)}")
            else:
                files.append(f)
        try:
            probe = "probe" in self.a.phases and self.probe_s > 0 and PROBE_SCRIPT in files
            if "equiv" in self.a.phases or probe:
                self.phase_a(files if "equiv" in self.a.phases else [], probe, items="items" in self.a.phases)
                self.write_report(final=False)
            if "speed" in self.a.phases:
                self.phase_b(files)
        finally:
            code = self.finish()
        return code

    def finish(self) -> int:
        self.results["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        report = self.write_report(final=True)
        self.archive_logs()
        if not self.a.workdir and not self.a.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)
        print("\n" + report, flush=True)
        verdict = overall(self.results)
        print(f"\ngpu_check part {self.part}: {verdict} in {self.results['elapsed_s']:.0f}s; report "
              f"{self.report_path()}", flush=True)
        return 0 if verdict.startswith("PASS") else 1

    def report_path(self) -> str:
        return os.path.join(self.out_dir, f"GPU_RESULTS_{self.part}{'_dry' if self.dry else ''}.md")

    def write_report(self, final: bool) -> str:
        os.makedirs(self.out_dir, exist_ok=True)
        text = render_report(self.results, header=self.header(), final=final)
        with open(self.report_path(), "w") as f:
            f.write(text)
        with open(self.report_path()[:-3].replace("GPU_RESULTS", "gpu_check") + ".json", "w") as f:
            json.dump(self.results, f, indent=1, default=str)
        return text

    def archive_logs(self) -> None:
        """The runs' logs, args.json, finished summaries and event files in one archive (< 15 MiB)."""
        path = os.path.join(self.out_dir, f"logs_{self.part}{'_dry' if self.dry else ''}.tar.gz")
        budget = 15 * 2 ** 20
        with tarfile.open(path, "w:gz") as tar:
            for f in sorted(glob.glob(os.path.join(self.workdir, "*.log")) +
                            glob.glob(os.path.join(self.workdir, "runs", "*", "*"))):
                base = os.path.basename(f)
                if not os.path.isfile(f) or not (base.endswith(".log") or base in ("args.json", "finished")
                                                 or base.startswith("events.out")):
                    continue
                size = os.path.getsize(f)
                if size > budget:
                    continue
                budget -= size
                tar.add(f, arcname=os.path.relpath(f, self.workdir))

    def header(self) -> dict:
        pre = self.results.get("preflight", {})
        return {"date": self.started.strftime("%Y-%m-%d %H:%M"), "argv": shlex.join(sys.argv[1:]),
                "gpu": pre.get("nvidia_smi") or pre.get("gpu") or "none", "cpus": pre.get("cpus", os.cpu_count()),
                "python": platform.python_version(), "torch": pre.get("versions", {}).get("torch"),
                "torch_cuda": pre.get("torch_cuda"), "versions": pre.get("versions", {}),
                "render": pre.get("render"), "device": getattr(self, "device", "?")}


# ---------------------------------------------------------------------------------------------------------------
# Judging and reporting (pure functions, tested on synthetic results)


def probe_curve(train: list, evals: list, bins: int = 10) -> list:
    """[{'step0', 'step1', 'train', 'eval', 'n'}]: the (step, return) points in `bins` equal step ranges."""
    if not train:
        return []
    hi = max(s for s, _ in train)
    edges = np.linspace(0, hi, bins + 1)
    out = []
    for i in range(bins):
        lo_, hi_ = edges[i], edges[i + 1]
        inside = (lambda pts: [v for s, v in pts if lo_ < s <= hi_ or (i == 0 and s == lo_)])
        t, e = inside(train), inside(evals)
        if t or e:
            out.append({"step0": int(lo_), "step1": int(hi_), "train": float(np.mean(t)) if t else None,
                        "eval": float(np.mean(e)) if e else None, "n": len(t)})
    return out


def judge_probe(curve: list) -> tuple:
    """PASS when the training return of the last third of the curve is at least twice and 3 points above the first
    third's (Breakout: ~1.5 for random play; a working PQN passes 10 within 1-2M steps); else FAIL (flat)."""
    vals = [b["train"] for b in curve if b["train"] is not None]
    if len(vals) < 3:
        return "FAIL", f"only {len(vals)} step range(s) with finished games"
    k = max(1, len(vals) // 3)
    first, last = float(np.mean(vals[:k])), float(np.mean(vals[-k:]))
    ok = last >= max(2 * first, first + 3)
    return ("PASS" if ok else "FAIL"), f"return {first:.1f} -> {last:.1f} (first / last third of the curve)"


def evaluate_targets(rows: dict, dry: bool, files: list) -> list:
    keys = {key_of(f) for f in files}
    out = []
    for name, key, value_fn, target, higher in TARGETS:
        if key not in keys:
            continue
        try:
            value = value_fn(rows)
        except (KeyError, TypeError, ZeroDivisionError):
            value = None
        ratio = None if value is None or value == 0 else (value / target if higher else target / value)
        if dry:
            status = "n/a"
        elif value is None:
            status = "FAIL"
        else:
            status = "PASS" if ratio >= 1 else "FAIL"
        out.append({"target": name, "value": value, "goal": target, "higher": higher, "ratio": ratio,
                    "status": status})
    return out


def overall(results: dict) -> str:
    """'PASS' or 'FAIL: reasons' over every item (n/a and skipped items do not fail; unconfigured scripts do)."""
    bad = [f"equivalence {f}" for f, e in results["equivalence"].items() if e["status"] != "PASS"]
    bad += [f"{item} {f}" for item, per in results.get("items", {}).items() for f, e in per.items()
            if e["status"] == "FAIL"]
    bad += [f"no SCRIPTS line for {f}" for f in results.get("scripts", {}).get("unconfigured", [])]
    bad += [f"target '{t['target']}'" for t in results["targets"] if t["status"] == "FAIL"]
    bad += [f"speed {n}: {'; '.join(r['errors'])}" for n, r in results["speed"]["rows"].items() if r.get("errors")]
    if results.get("probe") and results["probe"]["status"] == "FAIL":
        bad.append("learning probe")
    if results["warnings"]:
        bad.append(f"{len(results['warnings'])} fallback warning(s)")
    if not results.get("preflight", {}).get("cuda") and not results["dry_run"]:
        bad.append("no CUDA device")
    return "PASS" if not bad else "FAIL: " + "; ".join(bad)


def _fmt(x, spec: str = ".2e") -> str:
    return "—" if x is None else format(x, spec)


def item_number(item: str) -> int:
    return list(ITEMS).index(item) + 1


def item_detail(item: str, e: dict) -> str:
    """One cell: why an item failed, else its measurement."""
    if e.get("reasons"):
        return "; ".join(e["reasons"])[:400]
    if item == "equivalence+":
        return (f"losses first {_fmt(e.get('first'), '.1e')} / median {_fmt(e.get('median'), '.1e')}"
                + (f"; evaluation returns {_fmt(e['eval'], '.1e')}" if e.get("eval") is not None else ""))
    if item == "cpu":
        return (f"first loss {_fmt(e.get('first'), '.1e')} / median {_fmt(e.get('median'), '.1e')} (tol {e['tol']:g}; "
                + ("same data" if e.get("same_data") else "device RNG draws differ: bounds the gap only") + ")")
    if item == "resume":
        return (f"{e.get('kills')} kills, losses before the first kill {_fmt(e.get('before_kill_max_rel'), '.1e')} "
                f"from the uninterrupted run; same steps to the end")
    if item == "variants":
        return f"{len(e.get('runs', {}))} runs: " + " / ".join(f"`{r}`" for r in e.get("runs", {}).values())[:300]
    if item == "snapshots":
        cpu = f"; on the CPU: largest gap {_fmt(e.get('cpu_max_abs'), '.1e')}" if "cpu_max_abs" in e else ""
        return (f"inline = recomputed at steps {e.get('steps')} (largest gap {_fmt(e.get('max_abs'), '.1e')}, "
                f"tol rel {SNAPSHOT_TOL[0]:g} / abs {SNAPSHOT_TOL[1]:g}){cpu}")
    if item == "syncs":
        return (f"{_fmt(e.get('per_iteration'), '.2f')} per loop iteration (action reads {e.get('expected', 0):g}, "
                f"limit {e.get('limit', 0):g}), {_fmt(e.get('per_step'), '.3f')} per step")
    if item == "determinism":
        cost = f", cost {e['cost']:+.1%} SPS without it" if e.get("cost") is not None else ""
        ops = f"; no deterministic kernel: {e['nondeterministic_ops']}" if e.get("nondeterministic_ops") else ""
        return f"{e.get('points')} loss points identical{cost}{ops}"
    return ""


def render_report(res: dict, header: dict, final: bool = True) -> str:
    """The markdown report (bench/GPU_RESULTS.md's format)."""
    dry = res["dry_run"]
    lines = [f"## {header['date']} — `scripts/gpu_check.py {header['argv']}`" + (" (DRY RUN on the CPU: the numbers "
             "only show the format)" if dry else ""), ""]
    if not final:
        lines += ["**Partial report (written after the equivalence phase; the check was still running).**", ""]
    lines += [f"- GPU: {header['gpu']}; device of the runs: {header['device']}; {header['cpus']} CPUs",
              f"- Python {header['python']}, torch {header['torch']} (CUDA {header['torch_cuda']}); "
              + ", ".join(f"{k} {v}" for k, v in header["versions"].items() if k != "torch"),
              f"- part `{res['part']}`, {res.get('elapsed_s', '?')} s" + (f"; MuJoCo rendering {header['render']}"
                                                                           if header.get("render") else ""),
              "", f"**Overall: {overall(res)}**", ""]
    # summary
    lines += ["| item | status | detail |", "|---|---|---|"]
    for f, e in res["equivalence"].items():
        detail = "; ".join(e["reasons"]) if e["reasons"] else (
            f"params {_fmt(e['params']['ratio'])} of movement (tol {e['tolerances']['param']}), losses first "
            f"{_fmt(e['losses']['first'], '.1e')} / median {_fmt(e['losses']['median'], '.1e')} "
            f"(tol {FIRST_LOSS_TOL:.0e} / {e['tolerances']['loss']})")
        lines.append(f"| 1. equivalence `{f}` | {e['status']} | {detail} |")
    for f in res.get("scripts", {}).get("unconfigured", []):
        lines.append(f"| 1. equivalence `{f}` | FAIL | no line in SCRIPTS (scripts/gpu_check.py): not checked |")
    for item, per in res.get("items", {}).items():
        for f, e in per.items():
            lines.append(f"| {item_number(item)}. {item} `{f}` | {e['status']} | {item_detail(item, e)} |")
    for f in res.get("scripts", {}).get("absent", []):
        lines.append(f"| 1. equivalence `{f}` | absent | configured, not in this checkout |")
    for t in res["targets"]:
        val = _fmt(t["value"], ".0%" if t["goal"] < 1 else ",.2f" if t["goal"] < 10 else ",.0f")
        lines.append(f"| {item_number('speed')}. speed: {t['target']} | {t['status']} | measured {val}, ratio to target "
                     f"{_fmt(t['ratio'], '.2f')} |")
    for n, r in res["speed"]["rows"].items():
        if r.get("errors"):
            lines.append(f"| {item_number('speed')}. speed {n} | FAIL | {'; '.join(r['errors'])} |")
    for s in res["skipped"]:
        lines.append(f"| {s.split(':')[0]} | skipped | {s.split(':', 1)[1].strip()} |")
    if res.get("probe"):
        p = res["probe"]
        lines.append(f"| {item_number('probe')}. probe: learning (PQN Breakout) | {p['status']} | {p['why']}; {p['points']} point(s) up to "
                     f"step {p['last_step']:,} |")
    lines.append(f"| fallback `warning:` lines | {'FAIL' if res['warnings'] else 'PASS'} | "
                 f"{len(res['warnings'])} |")
    for note in res["notes"]:
        lines.append(f"| note | — | {note} |")
    if res["warnings"]:
        lines += ["", "### Fallback warnings", ""] + [f"- `{w['run']}`: `{w['line']}`" for w in res["warnings"]]
    if res.get("compile_notes"):
        lines += ["", "torch.compile's own log lines (graph breaks, recompilations; not fallbacks, fail nothing): " +
                  "; ".join(f"`{run}` {n['n']} (first: `{n['first'][0][:120]}`)" for run, n in
                            res["compile_notes"].items())]
    if res.get("other_warnings"):
        lines += ["", "Other `warning:` lines (not fallbacks; each once): " +
                  "; ".join(f"`{w}`" for w in res["other_warnings"])]
    # 1.
    if res["equivalence"]:
        lines += ["", "### 1. Equivalence: fast paths vs `--compile off --cudagraphs off`", "",
                  "| script | fast paths | loss points | loss diff first / median / max | params: diff / movement "
                  "| max abs diff | reference | peak GPU | wall s (fast, plain, ref) | status |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for f, e in res["equivalence"].items():
            lo, pa = e.get("losses") or {}, e.get("params") or {}
            walls = e.get("walls", {})
            lines.append(
                f"| `{f}` | {e.get('fast_paths') or '—'} | {lo.get('points', '—')} | "
                f"{_fmt(lo.get('first'), '.1e')} / "
                f"{_fmt(lo.get('median'), '.1e')} / {_fmt(lo.get('max'), '.1e')} | {_fmt(pa.get('ratio'))}"
                + (f" (halfway {_fmt(pa['mid_ratio'])})" if pa.get("mid_ratio") is not None else "")
                + f" | {_fmt(pa.get('max_abs'))} | {e.get('ref', '—')} | "
                f"{bench.fmt_mib(e.get('peak_gpu_mib'))} | "
                f"{', '.join(str(walls[t]) for t in ('fast', 'plain', 'ref') if t in walls) or '—'} | "
                f"{e['status']} |")
        lines += ["", "Loss diff: |fast - plain| / median |plain| per compared tag, the worst tag; params: "
                  "||fast - plain|| / ||plain - reference|| (reference `init`: the initial parameters, from a run "
                  "that changes nothing; `checkpoint`: the run's own checkpoint). Tolerances and why: the comment "
                  "above FIRST_LOSS_TOL in scripts/gpu_check.py."]
    # 2.
    rows = res["speed"]["rows"]
    if rows:
        table_rows = [dict(r, script=n.split("/")[0]) for n, r in rows.items()]
        lines += ["", f"### {item_number('speed')}. Speed (steady state; bench.py's full mode with short budgets)", "",
                  bench.format_table(table_rows)]
        if res["targets"]:
            lines += ["", "| GPU target | measured | target | ratio to target | status |", "|---|---|---|---|---|"]
            for t in res["targets"]:
                lines.append(f"| {t['target']} | {_fmt(t['value'], ',.3g')} | {t['goal']:,} | "
                             f"{_fmt(t['ratio'], '.2f')} | {t['status']} |")
    # 3.
    if res.get("probe"):
        p = res["probe"]
        lines += ["", f"### {item_number('probe')}. Learning probe: PQN on Breakout-v5, {p['points']} logged points, last step "
                  f"{p['last_step']:,}, SPS {_fmt(p.get('sps'), ',.0f')}", "",
                  "| steps | train return | eval return (greedy) | games | |", "|---|---|---|---|---|"]
        top = max([b["train"] or 0 for b in p["curve"]] + [1e-9])
        for b in p["curve"]:
            bar = "#" * int(round(30 * (b["train"] or 0) / top))
            lines.append(f"| {b['step0']:,}-{b['step1']:,} | {_fmt(b['train'], '.1f')} | {_fmt(b['eval'], '.1f')} | "
                         f"{b['n']} | `{bar}` |")
    runs = res["runs"]
    if runs:
        lines += ["", f"Runs: {len(runs)}, wall seconds: " + ", ".join(f"{r['name']} {r['wall']}" for r in runs)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, epilog=device_calls_text(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=list(PARTS), default="all", help="which device command's share (default all)")
    p.add_argument("--dry-run", action="store_true", help="the CPU rehearsal: tiny budgets, every code path, "
                   "the report (speed targets and the probe are not judged)")
    p.add_argument("--scripts", nargs="+", metavar="KEY", default=None,
                   help="only these scripts (dqn ppo pqn drq simbav2 mrq: the file name up to its first '_')")
    p.add_argument("--phases", nargs="+", choices=["equiv", "items", "speed", "probe"],
                   default=["equiv", "items", "speed", "probe"], help="items: cpu, resume, variants, syncs and "
                   "determinism (with equiv)")
    p.add_argument("--out-dir", default=os.environ.get("OUT") or os.path.join(REPO, "gpu_check_out"),
                   help="where the report, the JSON results and the logs go (default $OUT, else gpu_check_out/)")
    p.add_argument("--workdir", default=None, help="keep the runs here (default: a temporary directory, removed)")
    p.add_argument("--keep", action="store_true", help="keep the temporary working directory")
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds from start to the report (default per part: " +
                   ", ".join(f"{k} {v['deadline']}" for k, v in PARTS.items()) + f"; dry run {DRY['deadline']})")
    p.add_argument("--equiv-seconds", type=float, default=None, help="cap of the equivalence phase (seconds)")
    p.add_argument("--probe-seconds", type=float, default=None, help="wall-clock time of the learning probe (0: none)")
    p.add_argument("--jobs", type=int, default=None, help="equivalence runs at a time (default: all on a GPU, 2 dry)")
    p.add_argument("--fast", default=None, metavar="FLAGS",
                   help=f"flags of the fast run (default '{FAST}'); e.g. '--compile on' to calibrate on a CPU")
    p.add_argument("--plan", action="store_true", help="print the commands the check would run and exit")
    p.add_argument("--fresh-processes", action="store_true",
                   help="--dry-run: start every run as a fresh process (default: the runs of phase A are forked from "
                   "a server per script that imported its modules once, scripts/forks.py; a GPU check always starts "
                   "fresh processes)")
    args = p.parse_args(argv)
    if args.scripts:
        known = {key_of(f) for f in list(SCRIPTS) + discover()}
        unknown = sorted(set(args.scripts) - known)
        if unknown:
            p.error(f"--scripts: unknown {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return args


def print_plan(check: GpuCheck) -> None:
    """Every command of the part, as the check would build them (no preflight: GPU-mode flags)."""
    check.device, check.device_flags = ("cpu" if check.dry else "cuda"), []
    scripts = plan_scripts(check.part, check.a.scripts)
    print(f"# part {check.part}{' (dry run)' if check.dry else ''}: {', '.join(scripts['check'])}")
    for f in scripts["unconfigured"]:
        print(f"# {f}: no line in SCRIPTS, not checked")
    for f in scripts["absent"]:
        print(f"# {f}: configured, absent")
    for job in check.equivalence_jobs(scripts["check"]) + check.item_jobs(scripts["check"]):
        for argv, kills in job.stages:
            print(f"{job.item:8s} {job.tag:6s} python {job.file} {shlex.join(argv)} --run-name {job.name}"
                  + (f"  # SIGKILL after checkpoint {kills}" if kills else "")
                  + ("  # + " + " ".join(f"{k}={v}" for k, v in job.env.items()) if job.env else ""))
    print("syncs    (the eq fast runs count their host syncs: HARNESS_COUNT_SYNCS=1)")
    if check.part in ("atari", "all") and PROBE_SCRIPT in scripts["check"]:
        print(f"probe       python {PROBE_SCRIPT} {shlex.join(check.probe_argv())}")
    for file, spec, variant, budget, tags in check.speed_plan(scripts["check"]):
        cadence, _ = bench.choose_cadence(spec.default_cadence, budget.measure, spec.gran(budget.args))
        total = bench.round_up(budget.warmup + budget.measure, spec.gran(budget.args))
        print(f"speed {'/'.join(tags):6s} python {file} {shlex.join(budget.args + spec.variants[variant])} "
              f"--total-timesteps ~{total} --metrics-every {cadence}|0 (warm-up {budget.warmup}, window "
              f"{budget.measure})")


def main(argv=None) -> int:
    args = parse_args(argv)
    check = GpuCheck(args)
    if args.plan:
        print_plan(check)
        return 0
    return check.run()


if __name__ == "__main__":
    sys.exit(main())
