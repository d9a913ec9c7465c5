"""Cost of a dqn_atari_hr.py checkpoint with a full replay buffer: size on disk, time to write it, time to resume.

Builds what the script checkpoints once its buffer is full: a FrameReplayBuffer of --buffer-size slots (default
1,000,000, the script's default) filled with random frames and episode flags, a default Q-network, its target and Adam
(after one update, so the moments exist), a 1024-observation probe batch and the RNG states. Then times, with the
script's own functions and the harness's, in the order harness.Run.save and --resume call them:
- write:  rb.store.save (the ring's changed chunk files) + dqn_atari_hr.checkpoint_state + harness.atomic_save
  (temp file, fsync, rename) + harness.ChunkStore.prune, as every --checkpoint-every: first with every chunk to write
  (the first checkpoint of a full ring), then "incremental" after --changed-slots new slots (the script's default
  cadence), which rewrites only the chunks they touched;
- resume: harness.read_checkpoint + rb.store.load + dqn_atari_hr.restore_state into a fresh buffer, network and
  optimiser, as --resume does; "cold" first (the file evicted from the page cache with posix_fadvise, as a requeued
  job on another node reads it), then "warm" (file cached). The restored buffer is checked against the original.
The original buffer is freed before the fresh one is allocated, so the peak is about one buffer (7.1 GB at 1M).
Prints one markdown table.

    python scripts/bench_checkpoint_dqn.py [--buffer-size 1000000] [--dir DIR]
"""
import argparse
import gc
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dqn_atari_hr as dqn  # noqa: E402
import harness  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--buffer-size", type=int, default=dqn.Args().buffer_size, help="replay slots (script default)")
p.add_argument("--dir", default=None, help="where to write checkpoint.pt (default: a temp dir, deleted after)")
p.add_argument("--episode-length", type=int, default=100, help="steps per life in the synthetic episodes")
p.add_argument("--changed-slots", type=int, default=dqn.Args().checkpoint_every,
               help="slots written between the two timed checkpoints (default: the script's --checkpoint-every)")
a = p.parse_args()

need = dqn.FrameReplayBuffer.bytes_needed(a.buffer_size)
avail = harness.mem_available_bytes()
if avail < 1.5 * need + 1e9:  # one buffer, plus room for page cache and the rest
    sys.exit(f"error: --buffer-size {a.buffer_size} needs {need / 1e9:.2f} GB; only {avail / 1e9:.2f} GB is available "
             f"(MemAvailable; want 1.5x + 1 GB): lower --buffer-size or wait")
workdir = a.dir or tempfile.mkdtemp(prefix="bench_ckpt_")
os.makedirs(workdir, exist_ok=True)
if shutil.disk_usage(workdir).free < 1.1 * need + 1e9:
    sys.exit(f"error: --dir {workdir}: less than {(1.1 * need + 1e9) / 1e9:.1f} GB free on disk")
path = os.path.join(workdir, "checkpoint.pt")
replay_dir = os.path.join(workdir, "replay")


def rss():
    """(anonymous, file-backed) resident memory of this process in GB."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return tuple(int(fields[k].split()[0]) * 1024 / 1e9 for k in ("RssAnon", "RssFile"))


def build(seed):
    args = dqn.resolve_defaults(dqn.Args(buffer_size=a.buffer_size))
    q_network, target_network = dqn.QNetwork(args, 4), dqn.QNetwork(args, 4)
    optimizer = torch.optim.Adam(q_network.parameters(), lr=args.learning_rate)
    return args, q_network, target_network, optimizer, dqn.FrameReplayBuffer(a.buffer_size, seed=seed)


rows = []
torch.manual_seed(0)
args, q_network, target_network, optimizer, rb = build(seed=1)
target_network.load_state_dict(q_network.state_dict())
rng, probe_rng = np.random.default_rng(1), np.random.default_rng([1, 1])

# fill the ring completely, as after --buffer-size steps: random frames, episodes of --episode-length steps
t0 = time.perf_counter()
chunk = 50_000
for i in range(0, a.buffer_size, chunk):
    n = min(chunk, a.buffer_size - i)
    rb.frames[i:i + n] = rng.integers(0, 256, size=(n, *rb.frames.shape[1:]), dtype=np.uint8)
rb.actions[:] = rng.integers(0, 4, a.buffer_size, dtype=np.uint8)
rb.rewards[:] = rng.choice(np.array([-1.0, 0.0, 1.0], dtype=np.float32), a.buffer_size)
period = a.episode_length + 1  # L step slots + 1 final-frame slot
pos = np.arange(a.buffer_size) % period
rb.flags[:] = np.where(pos == 0, rb.FIRST, 0) | np.where(pos == period - 2, rb.TERMINATED, 0) | \
    np.where(pos == period - 1, rb.FINAL, 0)
rb.ptr, rb.full = 123_457 % a.buffer_size, True
fill_s = time.perf_counter() - t0

# one update: Adam's moments exist
batch = dqn.ReplaySampler(rb, args.batch_size, torch.device("cpu")).sample()
loss = torch.nn.functional.mse_loss(q_network(batch.obs).gather(1, batch.actions.unsqueeze(1)).squeeze(1),
                                    batch.rewards)
optimizer.zero_grad()
loss.backward()
optimizer.step()
valid = rb.valid_indices()
probe_obs = rb.observations(np.sort(probe_rng.choice(valid, size=args.metrics_batch, replace=False)))
check_idx = valid[:: max(1, valid.size // 2000)]  # to verify the restored buffer
expected = (rb.observations(check_idx).numpy().copy(), rb.observations((check_idx + 1) % rb.capacity).numpy().copy(),
            rb.flags.copy(), rb.actions.copy(), rb.rewards.copy(), rb.ptr, rb.full)
checksum = harness.param_checksum(q_network)
counters = {"probe_seconds": 1.0, "n_probes": 40, "wall_seconds": 3600.0, "last_return": 12.0}
anon_before, _ = rss()



def write_checkpoint(rb, probe_obs, tag):
    """What run.save does at a checkpoint; returns (seconds, bytes of checkpoint.pt, bytes of replay chunks)."""
    t0 = time.perf_counter()
    manifest, replay_bytes = rb.store.save(replay_dir, tag, rb.filled)
    state = dqn.checkpoint_state(q_network, target_network, optimizer, rb, probe_obs, rng, probe_rng)
    size = harness.atomic_save({"format": harness.CHECKPOINT_FORMAT, "global_step": a.buffer_size,
                                "script": "dqn_atari_hr.py", "args": vars(args), "state": state,
                                "counters": counters, "replay": manifest}, path)
    harness.ChunkStore.prune(replay_dir, manifest)
    return time.perf_counter() - t0, size, replay_bytes


write_s, size, replay_bytes = write_checkpoint(rb, probe_obs, "full")
anon_after_write, _ = rss()
disk = sum(os.stat(os.path.join(replay_dir, f)).st_blocks * 512 for f in os.listdir(replay_dir))
# --changed-slots new transitions since then: the chunks they fall in are dirty (contents unchanged: same bytes)
changed = np.arange(rb.ptr, rb.ptr + a.changed_slots) % rb.capacity
for slot in changed:
    rb.store.touch(slot)
inc_s, _, inc_bytes = write_checkpoint(rb, probe_obs, "incremental")
n_chunks, n_inc = len(rb.store.saved), len(np.unique(changed // rb.store.chunk))
del rb, probe_obs, batch  # free the original buffer before the fresh one exists
gc.collect()


def resume(label):
    fresh_args, q2, target2, opt2, rb2 = build(seed=2)
    rng2, probe_rng2 = np.random.default_rng(2), np.random.default_rng([2, 1])
    t0 = time.perf_counter()
    ckpt = harness.read_checkpoint(path)
    rb2.store.load(replay_dir, ckpt["replay"])
    probe2 = dqn.restore_state(ckpt["state"], q2, target2, opt2, rb2, rng2, probe_rng2)
    step = ckpt["global_step"]
    secs = time.perf_counter() - t0
    anon, file_backed = rss()
    del ckpt
    got = (rb2.observations(check_idx).numpy(), rb2.observations((check_idx + 1) % rb2.capacity).numpy(),
           rb2.flags, rb2.actions, rb2.rewards, rb2.ptr, rb2.full)
    ok = step == a.buffer_size and harness.param_checksum(q2) == checksum and all(
        np.array_equal(x, y) for x, y in zip(got, expected))
    if not ok:
        sys.exit(f"error: {label} resume did not restore the checkpointed state")
    del rb2, probe2
    gc.collect()
    return secs, anon, file_backed


for f in [path] + [os.path.join(replay_dir, n) for n in os.listdir(replay_dir)]:
    fd = os.open(f, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # written and fsynced: clean pages, evicted
    os.close(fd)
cold_s, cold_anon, cold_file = resume("cold")
warm_s, _, _ = resume("warm")

gb = need / 1e9
rows = [
    ("replay buffer", f"{a.buffer_size:,} slots, full ({gb:.2f} GB in memory); filled in {fill_s:.1f}s (not timed)"),
    ("checkpoint size", f"checkpoint.pt {size / 1e6:.0f} MB (networks + Adam + probe batch) + replay/ "
                        f"{replay_bytes / 1e9:.3f} GB in {n_chunks} chunk files ({disk / 1e9:.3f} GB allocated)"),
    ("time to write, every chunk (first checkpoint of a full ring; fsyncs included)",
     f"{write_s:.1f}s ({(size + replay_bytes) / 1e9 / write_s:.2f} GB/s)"),
    (f"time to write, incremental ({a.changed_slots:,} new slots since the last: {n_inc} of {n_chunks} chunks)",
     f"{inc_s:.1f}s ({(size + inc_bytes) / 1e9:.2f} GB written)"),
    ("time to resume, cold (files not in page cache)",
     f"{cold_s:.1f}s ({(size + replay_bytes) / 1e9 / cold_s:.2f} GB/s)"),
    ("time to resume, warm (files in page cache)", f"{warm_s:.1f}s ({(size + replay_bytes) / 1e9 / warm_s:.2f} GB/s)"),
    ("anonymous RSS: before / after write",
     f"{anon_before:.2f} / {anon_after_write:.2f} GB (the write copies nothing)"),
    ("RSS after cold restore: anonymous / file-backed (mmap, reclaimable)", f"{cold_anon:.2f} / {cold_file:.2f} GB"),
]
if a.dir is None:
    shutil.rmtree(workdir)
else:
    os.remove(path)
    shutil.rmtree(replay_dir)
print(f"dqn_atari_hr.py checkpoint cost at --buffer-size {a.buffer_size:,} (default Q-network, {os.cpu_count()} "
      f"CPUs, torch {torch.__version__}, dir {workdir})\n")
print("| measure | value |\n|---|---|")
for k, v in rows:
    print(f"| {k} | {v} |")
