"""Shared test helpers: run a training script as a user would, read its TensorBoard events back."""
import glob
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def read_scalars(run_dir):
    """All scalars of a run: {tag: [(step, value), ...]} sorted by step. Each directory holding event files is read
    by one accumulator, in file order, as TensorBoard does, so a resumed run's purge_step drops the events that the
    killed process logged after its checkpoint."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = glob.glob(os.path.join(run_dir, "**", "events.out.tfevents.*"), recursive=True)
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


@pytest.fixture(name="read_scalars")
def read_scalars_fixture():
    return read_scalars


@pytest.fixture(name="run_script")
def run_script_fixture():
    return run_script
