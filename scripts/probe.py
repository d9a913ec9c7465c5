#!/usr/bin/env python
"""Representation metrics after the fact: recompute every representation/* scalar of a run from its network
snapshots, at the run's own thresholds and at any others.

    python dqn_atari_hr.py --activation tanh --hr --snapshot-every 100000 --run-name tanh_hr
    python scripts/probe.py runs/tanh_hr --redo-tau 0 0.025 0.1 --kde-threshold 10 --srank-delta 0.001

A run made with --snapshot-every N holds runs/NAME/snapshots/: the weights of the networks its probe reads, every N
steps (step_<step>.pt), and probe.pt, the fixed probe batch its inline metrics used. For each snapshot this script
builds the script's own networks (the flags in runs/NAME/args.json, the sizes in the snapshot), loads the weights and
calls the script's own probe (its `probe_snapshot`, which calls the `probe_metrics` the training loop calls), once
per setting:
  own                   the run's own thresholds: the values equal what the run logged inline at the same step
  redo_tau=T            --redo-tau T (ReDo score threshold: dormant_score), the others as the run had them
  kde_threshold=K       --kde-threshold K (KDE-peak test: dormant_kde, hidden_bias, live_contribution)
  srank_delta=D         --srank-delta D (effective rank: srank)
Each setting is written as TensorBoard scalars, with the tags the run logs, to runs/NAME/probe/<setting>/ (a run's
inline events are never mixed with recomputed ones; point TensorBoard at runs/ and each setting is a run of its own),
and all settings to one CSV, runs/NAME/probe/metrics.csv (setting, step, tag, value). Running it again rewrites the
settings it computes and keeps the others. `scripts/analyze.py runs --metrics-from redo_tau=0.025` draws and tabulates
a setting in place of the inline metrics.

Not recomputed: DrQ's grad/* (gradients of the update at the probe step need that update's batch and optimizer).
Exactness: same device and torch build as the run: equal up to float32 rounding (the probe's forward runs in other
batch shapes nowhere: the same chunks, the same KDE jitter seeded by --seed). On another device (a CUDA run probed on
the CPU) the KDE jitter comes from another generator and matmuls round differently: dormant_kde may differ by a
neuron or so. --device auto uses the run's device when it is available.

Bad input: a directory without snapshots, a run of a script this tool does not know, args.json that is not the
script's, an unknown option, a threshold the script's probe does not have (PQN's --kde-threshold): one line each,
exit 1 (the other runs are still probed). A corrupt or truncated snapshot is skipped and named.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib
import json
import math
import os
import shutil
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SCRIPTS = ("dqn_atari_hr.py", "ppo_atari_hr.py", "pqn_atari_hr.py", "drq_dmc_dominance.py", "simbav2_dmc_hr.py",
           "mrq_dmc_hr.py")
THRESHOLDS = ("redo_tau", "kde_threshold", "srank_delta")


class ProbeError(Exception):
    """One run cannot be probed: the message is its one line."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 1, as the training scripts answer bad input
        sys.stderr.write(f"error: {message} (thresholds: --redo-tau, --kde-threshold, --srank-delta; see --help)\n")
        sys.exit(1)


def parse_args(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories (runs/NAME) made with --snapshot-every")
    p.add_argument("--redo-tau", type=float, nargs="+", default=[], metavar="T",
                   help="ReDo thresholds: a neuron whose activation score is <= T is dormant (dormant_score)")
    p.add_argument("--kde-threshold", type=float, nargs="+", default=[], metavar="K",
                   help="KDE-peak thresholds: a neuron whose activation density peaks above K is dormant")
    p.add_argument("--srank-delta", type=float, nargs="+", default=[], metavar="D",
                   help="effective-rank thresholds: the fewest singular values holding 1 - D of their sum")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to run the probes (auto: the run's device when available, else the CPU)")
    a = p.parse_args(argv)
    for name, lo, hi, lo_open in (("redo_tau", 0.0, math.inf, False), ("kde_threshold", 0.0, math.inf, True),
                                  ("srank_delta", 0.0, 1.0, False)):
        for v in getattr(a, name):
            if not (math.isfinite(v) and (v > lo if lo_open else v >= lo) and v < hi):
                p.error(f"--{name.replace('_', '-')} {v}: must be {'>' if lo_open else '>='} {lo:g}"
                        + (f" and < {hi:g}" if math.isfinite(hi) else " and finite"))
    return a


def settings(a) -> list[tuple[str, dict]]:
    """("own", {}) then one setting per threshold value given: (name, {flag field: value})."""
    return [("own", {})] + [(f"{name}={v:g}", {name: v}) for name in THRESHOLDS for v in getattr(a, name)]


def load(path: str) -> dict:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - a truncated or corrupt file: one answer for all
        raise ProbeError(f"cannot read {path} ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]})")
    import harness

    if not isinstance(obj, dict) or obj.get("format") != harness.SNAPSHOT_FORMAT or "script" not in obj:
        raise ProbeError(f"cannot read {path} (not a snapshot of this toolkit, format {harness.SNAPSHOT_FORMAT})")
    return obj


def open_run(run_dir: str):
    """(script module, Args, probe batch, [(step, path)]) of one run, or ProbeError with its one line."""
    import harness

    snap_dir = os.path.join(run_dir, "snapshots")
    if not os.path.isfile(os.path.join(run_dir, "args.json")):
        raise ProbeError(f"{run_dir} is not a run directory (no args.json)")
    steps = sorted((harness.snapshot_step(n), os.path.join(snap_dir, n)) for n in
                   (os.listdir(snap_dir) if os.path.isdir(snap_dir) else []) if harness.snapshot_step(n) is not None)
    if not steps:
        raise ProbeError(f"{run_dir} has no snapshots (train with --snapshot-every N to keep them)")
    probe_path = os.path.join(snap_dir, "probe.pt")
    if not os.path.isfile(probe_path):
        raise ProbeError(f"{run_dir} has snapshots but no probe batch ({probe_path}): no probe drew one before the "
                         f"run stopped")
    probe = load(probe_path)
    script = probe["script"]
    if script not in SCRIPTS:
        raise ProbeError(f"{run_dir} was made by {script}, which has no probe here (known: {', '.join(SCRIPTS)})")
    module = importlib.import_module(script[:-3])
    with open(os.path.join(run_dir, "args.json")) as f:
        saved = json.load(f)
    fields = {f.name for f in dataclasses.fields(module.Args)}
    foreign = sorted(set(saved) - fields)
    if foreign:
        raise ProbeError(f"{run_dir}/args.json is not {script}'s (flags it does not have: "
                         f"{', '.join('--' + k.replace('_', '-') for k in foreign[:5])})")
    return module, module.Args(**saved), probe, steps


def write_csv(path: str, rows: list, replaced: set) -> None:
    """metrics.csv: keep the rows of settings not recomputed now, then this run's rows."""
    kept = []
    if os.path.isfile(path):
        with open(path, newline="") as f:
            kept = [r for r in csv.DictReader(f) if r["setting"] not in replaced]
    with open(path + ".tmp", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["setting", "step", "tag", "value"])
        w.writeheader()
        w.writerows(kept + rows)
    os.replace(path + ".tmp", path)


def probe_run(run_dir: str, a) -> int:
    """Recompute one run; returns the number of snapshots probed."""
    import torch
    from torch.utils.tensorboard import SummaryWriter

    import harness

    module, args, probe, steps = open_run(run_dir)
    plan = settings(a)
    absent = sorted({k for _, overrides in plan for k in overrides} - {f.name for f in dataclasses.fields(args)})
    if absent:  # e.g. PQN's probe has no --kde-threshold (common.probe_scalars' default)
        raise ProbeError(f"{run_dir} was made by {probe['script']}, whose probe has no "
                         f"{', '.join('--' + k.replace('_', '-') for k in absent)} (fixed at the default)")
    want = a.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() and load(steps[0][1]).get("device") == "cuda" else "cpu"
    elif want == "cuda" and not torch.cuda.is_available():
        raise ProbeError("--device cuda: no CUDA GPU is available")
    device = torch.device(want)
    out_dir = os.path.join(run_dir, "probe")
    writers = {}
    for name, _ in plan:
        shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)  # nothing logged twice on a second call
        writers[name] = SummaryWriter(os.path.join(out_dir, name))
        writers[name].add_custom_scalars(harness.metrics_layout())
    rows, done, t0 = [], 0, time.perf_counter()
    for step, path in steps:
        try:
            snap = load(path)
            if snap["script"] != probe["script"]:
                raise ProbeError(f"{path} was made by {snap['script']}, the probe batch by {probe['script']}")
            for name, overrides in plan:
                with torch.no_grad():  # not set_grad_enabled(False), which a caller in this process would keep
                    scalars = module.probe_snapshot(dataclasses.replace(args, **overrides), snap, probe["probe"],
                                                    device)
                for tag, value in scalars.items():
                    writers[name].add_scalar(tag, value, step)
                    rows.append({"setting": name, "step": step, "tag": tag, "value": repr(float(value))})
            done += 1
        except ProbeError as e:
            print(f"warning: skipped {path}: {e}", file=sys.stderr)
        except (RuntimeError, KeyError, ValueError) as e:  # weights of another network shape, a diverged network
            print(f"warning: skipped {path}: cannot probe it ({type(e).__name__}: "
                  f"{(str(e).splitlines() or [''])[0][:160]})", file=sys.stderr)
    for w in writers.values():
        w.close()
    write_csv(os.path.join(out_dir, "metrics.csv"), rows, {name for name, _ in plan})
    seconds = time.perf_counter() - t0
    print(f"{run_dir}: {done} of {len(steps)} snapshots x {len(plan)} settings on {device.type} in {seconds:.1f}s "
          f"({seconds / max(done, 1):.2f}s per snapshot) -> {out_dir}/", flush=True)
    if not done:
        raise ProbeError(f"{run_dir}: no snapshot could be probed")
    return done


def main(argv=None) -> int:
    a = parse_args(argv)
    failed = 0
    for run_dir in a.runs:
        run_dir = run_dir.rstrip("/")
        try:
            probe_run(run_dir, a)
        except ProbeError as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
