"""Every numeric flag of every training script, at its edges: no value ends in a traceback.

The flags come from each script's `Args` (every int and float field, Optional ones too): a flag added later is fuzzed
as well. Each is tried at EDGES. What a try must do:
  - refused: exit 1 or 2 with one `error: ...` line, before any environment or network is built. Checked in-process
    (fast): the script's `__main__` runs with harness.Run stopped where it would create the run directory, so
    everything that can refuse a run (tyro, the script's validate, the generic checks, the replay and network memory
    checks, which build the networks on the meta device only) runs exactly as a user's command runs it;
  - accepted: the value must run a tiny budget (learning included) to the end, or stop with the non-finite one-liner,
    as a process. Exit 0, 1 or 2, no traceback.

Grouping rule for the processes (the suite's time): the accepted (flag, value) pairs of one script are packed into as
few tiny runs as possible, one edge value at a time: a pair joins the current run when the run's flags together stay
accepted in-process (values that interact, e.g. two bounds of one range, are refused together and go to a run of
their own). A value that stops the run early (the non-finite stop) ends only its own run; a failure names its run's
flags, and FLAG_EDGES_ONE=1 runs each pair alone to find the culprit.
Not run as a process: `--total-timesteps` (the budget itself: 2**62 steps is a run the user asked for) and
NOT_RUN below (flags that only say how long the run plays after training, e.g. --eval-episodes with --save-model off).
ENABLERS: the flags a value needs to take effect at all (--hr-branches without --hr is refused as "no effect").
"""
import contextlib
import dataclasses
import importlib
import io
import os
import runpy
import subprocess
import sys
import time
import typing

import pytest

from conftest import REPO, run_script

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
                             "--log-every", "80", "--eval-every", "0", "--total-timesteps", "160", "--compile", "off"],
    "simbav2_dmc_hr.py": ["--env-id", "cartpole-swingup", "--critic-hidden-dim", "16", "--actor-hidden-dim", "8",
                          "--batch-size", "16", "--max-episode-steps", "200", "--metrics-batch", "32",
                          "--total-timesteps", "200", "--learning-starts", "100", "--buffer-size", "1000",
                          "--metrics-every", "100", "--log-every", "100", "--eval-every", "0", "--compile", "off"],
    "mrq_dmc_hr.py": ["--env-id", "cartpole-swingup", "--batch-size", "8", "--episode-frames", "40",
                      "--target-update-freq", "5", "--zs-dim", "32", "--za-dim", "16", "--zsa-dim", "32",
                      "--enc-hdim", "32", "--value-hdim", "32", "--policy-hdim", "32", "--log-every", "40",
                      "--total-timesteps", "120", "--learning-starts", "40", "--buffer-size", "200",
                      "--metrics-every", "80", "--metrics-batch", "16", "--eval-every", "0", "--compile", "off"],
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
        return "accepted", ""
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
            out[name, value] = msg or verdict
    finally:
        os.chdir(cwd)
    return out


def groups(script, accepted, tmp_path):
    """The grouping rule of the module docstring: [[(name, value, argv), ...], ...]."""
    if os.environ.get("FLAG_EDGES_ONE") == "1":
        return [[t] for t in accepted]
    cwd, out = os.getcwd(), []
    os.chdir(tmp_path)
    try:
        for value in EDGES:
            pending = [t for t in accepted if t[1] == value]
            while pending:
                group, rest = [pending[0]], []
                for t in pending[1:]:
                    argv = [a for g in (*group, t) for a in g[2]]
                    if preflight(script, [*TINY[script], *argv])[0] == "accepted":
                        group.append(t)
                    else:
                        rest.append(t)
                out.append(group)
                pending = rest
    finally:
        os.chdir(cwd)
    return out


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_numeric_flag_at_its_edges(script, tmp_path, one_torch_thread):
    t0 = time.time()
    verdicts = refusals(script, tmp_path)
    accepted = [t for t in edge_tries(script) if verdicts[t[0], t[1]] == "accepted" and t[0] not in NOT_RUN]
    failures = []
    for i, group in enumerate(groups(script, accepted, tmp_path)):
        argv = [a for g in group for a in g[2]]
        try:
            proc = run_script(script, [*TINY[script], *argv, "--run-name", f"edge{i}"], tmp_path, timeout=120,
                              env={"OMP_NUM_THREADS": "1"})
        except subprocess.TimeoutExpired:
            failures.append(f"{' '.join(argv)}: still running after 120 s (a tiny run takes seconds)")
            continue
        out = proc.stdout + proc.stderr
        last = (proc.stderr.strip().splitlines() or [""])[-1]
        ok = "Traceback" not in out and (proc.returncode == 0 or (
            proc.returncode == 1 and last.startswith("error: non-finite")))
        if not ok:
            failures.append(f"{' '.join(argv)}: exit {proc.returncode}, {out[-600:]}")
    print(f"{script}: {len(verdicts)} tries, {len(accepted)} accepted, {time.time() - t0:.1f}s")
    assert not failures, "\n".join(failures)


def test_the_fuzz_sees_every_numeric_flag():
    """The flag list is the Args class's, not a hand-kept one: a numeric field added to Args is fuzzed."""
    names = {n for s in SCRIPTS for n, _ in numeric_flags(s)}
    assert {"learning_rate", "hr_branches", "buffer_size", "q_lr", "bin_lower", "critic_num_blocks"} <= names
    assert len(names) > 100
