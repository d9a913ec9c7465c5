#!/usr/bin/env python
"""What a snapshot costs at each script's recipe sizes: its size on disk, the probe batch's, and the time
scripts/probe.py takes to recompute one snapshot's metrics (one setting: the network built, the weights loaded, the
script's own probe on its default --metrics-batch).

    python scripts/bench_probe.py [--scripts dqn ppo ...] [--repeats 3] [--device cpu] [--metrics-batch N]

No training and no environment: the networks are built at the default flags with the sizes the recipe's environment
gives (below), with their initial weights, and the probe batch is random (uint8 frames, or states and actions), so
the time is the probe's cost, not that of any particular network state. Prints one Markdown table.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import io
import math
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("MUJOCO_GL", "egl")

import torch  # noqa: E402

# script -> (the recipe's environment, the sizes it gives: what the run puts in its snapshots' `build`)
RECIPES = {
    "dqn": ("dqn_atari_hr", "BreakoutNoFrameskip-v4", {"n_actions": 4}),
    "ppo": ("ppo_atari_hr", "Breakout-v5", {"n_actions": 4, "obs_shape": [4, 84, 84]}),
    "pqn": ("pqn_atari_hr", "Breakout-v5", {"n_actions": 4, "obs_shape": [4, 84, 84]}),
    "drq": ("drq_dmc_dominance", "cartpole-swingup", {"obs_shape": [9, 84, 84], "action_dim": 1}),
    "simbav2": ("simbav2_dmc_hr", "humanoid-run", {"obs_dim": 67, "action_dim": 21}),
    "mrq": ("mrq_dmc_hr", "walker-walk", {"obs_shape": [9, 84, 84], "action_dim": 6}),
}


def networks(name: str, m, args, build: dict) -> dict:
    """The modules a run of `name` snapshots, at its initial weights (as the script's Snapshots call names them)."""
    if name == "dqn":
        return {"q_network": m.QNetwork(args, build["n_actions"])}
    if name == "ppo":
        return {"agent": m.Agent(args, build["n_actions"], tuple(build["obs_shape"]))}
    if name == "pqn":
        return {"network": m.QNetwork(args, build["n_actions"], tuple(build["obs_shape"]))}
    if name == "drq":
        return {"critic": m.Critic(tuple(build["obs_shape"]), build["action_dim"], args)}
    if name == "simbav2":
        return {"actor": m.Actor(build["obs_dim"], build["action_dim"], args),
                "critic": m.Critic(build["obs_dim"], build["action_dim"], args)}
    base = m.Widths(args.conv_channels, args.zs_dim, args.enc_hdim)
    build["widths"], build["hr"] = list(base), []
    encoder, value, _ = m.build_networks(args, tuple(build["obs_shape"]), build["action_dim"], base, ())
    return {"encoder": encoder, "value": value}


def probe_batch(name: str, args, build: dict) -> dict:
    n, g = args.metrics_batch, torch.Generator().manual_seed(0)
    if name == "simbav2":
        return {"obs": torch.randn(n, build["obs_dim"], generator=g),
                "actions": torch.rand(n, build["action_dim"], generator=g) * 2 - 1}
    shape = build.get("obs_shape", [4, 84, 84])
    batch = {"obs": torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=g)}
    if name in ("drq", "mrq"):
        batch["actions"] = torch.rand(n, build["action_dim"], generator=g) * 2 - 1
    return batch


def nbytes(obj) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.tell()


def measure(name: str, repeats: int, device: torch.device, metrics_batch: int | None = None) -> dict:
    module, env_id, build = RECIPES[name]
    m = importlib.import_module(module)
    args = m.Args(env_id=env_id)
    if metrics_batch:
        args.metrics_batch = metrics_batch
    if hasattr(m, "resolve_defaults"):
        args = m.resolve_defaults(args)
    build = dict(build)
    nets = networks(name, m, args, build)
    extra = {"obs_affine": torch.stack([torch.zeros(build["obs_dim"]), torch.ones(build["obs_dim"])])} \
        if name == "simbav2" else {"ln_on": True} if name == "drq" else {}
    snapshot = {"format": 1, "script": module + ".py", "step": 0, "device": "cpu", "build": build, "extra": extra,
                "networks": {k: {n: t.detach().cpu() for n, t in v.state_dict().items()} for k, v in nets.items()}}
    probe = probe_batch(name, args, build)
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first call warms up (allocator, kernels): not counted
            t0 = time.perf_counter()
            m.probe_snapshot(dataclasses.replace(args), snapshot, probe, device)
            times.append(time.perf_counter() - t0)
    every = args.metrics_every
    weights = sum(t.numel() * t.element_size() for n in nets.values() for t in n.state_dict().values())
    return {"script": module + ".py", "env": env_id, "batch": args.metrics_batch, "weights_mb": weights / 1e6,
            "snapshot_mb": nbytes(snapshot) / 1e6,
            "probe_mb": nbytes({"probe": probe}) / 1e6, "count": args.total_timesteps // every, "every": every,
            "seconds": min(times[1:]) if repeats else times[0]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scripts", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    p.add_argument("--repeats", type=int, default=3, help="timed probes per script after one warm-up (the best is kept)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--metrics-batch", type=int, default=None, help="another probe batch size (default: each script's)")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")
    print("| script | recipe env | one snapshot | probe batch (--metrics-batch) | --snapshot-every = --metrics-every: "
          "the run's snapshots | probe.py per snapshot and setting |")
    print("|---|---|---|---|---|---|")
    for name in a.scripts:
        r = measure(name, a.repeats, device, a.metrics_batch)
        total = r["count"] * r["snapshot_mb"] + r["probe_mb"]
        print(f"| `{r['script']}` | {r['env']} | {r['snapshot_mb']:.2f} MB | {r['probe_mb']:.2f} MB ({r['batch']}) | "
              f"{r['count']} x every {r['every']:,}: {total / 1e3:.2f} GB | {r['seconds']:.2f} s |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
