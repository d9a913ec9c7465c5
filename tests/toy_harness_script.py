"""A toy training script on harness.py, for tests/test_harness.py: a tiny nn.Linear fitted to random targets from a
numpy ring replay (saved through a harness.ChunkStore), one scalar logged every step, a probe, checkpoints.
--nan-at STEP injects a non-finite loss at STEP; --sleep makes every step slow enough for a test to kill the run."""
import dataclasses
import os
import sys
import time
from typing import Literal, Optional

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import harness  # noqa: E402

CHUNK = 16  # replay slots per ChunkStore chunk: several chunks in a tiny ring


@dataclasses.dataclass
class Args:
    # Run
    exp_name: str = "toy"
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """torch.backends.cudnn.deterministic"""
    cuda: bool = False
    """use CUDA when available"""
    track: bool = False
    """track with Weights and Biases"""
    run_name: Optional[str] = None
    """run directory runs/NAME"""
    env_id: str = "Toy-v0"
    """the (pretend) environment id"""
    total_timesteps: int = 120
    """steps of the run"""
    # Algorithm
    learning_rate: float = 0.01
    """Adam learning rate"""
    buffer_size: int = 48
    """replay ring slots"""
    batch_size: int = 8
    """samples per update"""
    # Metrics
    metrics_every: int = 20
    """steps between probes (0 = never)"""
    metrics_batch: int = 16
    """samples per probe"""
    # Checkpointing
    checkpoint_every: int = 40
    """steps between checkpoints (0 = never)"""
    resume: bool = False
    """continue runs/NAME from its checkpoint"""
    # Speed
    compile: Literal["auto", "on", "off"] = "off"
    """torch.compile"""
    cudagraphs: Literal["auto", "on", "off"] = "off"
    """CUDA graphs"""
    # Test hooks
    nan_at: int = -1
    """make the loss non-finite at this step (-1 = never)"""
    sleep: float = 0.0
    """seconds to sleep every step"""


def validate(args: Args) -> None:
    harness.at_least(args, {"buffer_size": 1, "batch_size": 1})
    harness.finite(args, ["learning_rate"])
    if args.metrics_batch > args.buffer_size:
        harness.fail(f"--metrics-batch {args.metrics_batch} exceeds --buffer-size {args.buffer_size}")


if __name__ == "__main__":
    args = harness.cli(Args)
    validate(args)
    run = harness.Run(args, memory={f"--buffer-size {args.buffer_size}": args.buffer_size * 5 * 4})
    rng = np.random.default_rng(args.seed)
    obs = np.zeros((args.buffer_size, 4), np.float32)
    targets = np.zeros((args.buffer_size, 1), np.float32)
    store = harness.ChunkStore({"obs": obs, "targets": targets}, chunk=CHUNK)
    hidden, head = torch.nn.Linear(4, 8), torch.nn.Linear(8, 1)
    optimizer = torch.optim.Adam([*hidden.parameters(), *head.parameters()], lr=args.learning_rate)
    filled = 0
    if run.checkpoint is not None:
        state = run.checkpoint["state"]
        hidden.load_state_dict(state["hidden"])
        head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        harness.set_rng_state(state["rng"], rng)
        filled = state["filled"]
        run.restore_replay(store)
        run.resumed(hidden, head)
    run.fast_paths()
    run.describe(hidden, head)
    last_good = harness.LastGood()

    def net_state():
        return {"hidden": hidden.state_dict(), "head": head.state_dict(), "optimizer": optimizer.state_dict()}

    last_good.update(run.start_step, net_state())

    for step in range(run.start_step, args.total_timesteps):
        slot = step % args.buffer_size
        obs[slot] = rng.standard_normal(4)
        targets[slot] = obs[slot].sum()
        store.touch(slot)
        filled = min(filled + 1, args.buffer_size)
        idx = rng.integers(0, filled, args.batch_size)
        x, y = torch.from_numpy(obs[idx]), torch.from_numpy(targets[idx])
        loss = torch.nn.functional.mse_loss(head(torch.relu(hidden(x))), y)
        if step == args.nan_at:
            loss = loss * float("nan")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if not harness.all_finite([*hidden.parameters(), *head.parameters()], loss).item():
            run.stop_nonfinite(step, "loss" if not torch.isfinite(loss) else "parameters", last_good)
        last_good.update(step + 1, net_state())
        run.log(step, {"losses/loss": loss.item()})
        if harness.due(step, args.metrics_every) and filled >= args.metrics_batch:
            with run.probing(), torch.no_grad():
                batch = torch.from_numpy(obs[:args.metrics_batch])
                pre = hidden(batch)
                run.log(step, common.probe_scalars({"latent": (torch.relu(pre), pre)}, head.weight, seed=args.seed))
        if step % 10 == 0:
            run.episode(step, float(-loss.item()), 10)
        if run.checkpoint_due(step + 1):
            run.save(step + 1, {**net_state(), "rng": harness.rng_state(rng), "filled": filled},
                     replay=store, filled=filled)
        run.progress(step + 1, loss=loss.item())
        time.sleep(args.sleep)
    run.finish(args.total_timesteps)
