"""harness.py on its own: the run lifecycle once, on a toy loop (tests/toy_harness_script.py, run as a user would and
in-process), and the plumbing the scripts share (atomic save, RNG state, replay chunks, last-good, fast paths)."""
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import harness
from conftest import REPO, kill_after_checkpoint, read_scalars, resume_after_kill, run_script, steps_of

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import toy_harness_script as toy  # noqa: E402

TOY = "tests/toy_harness_script.py"


def refused(fn, *args, **kwargs) -> str:
    """The harness's one way to end on bad input: SystemExit carrying one 'error: ...' line (exit 1)."""
    with pytest.raises(SystemExit) as e:
        fn(*args, **kwargs)
    msg = e.value.code
    assert isinstance(msg, str) and msg.startswith("error: ") and "\n" not in msg, repr(msg)
    return msg


def one_error_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), proc.stdout + proc.stderr
    return lines[0]


@pytest.fixture
def here(tmp_path, monkeypatch):
    """In-process runs: cwd = tmp_path (runs/ lands there); Run's SIGTERM handler and excepthook undone after."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    monkeypatch.setattr(sys, "argv", [os.path.join(REPO, TOY)])
    term = signal.getsignal(signal.SIGTERM)
    yield tmp_path
    signal.signal(signal.SIGTERM, term)


def open_run(**kw) -> harness.Run:
    return harness.Run(toy.Args(**kw))


def close(run: harness.Run) -> None:
    """End an in-process run without finishing it (as a killed process would): writer closed, lock released."""
    run.writer.close()
    os.close(run._lock_fd)


def saved_args(run_dir, **changes) -> toy.Args:
    with open(os.path.join(run_dir, "args.json")) as f:
        return toy.Args(**{**json.load(f), **changes})


def toy_store(seed=0, capacity=40, chunk=16):
    rng = np.random.default_rng(seed)
    arrays = {"obs": rng.standard_normal((capacity, 3)).astype(np.float32),
              "act": rng.integers(0, 5, capacity).astype(np.uint8)}
    return harness.ChunkStore(arrays, chunk=chunk), arrays


# ---------------------------------------------------------------------------------------------------------------
# the toy run end to end: SIGKILL after a checkpoint, the resume gate, purge, `finished`


def test_kill_resume_gate_purge_and_finished(tmp_path, here, capsys):
    args = ["--run-name", "kr", "--sleep", "0.03", "--total-timesteps", "120", "--checkpoint-every", "40"]
    out, ckpt, killed = kill_after_checkpoint(TOY, args, tmp_path, "kr", 45, tag="losses/loss")
    step = ckpt["global_step"]
    assert f"checkpoint: step {step}, " in out
    assert ckpt["format"] == harness.CHECKPOINT_FORMAT and step in (40, 80) and ckpt["replay"]["files"]
    assert max(steps_of(killed, "losses/loss")) >= step  # the killed process logged past its checkpoint: to purge
    run_dir = tmp_path / "runs" / "kr"

    # the resume gate, in-process
    msg = refused(harness.Run, saved_args(run_dir, resume=True, learning_rate=0.02, seed=2))
    assert msg == ("error: --resume: runs/kr was made with other flags: --learning-rate (saved 0.01, now 0.02), "
                   "--seed (saved 1, now 2)")
    assert "add --resume" in refused(harness.Run, saved_args(run_dir))  # a checkpoint, and no --resume
    (run_dir / "checkpoint_last_good.pt.tmp").write_bytes(b"half a file")  # what a kill during a save leaves

    # --no-torch-deterministic is in MAY_DIFFER_ON_RESUME: the resume goes ahead (and the SIGKILLed owner left no lock)
    assert "torch_deterministic" in harness.MAY_DIFFER_ON_RESUME
    proc, checksum, scalars = resume_after_kill(TOY, [*args, "--no-torch-deterministic"], tmp_path, "kr", ckpt)
    assert checksum == pytest.approx(sum(t.double().sum().item() for part in ("hidden", "head")
                                         for t in ckpt["state"][part].values()), rel=1e-12)
    assert steps_of(scalars, "losses/loss") == list(range(120))  # every step exactly once: nothing lost or doubled
    assert steps_of(scalars, "representation/latent/dormant_kde") == [20, 40, 60, 80, 100]
    assert not (run_dir / "checkpoint_last_good.pt.tmp").exists()  # stale temporary file removed on start
    assert not (run_dir / "checkpoint.pt").exists() and not (run_dir / "replay").exists()  # finished: not resumable
    with open(run_dir / "finished") as f:
        done = json.load(f)
    assert {"global_step", "steps_this_process", "wall_seconds", "sps", "probe_seconds", "n_probes", "probe_share",
            "peak_host_rss_bytes", "device", "compile", "cudagraphs"} <= set(done)
    assert done["global_step"] == 120 and done["steps_this_process"] == 120 - step
    assert done["n_probes"] == 5  # counters carried across the resume: each probe counted once
    assert done["wall_seconds"] > done["wall_seconds_this_process"] > 0 and done["sps"] > 0
    assert done["probe_share"] == pytest.approx(done["probe_seconds"] / done["wall_seconds"], rel=1e-3)
    assert done["peak_host_rss_bytes"] > 50e6
    assert (done["device"], done["compile"], done["cudagraphs"]) == ("cpu", False, False)
    assert f"done: 120 steps ({120 - step} in this process)" in proc.stdout

    # a finished run: --resume says so and exits 0; a fresh start on its name is refused
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        harness.Run(saved_args(run_dir, resume=True))
    assert e.value.code == 0 and capsys.readouterr().out == "run kr already finished (at step 120); nothing to resume\n"
    assert "holds a finished run" in refused(harness.Run, saved_args(run_dir))


def test_nonfinite_loss_stops_with_last_good_state(tmp_path, here):
    proc = run_script(TOY, ["--run-name", "nan", "--nan-at", "50", "--checkpoint-every", "20"], tmp_path,
                      env={"OMP_NUM_THREADS": "1"})
    line = one_error_line(proc)
    assert line == ("error: non-finite loss at step 50; last good state (step 50) written to "
                    "runs/nan/checkpoint_last_good.pt; the resumable checkpoint is runs/nan/checkpoint.pt (step 40)")
    good = torch.load(tmp_path / "runs/nan/checkpoint_last_good.pt", weights_only=False)
    assert good["global_step"] == 50 and good["args"]["nan_at"] == 50 and good["format"] == harness.CHECKPOINT_FORMAT
    tensors = harness.LastGood._tensors(good["state"])
    assert len(tensors) == 4 + 3 * 4 and all(torch.isfinite(t).all() for t in tensors)  # params + Adam state
    ckpt = harness.read_checkpoint("runs/nan/checkpoint.pt")  # untouched and still resumable
    assert ckpt["global_step"] == 40 and not os.path.exists("runs/nan/finished")
    run = harness.Run(saved_args("runs/nan", resume=True))
    assert run.start_step == 40
    close(run)
    # corrupt files: every unreadable checkpoint or replay chunk gets the same one-line answer
    good_dir = "runs/nan"
    chunk = os.path.join("replay", sorted(ckpt["replay"]["files"].values())[0])
    raw = open(os.path.join(good_dir, "checkpoint.pt"), "rb").read()
    chunk_raw = open(os.path.join(good_dir, chunk), "rb").read()
    old = {**ckpt, "format": 2}
    cases = {"empty": ("checkpoint.pt", b""), "truncated": ("checkpoint.pt", raw[:len(raw) // 2]),
             "garbage": ("checkpoint.pt", b"\x00not a checkpoint" * 50), "old-format": ("checkpoint.pt", old),
             "chunk-truncated": (chunk, chunk_raw[:len(chunk_raw) // 2]), "chunk-empty": (chunk, b""),
             "chunk-missing": (chunk, None)}
    for name, (path, content) in cases.items():
        shutil.copytree(good_dir, f"runs/{name}")
        target = os.path.join("runs", name, path)
        if content is None:
            os.remove(target)
        elif isinstance(content, dict):
            torch.save(content, target)
        else:
            with open(target, "wb") as f:
                f.write(content)
        msg = refused(harness.Run, saved_args(f"runs/{name}", resume=True, run_name=name))
        what = "runs/" + name + ("/replay" if path == chunk else "/checkpoint.pt")
        assert msg.startswith(f"error: --resume: cannot read {what}"), (name, msg)
        if name == "old-format":
            assert "checkpoint format 2" in msg


@pytest.mark.parametrize("sig, every", [(signal.SIGINT, 20), (signal.SIGTERM, 0)], ids=["ctrl-c", "sigterm-no-ckpt"])
def test_interrupt_one_line_exit_130_lock_and_resume(sig, every, tmp_path, here):
    """A live run owns its directory (a second process is refused); Ctrl-C / SIGTERM: one line, no traceback, exit
    130, and the run resumes from its checkpoint (or, with none yet, starts again without --resume)."""
    flags = dict(run_name="int", sleep=0.05, total_timesteps=1000, checkpoint_every=every)
    with open(tmp_path / "out.log", "w") as log:
        proc = subprocess.Popen(  # SIGINT as a terminal's Ctrl-C sends it: default handling, even in a background job
            [sys.executable, os.path.join(REPO, TOY), *(f"--{k.replace('_', '-')}={v}" for k, v in flags.items())],
            cwd=tmp_path, stdout=log, stderr=subprocess.PIPE, text=True,
            env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"),
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        ready = "checkpoint: step 20" if every else "parameters: "  # past harness.Run: the handlers are in place
        deadline = time.time() + 120
        while ready not in (tmp_path / "out.log").read_text() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read()
        msg = refused(harness.Run, toy.Args(**flags, resume=bool(every)))
        assert msg == f"error: --run-name int: runs/int is in use by another running process (pid {proc.pid})"
        proc.send_signal(sig)
        err = proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err, err
    if every:
        ckpt = harness.read_checkpoint("runs/int/checkpoint.pt")
        assert err.strip().splitlines() == [f"interrupted: runs/int continues from its checkpoint at step "
                                            f"{ckpt['global_step']} with --resume --run-name int"], err
        run = harness.Run(saved_args("runs/int", resume=True))  # the lock went with the process
        assert run.start_step == ckpt["global_step"] >= 20
    else:
        assert err.strip().splitlines() == ["interrupted: runs/int has no checkpoint yet: start it again without "
                                            "--resume (its events are moved aside)"], err
        run = harness.Run(saved_args("runs/int"))
        assert run.start_step == 0 and any(d.startswith("int.partial-") for d in os.listdir("runs"))
    close(run)


# ---------------------------------------------------------------------------------------------------------------
# the run directory, in-process


@pytest.mark.parametrize("kw, needle", [
    ({"run_name": "../x"}, "--run-name '../x' must name a directory inside runs/"),
    ({"run_name": "/abs"}, "--run-name '/abs' must name a directory inside runs/"),
    ({"run_name": "a/../../b"}, "--run-name 'a/../../b' must name a directory inside runs/"),
    ({"run_name": ""}, "--run-name '' must name"),
    ({"exp_name": "a/b"}, "--exp-name 'a/b' must be a plain name"),
    ({"exp_name": ".."}, "--exp-name '..' must be a plain name"),
    ({"seed": -1}, "--seed must be in [0, 2**32), got -1"),
    ({"seed": 2**32}, "--seed must be in [0, 2**32)"),
    ({"total_timesteps": 0}, "--total-timesteps must be >= 1, got 0"),
    ({"checkpoint_every": -1}, "--checkpoint-every must be >= 0, got -1"),
    ({"metrics_batch": 1}, "--metrics-batch must be >= 2, got 1"),
    ({"resume": True}, "--resume needs --run-name NAME"),
    ({"cudagraphs": "on", "cuda": False}, "--cudagraphs on needs a CUDA GPU"),
])
def test_bad_flags_refused_before_anything_exists(kw, needle, here):
    assert needle in refused(open_run, **kw)
    assert os.listdir(here) == []


def test_resume_without_checkpoint_and_memory_check(here, monkeypatch):
    assert refused(open_run, run_name="none", resume=True) == "error: --resume: no checkpoint in runs/none"
    monkeypatch.setattr(harness, "mem_available_bytes", lambda: 1_000_000_000)
    harness.check_memory({"--buffer-size 10": 999_000_000})  # fits
    msg = refused(harness.Run, toy.Args(run_name="m"), memory={"--buffer-size 10": 0.6e9, "--num-envs 2": 0.6e9})
    assert msg == ("error: --buffer-size 10 + --num-envs 2 needs 1.20 GB of memory but only 1.00 GB is available "
                   "(MemAvailable)")
    # one that cannot fit alone is the flag to change: named alone, with its own need
    msg = refused(harness.Run, toy.Args(run_name="m"), memory={"--buffer-size 10": 1.5e9, "--num-envs 2": 1e8})
    assert msg == "error: --buffer-size 10 needs 1.50 GB of memory but only 1.00 GB is available (MemAvailable)"
    assert os.listdir(here) == []
    (here / "runs").mkdir()
    (here / "runs" / "blocked").write_text("a file")
    assert "it exists and is not a directory" in refused(open_run, run_name="blocked")


def test_fresh_start_moves_aside_events_without_checkpoint(here, capsys):
    run = open_run(run_name="p")  # a run stopped before its first checkpoint: events, no checkpoint
    for step in range(5):
        run.log(step, {"losses/loss": float(step)})
    close(run)
    run = open_run(run_name="p")
    lines = capsys.readouterr().out.splitlines()
    aside = [d for d in os.listdir("runs") if d.startswith("p.partial-")]
    assert len(aside) == 1 and lines == [f"runs/p held the events of a run stopped before its first checkpoint: "
                                         f"moved to runs/{aside[0]}"]
    for step in range(3):
        run.log(step, {"losses/loss": 10.0 + step})
    close(run)
    assert read_scalars("runs/p")["losses/loss"] == [(0, 10.0), (1, 11.0), (2, 12.0)]  # nothing logged twice
    assert steps_of(read_scalars(f"runs/{aside[0]}"), "losses/loss") == [0, 1, 2, 3, 4]
    assert os.path.exists(f"runs/{aside[0]}/args.json") and os.path.exists("runs/p/args.json")


def test_save_resume_restores_state_and_replay_and_disk_full_keeps_old(here, monkeypatch, capsys):
    run = open_run(run_name="s", total_timesteps=100)
    store, arrays = toy_store()
    before = {k: a.copy() for k, a in arrays.items()}
    run.counters["n_probes"] = 3
    run.save(10, {"w": torch.arange(3.0)}, replay=store, filled=40)
    assert capsys.readouterr().out.startswith("checkpoint: step 10, ")
    # a later save that fails for lack of space: one line, the previous checkpoint and its chunks intact
    arrays["obs"][20] = 99.0
    store.touch(20)
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        if getattr(f, "name", "").endswith("checkpoint.pt.tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    msg = refused(run.save, 20, {"w": torch.zeros(3)}, replay=store, filled=40)
    assert msg == ("error: cannot write runs/s/checkpoint.pt: no space left on the device; the previous checkpoint, "
                   "if any, is intact")
    monkeypatch.setattr(torch, "save", real_save)
    close(run)
    assert harness.read_checkpoint("runs/s/checkpoint.pt")["global_step"] == 10
    assert not any(n.endswith(".tmp") for n in os.listdir("runs/s"))
    assert "chunk00001_20.pt" in os.listdir("runs/s/replay")  # written before the failure, named by no checkpoint
    (here / "runs/s/replay/chunk00007_5.pt.tmp").write_bytes(b"")  # stale files of a killed write
    (here / "runs/s/events.out.tfevents.x.tmp").write_bytes(b"")
    run = open_run(run_name="s", total_timesteps=100, resume=True)
    assert run.start_step == 10 and torch.equal(run.checkpoint["state"]["w"], torch.arange(3.0))
    assert run.counters["n_probes"] == 3
    fresh, fresh_arrays = toy_store(seed=1)
    run.restore_replay(fresh)
    for k in arrays:
        assert np.array_equal(fresh_arrays[k], before[k]), k  # the old checkpoint's replay, exactly
    assert sorted(os.listdir("runs/s/replay")) == sorted(run.manifest["files"].values())  # orphans and .tmp gone
    assert not any(n.endswith(".tmp") for n in os.listdir("runs/s"))
    close(run)


def test_progress_is_rate_limited_and_fast_paths_line(here, capsys):
    run = harness.Run(toy.Args(run_name="pr", total_timesteps=1000), progress_every=10.0)
    assert run.fast_paths() == (False, False)
    assert capsys.readouterr().out == "fast paths: torch.compile off, CUDA graphs off, pinned transfers off (CPU)\n"
    for step in range(200):
        run.progress(step, loss=0.5)
    assert capsys.readouterr().out == ""  # nothing within the first 10 s
    run._last_print -= 11
    run.episode(5, 2.5, 10)
    for step in range(200, 400):
        run.progress(step, loss=0.5, eps=3)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("step 200/1,000 (20.0%) SPS=") and "ETA=" in out[0]
    assert "return=2.5 " in out[0] and out[0].endswith(" loss=0.5 eps=3")
    run.progress(400, force=True)
    assert len(capsys.readouterr().out.splitlines()) == 1
    close(run)


def test_eta_is_unknown_in_the_warm_up_then_follows_the_recent_training_rate(here, monkeypatch, capsys):
    """During the warm-up (random actions, no update: often 10x faster than training) the ETA does not extrapolate the
    warm-up's speed: `?`, with the warm-up's own time left. Once updates run it is the time left at the rate of the
    last 5 intervals between progress lines. A fake clock gives the known answers."""
    run = harness.Run(toy.Args(run_name="eta", total_timesteps=10_000), learning_starts=1_000)
    t0, clock = run.start_time, [run.start_time]
    monkeypatch.setattr(harness.time, "time", lambda: clock[0])

    def line(step, seconds):
        clock[0] = t0 + seconds
        run.progress(step, force=True)
        return capsys.readouterr().out.split(" ETA=")[1].split(" return=")[0]

    # 500 warm-up steps in 1 s: extrapolated, 9,500 steps left would read 0:00:19; the warm-up ends in 1 s
    assert line(500, 1.0) == "? (warm-up ends in 0:00:01; training speed not known yet)"
    assert line(1_000, 2.0) == "? (training speed not known yet)"  # the first progress line with updates: no rate yet
    assert line(1_100, 12.0) == "0:14:50"  # 10 steps/s since: 8,900 steps left, 890 s
    for i in range(1, 6):  # training speeds up to 100 steps/s for 5 intervals
        eta = line(1_100 + 100 * i, 12.0 + i)
    assert eta == "0:01:24"  # 8,400 steps left at the recent 100 steps/s (40 steps/s over the whole training: 0:03:30)
    close(run)


# ---------------------------------------------------------------------------------------------------------------
# command line


def test_cli_folds_tyro_errors_into_one_line(capsys):
    assert "--bogus" in refused(harness.cli, toy.Args, ["--bogus"])
    assert "'maybe'" in refused(harness.cli, toy.Args, ["--compile", "maybe"])
    assert "--seed" in refused(harness.cli, toy.Args, ["--seed", "abc"])
    assert "--total-timesteps" in refused(harness.cli, toy.Args, ["--total-timesteps"])
    args = harness.cli(toy.Args, ["--no-torch-deterministic", "--run-name", "x", "--sleep", "0.5"])
    assert (args.torch_deterministic, args.run_name, args.sleep) == (False, "x", 0.5)
    with pytest.raises(SystemExit) as e:
        harness.cli(toy.Args, ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "\nrun:\n" in out and "\ncheckpointing:\n" in out and "\nspeed:\n" in out
    assert "--learning-rate FLOAT     Adam learning rate (default: 0.01)" in out
    assert out.count("(default: ") == out.count("\n  --")


def test_generic_value_checks():
    a = toy.Args(learning_rate=float("inf"), metrics_batch=0)
    msg = "error: --learning-rate must be a finite number > 0, got inf"
    assert refused(harness.finite, a, ["learning_rate"]) == msg
    assert refused(harness.at_least, a, {"metrics_batch": 2}) == "error: --metrics-batch must be >= 2, got 0"
    a.learning_rate = 1.5
    assert refused(harness.unit_interval, a, ["learning_rate"]) == "error: --learning-rate must be in [0, 1], got 1.5"
    harness.finite(toy.Args(learning_rate=0.0), ["learning_rate"], positive=False)


# ---------------------------------------------------------------------------------------------------------------
# cadences, replay chunks, last-good


def test_due_with_and_without_prev():
    assert [s for s in range(0, 31) if harness.due(s, 10)] == [10, 20, 30]  # positive multiples only
    assert not any(harness.due(s, 0) for s in range(50))  # 0 = never
    # a counter that jumps by 128 per rollout: due when it crosses a multiple of 300
    steps = list(range(0, 1025, 128))
    assert [s for p, s in zip(steps, steps[1:]) if harness.due(s, 300, p)] == [384, 640, 1024]
    assert harness.due(200, 100, 100) and not harness.due(199, 100, 100) and not harness.due(5, 0, 0)
    run = type("R", (), {"args": toy.Args(total_timesteps=100, checkpoint_every=25)})()
    assert [s for s in range(101) if harness.Run.checkpoint_due(run, s)] == [25, 50, 75]  # never at the end


def chunk_files(directory):
    return sorted(os.listdir(directory))


def test_chunk_store_rewrites_only_changed_chunks_and_restores_exactly(tmp_path):
    d = str(tmp_path)
    store, arrays = toy_store(capacity=40, chunk=16)  # chunks [0,16) [16,32) [32,40)
    m1, b1 = store.save(d, "1", filled=20)  # only the filled part: chunks 0 and 1
    assert chunk_files(d) == ["chunk00000_1.pt", "chunk00001_1.pt"] and b1 > 0
    first = {k: a.copy() for k, a in arrays.items()}
    arrays["obs"][17] = 5.0
    store.touch(17)
    m2, b2 = store.save(d, "2", filled=20)  # one changed chunk: one new file
    assert chunk_files(d) == ["chunk00000_1.pt", "chunk00001_1.pt", "chunk00001_2.pt"]
    assert m2["files"] == {0: "chunk00000_1.pt", 1: "chunk00001_2.pt"}
    m3, b3 = store.save(d, "3", filled=20)  # nothing changed: nothing written
    assert b3 == 0 and m3 == m2
    # the old manifest stays loadable until it is pruned
    old, old_arrays = toy_store(seed=5)
    old.load(d, m1)
    assert all(np.array_equal(old_arrays[k][:20], first[k][:20]) for k in arrays)
    harness.ChunkStore.prune(d, m2)
    assert chunk_files(d) == ["chunk00000_1.pt", "chunk00001_2.pt"]
    new, new_arrays = toy_store(seed=6)
    new.load(d, m2)
    assert all(np.array_equal(new_arrays[k][:20], arrays[k][:20]) for k in arrays)  # exact restore
    assert not new.dirty.any() and new.saved == m2["files"]
    new_arrays["act"][39] = 1
    new.touch(39)
    m4, _ = new.save(d, "4", filled=40)  # the ring filled up: the third chunk appears
    assert m4["files"] == {0: "chunk00000_1.pt", 1: "chunk00001_2.pt", 2: "chunk00002_4.pt"}
    with pytest.raises(ValueError, match="layout"):
        toy_store(capacity=48)[0].load(d, m4)


def test_last_good_refreshes_in_place_and_reclones_when_optimizer_state_appears():
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    lg = harness.LastGood()
    lg.update(0, {"net": net.state_dict(), "opt": opt.state_dict()})
    mine = lg._tensors(lg.state)
    assert len(mine) == 2 and all(m.data_ptr() != p.data_ptr() for m, p in zip(mine, net.parameters()))
    with torch.no_grad():
        net.weight.add_(1.0)
    lg.update(1, {"net": net.state_dict(), "opt": opt.state_dict()})
    assert lg.step == 1 and all(a is b for a, b in zip(lg._tensors(lg.state), mine))  # refreshed in place
    assert torch.equal(lg.state["net"]["weight"], net.weight)
    net(torch.ones(1, 3)).sum().backward()
    opt.step()  # Adam's state appears: step, exp_avg, exp_avg_sq per parameter
    lg.update(2, {"net": net.state_dict(), "opt": opt.state_dict()})
    assert len(lg._tensors(lg.state)) == 2 + 3 * 2
    assert torch.equal(lg.state["opt"]["state"][0]["exp_avg"], opt.state[net.weight]["exp_avg"])
    with torch.no_grad():
        net.weight.fill_(float("nan"))  # a diverged parameter is not the last good one
    assert not harness.all_finite(net.parameters()).item() and harness.all_finite([torch.ones(2)], None).item()
    assert torch.isfinite(lg.state["net"]["weight"]).all()


def test_param_checksum_sums_float_tensors_of_every_module():
    a, b = torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2)  # BatchNorm's num_batches_tracked is an int: skipped
    expect = sum(t.double().sum().item() for m in (a, b) for t in m.state_dict().values() if t.is_floating_point())
    assert harness.param_checksum(a, b) == expect


# ---------------------------------------------------------------------------------------------------------------
# files and RNG state


def test_atomic_save_replaces_whole_file_and_leaves_no_temp(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    harness.atomic_save({"step": 1, "w": torch.zeros(4)}, path)
    size = harness.atomic_save({"step": 2, "w": torch.arange(1000.0)}, path)
    assert os.listdir(tmp_path) == ["checkpoint.pt"]
    assert size == os.path.getsize(path)
    state = torch.load(path, weights_only=False)
    assert state["step"] == 2 and torch.equal(state["w"], torch.arange(1000.0))


def test_atomic_save_failure_keeps_previous_file_with_one_line(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    harness.atomic_save({"step": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    msg = refused(harness.atomic_save, {"step": 2, "bad": Unpicklable()}, path)
    assert msg == f"error: cannot write {path}: boom; the previous checkpoint, if any, is intact"

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    assert "no space left on the device" in refused(harness.atomic_save, {"step": 3}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False)["step"] == 1 and os.listdir(tmp_path) == ["checkpoint.pt"]


def test_rng_state_round_trip_replays_every_stream():
    gen = np.random.default_rng(3)
    state = harness.rng_state(gen)

    def draw():
        return (random.random(), np.random.rand(), torch.rand(2).tolist(), gen.integers(1 << 30))

    first = draw()
    harness.set_rng_state(state, gen)
    assert draw() == first
    with pytest.raises(ValueError):
        harness.set_rng_state(state)


def test_arg_conflicts_lists_changed_added_and_removed_names():
    saved = {"lr": 1e-4, "seed": 1, "checkpoint_every": 10, "gone": True}
    current = {"lr": 2e-4, "seed": 1, "checkpoint_every": 20, "new": 0}
    assert harness.arg_conflicts(saved, current, may_differ=["checkpoint_every"]) == ["gone", "lr", "new"]
    assert harness.arg_conflicts(saved, dict(saved), may_differ=[]) == []
    assert harness.arg_conflicts({"cuda": True, "compile": "on"}, {"cuda": False, "compile": "off"}) == []


# ---------------------------------------------------------------------------------------------------------------
# GPU fast-path helpers (their CPU-checkable parts; the CUDA paths are measured by scripts/bench.py on a GPU)


def _failing_backend(gm, example_inputs):
    raise RuntimeError("no compiler here")


def test_compiled_falls_back_to_eager_with_one_warning(capsys):
    calls = []

    def f(x):
        calls.append(1)
        return x * 2 + 1

    torch._dynamo.reset()
    fast = harness.compiled(f, True, backend=_failing_backend)
    x = torch.arange(4.0)
    assert torch.equal(fast(x), x * 2 + 1) and torch.equal(fast(x), x * 2 + 1)
    err = capsys.readouterr().err
    assert err.count("warning: torch.compile of f failed") == 1 and "running it eagerly" in err
    torch._dynamo.reset()
    with pytest.raises(Exception):
        harness.compiled(f, True, strict=True, backend=_failing_backend)(x)
    assert harness.compiled(f, False) is f


def test_compiled_really_compiles():
    torch._dynamo.reset()
    seen = []

    def recording_backend(gm, example_inputs):
        seen.append(gm)
        return gm.forward

    fast = harness.compiled(lambda x: torch.tanh(x) * x, True, strict=True, backend=recording_backend)
    x = torch.randn(5)
    torch.testing.assert_close(fast(x), torch.tanh(x) * x)
    assert len(seen) == 1  # one FX graph went through the compiler: no graph break, no host sync inside


def test_cuda_graphed_rejects_cpu_tensors():
    step = harness.cuda_graphed(lambda x: x + 1)
    with pytest.raises(ValueError, match="CUDA tensor"):
        step(torch.zeros(3))


def test_set_capturable_round_trip_keeps_lr_and_state():
    p = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.RAdam([p], lr=2.5e-4)
    p.grad = torch.ones(3)
    opt.step()
    before = {k: v.clone() for k, v in opt.state[p].items()}
    harness.set_capturable_(opt, True)  # what a CUDA run does (the step itself only works on a GPU)
    group = opt.param_groups[0]
    assert group["capturable"] and torch.is_tensor(group["lr"]) and float(group["lr"]) == pytest.approx(2.5e-4)
    group["lr"].fill_(1e-4)
    harness.set_capturable_(opt, False)  # e.g. that run's checkpoint resumed on a CPU
    assert group["lr"] == pytest.approx(1e-4) and isinstance(group["lr"], float) and not group["capturable"]
    for k, v in opt.state[p].items():
        assert torch.equal(v, before[k]) and v.device.type == "cpu"
    opt.step()  # the plain CPU path runs with the converted state
    assert float(opt.state[p]["step"]) == 2


def test_set_lr_fills_tensor_lr_in_place_and_assigns_float_lr():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.Adam([p], lr=1e-3)
    harness.set_lr(opt, 5e-4)
    assert opt.param_groups[0]["lr"] == 5e-4
    lr = torch.tensor(1e-3)
    opt = torch.optim.Adam([p], lr=lr)
    harness.set_lr(opt, 2e-4)
    assert opt.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(2e-4)


def test_staging_on_cpu_shares_memory_and_keeps_its_tensor():
    s = harness.Staging((2, 3), torch.float32, "cpu")
    host = s.wait()
    host[0], host[1] = [1, 2, 3], np.array([True, False, True])
    up = s.upload()
    assert torch.equal(up, torch.tensor([[1.0, 2.0, 3.0], [1.0, 0.0, 1.0]]))
    s.wait()[1] = 0.0
    assert s.upload() is up and up[1].sum() == 0  # the same tensor each time, no copy on the CPU


def test_env_seeds_fresh_start_and_resume():
    from types import SimpleNamespace

    def seeds(start_step, **kw):
        return harness.Run.env_seeds(SimpleNamespace(start_step=start_step, args=SimpleNamespace(seed=3)), **kw)

    assert seeds(0) == (3, 10_003) and seeds(0, eval_offset=100) == (3, 103)
    resumed = seeds(5000)
    assert resumed == seeds(5000) and resumed != seeds(6000)  # deterministic per resume step, fresh episodes
    assert len(set(resumed) | {3, 10_003}) == 4


def test_timed_adds_wall_seconds_per_phase():
    from types import SimpleNamespace

    run = SimpleNamespace(timers={})
    for _ in range(2):
        with harness.Run.timed(run, "update"):
            time.sleep(0.02)
    assert set(run.timers) == {"update"} and 0.04 <= run.timers["update"] < 1.0


# ---------------------------------------------------------------------------------------------------------------
# MuJoCo's renderer, CPUs, determinism, host-sync counting


BROKEN_EGL = {"MUJOCO_GL": "egl", "__EGL_VENDOR_LIBRARY_FILENAMES": "/nonexistent.json"}


def test_dm_control_without_pixels_needs_no_renderer(tmp_path):
    """A state task imports and steps with a broken EGL (MUJOCO_GL=disable); a pixel run gets one line naming what
    to try (here EGL fails at import), and so does a renderer that fails at its first frame (OSMesa, not installed)."""
    code = ("import harness; s = harness.dm_control_suite(pixels={}); e = s.load('cartpole', 'swingup'); "
            "t = e.reset(); print(sorted(t.observation)); harness.first_frame(lambda: e.physics.render(8, 8))")
    env = dict(os.environ, PYTHONPATH=REPO, **BROKEN_EGL)
    state = subprocess.run([sys.executable, "-c", code.format(False).split("; harness.first_frame")[0]], env=env,
                           capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert state.returncode == 0 and "['position', 'velocity']" in state.stdout, state.stderr
    pixels = subprocess.run([sys.executable, "-c", code.format(True)], env=env, capture_output=True, text=True,
                            cwd=tmp_path, timeout=120)
    line = one_error_line(pixels)
    assert "MUJOCO_GL='egl' cannot start" in line and "MUJOCO_GL=osmesa" in line and "Traceback" not in pixels.stderr
    osmesa = subprocess.run([sys.executable, "-c", code.format(True)], capture_output=True, text=True, cwd=tmp_path,
                            env=dict(os.environ, PYTHONPATH=REPO, MUJOCO_GL="osmesa"), timeout=120)
    if osmesa.returncode == 0:
        pytest.skip("OSMesa works on this machine: no failing renderer to test the first frame with")
    assert "MUJOCO_GL='osmesa' cannot start" in one_error_line(osmesa)


def test_available_cpus_follows_the_affinity_mask():
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no CPU affinity on this platform")
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(before)})
        assert harness.available_cpus() == 1
    finally:
        os.sched_setaffinity(0, before)
    assert harness.available_cpus() == len(before)


def test_deterministic_touches_only_cudnn_on_the_cpu():
    was = torch.are_deterministic_algorithms_enabled()
    harness.deterministic(True, torch.device("cpu"))
    assert torch.backends.cudnn.deterministic and torch.are_deterministic_algorithms_enabled() == was
    harness.deterministic(False, torch.device("cpu"))
    assert not torch.backends.cudnn.deterministic


def test_nondeterminism_warning_becomes_one_line_per_op(capsys):
    """What torch's warn_only mode says for an op without a deterministic CUDA kernel reaches the user once per op,
    as one `warning:` line (the text below is torch's own, from alertNotDeterministic)."""
    import warnings

    saved = warnings.showwarning
    try:
        harness._route_warnings()
        msg = ("cumsum_cuda_kernel does not have a deterministic implementation, but you set "
               "'torch.use_deterministic_algorithms(True, warn_only=True)'. You can file an issue ...")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = saved  # catch_warnings restored it: route again inside
            harness._route_warnings()
            for _ in range(3):
                warnings.warn(msg, UserWarning)
        err = capsys.readouterr().err.strip().splitlines()
        assert err == ["warning: --torch-deterministic: cumsum_cuda_kernel has no deterministic CUDA implementation; "
                       "this run is not bit-repeatable"]
    finally:
        warnings.showwarning = saved
        harness._SEEN_WARNINGS.clear()


def test_sync_counter_rate_is_the_steady_state_slope(monkeypatch):
    """Counted syncs sampled per loop iteration: 50 set-up syncs, then 1 per iteration of 4 steps, plus 3 at every
    10th iteration (logging): the second half's slope is (1 + 3/10) per iteration = 1.3, /4 per step."""
    import warnings

    monkeypatch.setenv(harness.SyncCounter.ENV, "1")
    saved = warnings.showwarning
    try:
        with warnings.catch_warnings():
            counter = harness.SyncCounter.from_env(torch.device("cpu"))

            def sync(n):
                for _ in range(n):
                    warnings.warn(f"{harness.SYNC_WARNING}", UserWarning)

            sync(50)
            for it in range(1, 201):
                sync(1 + (3 if it % 10 == 0 else 0))
                counter.tick(4 * it)
        s = counter.summary()
        assert s["total"] == 50 + 200 + 60 and s["iterations"] == 200
        assert s["per_iteration"] == pytest.approx(1.3, rel=0.02) and s["per_step"] == pytest.approx(1.3 / 4, rel=0.02)
    finally:
        warnings.showwarning = saved
        harness.SyncCounter.active = None
    assert harness.SyncCounter.from_env(torch.device("cpu")) is not None  # env still set by monkeypatch
    harness.SyncCounter.active = None
    monkeypatch.delenv(harness.SyncCounter.ENV)
    assert harness.SyncCounter.from_env(torch.device("cpu")) is None


def test_help_into_a_closed_pipe_is_quiet(tmp_path):
    """`--help | head -1`: the reader may be gone before the help is written; no BrokenPipeError traceback."""
    r, w = os.pipe()
    os.close(r)  # the reader left before a byte was written
    proc = subprocess.run([sys.executable, os.path.join(REPO, TOY), "--help"], stdout=w, stderr=subprocess.PIPE,
                          text=True, cwd=tmp_path, timeout=120)
    os.close(w)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


# ---------------------------------------------------------------------------------------------------------------
# snapshots


class FakeRun:
    """What harness.Snapshots reads of a Run."""

    def __init__(self, directory, purge_step, every=100, total=1000):
        self.dir, self.purge_step, self.script = str(directory), purge_step, "dqn_atari_hr.py"
        self.device = torch.device("cpu")
        self.args = type("A", (), {"snapshot_every": every, "total_timesteps": total})()


def test_snapshots_write_weights_and_the_probe_batch_once(tmp_path, capsys):
    net = torch.nn.Linear(3, 2)
    snaps = harness.Snapshots(FakeRun(tmp_path, None), {"net": net}, build={"n": 3}, probe_bytes=2_000_000)
    assert capsys.readouterr().out.startswith(f"snapshots: every 100 steps, about 10 x {(6 + 2) * 4 / 1e6:.2f} MB + "
                                              f"the probe batch 2.00 MB = 0.002 GB in {tmp_path}/snapshots")
    assert [s for s in range(1, 1001) if snaps.due(s)] == list(range(100, 1001, 100))
    snaps.save(100, None)  # before the probe batch exists
    snaps.save(200, {"obs": torch.ones(4, 2)}, extra={"mean": 1.5})
    with torch.no_grad():
        net.weight.fill_(7.0)
    snaps.save(300, {"obs": torch.zeros(4, 2)})  # the batch is fixed: the first one stays
    assert sorted(os.listdir(tmp_path / "snapshots")) == [
        "probe.pt", "step_000000000100.pt", "step_000000000200.pt", "step_000000000300.pt"]
    probe = torch.load(tmp_path / "snapshots" / "probe.pt", weights_only=False)
    assert probe["step"] == 200 and torch.equal(probe["probe"]["obs"], torch.ones(4, 2))
    s200 = torch.load(tmp_path / "snapshots" / "step_000000000200.pt", weights_only=False)
    s300 = torch.load(tmp_path / "snapshots" / "step_000000000300.pt", weights_only=False)
    assert s200["step"] == 200 and s200["build"] == {"n": 3} and s200["extra"] == {"mean": 1.5}
    assert s200["script"] == "dqn_atari_hr.py" and s200["device"] == "cpu"
    assert not torch.equal(s200["networks"]["net"]["weight"], s300["networks"]["net"]["weight"])
    assert torch.equal(s300["networks"]["net"]["weight"], torch.full((2, 3), 7.0))


def test_snapshots_on_resume_drop_what_comes_at_or_after_the_purge_step(tmp_path, capsys):
    """A resumed run takes again the snapshots from its purge step on (and draws the probe batch again if the killed
    process drew it there); a killed write's temporary file goes; off (--snapshot-every 0) prints nothing."""
    d = tmp_path / "snapshots"
    d.mkdir()
    for step in (100, 200, 300):
        (d / harness.snapshot_name(step)).write_bytes(b"x")
    (d / "step_000000000400.pt.tmp").write_bytes(b"half")
    torch.save({"step": 250, "probe": {}}, d / "probe.pt")
    harness.Snapshots(FakeRun(tmp_path, 200, every=0), {}, {}, 0)
    assert capsys.readouterr().out == ""
    assert sorted(os.listdir(d)) == ["step_000000000100.pt"]
    torch.save({"step": 100, "probe": {}}, d / "probe.pt")  # drawn before the checkpoint: kept
    (d / "step_000000000200.pt").write_bytes(b"x")
    harness.Snapshots(FakeRun(tmp_path, 201), {}, {}, 0)
    assert sorted(os.listdir(d)) == ["probe.pt", "step_000000000100.pt", "step_000000000200.pt"]
    (d / "probe.pt").write_bytes(b"garbage")  # unreadable: gone, written again at the next snapshot
    harness.Snapshots(FakeRun(tmp_path, None), {}, {}, 0)
    assert sorted(os.listdir(d)) == ["step_000000000100.pt", "step_000000000200.pt"]


def test_snapshot_and_srank_flags_are_checked():
    import dqn_atari_hr as dqn

    assert refused(harness._generic_checks, dqn.Args(snapshot_every=10, metrics_every=0)).startswith(
        "error: --snapshot-every 10 needs probes (--metrics-every > 0)")
    assert refused(harness._generic_checks, dqn.Args(snapshot_every=-1)) == \
        "error: --snapshot-every must be >= 0, got -1"
    for bad in (1.0, -0.1):
        assert refused(harness._generic_checks, dqn.Args(srank_delta=bad)) == \
            f"error: --srank-delta must be in [0, 1), got {bad}"
    assert refused(harness._generic_checks, dqn.Args(srank_delta=float("nan"))).startswith(
        "error: --srank-delta must be a finite number")  # number_flags' float32 rule, first
    harness._generic_checks(dqn.Args(srank_delta=0.0, snapshot_every=5))


def test_metrics_layout_charts_each_metric_across_layers():
    import re

    charts = harness.metrics_layout()["representation"]
    assert set(charts) == {*harness.LAYER_METRICS, "network-wide"}
    regex = {k: v[1][0] for k, v in charts.items()}
    assert re.search(regex["srank"], "representation/critic/block1/hidden/srank")  # nested layer names too
    assert not re.search(regex["dominant"], "representation/dominant")  # the network-wide one
    assert re.search(regex["network-wide"], "representation/dominant")
    assert not re.search(regex["srank"], "representation/latent/srank_x")
