"""Tests for scripts/bench.py: the parsing of the scripts' own output lines, steady-state SPS on synthetic series
with known answers, the projection to the default cadence, the table, and one tiny
real run of the harness on dqn_atari_hr.py."""
import os
import subprocess
import sys

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


def test_progress_events_from_cumulative_sps_lines():
    text = ("global_step=5000 SPS=100 episodic_return=nan epsilon=0.550 probe_overhead=0.00%\n"  # dqn
            "global_step=2048, SPS=256, episodic_return=1.0\n"  # ppo / pqn
            "global_step=4000, SPS=12.50, episodic_return=3.0 | seconds: physics=1.0\n")  # drq
    assert bench.progress_events(text) == [(50.0, 5000), (8.0, 2048), (320.0, 4000)]
    # fallback SPS: 500 steps/s after the warm-up
    events = [(s / 100, s) for s in (1000, 2000)] + [(20 + (s - 2000) / 500, s) for s in (3000, 4000, 5000)]
    lines = "".join(f"global_step={s}, SPS={s / t:.2f}\n" for t, s in events)
    assert bench.steady_sps(bench.progress_events(lines), 2000)["sps"] == pytest.approx(500.0, rel=1e-3)


def test_parse_probe_report_of_each_script():
    dqn = ("done: 2000 steps (2000 in this process) in 320.2s, SPS=6\n"
           "metrics: 3 probes took 2.96s = 0.93% of wall time\n")
    assert bench.parse_probe_report(dqn) == {"seconds": 2.96, "share": pytest.approx(0.0093), "n": 3}
    for ppo in ("done: 4096 steps in 30.5s, SPS=134, metric probes 1.50s = 4.92% of the time\n",
                "done: 4096 steps, 4096 in 30.5s in this process (SPS=134), metric probes 1.50s = 4.92% of the run's "
                "time\n"):
        assert bench.parse_probe_report(ppo) == {"seconds": 1.5, "share": pytest.approx(0.0492), "n": None}
    drq = ("global_step=40, SPS=3.00, episodic_return=nan | seconds: physics=0.1 render=0.2 replay=0.0 update=1.0 "
           "mitigation=0.0 metrics=9.9 eval=0.0\n"
           "done: 2320 frames (2320 in this process, 80.0s, SPS=29.00); seconds: physics=1.0 render=2.0 (eval env: "
           "physics=0.0 render=0.0) replay=0.5 update=40.0 mitigation=0.0 metrics=4.0 eval=0.0 checkpoint=0.0\n")
    assert bench.parse_probe_report(drq) == {"seconds": 4.0, "share": pytest.approx(0.05), "n": None}
    pqn = ("global_step=512, SPS=343, episodic_return=nan, epsilon=0.001\n"
           "done: 512 steps, 512 in 1.5s in this process (SPS=342), metric probes 0.29s = 19.30% of this process's "
           "time\n")
    assert bench.parse_probe_report(pqn) == {"seconds": 0.29, "share": pytest.approx(0.193), "n": None}
    silent = "global_step=1024, SPS=100, episodic_return=nan, epsilon=0.500\n"  # no probe accounting printed
    assert bench.parse_probe_report(silent) is None


def test_parse_fast_paths():
    line = "fast paths: torch.compile {}, CUDA graphs {}, pinned transfers {}"
    assert bench.parse_fast_paths(line.format("on", "on", "on")) == "compile+graphs+pinned"
    assert bench.parse_fast_paths("x\n" + line.format("off", "off", "off (CPU)") + "\ny") == "eager"
    assert bench.parse_fast_paths(line.format("on", "off", "off (CPU)")) == "compile"
    assert bench.parse_fast_paths("no such line") is None


def test_parse_peak_gpu_and_ceiling():
    assert bench.parse_peak_gpu_mib("nothing here") is None
    assert bench.parse_peak_gpu_mib("peak GPU memory: 1.5 GiB (max_memory_reserved)") == pytest.approx(1536.0)
    assert bench.parse_peak_gpu_mib("peak GPU memory 800 MiB\npeak GPU memory = 900 MiB") == pytest.approx(900.0)
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
    return {"rc": rc, "timed_out": False, "window": bench.steady_sps(events, 2048), "sps_source": "tb",
            "sps_events": events, "probe_steps": list(probe_steps), "probe": report, "maxrss_mib": rss,
            "gpu_mib": None, "gpu_src": None, "device": "cpu"}


def test_make_row_and_table():
    spec, budget = bench.SPECS["pqn"], bench.Budget(2048, 6144, ["--num-envs", "32"], 100)
    on = fake_run(100.0, probe_steps=[3072, 6144], probe_cost=2.0, rss=600.0,
                  report={"seconds": 4.0, "share": 0.05, "n": None})  # pqn's line gives no count: probe steps do
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
    assert table[2].startswith("| pqn | relu | cpu | — | 32 | ")
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
    assert (b.warmup, b.measure) == (400, 800)  # learning starts 200 + 200 steps of training
    b = bench.resolve_budget(dqn, dqn.quick, 0.2)
    assert (b.warmup, b.measure, bench.flag(b.args, "--learning-starts", 0)) == (100, 200, 40)
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
    """The harness end to end on dqn_atari_hr.py: 400-step runs (100 warm-up), metrics every 200 steps and off."""
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
    assert named["probe share"].endswith("%")  # dqn reports it
    assert named["peak host RSS"].endswith("iB") and named["peak GPU mem"] == "n/a"
