"""Tests for dqn_atari_hr.py: smoke runs of the real script, the frame-deduplicated replay buffer against a scripted
episode stream, parameter counts of the papers' variants, layer semantics, and bad-input handling."""
import json
import os

import numpy as np
import pytest
import torch

import common
import dqn_atari_hr as dqn

SCRIPT = "dqn_atari_hr.py"
METRIC_KEYS = ("dormant_kde", "dormant_score", "srank", "max_score", "saturated", "zombie")
# tiny budget: ~2 games of random Breakout, 2 probes (before and after learning starts), 37 updates of batch 8;
# one torch thread per run (the CI box has 2 cores and runs two at a time)
TINY = ["--total-timesteps", 400, "--learning-starts", 250, "--buffer-size", 1000, "--batch-size", 8,
        "--metrics-every", 150, "--metrics-batch", 64, "--exploration-fraction", 1.0, "--target-network-frequency", 50]
ENV = {"OMP_NUM_THREADS": "1"}


def expected_tags(layers):
    tags = {"charts/episodic_return", "charts/episodic_length", "charts/SPS", "charts/learning_rate",
            "charts/epsilon", "losses/td_loss", "losses/q_values", "representation/hidden_bias",
            "representation/live_contribution"}
    return tags | {f"representation/{layer}/{key}" for layer in layers for key in METRIC_KEYS}


SMOKE = {  # id -> (extra flags, probed layers)
    "relu+save": (["--save-model", "--eval-episodes", 1], ["conv1", "conv2", "conv3", "latent"]),
    "tanh-hr": (["--activation", "tanh", "--hr"], ["conv1", "conv2", "conv3", "latent"]),
    "tanh-ln": (["--activation", "tanh", "--layernorm"], ["conv1", "conv2", "conv3", "latent"]),
    "widen": (["--hidden-dim", 1024], ["conv1", "conv2", "conv3", "latent"]),
    "2hr": (["--hr", "--hidden-layers", 2], ["conv1", "conv2", "conv3", "fc1", "latent"]),
    "hadamax": (["--encoder", "hadamax", "--activation", "gelu", "--layernorm"], ["conv1", "conv2", "conv3", "latent"]),
}


def run_many(jobs, workers=2):
    """{key: (args, cwd)} -> {key: CompletedProcess}, `workers` subprocesses at a time (the box has 2 cores)."""
    from concurrent.futures import ThreadPoolExecutor

    from conftest import run_script
    with ThreadPoolExecutor(workers) as pool:
        futures = {k: pool.submit(run_script, SCRIPT, args, cwd, 300, ENV) for k, (args, cwd) in jobs.items()}
        return {k: f.result() for k, f in futures.items()}


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    jobs = {}
    for key, (variant, _) in SMOKE.items():
        cwd = tmp_path_factory.mktemp(key.replace("+", "_"))
        jobs[key] = ([*TINY, *variant, "--run-name", "smoke"], cwd)
    return {k: (proc, jobs[k][1]) for k, proc in run_many(jobs).items()}


@pytest.mark.parametrize("key", list(SMOKE))
def test_smoke_logs_every_tag(key, smoke_runs, read_scalars):
    variant, layers = SMOKE[key]
    proc, cwd = smoke_runs[key]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = cwd / "runs" / "smoke"
    assert (run_dir / "finished").exists()  # marker the sweeps and analyze.py rely on
    scalars = read_scalars(str(run_dir))
    missing = expected_tags(layers) - set(scalars)
    assert not missing, f"missing tags: {sorted(missing)}"
    for layer in layers:  # probes at every --metrics-every step, values in range
        assert [s for s, _ in scalars[f"representation/{layer}/srank"]] == [150, 300]
        for key in ("dormant_kde", "dormant_score", "saturated", "zombie"):
            assert all(0.0 <= v <= 1.0 for _, v in scalars[f"representation/{layer}/{key}"])
        assert all(v >= 1 for _, v in scalars[f"representation/{layer}/srank"])
    # head contributions: dormant (KDE) vs live latent neurons; an all-dormant latent has no live contribution
    # (at init on near-identical Breakout frames most latent units barely vary, so this happens)
    dormant = dict(scalars["representation/latent/dormant_kde"])
    for name, empty_when in [("live_contribution", 1.0), ("hidden_bias", 0.0)]:
        for step, v in scalars[f"representation/{name}"]:
            assert v >= 0 and (v == 0 if dormant[step] == empty_when else True)
    # episodic return is the raw score of full games: an integer number of bricks, not a per-life clipped sum
    assert all(float(v).is_integer() and v >= 0 for _, v in scalars["charts/episodic_return"])
    args = json.loads((run_dir / "args.json").read_text())
    assert args["run_name"] == "smoke" and args["total_timesteps"] == 400
    # the printed parameter count is the network's
    argv = [str(a) for a in variant]
    parsed = dqn.Args(**{k: v for k, v in args.items()})
    n_params = sum(p.numel() for p in dqn.QNetwork(parsed, 4).parameters())
    assert f"parameters: {n_params:,}" in proc.stdout
    if "--save-model" in argv:
        assert (run_dir / "dqn_atari_hr.cleanrl_model").exists()
        assert len(scalars["eval/episodic_return"]) == 1


# --------------------------------------------------------------------------------------------------------------
# replay buffer


def encode(ep, t, shape=(84, 84)):
    f = np.zeros(shape, dtype=np.uint8)
    f[0, :4] = (ep % 256, ep // 256, t % 256, t // 256)
    f[1:, :] = (ep * 7 + t) % 251  # the rest of the frame varies too
    return f


def decode(frame):
    return int(frame[0, 0]) + 256 * int(frame[0, 1]), int(frame[0, 2]) + 256 * int(frame[0, 3])


def truth_stack(ep, t, k=4):
    """The stack the agent saw at step t of episode ep: frames t-3..t, the first frame repeated before t=0."""
    return [(ep, max(t - k + 1 + i, 0)) for i in range(k)]


def test_replay_stacks_match_scripted_episode_stream():
    rng = np.random.default_rng(0)
    cap = 97  # odd and small: the ring wraps many times, mid-episode
    rb = dqn.FrameReplayBuffer(cap, frame_shape=(84, 84), seed=1)
    truth = {}  # (ep, t) -> (action, reward, terminated, truncated, global slot)
    slot = 0  # global write count = slot number of the next write
    n_checked = 0
    for ep in range(300):
        length = int(rng.choice([1, 2, 3, 4, 5, 7, 30]))
        ends_by = rng.choice(["terminated", "truncated"])
        first = encode(ep, 0)
        agent = dqn.FrameStack(first)  # the acting agent's own stack
        rb.start_episode(first)
        slot += 1
        for t in range(length):
            assert [decode(f) for f in agent.frames] == truth_stack(ep, t)
            action, reward = int(rng.integers(18)), float(rng.normal())
            term = ends_by == "terminated" and t == length - 1
            trunc = ends_by == "truncated" and t == length - 1
            truth[(ep, t)] = (action, reward, term, trunc, slot - 1)
            rb.add(action, reward, encode(ep, t + 1), term, trunc)
            slot += 1
            agent.push(encode(ep, t + 1))
        if ep % 5:
            continue
        # every sampleable transition: the ones still in the ring, minus the newest and the 3 oldest slots
        lo = slot - cap + 3 if slot >= cap else 0
        expected = {k for k, v in truth.items() if lo <= v[4] < slot - 1}
        got = {decode(rb.frames[i]) for i in rb.valid_indices()}
        assert got == expected
        assert rb.num_transitions() == len(expected)
        obs, actions, rewards, next_obs, dones = rb.sample(64)
        assert obs.dtype == torch.uint8 and obs.shape == (64, 4, 84, 84) and next_obs.shape == obs.shape
        for i in range(64):
            ep_i, t_i = decode(obs[i, -1].numpy())
            action, reward, term, trunc, _ = truth[(ep_i, t_i)]
            assert [decode(f) for f in obs[i].numpy()] == truth_stack(ep_i, t_i)
            assert [decode(f) for f in next_obs[i].numpy()] == truth_stack(ep_i, t_i + 1)
            assert actions[i].item() == action and rewards[i].item() == pytest.approx(reward, rel=1e-6)
            assert dones[i].item() == float(term)  # truncation bootstraps (done 0) from the true final frame
            for f in obs[i].numpy():  # whole frames, not just the code
                assert (f == encode(*decode(f))).all()
            n_checked += 1
    assert n_checked > 3000
    ends = [k for k, v in truth.items() if v[2] or v[3]]
    assert len(ends) == 300


def test_replay_bytes_per_transition():
    assert dqn.FrameReplayBuffer.bytes_needed(1, (84, 84)) == 84 * 84 + 1 + 4 + 1  # frame, action, reward, flags
    cap = 2000
    rb = dqn.FrameReplayBuffer(cap, frame_shape=(84, 84))
    assert rb.nbytes == dqn.FrameReplayBuffer.bytes_needed(cap, (84, 84))
    ep = 0
    while not rb.full or rb.ptr < 500:  # episodes of 100 steps, as a learning agent's lives
        rb.start_episode(encode(ep, 0))
        for t in range(100):
            rb.add(0, 0.0, encode(ep, t + 1), t == 99, False)
        ep += 1
    per_transition = rb.nbytes / rb.num_transitions()
    assert per_transition <= 7200, per_transition  # CleanRL's buffer: 2 x 4 x 84 x 84 = 56448 B
    assert 1e6 * rb.nbytes / cap / 1e9 < 7.1  # the 1M default needs about 7 GB


# --------------------------------------------------------------------------------------------------------------
# network


def n_params(**kw):
    return sum(p.numel() for p in dqn.QNetwork(dqn.Args(**kw), 4).parameters())


def test_parameter_counts_hr_and_widen():
    branch = 3136 * 512 + 512  # one Linear(3136 -> 512) of the latent layer
    base = n_params()
    assert base == (4 * 32 * 64 + 32) + (32 * 64 * 16 + 64) + (64 * 64 * 9 + 64) + branch + (512 * 4 + 4)
    hr = n_params(activation="tanh", hr=True)
    assert hr - base == branch  # HR adds exactly one branch
    assert n_params(activation="tanh", hr=True, hr_branches=3) - base == 2 * branch
    widen = n_params(hidden_dim=1024)
    assert abs(widen - hr) / hr < 0.01
    assert n_params(hr=True, hidden_layers=2) - n_params(hr=True) == 2 * (512 * 512 + 512)


def test_hr_layer_is_product_of_branches_and_conv_layernorm_is_per_position():
    torch.manual_seed(0)
    layer = dqn.HiddenLayer("linear", 6, 5, "tanh", branches=2)
    x = torch.randn(3, 6)
    b1, b2 = layer.branches
    out, pre = layer(x, probe=True)
    torch.testing.assert_close(out, torch.tanh(b1(x)) * torch.tanh(b2(x)))
    torch.testing.assert_close(pre, torch.cat([b1(x), b2(x)], dim=1))
    summed = dqn.HiddenLayer("linear", 6, 5, "relu", branches=3, combine="sum")
    torch.testing.assert_close(summed(x), sum(torch.relu(b(x)) for b in summed.branches))
    conv = dqn.HiddenLayer("conv", 3, 4, "relu", layernorm=True, kernel=3)
    xc = torch.randn(2, 3, 7, 7)
    z = conv.branches[0](xc)
    mu, var = z.mean(dim=1, keepdim=True), z.var(dim=1, unbiased=False, keepdim=True)
    torch.testing.assert_close(conv(xc), torch.relu((z - mu) / torch.sqrt(var + 1e-5)))
    crelu = dqn.HiddenLayer("linear", 6, 5, "crelu")
    assert crelu(x).shape == (3, 10) and crelu.out_dim == 10


def test_hadamax_encoder_shapes():
    net = dqn.QNetwork(dqn.Args(encoder="hadamax", activation="gelu", layernorm=True), 4)
    obs = torch.randint(0, 255, (2, 4, 84, 84), dtype=torch.uint8)
    q, layers = net(obs, probe=True)
    assert q.shape == (2, 4)
    assert [tuple(layers[f"conv{i}"][0].shape) for i in (1, 2, 3)] == [(2, 32, 21, 21), (2, 64, 11, 11),
                                                                       (2, 64, 11, 11)]
    assert net.dense[0].branches[0].in_features == 7744
    assert all(len(c.branches) == 2 and c.norms is not None for c in net.convs)
    torch.testing.assert_close(net(obs), q)


def test_conv_preactivation_reduction_keeps_saturation():
    torch.manual_seed(0)
    pre = torch.randn(16, 8, 5, 5)
    pre[:, 0] = -pre[:, 0].abs()  # saturated channel
    pre[:, 1] = pre[:, 1].abs() + 0.1  # zombie channel
    reduced = torch.stack([pre.amax(dim=(2, 3)), pre.amin(dim=(2, 3))], dim=-1).unsqueeze(2)
    assert common.saturation_fractions(reduced) == common.saturation_fractions(pre) == (1 / 8, 1 / 8)


# --------------------------------------------------------------------------------------------------------------
# bad input


BAD = {  # id -> (argv, the flag the error must name)
    "env-unknown": (["--env-id", "NotAGameNoFrameskip-v4"], "--env-id"),
    "env-not-atari": (["--env-id", "CartPole-v1"], "--env-id"),
    "hr-branches-1": (["--hr", "--hr-branches", 1], "--hr-branches"),
    "sum-without-hr": (["--combine", "sum"], "--combine"),
    "buffer-too-big": (["--buffer-size", 10 ** 9], "--buffer-size"),
    "track": (["--track"], "--track"),
    "activation": (["--activation", "swish"], "--activation"),
}


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
    jobs = {k: (argv, tmp_path_factory.mktemp("bad")) for k, (argv, _) in BAD.items()}
    return {k: (proc, jobs[k][1]) for k, proc in run_many(jobs, workers=4).items()}


@pytest.mark.parametrize("key", list(BAD))
def test_bad_input_exits_before_allocating(key, bad_runs):
    _, flag = BAD[key]
    proc, cwd = bad_runs[key]
    assert proc.returncode != 0
    assert flag in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and "A.L.E" not in proc.stderr  # no environment was created
    assert not (cwd / "runs").exists()  # nor a run directory
    if flag != "--activation":  # ours; tyro formats its own choice error in a box
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    if flag == "--buffer-size":
        assert "GB" in proc.stderr and "available" in proc.stderr
    if flag == "--activation":
        assert "swish" in proc.stderr


def test_import_does_not_train(tmp_path):
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", "import dqn_atari_hr"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, PYTHONPATH=repo))
    assert proc.returncode == 0 and proc.stdout == "", proc.stdout + proc.stderr
    assert list(tmp_path.iterdir()) == []
    assert dqn.Args().end_e == 0.1 and dqn.Args().learning_starts == 80_000 and dqn.Args().buffer_size == 10 ** 6
