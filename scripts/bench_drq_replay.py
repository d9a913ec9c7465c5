"""Host time per DrQ update spent preparing the batch (sampling, stack gather, upload enqueue), old path vs new.

    python scripts/bench_drq_replay.py            # the recipe's sizes (drq_dmc_dominance.Args): 2.1 GB ring
    python scripts/bench_drq_replay.py --quick    # a small ring and batch: a few seconds (the test runs this)

Paths (drq_dmc_dominance.BatchSampler):
  host    the ring on the host: np.take of 2 x batch x stack frames into a pinned buffer, one non-blocking upload
          (what every update did before; now the fallback when the ring does not fit in half the free GPU memory)
  device  the ring mirrored where the update runs (on the CPU: the host ring itself, no copy): only the slot indices
          go up, the stacks are gathered there by index_select

Columns, in milliseconds: `write` the host time of storing one frame (rb.add; on CUDA with the mirror it also queues
the frame's upload), `batch` the host time of sampler.sample() (what the training loop waits for between the action
sync and launching the update), `ready` until the batch is on the device (after a synchronize; = batch on the CPU).
Runs on CUDA when available (--no-cuda: the CPU)."""
import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import drq_dmc_dominance as drq  # noqa: E402

EPISODE = 500  # agent steps per episode: 1000 frames at action repeat 2


def fill(rb: drq.FrameReplay, n: int, pool: np.ndarray, action_dim: int) -> None:
    """n writes of frames from `pool`, episodes of EPISODE agent steps, each after its reset frame."""
    for t in range(n):
        if t % (EPISODE + 1) == 0:
            rb.add_first(pool[t % len(pool)])
        else:
            rb.add(pool[t % len(pool)], np.zeros(action_dim, np.float32), 1.0, False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(rb, pool, action_dim, batch_size, device, on_device, updates, seed=0) -> dict:
    """Mean ms per update of write, batch and ready over `updates` updates (after 3 warm-up ones), each update
    storing one new frame first, as the training loop does."""
    sampler = drq.BatchSampler(rb, batch_size, device, on_device=on_device)
    rng = np.random.default_rng(seed)
    times = {"write": [], "batch": [], "ready": []}
    for i in range(updates + 3):
        sync(device)  # the action sync before each update's batch
        t0 = time.perf_counter()
        rb.add(pool[i % len(pool)], np.zeros(action_dim, np.float32), 1.0, False)
        t1 = time.perf_counter()
        sampler.sample(rng)
        t2 = time.perf_counter()
        sync(device)
        t3 = time.perf_counter()
        if i >= 3:
            for k, dt in zip(times, (t1 - t0, t2 - t1, t3 - t1)):
                times[k].append(dt * 1e3)
    return {k: float(np.mean(v)) for k, v in times.items()}


def main(argv=None) -> list:
    defaults = drq.Args()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a 2,000-slot ring, batch 128, 10 updates (a few seconds)")
    p.add_argument("--buffer-size", type=int, default=defaults.buffer_size)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--frame-stack", type=int, default=defaults.frame_stack)
    p.add_argument("--image-size", type=int, default=defaults.image_size)
    p.add_argument("--action-dim", type=int, default=6, help="6: cheetah-run, walker-walk")
    p.add_argument("--updates", type=int, default=50)
    p.add_argument("--no-cuda", action="store_true")
    a = p.parse_args(argv)
    if a.quick:
        a.buffer_size, a.batch_size, a.updates = 2000, 128, 10
    device = torch.device("cuda" if torch.cuda.is_available() and not a.no_cuda else "cpu")
    size, stack = a.image_size, a.frame_stack
    gen = np.random.default_rng(0)
    pool = gen.integers(0, 256, (64, 3, size, size), dtype=np.uint8)
    rb = drq.FrameReplay(a.buffer_size, (3, size, size), a.action_dim, stack)
    t = time.perf_counter()
    fill(rb, a.buffer_size + EPISODE // 2, pool, a.action_dim)  # wrapped, as in a long run
    per_batch = 2 * a.batch_size * stack * 3 * size * size
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device {device} ({name}); ring {a.buffer_size} x 3x{size}x{size} ({rb.frames.nbytes / 1e9:.2f} GB, filled "
          f"in {time.perf_counter() - t:.1f}s), batch {a.batch_size}, stack {stack}: {per_batch / 1e6:.1f} MB of "
          f"frames per batch; mean of {a.updates} updates")
    rows = []
    print(f"| {'path':<8} | {'write ms':>9} | {'batch ms':>9} | {'ready ms':>9} |")
    print(f"|{'-' * 10}|{'-' * 11}|{'-' * 11}|{'-' * 11}|")
    for label, on_device in (("host", False), ("device", True)):
        r = measure(rb, pool, a.action_dim, a.batch_size, device, on_device, a.updates)
        rows.append({"path": label, **r})
        print(f"| {label:<8} | {r['write']:>9.3f} | {r['batch']:>9.2f} | {r['ready']:>9.2f} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
