"""Speed benchmark of the training scripts: one markdown table of steady-state steps per second with representation
metrics on and off, the share of time the metric probes take, peak host and GPU memory, and, for the envpool
scripts, the envpool ceiling (envpool alone stepping random actions with the same envs and threads).

Each script runs as a user would run it: `python <script> ...` in a temporary working directory, with a unique
--run-name, one process per measurement. What a run reports about itself (probe time and count, peak host and GPU
memory, device, fast paths) is read from the end-of-run summary harness.py writes to runs/NAME/finished (JSON).

    python scripts/bench.py --quick                      # the 2-core CPU check (small budgets, < 10 minutes)
    python scripts/bench.py --out                        # full budgets (GPU machine), appends to bench/RESULTS.md
    python scripts/bench.py --quick --scripts dqn pqn --variants relu --out

Steady-state SPS: the rate between the first charts/SPS TensorBoard event at or after the warm-up step and the
last one, from the events' wall-clock stamps (start-up, warm-up and end-of-run work are excluded).

Metric cadence: the time share of the probes depends only on the cadence in steps (one probe costs p seconds,
whatever the run length), so shrinking the cadence with the budget would inflate the share. The metrics-on run
uses the script's default cadence when the measured window holds 3 default-cadence probes (full mode on a GPU);
otherwise (--quick) a cadence scaled so that the window holds --probes (1) probe, which measures p; the table
then also gives the projection to the default cadence D: on/off = (D / SPS_off) / (D / SPS_off + p).
"""
import argparse
import datetime
import glob
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CEILING_SCRIPT = os.path.join(REPO, "scripts", "bench_envpool_ceiling.py")
DEFAULT_OUT = os.path.join(REPO, "bench", "RESULTS.md")


# ---------------------------------------------------------------------------------------------------------------
# What is benchmarked


@dataclass
class Budget:
    warmup: int  # presets: steps (frames for DrQ) after learning starts; resolved: the window's first step
    measure: int  # length of the measured window
    args: list = field(default_factory=list)  # extra flags of this mode (recorded in the results)
    ceiling_steps: int = 0  # pool steps timed by bench_envpool_ceiling.py (envpool scripts)


@dataclass
class Spec:
    key: str
    file: str
    unit: str  # what total_timesteps counts
    default_cadence: int  # the script's default --metrics-every
    variants: dict
    quick: Budget
    full: Budget
    envpool: bool = False

    def gran(self, args: list) -> int:
        """Steps between two charts/SPS events (= probe checks for PPO/PQN) with these flags."""
        if self.key == "dqn":
            return 100  # dqn_atari_hr.LOG_EVERY
        if self.key == "ppo":
            return flag(args, "--num-envs", 8) * flag(args, "--num-steps", 128)
        if self.key == "pqn":
            return flag(args, "--num-envs", 128) * flag(args, "--num-steps", 32)
        if self.key == "drq":
            return flag(args, "--log-every", 1000)
        return 1


ATARI_VARIANTS = {"relu": [], "tanh_hr": ["--activation", "tanh", "--hr"], "hadamax": ["--encoder", "hadamax"]}
DRQ_VARIANTS = {"none": ["--mitigation", "none"]}

# Budgets. Quick mode (the 2-core CPU, all rows in < 10 minutes): small rollouts that keep the default compute
# per sample (gradient steps per sample and minibatch size of the defaults), so the probe batch of ppo and pqn is
# their 256-sample rollout instead of 1024 (a probe batch larger than its rollout is refused); learning starts early
# enough that the window is all training, and, for the replay scripts, late enough that the replay holds the probe
# batch (a probe before that is skipped).
SPECS = {
    "dqn": Spec(
        "dqn", "dqn_atari_hr.py", "steps", 25_000, ATARI_VARIANTS,
        # learning starts once the replay holds the default probe batch (1,024); a 0.7 GB replay
        quick=Budget(200, 800, ["--learning-starts", "1024", "--buffer-size", "100000"]),
        full=Budget(10_000, 150_000, [])),  # after the default learning_starts 80k; 6 default-cadence probes
    "ppo": Spec(
        "ppo", "ppo_atari_hr.py", "steps", 102_400, ATARI_VARIANTS,
        # 8 envs x 32 steps, one minibatch of 256 (default: 8 x 128, four of 256): same 4 epochs of 256-minibatches
        quick=Budget(256, 768, ["--num-steps", "32", "--num-minibatches", "1", "--metrics-batch", "256"],
                     ceiling_steps=300),
        full=Budget(102_400, 1_024_000, [], ceiling_steps=5000), envpool=True),
    "pqn": Spec(
        "pqn", "pqn_atari_hr.py", "steps", 100_000, ATARI_VARIANTS,
        # 16 envs x 16 steps, minibatches of 128 as the default 128 x 32 / 32; probe batch = the 256-sample rollout
        quick=Budget(256, 512, ["--num-envs", "16", "--num-steps", "16", "--num-minibatches", "2",
                                "--metrics-batch", "256"], ceiling_steps=200),
        full=Budget(409_600, 3_276_800, [], ceiling_steps=2000), envpool=True),
    "drq": Spec(
        "drq", "drq_dmc_dominance.py", "frames", 10_000, DRQ_VARIANTS,
        # cartpole (action repeat 8): the probe needs --metrics-batch (256) transitions in the replay, so learning
        # starts after 2,080 frames (260 agent steps) of random actions; then 1 update of batch 512 (~7 s on the
        # 2-core CPU) warms up and 3 are measured, with charts/SPS logged at every agent step
        quick=Budget(8, 24, ["--learning-starts", "260", "--buffer-size", "10000", "--log-every", "8",
                             "--eval-every", "0", "--checkpoint-every", "0"]),
        full=Budget(4000, 40_000, ["--eval-every", "0", "--checkpoint-every", "0"])),
}
# Hadamax is ~10x slower than the Nature CNN on the CPU (~2x on a GPU): its warm-up and window are scaled down
VARIANT_SCALE = {"quick": {"hadamax": 0.25}, "full": {"hadamax": 0.5}}


LEARNING_STARTS = {"dqn": 80_000, "drq": 1000}  # the scripts' defaults (ppo and pqn learn from the first rollout)
# DrQ counts --learning-starts in agent steps (jaxrl) and its budgets in frames: cartpole-swingup, the default and
# the benchmark's task, repeats each action 8 times
DRQ_ACTION_REPEAT = 8


def flag(args: list, name: str, default: int) -> int:
    """Integer value of `name` in an argv list (last one wins), else default."""
    value = default
    for i, a in enumerate(args[:-1]):
        if a == name:
            value = int(args[i + 1])
    return value


def round_up(x: int, g: int) -> int:
    return -(-x // g) * g


def choose_cadence(default: int, measure: int, gran: int, probes: int = 1, mode: str = "auto",
                   min_default: int = 3):
    """(cadence, scaled?): the default cadence when the window of `measure` steps holds at least `min_default`
    default-cadence probes (or mode == 'default'), else the largest multiple of `gran` that puts about `probes`
    probes in the window (enough to measure the cost of one)."""
    if mode == "default" or (mode == "auto" and measure >= min_default * default):
        return default, False
    return max(gran, (measure // max(probes, 1)) // gran * gran), True


# ---------------------------------------------------------------------------------------------------------------
# Pure measurement helpers (tested in tests/test_bench.py)


def steady_sps(events, warmup_step: int) -> Optional[dict]:
    """Steady-state rate from (wall_time, step) events: from the first event at step >= warmup_step to the last
    event. None when fewer than two events are in that range or no time passed between them."""
    ev = sorted(events, key=lambda e: (e[1], e[0]))
    window = [e for e in ev if e[1] >= warmup_step]
    if len(window) < 2:
        return None
    (t0, s0), (t1, s1) = window[0], window[-1]
    if t1 <= t0 or s1 <= s0:
        return None
    return {"sps": (s1 - s0) / (t1 - t0), "step0": s0, "step1": s1, "seconds": t1 - t0}


def read_finished(run_dir: str) -> Optional[dict]:
    """The run's end-of-run summary: runs/NAME/finished, the JSON object harness.Run.finish writes (global_step,
    sps, probe_seconds, n_probes, probe_share, peak_host_rss_bytes, peak_gpu_*_bytes on CUDA, device, compile,
    cudagraphs, ...). None when the run did not finish or the file is not a JSON object (an older empty marker)."""
    try:
        with open(os.path.join(run_dir, "finished")) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def probe_report(summary: Optional[dict]) -> Optional[dict]:
    """{'seconds', 'share' (0..1), 'n'}: the run's probe time, its share of the run's wall time, and the probes."""
    if not summary or summary.get("probe_seconds") is None:
        return None
    seconds, n = float(summary["probe_seconds"]), summary.get("n_probes")
    share = summary.get("probe_share")
    if share is None and summary.get("wall_seconds"):
        share = seconds / float(summary["wall_seconds"])
    return {"seconds": seconds, "share": None if share is None else float(share), "n": None if n is None else int(n)}


def fast_paths_of(summary: Optional[dict]) -> Optional[str]:
    """The GPU fast paths a run used: 'compile+graphs+pinned', ..., 'eager' (pinned uploads go with CUDA)."""
    if not summary or "compile" not in summary:
        return None
    used = [name for name, on in (("compile", summary.get("compile")), ("graphs", summary.get("cudagraphs")),
                                  ("pinned", summary.get("device") == "cuda")) if on]
    return "+".join(used) or "eager"


def peak_gpu_mib(summary: Optional[dict]) -> Optional[float]:
    """Peak GPU memory the run's process held (torch's max reserved; max allocated if that is all there is)."""
    value = None if not summary else summary.get("peak_gpu_reserved_bytes", summary.get("peak_gpu_allocated_bytes"))
    return None if value is None else float(value) / 2 ** 20


def parse_ceiling(text: str) -> Optional[float]:
    """Training-env SPS printed by bench_envpool_ceiling.py."""
    m = re.search(r"SPS \(training-env steps, as charts/SPS\) = (\d+)", text)
    return float(m.group(1)) if m else None


def probe_steps_of(scalars: dict) -> list:
    """Steps at which representation/* scalars were logged (one per probe)."""
    return sorted({e[1] for tag, evs in scalars.items() if tag.startswith("representation/") for e in evs})


def project(p: float, sps_off: float, cadence: int) -> float:
    """Metrics-on speed as a fraction of metrics-off when a probe of p seconds runs every `cadence` steps."""
    base = cadence / sps_off
    return base / (base + p)


# ---------------------------------------------------------------------------------------------------------------
# Running a child process


class GpuPoller:
    """Peak GPU memory of one process via nvidia-smi (per-pid; or the device's used memory above what it was
    at the start, when the pid is not visible, e.g. in a container)."""

    def __init__(self, pid: int, interval: float = 0.5):
        self.pid, self.interval = pid, interval
        self.peak_pid, self.peak_dev, self.base = None, None, self._device_used()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _query(args):
        try:
            return subprocess.run(["nvidia-smi", *args, "--format=csv,noheader,nounits"], capture_output=True,
                                  text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    def _device_used(self):
        vals = [float(x) for x in self._query(["--query-gpu=memory.used"]).split() if x.strip()]
        return sum(vals) if vals else None

    def _run(self):
        while not self._stop.is_set():
            for line in self._query(["--query-compute-apps=pid,used_memory"]).splitlines():
                parts = [x.strip() for x in line.split(",")]
                if len(parts) == 2 and parts[0] == str(self.pid) and parts[1].replace(".", "").isdigit():
                    self.peak_pid = max(self.peak_pid or 0.0, float(parts[1]))
            used = self._device_used()
            if used is not None and self.base is not None:
                self.peak_dev = max(self.peak_dev or 0.0, used - self.base)
            self._stop.wait(self.interval)

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=15)
        if self.peak_pid is not None:
            return self.peak_pid, "nvidia-smi (process)"
        if self.peak_dev is not None:
            return self.peak_dev, "nvidia-smi (device used minus start)"
        return None, None


def cuda_info():
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - torch missing or broken CUDA: report the CPU
        pass
    return None


CHILD_ENV = {"PYTHONUNBUFFERED": "1"}  # --threads adds OMP_NUM_THREADS / MKL_NUM_THREADS


def run_child(cmd: list, cwd: str, timeout: float, log_path: str, poll_gpu: bool = False) -> dict:
    """Run cmd in cwd with stdout+stderr to log_path; wait4 gives the child's own peak RSS."""
    env = dict(os.environ, **CHILD_ENV)
    start = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        poller = GpuPoller(proc.pid) if poll_gpu else None
        timed_out = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.time() - start > timeout:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)
                _, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.2)
        proc.returncode = os.waitstatus_to_exitcode(status)
    gpu, gpu_src = poller.stop() if poller else (None, None)
    with open(log_path, errors="replace") as f:
        text = f.read()
    return {"rc": proc.returncode, "timed_out": timed_out, "text": text, "wall": time.time() - start,
            "cpu": usage.ru_utime + usage.ru_stime, "maxrss_mib": usage.ru_maxrss / 1024.0, "gpu_mib": gpu,
            "gpu_src": gpu_src}


def read_scalars(run_dir: str, below: bool = True) -> dict:
    """{tag: [(wall_time, step, value), ...]} of every TensorBoard event file under run_dir (below=False: only those
    directly in it, not e.g. scripts/probe.py's runs/NAME/probe/<setting>/)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    pattern = os.path.join(run_dir, "**", "events.out.tfevents.*") if below else \
        os.path.join(run_dir, "events.out.tfevents.*")
    for directory in sorted({os.path.dirname(f) for f in glob.glob(pattern, recursive=True)}):
        acc = EventAccumulator(directory, size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.wall_time, e.step, e.value) for e in acc.Scalars(tag))
    return out


# ---------------------------------------------------------------------------------------------------------------
# One measurement, one row


def collect(res: dict, run_dir: str, warmup: int) -> dict:
    """Add what one finished child left in run_dir to its run_child result: steady-state SPS from the charts/SPS
    events, the probe steps, and from the run's own summary (runs/NAME/finished, JSON; not its printed lines) the
    probe time and count, device, fast paths and peak memory. A run that left no summary keeps wait4's peak RSS
    and the nvidia-smi poll."""
    res["scalars"] = read_scalars(run_dir) if os.path.isdir(run_dir) else {}
    sps_events = [(t, s) for t, s, _ in res["scalars"].get("charts/SPS", [])]
    res["window"], res["sps_events"] = steady_sps(sps_events, warmup), sps_events
    res["probe_steps"] = probe_steps_of(res["scalars"])
    summary = res["summary"] = read_finished(run_dir)
    res["probe"], res["fast"] = probe_report(summary), fast_paths_of(summary)
    res["device"] = summary.get("device") if summary else None
    if summary and summary.get("peak_host_rss_bytes"):
        res["rss_mib"], res["rss_src"] = summary["peak_host_rss_bytes"] / 2 ** 20, "finished"
    else:
        res["rss_mib"], res["rss_src"] = res.get("maxrss_mib"), "wait4"
    if peak_gpu_mib(summary) is not None:
        res["gpu_mib"], res["gpu_src"] = peak_gpu_mib(summary), "finished"
    return res


def measure(spec: Spec, variant: str, budget: Budget, cadence: int, workdir: str, timeout: float, tag: str,
            poll_gpu: bool, log=print) -> dict:
    """One run of spec's script with metrics every `cadence` steps (0 = off)."""
    gran = spec.gran(budget.args)
    total = round_up(budget.warmup + budget.measure, gran) + (gran if spec.key == "dqn" else 0)
    run_name = f"bench_{spec.key}_{variant}_{tag}_{os.getpid()}_{int(time.time() * 1000) % 10 ** 9}"
    base = [sys.executable, os.path.join(REPO, spec.file), "--total-timesteps", str(total), "--run-name", run_name,
            *budget.args, *spec.variants[variant]]
    cmd = base + ["--metrics-every", str(cadence)]
    log(f"  {spec.key}/{variant} metrics {'every ' + str(cadence) if cadence else 'off'}: "
        f"{total} {spec.unit} ({budget.warmup} warm-up) ...", flush=True)
    res = run_child(cmd, workdir, timeout, os.path.join(workdir, f"{run_name}.log"), poll_gpu)
    res["cmd"], res["metrics_every"] = cmd, cadence
    collect(res, os.path.join(workdir, "runs", run_name), budget.warmup)
    log(f"    {res['wall']:.0f}s wall, {res['cpu']:.0f}s CPU; window "
        f"{fmt_sps(res['window']['sps']) if res['window'] else '—'} {spec.unit}/s", flush=True)
    if res["rc"] != 0:
        last = [ln for ln in res["text"].strip().splitlines() if ln.strip()]
        log(f"  FAILED (rc {res['rc']}{', timeout' if res['timed_out'] else ''}): {last[-1] if last else ''}")
    return res


def run_ceiling(spec: Spec, budget: Budget, workdir: str, timeout: float, log=print) -> dict:
    """bench_envpool_ceiling.py with the pool the script builds (same envs, test envs and threads)."""
    if spec.key == "ppo":  # ppo_atari_hr.make_env: num_envs envs, envpool's default threads, no test envs
        n, n_test, threads = flag(budget.args, "--num-envs", 8), 0, 0
    else:
        n, n_test = flag(budget.args, "--num-envs", 128), flag(budget.args, "--num-test-envs", 8)
        threads = flag(budget.args, "--envpool-threads", 0)
    env_id = next((budget.args[i + 1] for i, a in enumerate(budget.args[:-1]) if a == "--env-id"), "Breakout-v5")
    cmd = [sys.executable, CEILING_SCRIPT, "--env-id", env_id, "--num-envs", str(n), "--num-test-envs", str(n_test),
           "--envpool-threads", str(threads), "--steps", str(budget.ceiling_steps)]
    log(f"  {spec.key} envpool ceiling: {n} + {n_test} envs, threads {threads or 'default'} ...", flush=True)
    res = run_child(cmd, workdir, timeout, os.path.join(workdir, f"ceiling_{spec.key}.log"))
    return {"sps": parse_ceiling(res["text"]), "envs": n, "test_envs": n_test, "threads": threads, "cmd": cmd,
            "rc": res["rc"]}


def make_row(spec: Spec, variant: str, budget: Budget, on: dict, off: dict, cadence: int, scaled: bool,
             ceiling: Optional[dict], device: str) -> dict:
    """Everything the table shows for one (script, variant)."""
    row = {"script": spec.key, "variant": variant, "device": on.get("device") or off.get("device") or device,
           "fast": on.get("fast") or off.get("fast"),
           "envs": None, "cadence": cadence, "scaled": scaled, "default_cadence": spec.default_cadence,
           "errors": []}
    if spec.envpool:
        row["envs"] = flag(budget.args, "--num-envs", 8 if spec.key == "ppo" else 128)
    for name, r in (("on", on), ("off", off)):
        if r["rc"] != 0:
            row["errors"].append(f"metrics {name}: rc {r['rc']}{' (timeout)' if r['timed_out'] else ''}")
        row[f"sps_{name}"] = r["window"]["sps"] if r["window"] else None
    row["ratio"] = row["sps_on"] / row["sps_off"] if row["sps_on"] and row["sps_off"] else None
    w = on["window"]
    row["probes_in_window"] = (sum(1 for p in on["probe_steps"] if w["step0"] < p <= w["step1"]) if w else None)
    # probe share and seconds per probe: the metrics-on run's finished summary (probe_seconds / n_probes)
    row["share"], row["p"] = None, None
    if on["probe"]:
        n = on["probe"]["n"] if on["probe"]["n"] is not None else len(on["probe_steps"])
        row["share"] = on["probe"]["share"]
        row["p"] = on["probe"]["seconds"] / n if n else None
    row["projected"] = (project(row["p"], row["sps_off"], spec.default_cadence)
                        if row["p"] is not None and row["sps_off"] else None)
    rss = [r["rss_mib"] for r in (on, off) if r.get("rss_mib") is not None]
    row["rss_mib"] = max(rss) if rss else None
    gpus = [r["gpu_mib"] for r in (on, off) if r["gpu_mib"] is not None]
    row["gpu_mib"] = max(gpus) if gpus else None
    row["gpu_src"] = next((r["gpu_src"] for r in (on, off) if r["gpu_src"]), None)
    row["ceiling"] = ceiling["sps"] if ceiling else None
    # our SPS at the default cadence: measured when the run used it, else projected from metrics-off
    at_default = row["sps_on"] if not scaled else (row["sps_off"] * row["projected"] if row["projected"] else None)
    row["pct_ceiling"] = at_default / row["ceiling"] if at_default and row["ceiling"] else None
    return row


# ---------------------------------------------------------------------------------------------------------------
# Output


def fmt_sps(x):
    if x is None:
        return "—"
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def fmt_pct(x, digits=1):
    return "—" if x is None else f"{100 * x:.{digits}f}%"


def fmt_mib(x):
    if x is None:
        return "n/a"
    return f"{x / 1024:.2f} GiB" if x >= 1024 else f"{x:.0f} MiB"


COLUMNS = ["script", "variant", "device", "fast paths", "envs", "SPS metrics on", "SPS metrics off", "on / off",
           "probe cadence", "probe share", "s / probe", "on / off at default cadence", "peak host RSS",
           "peak GPU mem", "envpool ceiling", "% of ceiling"]


def format_table(rows: list) -> str:
    """The markdown table (one line per row; missing values as —, unmeasurable GPU memory as n/a)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for r in rows:
        cadence = f"{r['cadence']:,}" + (" (scaled)" if r["scaled"] else " (default)")
        share = fmt_pct(r.get("share"), 2)
        proj = fmt_pct(r.get("projected")) if r["scaled"] else fmt_pct(r.get("ratio"))
        cells = [r["script"], r["variant"], r["device"], r.get("fast") or "—", "—" if r.get("envs") is None else str(r["envs"]),
                 fmt_sps(r.get("sps_on")), fmt_sps(r.get("sps_off")), fmt_pct(r.get("ratio")), cadence, share,
                 "—" if r.get("p") is None else f"{r['p']:.2f}", proj, fmt_mib(r.get("rss_mib")),
                 fmt_mib(r.get("gpu_mib")), fmt_sps(r.get("ceiling")) if r.get("envs") is not None else "—",
                 fmt_pct(r.get("pct_ceiling"))]
        if r.get("errors"):
            cells[0] += " (" + "; ".join(r["errors"]) + ")"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


FOOTNOTES = """\
- SPS: steady state, the rate between the first charts/SPS TensorBoard event at or after the warm-up step and the
  last one (wall-clock stamps of the events; start-up, warm-up and end-of-run work excluded). Steps are agent steps
  (frames for drq). Single runs, no repeats: on a shared CPU the on/off ratio carries a few % of noise.
- probe cadence: `--metrics-every` of the metrics-on run. "(scaled)": the measured window is too short for the
  default cadence, so probes ran more often (about {probes} in the window) to measure the cost of one probe;
  "on / off" then is the speed at that inflated cadence, and "on / off at default cadence" the projection
  (D / SPS_off) / (D / SPS_off + s per probe) with D the script's default cadence (dqn 25,000, ppo 102,400,
  pqn 100,000 steps, drq 10,000 frames). With "(default)" that column repeats the measured on / off.
- probe share: `probe_share` of the run's `finished` summary (runs/NAME/finished, JSON): probe time over the
  run's wall time (whole run, warm-up included); s / probe = `probe_seconds` / `n_probes` of the same file.
- metrics off: `--metrics-every 0`.
- fast paths: `compile`, `cudagraphs` and `device` of the run's `finished` summary (torch.compile, CUDA graphs,
  pinned-memory uploads, which go with CUDA; "eager" = none; — = no summary). Compare with
  `--args "pqn=--compile off --cudagraphs off"`.
- peak host RSS: `peak_host_rss_bytes` of the run's `finished` summary (the process's ru_maxrss; os.wait4 of the
  child when a run left none), the larger of the two runs. Peak GPU memory: `peak_gpu_reserved_bytes` of the
  summary (torch's max reserved), else nvidia-smi polled every 0.5 s; n/a on a CPU machine.
- envpool ceiling: scripts/bench_envpool_ceiling.py (envpool alone, random actions, the script's pool: same
  training envs, test envs and threads), training-env steps per second; % of ceiling uses our SPS at the default
  cadence (measured, or SPS_off x the projected on / off when the cadence was scaled).
"""


def machine_header(argv: list, load: Optional[tuple], load_end: Optional[tuple] = None) -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        import torch

        torch_v = torch.__version__
    except Exception:  # noqa: BLE001
        torch_v = "not importable"
    try:
        import envpool

        envpool_v = envpool.__version__
    except Exception:  # noqa: BLE001
        envpool_v = "not importable"
    gpu = cuda_info()
    command = shlex.join(["scripts/bench.py", *argv])
    lines = [f"## {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} — `{command}`",
             "",
             f"- CPU: {cpu}, {os.cpu_count()} cores (logical)",
             f"- GPU: {gpu or 'none (CPU only)'}",
             f"- torch {torch_v}, envpool {envpool_v}, Python {platform.python_version()}, {platform.platform()}",
             f"- OMP_NUM_THREADS of the runs: {os.environ.get('OMP_NUM_THREADS', 'unset (torch default)')}"
             + (" (set by --threads)" if "OMP_NUM_THREADS" in CHILD_ENV else "")]
    if load:
        lines.append(f"- load average at start: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1/5/15 min)"
                     + (f", at the end: {load_end[0]:.2f} / {load_end[1]:.2f} / {load_end[2]:.2f}" if load_end
                        else "") + " (other processes on the machine skew the numbers)")
    return "\n".join(lines)


def settings_md(used: list) -> str:
    """The flags and budgets each script ran with; used = [(spec, variants, budget)]."""
    lines = ["Flags per script (besides `--total-timesteps`, `--run-name`, `--metrics-every` and the variant's):", ""]
    for spec, variants, b in used:
        flags = " ".join(b.args) or "(defaults)"
        lines.append(f"- {spec.key} ({', '.join(variants)}): `{spec.file} {flags}`; warm-up {b.warmup:,} "
                     f"{spec.unit}, measured window {b.measure:,} {spec.unit}")
    lines.append("- variants: " + ", ".join(f"{k} = `{' '.join(v) or '(defaults)'}`" for k, v in
                                              {**ATARI_VARIANTS, **DRQ_VARIANTS}.items()))
    return "\n".join(lines)


def write_results(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a") as f:
        if new:
            f.write("# Benchmark results\n\nWritten by `scripts/bench.py --out`; newest at the bottom.\n")
        f.write("\n" + text.rstrip() + "\n")


# ---------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small budgets for the 2-core CPU (under 10 minutes)")
    p.add_argument("--scripts", nargs="+", choices=list(SPECS), default=list(SPECS), metavar="S",
                   help=f"scripts to run, of {', '.join(SPECS)} (default all)")
    p.add_argument("--variants", nargs="+", choices=list(ATARI_VARIANTS), default=list(ATARI_VARIANTS),
                   metavar="V", help=f"Atari variants, of {', '.join(ATARI_VARIANTS)} (default all); drq always runs "
                   "--mitigation none")
    p.add_argument("--out", nargs="?", const=DEFAULT_OUT, default=None, metavar="PATH",
                   help=f"append the table and the machine description to PATH (default {DEFAULT_OUT})")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply the warm-up and window budgets (e.g. 0.3 for a smoke test of the harness)")
    p.add_argument("--probes", type=int, default=1, help="probes in the measured window when the cadence is scaled")
    p.add_argument("--cadence", choices=["auto", "default"], default="auto",
                   help="auto: the default cadence when the window holds 3 default-cadence probes, else scaled; "
                   "default: always the script's default")
    p.add_argument("--args", action="append", default=[], metavar="SCRIPT=FLAGS",
                   help="extra flags for one script, appended last (repeatable), e.g. "
                   "--args 'pqn=--num-envs 64 --envpool-threads 8'")
    p.add_argument("--threads", type=int, default=None,
                   help="OMP_NUM_THREADS / MKL_NUM_THREADS of the runs (default: inherited)")
    p.add_argument("--no-ceiling", action="store_true", help="skip the envpool ceiling runs")
    p.add_argument("--timeout", type=float, default=None, help="seconds per run (default 300 quick, 1800 full)")
    p.add_argument("--workdir", default=None, help="keep the runs here (default: a temporary dir, removed)")
    args = p.parse_args(argv)
    if args.scale <= 0 or args.probes < 1:
        p.error("--scale must be > 0 and --probes >= 1")
    try:
        parse_extra(args.args)
    except ValueError as e:
        p.error(str(e))
    return args


def resolve_budget(spec: Spec, b: Budget, scale: float = 1.0, extra: Optional[list] = None) -> Budget:
    """The budget a run uses: the preset's post-learning-starts warm-up and window times `scale` (the learning starts
    stay: for dqn and drq they fill the probe batch), `extra` flags appended, and the warm-up made absolute
    (learning starts + warm-up, a multiple of the charts/SPS interval)."""
    args = list(b.args) + list(extra or [])
    g = spec.gran(args)
    starts = flag(args, "--learning-starts", LEARNING_STARTS.get(spec.key, 0))
    if spec.key == "drq":
        starts *= flag(args, "--action-repeat", DRQ_ACTION_REPEAT)
    warmup = round_up(starts + max(int(b.warmup * scale), 1), g)
    return Budget(warmup, max(round_up(int(b.measure * scale), g), g), args,
                  max(10, int(b.ceiling_steps * scale)) if b.ceiling_steps else 0)


def parse_extra(items: list) -> dict:
    """--args KEY=FLAGS items -> {key: [flags]}."""
    out = {}
    for item in items or []:
        key, sep, flags = item.partition("=")
        if not sep or key not in SPECS:
            raise ValueError(f"--args {item!r}: expected SCRIPT=FLAGS with SCRIPT one of {', '.join(SPECS)}")
        out.setdefault(key, []).extend(flags.split())
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    mode = "quick" if args.quick else "full"
    if args.threads:
        CHILD_ENV.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        os.environ.update(OMP_NUM_THREADS=str(args.threads))  # so the header reports it
    timeout = args.timeout or (300 if args.quick else 1800)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    extra = parse_extra(args.args)
    gpu = cuda_info()
    device = "cuda" if gpu else "cpu"
    poll_gpu = bool(gpu) and shutil.which("nvidia-smi") is not None
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_")
    os.makedirs(workdir, exist_ok=True)
    t_start = time.time()
    print(f"bench: {mode} mode, {', '.join(args.scripts)}; runs in {workdir}", flush=True)
    rows, used = [], []
    try:
        for key in args.scripts:
            spec = SPECS[key]
            variants = list(spec.variants) if key == "drq" else [v for v in args.variants if v in spec.variants]
            if not variants:
                continue
            budgets = {v: resolve_budget(spec, getattr(spec, mode), args.scale * VARIANT_SCALE[mode].get(v, 1.0),
                                         extra.get(key)) for v in variants}
            for v in variants:  # one settings line per distinct budget
                same = next((u for u in used if u[0] is spec and (u[2].warmup, u[2].measure, u[2].args)
                             == (budgets[v].warmup, budgets[v].measure, budgets[v].args)), None)
                if same:
                    same[1].append(v)
                else:
                    used.append((spec, [v], budgets[v]))
            ceiling = None
            if spec.envpool and not args.no_ceiling:
                ceiling = run_ceiling(spec, budgets[variants[0]], workdir, timeout)
                print(f"  ceiling: {fmt_sps(ceiling['sps'])} SPS", flush=True)
            for variant in variants:
                budget = budgets[variant]
                cadence, scaled = choose_cadence(spec.default_cadence, budget.measure, spec.gran(budget.args),
                                                 args.probes, args.cadence)
                on = measure(spec, variant, budget, cadence, workdir, timeout, "on", poll_gpu)
                off = measure(spec, variant, budget, 0, workdir, timeout, "off", poll_gpu)
                row = make_row(spec, variant, budget, on, off, cadence, scaled, ceiling, device)
                rows.append(row)
                print(f"  -> on {fmt_sps(row['sps_on'])}, off {fmt_sps(row['sps_off'])} SPS "
                      f"({fmt_pct(row['ratio'])}); {row['probes_in_window']} probes in window; "
                      f"{time.time() - t_start:.0f}s so far", flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.time() - t_start
    notes = FOOTNOTES.format(probes=args.probes)
    load_end = os.getloadavg() if hasattr(os, "getloadavg") else None
    header = machine_header(sys.argv[1:] if argv is None else argv, load, load_end)
    report = "\n\n".join([header, format_table(rows), notes.rstrip(),
                          settings_md(used) + f"\n\nTotal bench time: {elapsed:.0f}s."])
    print("\n" + report)
    if args.out:
        write_results(args.out, report)
        print(f"\nappended to {args.out}")
    return 0 if rows and all(not r["errors"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
