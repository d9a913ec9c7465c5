"""The README is executable documentation: its first commands are the set-up and the tests, and every row of the
bad-input table (docs/bad-input.md) is run here, as a user would type it, and must fail the way the table says."""
import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "scripts"))
from forks import Forks  # noqa: E402

ATARI = ("dqn_atari_hr.py", "ppo_atari_hr.py", "pqn_atari_hr.py")
SCRIPTS = (*ATARI, "drq_dmc_dominance.py", "simbav2_dmc_hr.py", "mrq_dmc_hr.py")


def readme_text():
    with open(os.path.join(REPO, "README.md")) as f:
        return f.read()


def bad_input_rows():
    """(script, flags, message) rows of the bad-input table, docs/bad-input.md."""
    with open(os.path.join(REPO, "docs", "bad-input.md")) as f:
        section = f.read()
    rows = []
    for line in section.splitlines():
        m = re.match(r"^\|\s*`([\w.]+\.py)`\s*\|\s*`([^`]*)`\s*\|\s*(.+?)\s*\|\s*$", line)
        if m:
            rows.append((m.group(1), m.group(2), m.group(3).strip("`")))
    return rows


ROWS = bad_input_rows()


def test_readme_opens_with_setup_and_test_commands():
    first_block = readme_text().split("```", 2)[1].splitlines()
    assert [line for line in first_block[1:] if line.strip()] == ["pip install -r requirements.txt",
                                                                 "python -m pytest -q"]
    with open(os.path.join(REPO, ".ci", "run")) as f:
        ci = f.read()
    assert "pip install -r requirements.txt" in ci and "python -m pytest -q" in ci


@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_input_table_covers_the_kinds_of_bad_input(script):
    flags = " ".join(f for s, f, _ in ROWS if s == script)
    for needed in ("--env-id", "--total-timesteps 0", "--checkpoint-every -1", "--resume --run-name"):
        assert needed in flags, (script, needed)
    if script in ATARI:  # the network-variant flags every Atari script has
        assert "--activation" in flags and "--encoder" in flags and "other-flags" in flags and "blocked" in flags
        assert ("--hr-branches 1" if script != "pqn_atari_hr.py" else "--combine sum") in flags
    if script == "drq_dmc_dominance.py":
        assert "--mitigation" in flags and "--hr-branches 1" in flags
    if script in ("dqn_atari_hr.py", "drq_dmc_dominance.py", "mrq_dmc_hr.py"):  # frame replays: the memory check
        assert "--buffer-size 1000000000" in flags and "--batch-size" in flags


def prepare(script, flags, cwd):
    """Rows that name these run directories need them first; returns the tree the row must leave as it is."""
    if "--run-name other-flags" in flags:  # an earlier run, made with the script's default flags
        run_dir = cwd / "runs" / "other-flags"
        run_dir.mkdir(parents=True)
        module = importlib.import_module(script[:-3])
        (run_dir / "args.json").write_text(json.dumps(dataclasses.asdict(module.Args())))
        (run_dir / "checkpoint.pt").write_bytes(b"")
    if "--run-name blocked" in flags:  # a file where the run directory should go: unwritable even for root
        (cwd / "runs").mkdir(exist_ok=True)
        (cwd / "runs" / "blocked").write_text("")
    return sorted(str(p.relative_to(cwd)) for p in cwd.rglob("*"))


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
    """Every row as a process of its own, run as a user would type it (in a directory of its own, COLUMNS=60), each
    forked from a server per script that imported the script's modules once (scripts/forks.py): a refused row spends
    nearly all of a fresh process's time importing. {(script, flags): (proc, cwd, tree before)}."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    servers = {s: Forks(s, cwd=tmp_path_factory.mktemp("forks"), env=env, workers=1)
               for s in dict.fromkeys(s for s, _, _ in ROWS)}
    rows = {}
    try:
        for i, (script, flags, _) in enumerate(ROWS):
            cwd = tmp_path_factory.mktemp("bad")
            rows[i] = (script, flags, cwd, prepare(script, flags, cwd))
            servers[script].submit(i, flags.split(), cwd=cwd, env=dict(env, COLUMNS="60"), timeout=180)
    finally:
        for forks in servers.values():
            forks.close()
    out = {}
    for i, (script, flags, cwd, before) in rows.items():
        rc, stdout, stderr, *_ = servers[script].ends.get(i) or ("never ran (the fork server ended)", "", "")
        out[script, flags] = (subprocess.CompletedProcess(flags, rc, stdout, stderr), cwd, before)
    return out


@pytest.mark.parametrize("script,flags,message", ROWS, ids=[f"{s[:3]}:{f}" for s, f, _ in ROWS])
def test_bad_input_row_fails_with_one_line_and_creates_nothing(script, flags, message, bad_runs):
    proc, cwd, before = bad_runs[(script, flags)]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr[-3000:]
    assert "parameters:" not in proc.stdout  # refused before any network, environment or buffer was built
    assert sorted(str(p.relative_to(cwd)) for p in cwd.rglob("*")) == before, "a refused run must create nothing"
