"""scripts/probe.py: metrics recomputed from a run's network snapshots. Each script's own test checks that the
recomputed metrics equal its inline ones (conftest.probe_reproduces); here, on one tiny DQN run: what a second call
keeps and rewrites, the CSV, TensorBoard's custom-scalars layout, analyze.py's --metrics-from, and bad input."""
import csv
import json
import os
import re
import shutil
import sys

import pytest

from conftest import REPO, read_scalars, run_script

sys.path.insert(0, os.path.join(REPO, "scripts"))
import analyze  # noqa: E402
import probe  # noqa: E402

FLAGS = ["--total-timesteps", 300, "--learning-starts", 100, "--buffer-size", 300, "--batch-size", 8,
         "--metrics-every", 100, "--metrics-batch", 32, "--snapshot-every", 100, "--compile", "off"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A finished tiny DQN run with snapshots at steps 100, 200 (300 is the end: the loop's last step is 299)."""
    cwd = tmp_path_factory.mktemp("probe")
    proc = run_script("dqn_atari_hr.py", [*map(str, FLAGS), "--run-name", "r"], cwd=cwd, timeout=600,
                      env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd / "runs" / "r"


@pytest.fixture
def run_dir(made, tmp_path):
    return shutil.copytree(made, tmp_path / "runs" / "r")


def layouts(directory):
    """The custom-scalars layouts (TensorBoard's Layout proto) written in `directory`'s event files."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.custom_scalar import layout_pb2

    out = []
    for name in os.listdir(directory):
        if name.startswith("events.out.tfevents."):
            for event in EventFileLoader(os.path.join(directory, name)).Load():
                for value in event.summary.value:
                    if value.tag == "custom_scalars__config__":
                        out.append(layout_pb2.Layout.FromString(value.tensor.string_val[0]))
    return out


def test_the_layout_puts_every_layer_of_a_metric_in_one_chart(run_dir):
    """One chart per metric, one line per layer: each per-layer tag the run logged matches the regex of exactly the
    chart named by its last part; the network-wide tags match the network-wide chart."""
    (layout,) = layouts(run_dir)
    charts = {c.title: c.multiline.tag[0] for cat in layout.category for c in cat.chart}
    tags = [t for t in read_scalars(run_dir, below=False) if t.startswith("representation/")]
    assert len(tags) == 4 * 6 + 2  # conv1-3 and latent x 6 metrics, hidden_bias and live_contribution
    for tag in tags:
        matched = [title for title, regex in charts.items() if re.search(regex, tag)]
        want = tag.split("/")[-1] if tag.count("/") == 2 else "network-wide"
        assert matched == [want], (tag, matched)


def test_a_second_call_rewrites_its_settings_and_keeps_the_others(run_dir, capsys):
    assert probe.main([str(run_dir), "--redo-tau", "0.5"]) == 0
    assert probe.main([str(run_dir), "--kde-threshold", "5"]) == 0
    out = capsys.readouterr().out
    assert f"{run_dir}: 2 of 2 snapshots x 2 settings on cpu in" in out
    assert sorted(os.listdir(run_dir / "probe")) == ["kde_threshold=5", "metrics.csv", "own", "redo_tau=0.5"]
    with open(run_dir / "probe" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    keys = [(r["setting"], int(r["step"]), r["tag"]) for r in rows]
    assert len(keys) == len(set(keys)) == 3 * 2 * 26  # 3 settings x 2 snapshots x 26 tags, none twice
    for setting in ("own", "redo_tau=0.5", "kde_threshold=5"):
        events = read_scalars(run_dir / "probe" / setting)  # the CSV and the events hold the same numbers
        assert len(os.listdir(run_dir / "probe" / setting)) == 1  # the first call's own/ events were replaced
        for r in rows:
            if r["setting"] == setting:
                assert dict(events[r["tag"]])[int(r["step"])] == pytest.approx(float(r["value"]), rel=1e-6)
        assert len(layouts(run_dir / "probe" / setting)) == 1


def test_analyze_reads_a_setting_in_place_of_the_inline_metrics(run_dir):
    assert probe.main([str(run_dir), "--redo-tau", "1e9"]) == 0
    inline = analyze.load_run(str(run_dir), 0.0)
    recomputed = analyze.load_run(str(run_dir), 0.0, "redo_tau=1e+09")
    tag = "representation/latent/dormant_score"
    assert list(recomputed.scalars[tag][1]) == [1.0, 1.0]  # every neuron's score is <= 1e9
    assert list(recomputed.scalars[tag][0]) == [100, 200] and list(inline.scalars[tag][0]) == [100, 200]
    assert list(recomputed.scalars["losses/td_loss"][1]) == list(inline.scalars["losses/td_loss"][1])
    assert "representation/latent/srank" in recomputed.scalars
    assert not any(t.startswith("representation/") for t in analyze.load_run(str(run_dir), 0.0, "nope").scalars)


def one_line_error(capsys, argv, code=1):
    with pytest.raises(SystemExit) as e:
        sys.exit(probe.main(argv))
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert e.value.code == code, err
    return err


def test_bad_input_gets_one_line_each(run_dir, tmp_path, capsys):
    (err,) = one_line_error(capsys, [str(run_dir), "--tau", "0.1"])
    assert err.startswith("error: unrecognized arguments: --tau 0.1 (thresholds: --redo-tau, --kde-threshold")
    (err,) = one_line_error(capsys, [str(run_dir), "--srank-delta", "1"])
    assert err == "error: --srank-delta 1.0: must be >= 0 and < 1 (thresholds: --redo-tau, --kde-threshold, " \
                  "--srank-delta; see --help)"
    (err,) = one_line_error(capsys, [str(run_dir), "--redo-tau", "nan"])
    assert err.startswith("error: --redo-tau nan: must be >= 0 and finite")
    (err,) = one_line_error(capsys, [str(tmp_path)])
    assert err == f"error: {tmp_path} is not a run directory (no args.json)"
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(run_dir / "args.json", bare)
    (err,) = one_line_error(capsys, [str(bare)])
    assert err == f"error: {bare} has no snapshots (train with --snapshot-every N to keep them)"
    # args.json of another script beside DQN's snapshots
    other = shutil.copytree(run_dir, tmp_path / "other")
    ppo = json.loads((run_dir / "args.json").read_text())
    ppo["clip_coef"] = 0.1
    (other / "args.json").write_text(json.dumps(ppo))
    (err,) = one_line_error(capsys, [str(other)])
    assert err == f"error: {other}/args.json is not dqn_atari_hr.py's (flags it does not have: --clip-coef)"
    # a snapshot made by a script probe.py does not know
    os.remove(other / "args.json")
    shutil.copy(run_dir / "args.json", other)
    import torch

    blob = torch.load(other / "snapshots" / "probe.pt", weights_only=False)
    torch.save({**blob, "script": "toy_harness_script.py"}, other / "snapshots" / "probe.pt")
    (err,) = one_line_error(capsys, [str(other)])
    assert err.startswith(f"error: {other} was made by toy_harness_script.py, which has no probe here")
    os.remove(other / "snapshots" / "probe.pt")
    (err,) = one_line_error(capsys, [str(other)])
    assert err.startswith(f"error: {other} has snapshots but no probe batch")


def test_a_truncated_snapshot_is_skipped_and_named(run_dir, capsys):
    path = run_dir / "snapshots" / "step_000000000100.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert probe.main([str(run_dir)]) == 0
    out, err = capsys.readouterr()
    (line,) = [ln for ln in err.splitlines() if ln.strip()]
    assert line.startswith(f"warning: skipped {path}: cannot read {path} (")
    assert "1 of 2 snapshots x 1 settings" in out
    assert [s for s, _ in read_scalars(run_dir / "probe" / "own")["representation/latent/srank"]] == [200]
    path.write_bytes(b"")
    (run_dir / "snapshots" / "step_000000000200.pt").write_bytes(b"garbage")
    err = one_line_error(capsys, [str(run_dir)])
    assert len(err) == 3 and err[-1] == f"error: {run_dir}: no snapshot could be probed"
