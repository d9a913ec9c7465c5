"""Shared test helpers: run a training script as a user would, read its TensorBoard events back."""
import glob
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def read_scalars(run_dir, below=True):
    """All scalars of a run: {tag: [(step, value), ...]} sorted by step. Each directory holding event files is read
    by one accumulator, in file order, as TensorBoard does, so a resumed run's purge_step drops the events that the
    killed process logged after its checkpoint. below=False: only the event files directly in run_dir (not, e.g.,
    scripts/probe.py's runs/NAME/probe/<setting>/)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pattern = ("**", "events.out.tfevents.*") if below else ("events.out.tfevents.*",)
    files = glob.glob(os.path.join(str(run_dir), *pattern), recursive=True)
    if not files:
        raise AssertionError(f"no TensorBoard event file under {run_dir}")
    out = {}
    for directory in sorted({os.path.dirname(f) for f in files}):
        acc = EventAccumulator(directory, size_guidance={"scalars": 0, "tensors": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return {k: sorted(v) for k, v in out.items()}


def run_script(script, args, cwd, timeout=600, env=None):
    """Run `python <script> <args>` from the repo in cwd (runs/ lands there); fail with its output on error."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    if env:
        full_env.update(env)
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, script), *map(str, args)],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout,
    )
    return proc


@pytest.fixture
def one_torch_thread():
    """In-process tests use one intra-op thread: on a shared 2-core box OpenMP spin-waiting makes two threads far
    slower for these tiny tensors. A test module opts in with pytestmark = pytest.mark.usefixtures(...)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(name="read_scalars")
def read_scalars_fixture():
    return read_scalars


@pytest.fixture(name="run_script")
def run_script_fixture():
    return run_script


def kill_after_checkpoint(script, args, cwd, run_name, ckpt_step, tag="charts/SPS", timeout=300, env=None):
    """The shared kill half of every script's kill/resume test: start `python <script> <args>` in cwd, wait until
    runs/<run_name>/checkpoint.pt exists and the run has logged `tag` at a step >= ckpt_step (events the resume must
    purge), SIGKILL it. Returns (its output, a copy of the checkpoint loaded on the CPU, the scalars at the kill).
    A SIGKILL leaves no chance to clean up: exactly what a pre-empted or crashed run looks like."""
    import shutil
    import signal
    import time

    import torch

    run_dir = os.path.join(str(cwd), "runs", run_name)
    ckpt_path = os.path.join(run_dir, "checkpoint.pt")
    log_path = os.path.join(str(cwd), f"{run_name}.killed.log")
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, os.path.join(REPO, script), *map(str, args)], cwd=cwd,
                                stdout=log, stderr=subprocess.STDOUT, env=full_env)
        try:
            deadline = time.time() + timeout
            while time.time() < deadline and proc.poll() is None:
                if os.path.exists(ckpt_path):
                    try:
                        steps = [s for s, _ in read_scalars(run_dir).get(tag, [])]
                    except AssertionError:  # no event file yet
                        steps = []
                    if steps and max(steps) >= ckpt_step:
                        break
                time.sleep(0.1)
            alive = proc.poll() is None
            if alive:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
    with open(log_path) as f:
        out = f.read()
    assert alive, "the run ended (or timed out) before it could be killed:\n" + out[-3000:]
    assert proc.returncode == -signal.SIGKILL and not os.path.exists(os.path.join(run_dir, "finished")), out[-3000:]
    copy = os.path.join(str(cwd), f"{run_name}.checkpoint-at-kill.pt")
    shutil.copy(ckpt_path, copy)
    return out, torch.load(copy, map_location="cpu", weights_only=False), read_scalars(run_dir)


def resume_after_kill(script, args, cwd, run_name, ckpt, timeout=600, env=None):
    """The shared resume half: `--resume`, which must finish, print the resume line at the checkpoint's step with the
    checkpoint's parameter checksum (every float tensor of its networks, float64 sum), and leave `finished` JSON.
    Returns (the process, the scalars of the whole run)."""
    import json
    import re

    proc = run_script(script, [*args, "--resume"], cwd, timeout, dict(env or {}, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = os.path.join(str(cwd), "runs", run_name)
    m = re.search(rf"resumed runs/{re.escape(run_name)} from step (\d+) \(parameter checksum (\S+)\)", proc.stdout)
    assert m and int(m.group(1)) == ckpt["global_step"], proc.stdout[-3000:]
    with open(os.path.join(run_dir, "finished")) as f:
        assert json.load(f)["steps_this_process"] > 0
    return proc, float(m.group(2)), read_scalars(run_dir)


def steps_of(scalars, tag):
    """The steps `tag` was logged at: a resumed run's must be strictly increasing (no duplicate, none lost)."""
    steps = [s for s, _ in scalars[tag]]
    assert steps == sorted(set(steps)), f"{tag} logged twice at some step: {steps}"
    return steps


# ---------------------------------------------------------------------------------------------------------------
# randomized kill/resume trials (tests/test_kill_resume.py): SIGKILL at points drawn from a seed, resume until done,
# compare with an uninterrupted run of the same flags

KILL_MODES = ("write", "after_save", "between", "before_first")
EPISODIC = ("charts/episodic_return", "charts/episodic_length")  # a resumed run starts fresh episodes


def kill_trials_wanted(default):
    """KILL_TRIALS=N in the environment asks for N trials per script instead of the default."""
    return int(os.environ.get("KILL_TRIALS", default))


def draw_kill_plan(rng, mode, checkpoint_every, fresh):
    """One process's kill point (see tests/kill_launcher.py). 'before_first' needs a fresh start (no checkpoint yet);
    with a checkpoint it becomes 'between'."""
    if mode == "before_first" and fresh:
        return {"at": "step", "after": rng.randint(1, checkpoint_every - 1)}
    if mode in ("between", "before_first"):  # from a fresh start: after the first checkpoint, before the second
        lo = checkpoint_every + 1 if fresh else 1
        return {"at": "step", "after": rng.randint(lo, lo + checkpoint_every - 2)}
    if mode == "write":
        return {"at": "write", "save": rng.choice((1, 1, 2)), "write": rng.randint(1, 3),
                "how": rng.choice(("partial", "before_rename"))}
    return {"at": "after_save", "save": rng.choice((1, 2))}


def compare_logged_steps(reference, resumed, episodic=EPISODIC):
    """What a killed-and-resumed run logged against an uninterrupted run of the same flags: every scalar tag at the
    same set of steps, none twice. Tags in `episodic` depend on where episodes end (a resume starts fresh ones): only
    no duplicate. Returns the problems found, one line each (empty: the same)."""
    problems = []
    for tag in sorted(set(reference) | set(resumed)):
        got = [s for s, _ in resumed.get(tag, [])]
        if len(got) != len(set(got)):
            dup = sorted({s for s in got if got.count(s) > 1})
            problems.append(f"{tag}: logged twice at steps {dup[:10]}")
        if tag in episodic:
            continue
        want = {s for s, _ in reference.get(tag, [])}
        missing, extra = sorted(want - set(got)), sorted(set(got) - want)
        if missing:
            problems.append(f"{tag}: missing at steps {missing[:10]}{' ...' if len(missing) > 10 else ''}")
        if extra:
            problems.append(f"{tag}: logged at steps the uninterrupted run did not log {extra[:10]}"
                            f"{' ...' if len(extra) > 10 else ''}")
    return problems


def probe_reproduces(run_dir, copy_to, steps, others=("--redo-tau", "1e9", "--srank-delta", "0.999")):
    """scripts/probe.py on a copy (at `copy_to`: the smoke tests read the run itself) of a finished run with
    snapshots, as a user runs it (in-process: main(argv)). Checks that at
    the run's own thresholds every recomputed representation/* tag equals the inline one at each snapshot step in
    `steps` (rel 1e-4 / abs 1e-6: the probe's float32 matmuls may round differently under another thread count; the
    fractions are counts and come out equal), and the known answers of the other settings: with --redo-tau 1e9 every
    neuron is dormant by score (dormant_score 1); with --srank-delta 0.999 srank is at most the run's own. Returns the
    recomputed scalars {setting: {tag: [(step, value)]}}."""
    import math
    import shutil

    import torch

    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import probe

    run_dir = shutil.copytree(run_dir, copy_to / run_dir.name)
    assert probe.main([str(run_dir), *others]) == 0
    assert torch.is_grad_enabled()  # the caller's autograd mode is left as it was
    inline = read_scalars(run_dir, below=False)
    got = {d.name: read_scalars(str(d)) for d in (run_dir / "probe").iterdir() if d.is_dir()}
    own = got["own"]
    assert set(own) == {t for t in inline if t.startswith("representation/")}, (sorted(own), sorted(inline))
    for tag, series in own.items():
        values = dict(series)
        assert sorted(values) == sorted(set(values)), f"{tag}: a step recomputed twice"
        for step in steps:
            a, b = dict(inline[tag])[step], values[step]
            assert math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6), (tag, step, a, b)
    for tag, series in got["redo_tau=1e+09"].items():
        if tag.endswith("/dormant_score"):
            assert all(v == 1.0 for _, v in series), (tag, series)
    for tag, series in got["srank_delta=0.999"].items():
        if tag.endswith("/srank"):
            assert all(v <= dict(own[tag])[s] for s, v in series), (tag, series)
    return got


def compare_snapshots(ref_dir, run_dir) -> list:
    """The snapshot series of a killed-and-resumed run against the uninterrupted run's: the same steps (no gap, no
    duplicate: one file per step), the probe batch saved in both or neither, no temporary file left."""
    def listing(d):
        d = os.path.join(d, "snapshots")
        return sorted(os.listdir(d)) if os.path.isdir(d) else []

    ref, got = listing(ref_dir), listing(run_dir)
    return [] if ref == got else [f"snapshots: the uninterrupted run has {ref}, the resumed one {got}"]


def kill_resume_trial(script, flags, cwd, name, rng, checkpoint_every, kills, episodic=EPISODIC, env=None,
                      timeout=600):
    """One randomized trial: an uninterrupted run of `flags` (in parallel) and the same flags killed `kills` times at
    points drawn from `rng` (modes in a random order, 'before_first' only first), each kill followed by a restart
    (--resume where a checkpoint exists, else a fresh start), the last left to finish. Fails with the processes'
    output on a traceback, a process that died other than by the planned SIGKILL, a missing `finished`, or logged steps
    that differ from the uninterrupted run's. Returns one line per kill (what was planned, where it happened)."""
    import json

    run_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    ref_name, run_dir = f"{name}-ref", os.path.join(str(cwd), "runs", name)
    ref_log = open(os.path.join(str(cwd), f"{ref_name}.log"), "w")
    ref = subprocess.Popen([sys.executable, os.path.join(REPO, script), *map(str, flags), "--run-name", ref_name],
                           cwd=cwd, stdout=ref_log, stderr=subprocess.STDOUT, env=run_env)
    modes = list(KILL_MODES)
    rng.shuffle(modes)
    modes = sorted(modes[:kills], key=lambda m: m != "before_first")
    outputs, happened = [], []
    try:
        for i, mode in enumerate([*modes, None]):
            fresh = not os.path.exists(os.path.join(run_dir, "checkpoint.pt"))
            args = [*map(str, flags), "--run-name", name, *([] if fresh else ["--resume"])]
            if mode is None:  # the last process runs to the end
                cmd, penv = [sys.executable, os.path.join(REPO, script), *args], run_env
            else:
                plan = draw_kill_plan(rng, mode, checkpoint_every, fresh)
                cmd = [sys.executable, os.path.join(REPO, "tests", "kill_launcher.py"), script, *args]
                penv = {**run_env, "KILL_PLAN": json.dumps(plan)}
            proc = subprocess.run(cmd, cwd=cwd, env=penv, capture_output=True, text=True, timeout=timeout)
            out = proc.stdout + proc.stderr
            outputs.append(f"--- process {i} ({'to the end' if mode is None else f'{mode} {plan}'}) "
                           f"{'--resume' if not fresh else 'fresh'}:\n{out[-4000:]}")
            where = [ln for ln in out.splitlines() if ln.startswith("kill_launcher: SIGKILL")]
            if "Traceback" in out or proc.returncode not in (0, -9) or (proc.returncode == -9 and not where):
                raise AssertionError("a process failed:\n" + "\n".join(outputs))
            if proc.returncode == 0:
                break  # the run finished before its planned kill point
            happened.append(f"{mode}: {where[0][len('kill_launcher: '):]}")
    finally:
        try:
            ref.wait(timeout=timeout)
        finally:
            if ref.poll() is None:
                ref.kill()
            ref_log.close()
    with open(os.path.join(str(cwd), f"{ref_name}.log")) as f:
        ref_out = f.read()
    if ref.returncode != 0 or "Traceback" in ref_out:
        raise AssertionError("the uninterrupted run failed:\n" + ref_out[-4000:])
    if not os.path.isfile(os.path.join(run_dir, "finished")):
        raise AssertionError("the killed run never wrote `finished`:\n" + "\n".join(outputs))
    problems = compare_logged_steps(read_scalars(os.path.join(str(cwd), "runs", ref_name)), read_scalars(run_dir),
                                    episodic)
    problems += compare_snapshots(os.path.join(str(cwd), "runs", ref_name), run_dir)
    if problems:
        raise AssertionError("\n".join(problems) + "\nkills: " + "; ".join(happened) + "\n" + "\n".join(outputs))
    return happened


# ---------------------------------------------------------------------------------------------------------------
# the documented TensorBoard tags of a script (docs/<script>.md, section "4. Logged metrics")


def documented_tags(script: str) -> list[tuple[str, str]]:
    """(regex, row) for every row of the tag table in docs/<script>.md's '## 4. Logged metrics' section. A tag cell is
    `a/b/c`; `<name>` stands for one path element (a layer), `{x,y}` for one of the listed words."""
    with open(os.path.join(REPO, "docs", script.replace(".py", ".md"))) as f:
        section = f.read().split("\n## 4. Logged metrics", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        m = re.match(r"^\|\s*`([^`]+)`\s*\|", line)
        if m and "/" in m.group(1):
            regex = re.escape(m.group(1))
            regex = re.sub(r"\\<[^>]*\\>|<[^>]*>", ".+", regex)
            regex = re.sub(r"\\\{([^}]*)\\\}|\{([^}]*)\}",
                           lambda g: "(" + "|".join((g.group(1) or g.group(2)).replace("\\", "").split(",")) + ")",
                           regex)
            rows.append((regex, line))
    assert rows, f"docs/{script.replace('.py', '.md')} has no tag table under '## 4. Logged metrics'"
    return rows


def check_documented_tags(script: str, written, conditional_ok: bool = True) -> None:
    """Every tag a run wrote is in the script's page, and every documented tag was written unless its row says
    'only with' (a tag that needs a flag or an event the smoke run may not have)."""
    rows = documented_tags(script)
    undocumented = sorted(t for t in written if not any(re.fullmatch(r, t) for r, _ in rows))
    assert not undocumented, f"{script} wrote tags its page does not list: {undocumented}"
    unwritten = [row for r, row in rows if not any(re.fullmatch(r, t) for t in written) and "only with" not in row]
    assert not unwritten, f"{script}'s page lists tags the run did not write: {unwritten}"
