"""Every numeric flag of every training script, at its edges: no value ends in a traceback.

The flags come from each script's `Args` (every int and float field, Optional ones too): a flag added later is fuzzed
as well. Each is tried at EDGES. What a try must do:
  - refused: exit 1 or 2 with one `error: ...` line, before any environment or network is built. Checked in-process
    (fast): the script's `__main__` runs with harness.Run stopped where it would create the run directory, so
    everything that can refuse a run (tyro, the script's validate, the generic checks, the replay and network memory
    checks, which build the networks on the meta device only) runs exactly as a user's command runs it;
  - accepted: the value must run a tiny budget (learning included) to the end, or stop with the non-finite one-liner,
    as a process. Exit 0, 1 or 2, no traceback.

Grouping rule for the processes (the suite's time: 3 minutes for all six scripts on 2 cores). The accepted (flag,
value) pairs of one script are packed first-fit into as few tiny runs as possible, across edge values: a pair joins a
run when the run has no value of its flag yet, its enablers do not contradict the run's (--mitigation lnwd vs
hlgauss), and the run's flags together stay accepted in-process (values that interact, e.g. two bounds of one range,
are refused together and the pair goes to another run). Values that switch a part of the tiny run off would hide what the others do there, so they are kept apart:
a pair whose run warns alone (no update will run, no probe: harness.never_warnings) runs alone, and int flags at 2**62
(periods and starts past the tiny budget) are packed among themselves. Float flags at 2**62 (rates, coefficients,
scales: the values that may blow a run up) are packed apart from the rest, and optimizer step sizes, weight decays and
exponents at 2**62 (BLOWS_UP: they do blow it up) run alone. The two bounds of one range (--bin-lower/--bin-upper,
--hl-min/--hl-max) never share a run: accepted apart, together they can make an empty range (0 and 5e-324). A run that ends with the non-finite one-liner stopped early for one of its values, so
the others were not exercised to the end: it is split in halves, each half runs again, down to the value whose stop it
is (a stop is a pass for that value alone). A failure names its run's flags; FLAG_EDGES_ONE=1 runs each pair alone.
The runs are processes forked from a server that imported the script's modules once (Forks): each runs the script as
`__main__`, as `python script argv` does, with its own exit status and output, without paying the imports each time.
Not run as a process: `--total-timesteps` (the budget itself: 2**62 steps is a run the user asked for) and
NOT_RUN below (flags that only say how long the run plays after training, e.g. --eval-episodes with --save-model off).
ENABLERS: the flags a value needs to take effect at all (--hr-branches without --hr is refused as "no effect").
"""
import contextlib
import dataclasses
import importlib
import io
import os
import re
import runpy
import sys
import time
import typing

import pytest

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "scripts"))
from forks import Forks  # noqa: E402  (scripts/forks.py: the fork server, shared with README's rows and gpu_check)

EDGES = ["0", "-1", str(2**62), "1e308", "-1e308", "nan", "inf", "5e-324"]
TINY = {  # a tiny run with learning in it, per script
    "dqn_atari_hr.py": ["--total-timesteps", "300", "--learning-starts", "100", "--buffer-size", "200",
                        "--batch-size", "8", "--metrics-every", "150", "--metrics-batch", "64",
                        "--exploration-fraction", "1.0", "--target-network-frequency", "50", "--compile", "off"],
    "ppo_atari_hr.py": ["--num-envs", "2", "--num-steps", "32", "--update-epochs", "1", "--num-minibatches", "2",
                        "--total-timesteps", "128", "--metrics-every", "64", "--metrics-batch", "32", "--compile", "off"],
    "pqn_atari_hr.py": ["--env-id", "Breakout-v5", "--num-envs", "4", "--num-test-envs", "1", "--num-steps", "8",
                        "--total-timesteps", "96", "--num-minibatches", "2", "--metrics-every", "32",
                        "--metrics-batch", "16", "--max-episode-steps", "30", "--torch-threads", "1", "--compile", "off"],
    "drq_dmc_dominance.py": ["--env-id", "cartpole-swingup", "--batch-size", "8", "--buffer-size", "200",
                             "--learning-starts", "10", "--metrics-every", "80", "--metrics-batch", "16",
                             "--log-every", "80", "--eval-every", "0", "--eval-episodes", "1", "--total-timesteps", "160",
                             "--compile", "off"],  # one evaluation episode where a value turns evaluation on
    "simbav2_dmc_hr.py": ["--env-id", "cartpole-swingup", "--critic-hidden-dim", "16", "--actor-hidden-dim", "8",
                          "--batch-size", "16", "--max-episode-steps", "200", "--metrics-batch", "32",
                          "--total-timesteps", "200", "--learning-starts", "100", "--buffer-size", "1000",
                          "--metrics-every", "100", "--log-every", "100", "--eval-every", "0", "--compile", "off"],
    # 80 frames: 20 agent steps of updates (4 target updates with their encoder updates), losses logged at 40 and
    # 80, a probe at 80: a third less per run than 120 frames, the part that learns unchanged in kind
    "mrq_dmc_hr.py": ["--env-id", "cartpole-swingup", "--batch-size", "8", "--episode-frames", "40",
                      "--target-update-freq", "5", "--zs-dim", "32", "--za-dim", "16", "--zsa-dim", "32",
                      "--enc-hdim", "32", "--value-hdim", "32", "--policy-hdim", "32", "--log-every", "40",
                      "--total-timesteps", "80", "--learning-starts", "40", "--buffer-size", "200",
                      "--metrics-every", "40", "--metrics-batch", "16", "--eval-every", "0", "--eval-episodes", "1",
                      "--compile", "off"],  # one evaluation episode where a value turns evaluation on
}
ENABLERS = {
    "hr_branches": ["--hr"],
    "hl_bins": ["--mitigation", "hlgauss"], "hl_min": ["--mitigation", "hlgauss"],
    "hl_max": ["--mitigation", "hlgauss"], "hl_sigma": ["--mitigation", "hlgauss"],
    "reset_every": ["--mitigation", "reset"], "redo_every": ["--mitigation", "redo"],
    "prune_target": ["--mitigation", "prune"], "prune_start": ["--mitigation", "prune"],
    "prune_end": ["--mitigation", "prune"], "prune_every": ["--mitigation", "prune"],
    "weight_decay": ["--mitigation", "lnwd"],
}
NOT_RUN = {"total_timesteps", "eval_episodes"}
SCRIPTS = tuple(TINY)
WORKERS = 2  # tiny runs at once: the test box has 2 cores, each run one thread


def numeric_flags(script):
    cls = importlib.import_module(script[:-3]).Args
    hints, out = typing.get_type_hints(cls), []
    for field in dataclasses.fields(cls):
        kind = hints[field.name]
        inner = [a for a in typing.get_args(kind) if a is not type(None)]
        kind = inner[0] if typing.get_origin(kind) is typing.Union and len(inner) == 1 else kind
        if kind in (int, float):
            out.append((field.name, kind))
    return out


class Accepted(Exception):
    pass


def preflight(script, argv):
    """The script's __main__ up to the point where harness.Run would create runs/NAME: ("accepted", "") or
    ("refused", the error line). Anything else (a traceback) fails the test."""
    import harness

    def stop(self):
        raise Accepted

    sys.argv, err = [script, *argv], io.StringIO()
    own, harness.Run._own_directory = harness.Run._own_directory, stop
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            runpy.run_path(os.path.join(REPO, script), run_name="__main__")
    except Accepted:
        return "accepted", "warns" if "warning: " in err.getvalue() else ""
    except SystemExit as e:
        msg = str(e.code)
        assert e.code not in (0, None) and msg.startswith("error: ") and "\n" not in msg, (argv, msg, err.getvalue())
        return "refused", msg
    finally:
        harness.Run._own_directory = own
    raise AssertionError(f"{script} {argv}: ran past harness.Run")


def edge_tries(script):
    """[(flag name, value, argv)] for every numeric flag and edge value."""
    tries = []
    for name, kind in numeric_flags(script):
        for value in EDGES:
            flag = "--" + name.replace("_", "-")
            tries.append((name, value, [*ENABLERS.get(name, []), flag, value]))
    return tries


def parses_as(kind, value):
    try:
        kind(value)
        return True
    except ValueError:
        return False


def refusals(script, tmp_path):
    """In-process: {(name, value): "accepted" or the error line}."""
    import harness

    cls = importlib.import_module(script[:-3]).Args
    out, kinds = {}, dict(numeric_flags(script))
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for name, value, argv in edge_tries(script):
            if not parses_as(kinds[name], value):  # not a number of the flag's type: tyro's error, no script needed
                with pytest.raises(SystemExit) as e, contextlib.redirect_stderr(io.StringIO()):
                    harness.cli(cls, argv)
                assert str(e.value.code).startswith("error: ") and "\n" not in str(e.value.code), (name, value)
                out[name, value] = str(e.value.code)
                continue
            verdict, msg = preflight(script, [*TINY[script], *argv])
            out[name, value] = msg if verdict == "refused" else verdict + (" (warns)" if msg else "")
    finally:
        os.chdir(cwd)
    return out


def as_flags(argv):
    """["--a", "1", "--b", "2"] -> {"--a": "1", "--b": "2"} (every argv here is flag-value pairs)."""
    return dict(zip(argv[::2], argv[1::2]))


def huge(script, t):
    """A float flag at 2**62 (a learning rate, a coefficient, a scale): the values that may blow the run up."""
    return t[1] == str(2**62) and dict(numeric_flags(script))[t[0]] is float


# at 2**62 these blow a run up: optimizer step sizes, weight decays, exponents (MR.Q's LAP priority ** --lap-alpha)
BLOWS_UP = re.compile(r"(^|_)(lr|learning_rate|wd|weight_decay|alpha)(_|$)")
RANGE_ENDS = {"lower": "upper", "upper": "lower", "min": "max", "max": "min"}


def other_end(name):
    """--bin-lower -> "bin_upper", --hl-max -> "hl_min": the other bound of a range flag (None: not one)."""
    head, _, end = name.rpartition("_")
    return f"{head}_{RANGE_ENDS[end]}" if head and end in RANGE_ENDS else None


def groups(script, accepted, tmp_path, warns=()):
    """The grouping rule of the module docstring: [[(name, value, argv), ...], ...]."""
    if os.environ.get("FLAG_EDGES_ONE") == "1":
        return [[t] for t in accepted]
    cwd, out = os.getcwd(), []
    os.chdir(tmp_path)
    try:
        alone = [t for t in accepted if t in warns or huge(script, t) and BLOWS_UP.search(t[0])]
        out += [[t] for t in alone]
        off = [t for t in accepted if t not in alone and t[1] == str(2**62) and dict(numeric_flags(script))[t[0]] is int]
        for pool in ([t for t in accepted if t not in alone and t not in off and not huge(script, t)], off,
                     [t for t in accepted if t not in alone and huge(script, t)]):
            runs = []
            for t in pool:
                mine = as_flags(t[2])
                for run in runs:
                    theirs = as_flags([a for g in run for a in g[2]])
                    if any(theirs.get(k, v) != v for k, v in mine.items()):  # the same flag, or enablers that differ
                        continue
                    if other_end(t[0]) in {g[0] for g in run}:  # the range's other bound: apart
                        continue
                    argv = [a for k, v in {**theirs, **mine}.items() for a in (k, v)]
                    if preflight(script, [*TINY[script], *argv]) == ("accepted", ""):
                        run.append(t)
                        break
                else:
                    runs.append([t])
            out += runs
    finally:
        os.chdir(cwd)
    return out


def verdict(rc, out, err):
    """"ok" (exit 0, no traceback), "stop" (the non-finite one-liner, exit 1) or "fail"."""
    last = (err.strip().splitlines() or [""])[-1]
    if "Traceback" in out + err or rc not in (0, 1):
        return "fail"
    return "ok" if rc == 0 else "stop" if last.startswith("error: non-finite") else "fail"


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_numeric_flag_at_its_edges(script, tmp_path, one_torch_thread):
    """A run that stops at the non-finite one-liner stopped early for the value that blew it up: it is split in halves
    and each half runs again, down to the one value whose stop it is, so no other value in it goes unexercised."""
    t0 = time.time()
    forks = Forks(script, tmp_path, dict(os.environ, OMP_NUM_THREADS="1"), WORKERS)  # imports beside the checks
    verdicts = refusals(script, tmp_path)
    accepted = [t for t in edge_tries(script) if verdicts[t[0], t[1]].startswith("accepted") and t[0] not in NOT_RUN]
    warns = [t for t in accepted if verdicts[t[0], t[1]] == "accepted (warns)"]
    runs = {f"edge{i}": g for i, g in enumerate(groups(script, accepted, tmp_path, warns))}
    t1, failures, n_runs = time.time(), [], len(runs)

    def argv_of(group):
        return [a for k, v in as_flags([a for t in group for a in t[2]]).items() for a in (k, v)]

    try:
        for name, group in runs.items():
            forks.submit(name, [*TINY[script], *argv_of(group), "--run-name", name], timeout=120)
        waiting = len(runs)
        while waiting:
            name, rc, out, err, secs, _ = forks.result()
            waiting -= 1
            group, argv = runs[name], argv_of(runs[name])
            print(f"  {name}: {' '.join(argv)}: exit {rc} in {secs}s")
            v = verdict(rc, out, err)
            if v == "stop" and len(group) > 1:
                for half, part in (("a", group[:len(group) // 2]), ("b", group[len(group) // 2:])):
                    runs[name + half] = part
                    forks.submit(name + half, [*TINY[script], *argv_of(part), "--run-name", name + half],
                                 timeout=120)
                waiting, n_runs = waiting + 2, n_runs + 2
            elif v == "fail":
                failures.append(f"{' '.join(argv)}: exit {rc}, {(out + err)[-1500:]}")
    finally:
        forks.close()
    print(f"{script}: {len(verdicts)} tries, {len(accepted)} accepted, {n_runs} runs; in-process {t1 - t0:.1f}s, "
          f"runs {time.time() - t1:.1f}s")
    assert not failures, "\n".join(failures)


def test_the_fuzz_sees_every_numeric_flag():
    """The flag list is the Args class's, not a hand-kept one: a numeric field added to Args is fuzzed."""
    names = {n for s in SCRIPTS for n, _ in numeric_flags(s)}
    assert {"learning_rate", "hr_branches", "buffer_size", "q_lr", "bin_lower", "critic_num_blocks"} <= names
    assert len(names) > 100
