"""Tests for scripts/bench.py: steady-state SPS on synthetic series with known answers, what a run's `finished`
summary (JSON, written by harness.Run.finish) gives the table, synthesised and written by the real harness on a toy
loop, the projection to the default cadence, the table, and one tiny real run of the bench on dqn_atari_hr.py.
Nothing here reads the scripts' printed lines."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "scripts"))
import bench  # noqa: E402


def test_steady_sps_ignores_startup_and_warmup():
    # 10 slow start-up events (10 steps/s), then exactly 500 steps/s from step 1000 on
    events = [(float(i), 10 * i) for i in range(11)]  # (wall, step): step 100 at t=10
    t, s = 10.0, 100
    while s < 1000:
        s += 100
        t += 100 / 50  # 50 steps/s between the start-up and the warm-up step
        events.append((t, s))
    t_w = t
    for _ in range(20):
        s += 100
        t += 100 / 500
        events.append((t, s))
    w = bench.steady_sps(list(reversed(events)), warmup_step=1000)  # order does not matter
    assert w["sps"] == pytest.approx(500.0)
    assert (w["step0"], w["step1"]) == (1000, 3000)
    assert w["seconds"] == pytest.approx(t - t_w)


def test_steady_sps_too_few_events():
    assert bench.steady_sps([], 0) is None
    assert bench.steady_sps([(1.0, 100), (2.0, 200)], warmup_step=150) is None
    assert bench.steady_sps([(1.0, 100), (1.0, 200)], warmup_step=0) is None  # no time passed


def write_run_dir(run_dir, sps_events, probe_steps=(), summary=None):
    """A run directory as a harness script leaves it: charts/SPS events at the given (wall time, step), one
    representation/* scalar per probe, and `finished` (a dict is written as JSON, a str as it is)."""
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(run_dir))
    for t, step in sps_events:
        w.add_scalar("charts/SPS", 1.0, step, walltime=t)
    for step in probe_steps:
        w.add_scalar("representation/latent/srank", 3.0, step, walltime=1.0)
    w.close()
    if summary is not None:
        (run_dir / "finished").write_text(summary if isinstance(summary, str) else json.dumps(summary))


CPU_SUMMARY = {"script": "pqn_atari_hr.py", "global_step": 4096, "steps_this_process": 4096, "wall_seconds": 40.0,
               "wall_seconds_this_process": 40.0, "sps": 102.4, "probe_seconds": 3.0, "n_probes": 4,
               "probe_share": 0.075, "last_return": 1.0, "peak_host_rss_bytes": 750 * 2 ** 20, "device": "cpu",
               "compile": False, "cudagraphs": False, "finished_at": "2025-01-01T00:00:00+0000"}


def test_collect_reads_the_finished_summary(tmp_path):
    events = [(100.0 + s / 200, s) for s in range(256, 4097, 256)]  # 200 steps/s throughout
    write_run_dir(tmp_path, events, probe_steps=(1024, 2048, 3072, 4096), summary=CPU_SUMMARY)
    res = bench.collect({"maxrss_mib": 999.0, "gpu_mib": None, "gpu_src": None}, str(tmp_path), warmup=1024)
    assert res["window"]["sps"] == pytest.approx(200.0) and (res["window"]["step0"], res["window"]["step1"]) == (
        1024, 4096)
    assert res["probe_steps"] == [1024, 2048, 3072, 4096]
    assert res["probe"] == {"seconds": 3.0, "share": pytest.approx(0.075), "n": 4}
    assert res["device"] == "cpu" and res["fast"] == "eager"
    assert res["rss_mib"] == pytest.approx(750.0) and res["rss_src"] == "finished"  # the run's own, not wait4's
    assert res["gpu_mib"] is None


def test_collect_on_cuda_and_without_a_summary(tmp_path):
    cuda = {**CPU_SUMMARY, "device": "cuda", "compile": True, "cudagraphs": True,
            "peak_gpu_allocated_bytes": 2 * 2 ** 30, "peak_gpu_reserved_bytes": 3 * 2 ** 30}
    (tmp_path / "gpu").mkdir()
    write_run_dir(tmp_path / "gpu", [(1.0, 100), (2.0, 200)], summary=cuda)
    res = bench.collect({"maxrss_mib": 10.0, "gpu_mib": 5000.0, "gpu_src": "nvidia-smi (process)"},
                        str(tmp_path / "gpu"), warmup=0)
    assert res["fast"] == "compile+graphs+pinned" and res["device"] == "cuda"
    assert res["gpu_mib"] == pytest.approx(3072.0) and res["gpu_src"] == "finished"  # torch's peak reserved
    assert bench.fast_paths_of({**cuda, "cudagraphs": False}) == "compile+pinned"
    assert bench.fast_paths_of({**CPU_SUMMARY, "compile": True}) == "compile"
    assert bench.peak_gpu_mib({"peak_gpu_allocated_bytes": 2 ** 20}) == pytest.approx(1.0)
    # a run that failed (no summary), left an older empty marker, or a JSON that is not an object: no probe share,
    # device or fast paths; peak host RSS from wait4, GPU memory from the nvidia-smi poll
    for name, marker in (("failed", None), ("old", ""), ("list", "[1, 2]")):
        (tmp_path / name).mkdir()
        write_run_dir(tmp_path / name, [(1.0, 100), (2.0, 200)], summary=marker)
        res = bench.collect({"maxrss_mib": 10.0, "gpu_mib": 5000.0, "gpu_src": "nvidia-smi (process)"},
                            str(tmp_path / name), warmup=0)
        assert res["summary"] is None and res["probe"] is None and res["fast"] is None and res["device"] is None
        assert (res["rss_mib"], res["rss_src"]) == (10.0, "wait4") and res["gpu_mib"] == 5000.0
        assert res["window"]["sps"] == pytest.approx(100.0)
    res = bench.collect({"maxrss_mib": 1.0, "gpu_mib": None, "gpu_src": None}, str(tmp_path / "missing"), 0)
    assert res["window"] is None and res["probe_steps"] == [] and res["summary"] is None
    # share from wall_seconds when a summary lacks probe_share; no count -> None (make_row counts the probe steps)
    assert bench.probe_report({"probe_seconds": 2.0, "wall_seconds": 8.0}) == {"seconds": 2.0, "share": 0.25,
                                                                             "n": None}


TOY = textwrap.dedent("""
    import dataclasses, sys, time
    from typing import Optional
    sys.path.insert(0, {repo!r})
    import harness

    @dataclasses.dataclass
    class Args:
        exp_name: str = "toy"
        seed: int = 1
        torch_deterministic: bool = True
        cuda: bool = False
        env_id: str = "Toy-v0"
        total_timesteps: int = 1000
        run_name: Optional[str] = None
        resume: bool = False
        checkpoint_every: int = 0
        metrics_every: int = 250
        metrics_batch: int = 2
        compile: str = "off"
        cudagraphs: str = "off"

    args = harness.cli(Args)
    run = harness.Run(args)
    run.fast_paths()
    for step in range(args.total_timesteps):
        if step % 100 == 0:
            time.sleep(0.01)
            run.log(step, {{"charts/SPS": run.sps(step)}})
        if harness.due(step, args.metrics_every):
            with run.probing():
                time.sleep(0.1)
                run.log(step, {{"representation/latent/srank": 1.0}})
    run.finish(args.total_timesteps)
""")


def test_collect_reads_what_the_harness_writes(tmp_path):
    """The contract: the keys bench reads are the ones harness.Run.finish writes (a toy loop on the real harness)."""
    (tmp_path / "toy.py").write_text(TOY.format(repo=REPO))
    proc = subprocess.run([sys.executable, "toy.py", "--run-name", "toy"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = bench.collect({"maxrss_mib": 1.0, "gpu_mib": None, "gpu_src": None}, str(tmp_path / "runs" / "toy"), 200)
    assert res["probe"]["n"] == 3 and res["probe_steps"] == [250, 500, 750]
    assert 0.3 <= res["probe"]["seconds"] < 5 and 0 < res["probe"]["share"] < 1
    assert res["device"] == "cpu" and res["fast"] == "eager"
    assert res["rss_src"] == "finished" and res["rss_mib"] > 20 and res["gpu_mib"] is None
    assert res["window"] is not None and res["window"]["sps"] > 0


def test_parse_ceiling():
    line = ("Breakout-v5: 136 envs (128 train + 8 test), 200 steps in 1.3s: SPS (training-env steps, as "
            "charts/SPS) = 19692, all envs = 20923")
    assert bench.parse_ceiling(line) == 19692.0
    assert bench.parse_ceiling("Traceback ...") is None


def test_projection_and_cadence():
    # 1000 steps at 100 SPS = 10 s per cadence, plus a 1 s probe
    assert bench.project(1.0, 100.0, 1000) == pytest.approx(10 / 11)
    assert bench.choose_cadence(25_000, 150_000, 100, 2) == (25_000, False)
    assert bench.choose_cadence(25_000, 1200, 100, 2) == (600, True)
    assert bench.choose_cadence(102_400, 2048, 1024, 2) == (1024, True)
    assert bench.choose_cadence(102_400, 1024, 1024, 2) == (1024, True)  # never below one event interval
    assert bench.choose_cadence(25_000, 1200, 100) == (1200, True)  # one probe in the window
    assert bench.choose_cadence(25_000, 60_000, 100, 2) == (30_000, True)  # fewer than 3 default probes
    assert bench.choose_cadence(25_000, 1200, 100, 2, mode="default") == (25_000, False)


def fake_run(rate, probe_steps=(), probe_cost=0.0, report=None, rc=0, rss=500.0):
    events, t = [], 0.0
    for s in range(1024, 8193, 1024):
        t += 1024 / rate + probe_cost * sum(1 for p in probe_steps if s - 1024 < p <= s)
        events.append((t, s))
    return {"rc": rc, "timed_out": False, "window": bench.steady_sps(events, 2048), "sps_events": events,
            "probe_steps": list(probe_steps), "probe": report, "rss_mib": rss, "gpu_mib": None, "gpu_src": None,
            "device": "cpu", "fast": "eager" if rc == 0 else None}


def test_make_row_and_table():
    spec, budget = bench.SPECS["pqn"], bench.Budget(2048, 6144, ["--num-envs", "32"], 100)
    on = fake_run(100.0, probe_steps=[3072, 6144], probe_cost=2.0, rss=600.0,
                  report={"seconds": 4.0, "share": 0.05, "n": None})  # no count in the summary: probe steps give it
    off = fake_run(100.0)
    row = bench.make_row(spec, "relu", budget, on, off, 3072, True, {"sps": 200.0}, "cpu")
    assert row["sps_off"] == pytest.approx(100.0)
    assert row["sps_on"] == pytest.approx(6144 / (6144 / 100 + 4.0))
    assert row["probes_in_window"] == 2
    assert row["p"] == pytest.approx(2.0) and row["share"] == pytest.approx(0.05)
    assert row["projected"] == pytest.approx(1000 / 1002)  # 100,000 steps at 100 SPS, plus 2 s
    assert row["pct_ceiling"] == pytest.approx(100 * 1000 / 1002 / 200)
    assert row["envs"] == 32 and row["rss_mib"] == 600.0 and row["gpu_mib"] is None

    dqn_on = fake_run(50.0, probe_steps=[4096], probe_cost=1.0, report={"seconds": 3.0, "share": 0.02, "n": 3})
    row2 = bench.make_row(bench.SPECS["dqn"], "tanh_hr", bench.SPECS["dqn"].quick, dqn_on, fake_run(50.0, rc=1),
                          600, True, None, "cpu")
    assert row2["p"] == pytest.approx(1.0) and row2["share"] == 0.02 and row2["errors"] == ["metrics off: rc 1"]

    table = bench.format_table([row, row2]).splitlines()
    assert len(table) == 4 and all(line.count("|") == len(bench.COLUMNS) + 1 for line in table)
    assert table[2].startswith("| pqn | relu | cpu | eager | 32 | ")
    cells = [c.strip() for c in table[2].strip("|").split("|")]
    named = dict(zip(bench.COLUMNS, cells))
    assert named["SPS metrics off"] == "100" and named["probe cadence"] == "3,072 (scaled)"
    assert named["probe share"] == "5.00%" and named["s / probe"] == "2.00"
    assert named["on / off at default cadence"] == "99.8%" and named["peak GPU mem"] == "n/a"
    assert named["envpool ceiling"] == "200" and named["% of ceiling"] == "49.9%"
    assert named["peak host RSS"] == "600 MiB"
    assert "(metrics off: rc 1)" in table[3] and "| — |" in table[3]


def test_budgets_and_extra_flags():
    dqn, drq, pqn = bench.SPECS["dqn"], bench.SPECS["drq"], bench.SPECS["pqn"]
    b = bench.resolve_budget(dqn, dqn.quick)
    assert (b.warmup, b.measure) == (1300, 800)  # learning starts 1024 (the probe batch) + 200 steps, rounded up
    b = bench.resolve_budget(dqn, dqn.quick, 0.2)
    assert (b.warmup, b.measure, bench.flag(b.args, "--learning-starts", 0)) == (1100, 200, 1024)
    assert bench.resolve_budget(dqn, dqn.full).warmup == 90_000  # the script's default learning starts (80k)
    b = bench.resolve_budget(drq, drq.quick, 0.5)
    assert (b.warmup, b.measure) == (2088, 16)  # drq keeps its learning starts (the probe batch needs them)
    extra = bench.parse_extra(["pqn=--num-envs 8 --num-steps 16", "pqn=--metrics-batch 128"])
    b = bench.resolve_budget(pqn, pqn.quick, 0.1, extra["pqn"])
    assert pqn.gran(b.args) == 128 and (b.warmup, b.measure) == (128, 128)
    assert b.args[-6:] == ["--num-envs", "8", "--num-steps", "16", "--metrics-batch", "128"]
    with pytest.raises(ValueError):
        bench.parse_extra(["sac=--x 1"])


def test_bad_flags():
    with pytest.raises(SystemExit):
        bench.parse_args(["--scripts", "sac"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--scale", "0"])
    assert bench.parse_args(["--out"]).out == bench.DEFAULT_OUT


def test_tiny_real_run_of_dqn(tmp_path):
    """The bench end to end on dqn_atari_hr.py: 1,400-step runs (learning starts 1,024, when the replay holds the
    probe batch; 1,100 warm-up), metrics every 200 steps and off."""
    out = tmp_path / "RESULTS.md"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "bench.py"), "--quick", "--scripts", "dqn",
                           "--variants", "relu", "--scale", "0.2", "--out", str(out)],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert text.startswith("# Benchmark results") and "- CPU: " in text and "torch " in text
    row = next(line for line in text.splitlines() if line.startswith("| dqn | relu |"))
    named = dict(zip(bench.COLUMNS, [c.strip() for c in row.strip("|").split("|")]))
    assert named["device"] == "cpu" and named["probe cadence"] == "200 (scaled)"
    assert float(named["SPS metrics on"].replace(",", "")) > 0 and float(named["SPS metrics off"].replace(",", "")) > 0
    assert named["probe share"].endswith("%") and named["s / probe"] != "—"  # from runs/NAME/finished
    assert named["fast paths"] == "eager"
    assert named["peak host RSS"].endswith("iB") and named["peak GPU mem"] == "n/a"


def test_bench_probe_builds_every_scripts_snapshot_and_probes_it():
    """scripts/bench_probe.py makes the snapshot each script's run makes (its networks, `build`, `extra`) and probes
    it with the script's probe_snapshot: a script whose snapshot changes and a bench that does not follow fails here.
    A snapshot's size is its weights' bytes, within torch.save's overhead."""
    import bench_probe
    import torch

    for name in bench_probe.RECIPES:
        r = bench_probe.measure(name, 0, torch.device("cpu"), metrics_batch=4)
        assert r["weights_mb"] <= r["snapshot_mb"] < r["weights_mb"] * 1.05 + 0.1, (name, r)
        assert r["batch"] == 4 and r["seconds"] > 0
