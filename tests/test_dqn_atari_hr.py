"""Tests for dqn_atari_hr.py: smoke runs of the real script, the frame-deduplicated replay buffer against a scripted
episode stream, parameter counts of the papers' variants, layer semantics, and bad-input handling."""
import json
import os

import numpy as np
import pytest
import torch

import common
import dqn_atari_hr as dqn
import harness
from conftest import check_documented_tags, kill_after_checkpoint, probe_reproduces, resume_after_kill, steps_of

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
    # snapshots at every probe (scripts/probe.py reproduces them: test_probe_recomputes_the_inline_metrics)
    "tanh-hr": (["--activation", "tanh", "--hr", "--snapshot-every", 150], ["conv1", "conv2", "conv3", "latent"]),
    "tanh-ln": (["--activation", "tanh", "--layernorm"], ["conv1", "conv2", "conv3", "latent"]),
    # a probe batch larger than the replay's transitions at step 150: that probe is skipped, the next one runs
    # and snapshots every 100 steps: the two before it have no probe batch yet, the one at 300 is probed
    "widen": (["--hidden-dim", 1024, "--metrics-batch", 200, "--snapshot-every", 100],
              ["conv1", "conv2", "conv3", "latent"]),
    "2hr": (["--hr", "--hidden-layers", 2], ["conv1", "conv2", "conv3", "fc1", "latent"]),
    "hadamax": (["--encoder", "hadamax", "--activation", "gelu", "--layernorm"], ["conv1", "conv2", "conv3", "latent"]),
    # the torch.compile fast path (acting step and TD loss) in the real loop, on CPU
    "compiled": (["--compile", "on"], ["conv1", "conv2", "conv3", "latent"]),
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
    for key, (variant, _) in {**SMOKE, "no-probe": (["--metrics-every", 0], [])}.items():
        cwd = tmp_path_factory.mktemp(key.replace("+", "_"))
        jobs[key] = ([*TINY, *variant, "--run-name", "smoke"], cwd)
    return {k: (proc, jobs[k][1]) for k, proc in run_many(jobs).items()}


@pytest.mark.parametrize("key", list(SMOKE))
def test_smoke_logs_every_tag(key, smoke_runs, read_scalars):
    variant, layers = SMOKE[key]
    proc, cwd = smoke_runs[key]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    compiled = key == "compiled"
    assert f"fast paths: torch.compile {'on' if compiled else 'off'}, CUDA graphs off, pinned transfers off (CPU)" \
        in proc.stdout
    assert "warning: torch.compile" not in proc.stderr  # compiled for real, no eager fallback
    run_dir = cwd / "runs" / "smoke"
    probe_steps = [300] if key == "widen" else [150, 300]
    finished = json.loads((run_dir / "finished").read_text())  # what the sweeps, bench and analyze.py read
    assert finished["global_step"] == 400 and finished["n_probes"] == len(probe_steps)
    assert ("probe at step 150 skipped: the replay holds" in proc.stdout) == (key == "widen")
    assert not (run_dir / "checkpoint.pt").exists() and not (run_dir / "replay").exists()
    scalars = read_scalars(str(run_dir))
    check_documented_tags("dqn_atari_hr.py", scalars)  # the page's tag table, both ways
    missing = expected_tags(layers) - set(scalars)
    assert not missing, f"missing tags: {sorted(missing)}"
    for layer in layers:  # probes at every --metrics-every step, values in range
        assert [s for s, _ in scalars[f"representation/{layer}/srank"]] == probe_steps
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


def test_probe_recomputes_the_inline_metrics(smoke_runs, tmp_path):
    """scripts/probe.py on the smoke runs' snapshots: the inline metrics at the run's own thresholds, the known answers
    at others (conftest.probe_reproduces); a snapshot taken before the probe batch existed is probed on it too."""
    proc, cwd = smoke_runs["tanh-hr"]
    assert "snapshots: every 150 steps, about 2 x" in proc.stdout
    assert sorted(os.listdir(cwd / "runs" / "smoke" / "snapshots")) == [
        "probe.pt", "step_000000000150.pt", "step_000000000300.pt"]
    probe_reproduces(cwd / "runs" / "smoke", tmp_path, steps=[150, 300])
    proc, cwd = smoke_runs["widen"]
    got = probe_reproduces(cwd / "runs" / "smoke", tmp_path / "widen", steps=[300])
    assert [s for s, _ in got["own"]["representation/latent/srank"]] == [100, 200, 300]


def test_probes_do_not_change_what_the_agent_does(smoke_runs, read_scalars):
    """The same run with probes (steps 150 and 300) and without: every action, hence every episode, replay batch and
    update, is the same, because a probe draws its batch from its own generator, never from the exploration RNG."""
    runs = {}
    for key in ("relu+save", "no-probe"):
        proc, cwd = smoke_runs[key]
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        runs[key] = read_scalars(str(cwd / "runs" / "smoke"))
    probed, plain = runs["relu+save"], runs["no-probe"]
    assert "representation/latent/srank" in probed and not any(t.startswith("representation/") for t in plain)
    assert max(s for s, _ in probed["charts/episodic_return"]) > 150  # an episode ended after the first probe
    for tag in ("charts/episodic_return", "charts/episodic_length", "charts/epsilon", "losses/td_loss",
                "losses/q_values"):
        assert probed[tag] == plain[tag], tag


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
        batch = dqn.ReplaySampler(rb, 64, torch.device("cpu")).sample()
        assert isinstance(batch, dqn.Batch)
        obs, actions, rewards, next_obs, dones = batch.obs, batch.actions, batch.rewards, batch.next_obs, batch.dones
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
    nbytes = sum(a.nbytes for a in (rb.frames, rb.actions, rb.rewards, rb.flags))
    assert nbytes == dqn.FrameReplayBuffer.bytes_needed(cap, (84, 84))
    ep = 0
    while not rb.full or rb.ptr < 500:  # episodes of 100 steps, as a learning agent's lives
        rb.start_episode(encode(ep, 0))
        for t in range(100):
            rb.add(0, 0.0, encode(ep, t + 1), t == 99, False)
        ep += 1
    per_transition = nbytes / rb.num_transitions()
    assert per_transition <= 7200, per_transition  # CleanRL's buffer: 2 x 4 x 84 x 84 = 56448 B
    assert 1e6 * nbytes / cap / 1e9 < 7.1  # the 1M default needs about 7 GB


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
    (w1, w2), (b1, b2) = layer.fused.weight.split(5), layer.fused.bias.split(5)
    out, pre = layer(x)
    torch.testing.assert_close(out, torch.tanh(x @ w1.T + b1) * torch.tanh(x @ w2.T + b2))
    torch.testing.assert_close(pre, torch.cat([x @ w1.T + b1, x @ w2.T + b2], dim=1))
    assert not torch.equal(w1, w2)  # independently initialised
    summed = dqn.HiddenLayer("linear", 6, 5, "relu", branches=3, combine="sum")
    w, b = summed.fused.weight.split(5), summed.fused.bias.split(5)
    torch.testing.assert_close(summed(x)[0], sum(torch.relu(x @ wk.T + bk) for wk, bk in zip(w, b)))
    conv = dqn.HiddenLayer("conv", 3, 4, "relu", layernorm=True, kernel=3)
    xc = torch.randn(2, 3, 7, 7)
    z = torch.nn.functional.conv2d(xc, conv.fused.weight, conv.fused.bias)
    mu, var = z.mean(dim=1, keepdim=True), z.var(dim=1, unbiased=False, keepdim=True)
    torch.testing.assert_close(conv(xc)[0], torch.relu((z - mu) / torch.sqrt(var + 1e-6)))
    crelu = dqn.HiddenLayer("linear", 6, 5, "crelu")
    assert crelu(x)[0].shape == (3, 10) and crelu.width == 10


def test_default_network_is_cleanrl_qnetwork():
    """The default network draws CleanRL dqn_atari's parameters (PyTorch's default init, in construction order),
    leaves the global RNG where CleanRL's leaves it, and computes the same Q-values, bit for bit."""
    nn = torch.nn
    torch.manual_seed(5)
    ref = nn.Sequential(nn.Conv2d(4, 32, 8, stride=4), nn.ReLU(), nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),
                        nn.Conv2d(64, 64, 3, stride=1), nn.ReLU(), nn.Flatten(), nn.Linear(3136, 512), nn.ReLU(),
                        nn.Linear(512, 6))
    ref_rng = torch.get_rng_state()
    torch.manual_seed(5)
    net = dqn.QNetwork(dqn.Args(), 6)
    assert torch.equal(torch.get_rng_state(), ref_rng)
    ours, theirs = list(net.parameters()), list(ref.parameters())
    assert len(ours) == len(theirs) and all(torch.equal(a, b) for a, b in zip(ours, theirs))
    obs = torch.randint(0, 256, (3, 4, 84, 84), dtype=torch.uint8)
    assert torch.equal(net(obs), ref(obs / 255.0))


def test_hadamax_encoder_shapes():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # SAME padding of even kernels without PyTorch's padding="same" warning
        net = dqn.QNetwork(dqn.Args(encoder="hadamax", activation="gelu", layernorm=True), 4)
        obs = torch.randint(0, 255, (2, 4, 84, 84), dtype=torch.uint8)
        q, layers = net(obs, probe=True)
    assert q.shape == (2, 4)
    assert [tuple(layers[f"conv{i}"][0].shape) for i in (1, 2, 3)] == [(2, 32, 21, 21), (2, 64, 11, 11),
                                                                       (2, 64, 11, 11)]
    assert net.encoder.hidden["latent"].fused.in_features == 7744
    convs = [net.encoder.hidden[f"conv{i}"] for i in (1, 2, 3)]
    assert all(c.branches == 2 and c.layernorm for c in convs)
    torch.testing.assert_close(net(obs), q)


@pytest.mark.parametrize("bad, message", [
    (dict(encoder="hadamax", conv_activation="tanh"),
     "--conv-activation applies to the Nature conv trunk; --encoder hadamax convs always use GELU"),
    (dict(encoder="hadamax", hr_layers="all"), "--hr-layers all does not apply to --encoder hadamax"),
    (dict(combine="sum"), "--combine sum needs --hr"),
])
def test_validate_rejects_network_flags_that_do_not_apply(bad, message):
    with pytest.raises(SystemExit) as exc:
        dqn.validate(dqn.Args(**bad))
    text = str(exc.value.code)
    assert text.startswith("error: ") and message in text and "\n" not in text, text
    dqn.validate(dqn.Args(encoder="hadamax"))  # the default --conv-activation relu is fine


def test_conv_preactivation_reduction_keeps_saturation():
    torch.manual_seed(0)
    pre = torch.randn(16, 8, 5, 5)
    pre[:, 0] = -pre[:, 0].abs()  # saturated channel
    pre[:, 1] = pre[:, 1].abs() + 0.1  # zombie channel
    reduced = dqn.spatial_extremes(pre)
    assert reduced.shape == (16, 8, 1, 2)
    assert common.saturation_fractions(reduced) == common.saturation_fractions(pre) == (1 / 8, 1 / 8)


# --------------------------------------------------------------------------------------------------------------
# fast paths (docs/running.md "GPU fast paths"): equivalence with the code they replaced, on CPU


def reference_sample(rb, batch_size):
    """A batch the plain way: the stacks, actions, rewards and terminal flags at sampled indices, five copies."""
    idx = rb.sample_indices(batch_size)
    nxt = (idx + 1) % rb.capacity
    return dqn.Batch(rb.observations(idx),
                     torch.from_numpy(rb.actions[idx].astype(np.int64)).to(rb.device),
                     torch.from_numpy(rb.rewards[idx]).to(rb.device),
                     rb.observations(nxt),
                     torch.from_numpy((rb.flags[idx] & rb.TERMINATED) != 0).float().to(rb.device))


def reference_update(q_network, target_network, optimizer, batch, gamma):
    """The inline update of the training loop before train_step (CleanRL's dqn_atari)."""
    obs, actions, rewards, next_obs, dones = batch
    with torch.no_grad():
        target_max = target_network(next_obs).max(dim=1).values
        td_target = rewards + gamma * target_max * (1 - dones)
    old_val = q_network(obs).gather(1, actions.unsqueeze(1)).squeeze(1)
    loss = torch.nn.functional.mse_loss(td_target, old_val)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach(), old_val.detach().mean()


def reference_target_update(target_network, q_network, tau):
    for tp, p in zip(target_network.parameters(), q_network.parameters()):
        tp.data.copy_(tau * p.data + (1.0 - tau) * tp.data)


@pytest.mark.parametrize("episodes", [6, 40], ids=["partly-filled", "wrapped-ring"])
def test_batched_sampler_returns_the_plain_batch(episodes):
    rb = dqn.FrameReplayBuffer(257, frame_shape=(84, 84), seed=3)
    fill_scripted(rb, np.random.default_rng(episodes), episodes)
    assert rb.full == (episodes == 40)
    sampler = dqn.ReplaySampler(rb, 64, torch.device("cpu"))
    ptrs, n_done = None, 0
    for _ in range(5):
        state = rb.rng.bit_generator.state
        want = reference_sample(rb, 64)
        after = rb.rng.bit_generator.state
        rb.rng.bit_generator.state = state  # the same RNG state for both
        got = sampler.sample()
        assert isinstance(got, dqn.Batch) and rb.rng.bit_generator.state == after  # the same draws
        assert [g.dtype for g in got] == [w.dtype for w in want] == [torch.uint8, torch.int64, torch.float32,
                                                                     torch.uint8, torch.float32]
        for g, w in zip(got, want):
            assert g.shape == w.shape and torch.equal(g, w)
        n_done += int(got[4].sum())
        # persistent tensors: a CUDA graph reads its inputs at fixed addresses
        now = [t.data_ptr() for t in got]
        assert ptrs is None or now == ptrs
        ptrs = now
    assert n_done > 0  # terminal transitions were among the samples


def small_nets(seed=0, **kw):
    args = dqn.resolve_defaults(dqn.Args(hidden_dim=64, **kw))
    torch.manual_seed(seed)
    q, target = dqn.QNetwork(args, 4), dqn.QNetwork(args, 4)
    target.load_state_dict(q.state_dict())
    return q, target


def twin_nets(**kw):
    a, b = small_nets(**kw), small_nets(**kw)
    for x, y in zip(a, b):
        y.load_state_dict(x.state_dict())
    return a, b


def scripted_batches(n, batch_size=16, tau=0.6):
    rb = dqn.FrameReplayBuffer(300, frame_shape=(84, 84), seed=1)
    fill_scripted(rb, np.random.default_rng(2), 30)
    batches = []
    for _ in range(n):
        batch = reference_sample(rb, batch_size)
        batches.append(batch._replace(actions=batch.actions % 4))
    return batches


def test_train_step_matches_reference_update():
    """make_train_step (+ update_target) performs exactly the Adam steps of the inline update it replaced, and
    make_act picks the inline argmax."""
    (ref_q, ref_target), (q, target) = twin_nets()
    ref_opt = torch.optim.Adam(ref_q.parameters(), lr=1e-3)
    opt = torch.optim.Adam(q.parameters(), lr=1e-3)
    harness.set_capturable_(opt, False)  # what the CPU run does after the (absent) restore: a no-op
    step = dqn.make_train_step(q, target, opt, gamma=0.99)
    target_params = [p for p in target.parameters()]
    for i, batch in enumerate(scripted_batches(5)):
        ref_loss, ref_mean = reference_update(ref_q, ref_target, ref_opt, batch, 0.99)
        loss, q_mean = step(*batch)
        assert torch.equal(loss, ref_loss) and torch.equal(q_mean, ref_mean) and not loss.requires_grad
        if i % 2:  # a soft target update in between: the later steps read it
            reference_target_update(ref_target, ref_q, 0.6)
            dqn.update_target(target, q, 0.6)
    for (name, p_ref), p in zip([*ref_q.named_parameters(), *ref_target.named_parameters()],
                                [*q.parameters(), *target.parameters()]):
        assert torch.equal(p, p_ref), name
    assert all(a is b for a, b in zip(target.parameters(), target_params))  # updated in place, never replaced
    assert not torch.equal(q.head.weight, small_nets()[0].head.weight)  # the steps did change the net
    dqn.update_target(target, q, 1.0)  # hard copy
    assert all(torch.equal(a, b) for a, b in zip(target.parameters(), q.parameters()))
    obs = scripted_batches(1)[0][0]
    for i in range(4):
        with torch.no_grad():
            want = int(q(obs[i:i + 1]).argmax(dim=1).item())
        got = dqn.make_act(q)(obs[i:i + 1])
        assert got.shape == (1,) and got.item() == want and not got.requires_grad


def test_compiled_paths_match_eager(monkeypatch):
    """torch.compile (inductor, on CPU here) of the TD loss and of the greedy acting step gives the eager results.
    strict: a compiler failure fails the test instead of silently falling back to eager."""
    import functools
    monkeypatch.setattr(harness, "compiled", functools.partial(harness.compiled, strict=True))
    torch._dynamo.reset()
    (eager_q, eager_target), (q, target) = twin_nets(activation="tanh", hr=True)
    eager_opt = torch.optim.Adam(eager_q.parameters(), lr=1e-3)
    opt = torch.optim.Adam(q.parameters(), lr=1e-3)
    eager_step = dqn.make_train_step(eager_q, eager_target, eager_opt, 0.99)
    fast_step = dqn.make_train_step(q, target, opt, 0.99, compile_loss=True)
    batches = scripted_batches(3)
    for batch in batches:
        for got, want in zip(fast_step(*batch), eager_step(*batch)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for p, p_eager in zip(q.parameters(), eager_q.parameters()):
        torch.testing.assert_close(p, p_eager, rtol=1e-4, atol=1e-5)
    fast_act, eager_act = harness.compiled(dqn.make_act(q), True), dqn.make_act(q)
    obs = batches[0][0]
    for i in range(3):
        assert torch.equal(fast_act(obs[i:i + 1]), eager_act(obs[i:i + 1]))


def test_fast_path_flags_need_no_cuda_except_cudagraphs_on():
    dqn.validate(dqn.Args(cudagraphs="off", compile="on"))  # these are fine without CUDA
    assert {"compile", "cudagraphs"} <= set(harness.MAY_DIFFER_ON_RESUME)  # they do not change what is trained
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as e:
        harness._generic_checks(dqn.Args(cudagraphs="on"))  # what harness.Run checks first
    assert "--cudagraphs" in str(e.value.code)


# --------------------------------------------------------------------------------------------------------------
# bad input


def tree(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_help_still_prints(run_script, tmp_path):
    proc = run_script(SCRIPT, ["--help"], tmp_path, 120, ENV)
    assert proc.returncode == 0 and "--checkpoint-every" in proc.stdout and "--resume" in proc.stdout, proc.stderr


def test_import_does_not_train(tmp_path):
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", "import dqn_atari_hr"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, PYTHONPATH=repo))
    assert proc.returncode == 0 and proc.stdout == "", proc.stdout + proc.stderr
    assert list(tmp_path.iterdir()) == []
    assert dqn.Args().end_e == 0.1 and dqn.Args().learning_starts == 80_000 and dqn.Args().buffer_size == 10 ** 6


# --------------------------------------------------------------------------------------------------------------
# checkpoint / resume


def fill_scripted(rb, rng, episodes, first_ep=0):
    """Scripted episodes of random length into rb; leaves the last one open (its newest slot awaits an action)."""
    for ep in range(first_ep, first_ep + episodes):
        rb.start_episode(encode(ep, 0))
        length = int(rng.integers(1, 40))
        for t in range(length):
            last = ep == first_ep + episodes - 1 and t == length - 1
            end = not last and t == length - 1
            term = end and rng.random() < 0.7
            trunc = end and not term
            rb.add(int(rng.integers(18)), float(rng.normal()), encode(ep, t + 1), term, trunc)
            if last:
                return


def replay_view(rb):
    """Everything sampling can return, for every valid index."""
    idx = rb.valid_indices()
    nxt = (idx + 1) % rb.capacity
    return {"idx": idx, "obs": rb.observations(idx).numpy(), "next_obs": rb.observations(nxt).numpy(),
            "actions": rb.actions[idx].copy(), "rewards": rb.rewards[idx].copy(), "flags": rb.flags.copy(),
            "ptr": rb.ptr, "full": rb.full}


def chunk_files(directory):
    return sorted(os.listdir(directory))


def test_replay_chunks_rewrite_only_what_changed_and_restore_exactly(tmp_path):
    """The ring's incremental checkpoint: every write marks its slot's chunk, so a save writes exactly the chunks
    changed since the last one (new files), the manifest of every save restores exactly that state, and the previous
    manifest stays loadable until pruned."""
    rng = np.random.default_rng(1)
    rb = dqn.FrameReplayBuffer(257, frame_shape=(84, 84), seed=3, chunk=64)
    fill_scripted(rb, rng, 3)  # partly filled
    d = str(tmp_path / "replay")
    first, written = rb.store.save(d, "a", rb.filled)
    n_chunks = -(-rb.ptr // 64)
    assert len(first["files"]) == n_chunks and len(chunk_files(d)) == n_chunks and written > rb.ptr * 84 * 84
    view_a = replay_view(rb)
    again, written = rb.store.save(d, "b", rb.filled)
    assert written == 0 and again["files"] == first["files"]  # nothing changed: nothing written
    before = dict(first["files"])
    for t in range(5):  # a few steps: they touch the chunk holding the pointer (and the one before, at a border)
        rb.add(0, 1.0, np.full((84, 84), t, np.uint8), False, False)
    touched = {((rb.ptr - 1 - k) % rb.capacity) // 64 for k in range(6)}
    second, written = rb.store.save(d, "c", rb.filled)
    changed = {i for i, name in second["files"].items() if before.get(i) != name}
    assert changed == touched and 0 < written < 3 * 64 * 84 * 84
    # the old manifest's files are still there: a kill before checkpoint.pt is replaced leaves it complete
    fresh = dqn.FrameReplayBuffer(257, frame_shape=(84, 84), seed=99, chunk=64)
    fresh.store.load(d, first)
    fresh.ptr, fresh.full = view_a["ptr"], view_a["full"]  # the pointer travels in the checkpoint's state
    for key, want in view_a.items():
        np.testing.assert_array_equal(replay_view(fresh)[key], want, err_msg=key)
    harness.ChunkStore.prune(d, second)
    assert chunk_files(d) == sorted(second["files"].values())
    fill_scripted(rb, rng, 40)  # wrap the ring: every chunk changes
    third, _ = rb.store.save(d, "d", rb.filled)
    assert len(third["files"]) == -(-257 // 64)
    assert all(third["files"][i] != second["files"].get(i) for i in third["files"])
    # a cut episode (what a resume does) touches at most the two chunks of its last two slots
    rb.cut_episode()
    fourth, written = rb.store.save(d, "e", rb.filled)
    assert 0 < written < 3 * 64 * 84 * 84 and sum(fourth["files"][i] != third["files"][i] for i in third["files"]) <= 2
    with pytest.raises(ValueError, match="layout"):
        dqn.FrameReplayBuffer(257, frame_shape=(84, 84), chunk=32).store.load(d, third)


def test_replay_cut_episode_truncates_without_crossing_episodes():
    rng = np.random.default_rng(0)
    rb = dqn.FrameReplayBuffer(300, frame_shape=(84, 84), seed=0)
    fill_scripted(rb, rng, 4)
    last = rb.ptr - 1
    ep, t = decode(rb.frames[last])
    assert t >= 1  # the open episode has at least one step
    before = set(rb.valid_indices())
    rb.cut_episode()
    assert set(rb.valid_indices()) == before  # the open newest slot was never sampleable; nothing else changes
    assert rb.flags[last] & rb.FINAL and rb.flags[last - 1] & rb.TRUNCATED
    rb.cut_episode()  # idempotent
    rb.start_episode(encode(ep + 1, 0))  # the resumed run's fresh episode
    for t2 in range(6):
        rb.add(0, 0.0, encode(ep + 1, t2 + 1), False, False)
    idx = rb.valid_indices()
    obs, next_obs = rb.observations(idx).numpy(), rb.observations((idx + 1) % rb.capacity).numpy()
    for o, nx in zip(obs, next_obs):
        eps = {decode(f)[0] for f in o} | {decode(f)[0] for f in nx}
        assert len(eps) == 1  # no stack and no transition mixes two episodes
    i = int(np.flatnonzero(idx == last - 1)[0])  # the cut step bootstraps (not terminal) from its true next frame
    assert decode(next_obs[i][-1]) == (ep, t) and not rb.flags[last - 1] & rb.TERMINATED


@pytest.mark.parametrize("episodes", [3, 40], ids=["partly-filled", "wrapped-ring"])
def test_checkpoint_restores_everything_and_releases_the_file(episodes, tmp_path):
    """checkpoint_state + the ring's chunks, written as run.save writes them, then read back as --resume reads them
    into fresh objects: networks, Adam, replay (identical samples: its RNG continues), every RNG, the probe batch."""
    args = dqn.resolve_defaults(dqn.Args(buffer_size=257, hidden_dim=64))
    torch.manual_seed(0)

    def build(seed):
        q, target = dqn.QNetwork(args, 4), dqn.QNetwork(args, 4)
        opt = torch.optim.Adam(q.parameters(), lr=1e-3)
        rb = dqn.FrameReplayBuffer(257, seed=seed, chunk=64)
        return q, target, opt, rb, np.random.default_rng(seed), np.random.default_rng([seed, 1])

    q, target, opt, rb, rng, probe_rng = build(1)
    fill_scripted(rb, np.random.default_rng(episodes), episodes)
    assert rb.full == (episodes == 40) and rb.num_transitions() > 20
    for _ in range(2):  # Adam state exists
        batch = reference_sample(rb, 4)
        opt.zero_grad()
        q(batch.obs).gather(1, batch.actions.unsqueeze(1) % 4).sum().backward()
        opt.step()
    rng.random(7)
    probe = rb.observations(np.sort(probe_rng.choice(rb.valid_indices(), 5, False)))
    path, replay_dir = str(tmp_path / "checkpoint.pt"), str(tmp_path / "replay")
    manifest, _ = rb.store.save(replay_dir, "123", rb.filled)
    harness.atomic_save({"format": harness.CHECKPOINT_FORMAT, "global_step": 123, "replay": manifest,
                         "state": dqn.checkpoint_state(q, target, opt, rb, probe, rng, probe_rng)}, path)
    view = replay_view(rb)
    expected_rng = (rng.random(), probe_rng.random(), np.random.get_state()[1][:4].copy(), torch.rand(2))
    expected_samples = [reference_sample(rb, 16) for _ in range(3)]

    q2, target2, opt2, rb2, rng2, probe_rng2 = build(2)
    np.random.seed(7)
    torch.manual_seed(7)
    ckpt = harness.read_checkpoint(path)
    rb2.store.load(replay_dir, ckpt["replay"])
    probe2 = dqn.restore_state(ckpt["state"], q2, target2, opt2, rb2, rng2, probe_rng2)
    torch.testing.assert_close(probe2, probe)
    for key, want in view.items():
        np.testing.assert_array_equal(replay_view(rb2)[key], want, err_msg=key)
    for a, b in [(q, q2), (target, target2)]:
        for (k, v), (k2, v2) in zip(a.state_dict().items(), b.state_dict().items()):
            assert k == k2 and torch.equal(v, v2)
    for p, p2 in zip(q.parameters(), q2.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key], opt2.state[p2][key])
    assert (rng2.random(), probe_rng2.random()) == expected_rng[:2]
    np.testing.assert_array_equal(np.random.get_state()[1][:4], expected_rng[2])
    torch.testing.assert_close(torch.rand(2), expected_rng[3])
    for want in expected_samples:  # the replay's sampling RNG continues where it was
        for a, b in zip(want, reference_sample(rb2, 16)):
            torch.testing.assert_close(a, b)
    assert harness.param_checksum(q2) == sum(t.double().sum().item() for t in ckpt["state"]["q_network"].values()
                                             if t.is_floating_point())
    del ckpt
    import gc
    gc.collect()
    with open("/proc/self/maps") as f:  # nothing restored still views the memory-mapped checkpoint file
        assert path not in f.read()


RESUME = ["--total-timesteps", 2400, "--learning-starts", 250, "--buffer-size", 1000, "--batch-size", 8,
          "--metrics-every", 500, "--metrics-batch", 64, "--exploration-fraction", 1.0,
          "--target-network-frequency", 50, "--checkpoint-every", 1200, "--run-name", "kr"]


def test_kill_and_resume_continues_the_run(tmp_path):
    run_dir = tmp_path / "runs" / "kr"
    out, ckpt, killed = kill_after_checkpoint(SCRIPT, RESUME, tmp_path, "kr", 1200)
    assert "checkpoint: step 1200" in out
    assert max(s for s, _ in killed["charts/SPS"]) >= 1200  # the killed process logged at or after its checkpoint
    state = ckpt["state"]
    assert ckpt["global_step"] == 1200 and state["probe_obs"] is not None  # probes at 500, 1000 drew the batch
    assert state["replay"]["full"]  # 1200 steps in a 1000-slot ring: the wrapped buffer went through the files
    assert chunk_files(run_dir / "replay") == sorted(ckpt["replay"]["files"].values())  # exactly the chunks named

    proc, checksum, scalars = resume_after_kill(SCRIPT, RESUME, tmp_path, "kr", ckpt)
    assert json.loads((run_dir / "finished").read_text())["global_step"] == 2400
    assert not (run_dir / "checkpoint.pt").exists() and not (run_dir / "replay").exists()  # gone once finished
    # the live network after restore is the checkpointed one (to the last bits of a float64 sum's order)
    want = sum(t.double().sum().item() for t in state["q_network"].values() if t.is_floating_point())
    assert checksum == pytest.approx(want, rel=1e-12, abs=1e-9)
    assert steps_of(scalars, "charts/SPS") == list(range(0, 2400, 100))  # no gap, no duplicate
    assert steps_of(scalars, "losses/td_loss") == list(range(300, 2400, 100))
    assert steps_of(scalars, "representation/latent/srank") == [500, 1000, 1500, 2000]
    args = json.loads((run_dir / "args.json").read_text())
    assert args["resume"] is False and args["checkpoint_every"] == 1200  # args.json is the original run's


def test_resume_of_a_finished_run_says_so(tmp_path, run_script):
    run_dir = tmp_path / "runs" / "done"
    os.makedirs(run_dir)
    (run_dir / "finished").write_text(json.dumps({"global_step": 400, "wall_seconds": 1.0}))
    proc = run_script(SCRIPT, ["--resume", "--run-name", "done"], tmp_path, 120, ENV)
    assert proc.returncode == 0, proc.stderr
    assert "run done already finished (at step 400); nothing to resume" in proc.stdout
    assert "A.L.E" not in proc.stderr + proc.stdout and tree(tmp_path) == ["runs", "runs/done", "runs/done/finished"]


NONFINITE = {  # id -> (flags, expected message tail, step of the last good state and of the resumable checkpoint)
    # caught at a logged update (step 200), before any checkpoint: the last good state is the initial one
    "at-logged-update": (["--learning-starts", 150, "--checkpoint-every", 300, "--metrics-every", 0],
                         "at step 200; last good state (step 0) written to runs/nf/checkpoint_last_good.pt; "
                         "the resumable checkpoint is runs/nf/checkpoint.pt (none yet)", 0, None),
    # caught by the check before writing the checkpoint of step 200; the one of step 100 stays the resume point
    "before-checkpoint": (["--learning-starts", 100, "--checkpoint-every", 100, "--metrics-every", 0],
                          "at step 199; last good state (step 100) written to runs/nf/checkpoint_last_good.pt; "
                          "the resumable checkpoint is runs/nf/checkpoint.pt (step 100)", 100, 100),
    # caught before a metric probe (whose KDE would raise on NaN activations)
    "before-probe": (["--learning-starts", 100, "--checkpoint-every", 0, "--metrics-every", 150, "--metrics-batch", 64],
                     "at step 150; last good state (step 0) written to runs/nf/checkpoint_last_good.pt; "
                     "the resumable checkpoint is runs/nf/checkpoint.pt (none yet)", 0, None),
}


@pytest.mark.parametrize("case", list(NONFINITE))
def test_nonfinite_loss_stops_with_last_good_state(case, tmp_path, run_script):
    # an absurd learning rate overflows the Q-values within a few updates (checked: 5 seeds, both cases)
    flags, message, good_step, ckpt_step = NONFINITE[case]
    argv = ["--total-timesteps", 1000, "--buffer-size", 1000, "--batch-size", 8, "--learning-rate", 1e10,
            "--run-name", "nf", *flags]
    proc = run_script(SCRIPT, argv, tmp_path, 300, ENV)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    run_dir = tmp_path / "runs" / "nf"
    lines = [line for line in proc.stderr.strip().splitlines() if not line.startswith(("A.L.E", "[Powered"))]
    assert len(lines) == 1 and lines[0].startswith("error: non-finite "), proc.stderr  # one line, no traceback
    assert message in lines[0], lines[0]
    assert not (run_dir / "finished").exists()
    good = torch.load(run_dir / "checkpoint_last_good.pt", map_location="cpu", weights_only=False)
    assert good["global_step"] == good_step
    for key in ("q_network", "target_network"):
        assert all(torch.isfinite(t).all() for t in good["state"][key].values())
    assert all(torch.isfinite(t).all() for s in good["state"]["optimizer"]["state"].values() for t in s.values())
    net = dqn.QNetwork(dqn.Args(**good["args"]), 4)
    net.load_state_dict(good["state"]["q_network"])  # a usable state
    if ckpt_step is None:
        assert not (run_dir / "checkpoint.pt").exists()
    else:  # the resume point is untouched by the stop
        assert torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)["global_step"] == ckpt_step


def warnings_before_the_run(argv, tmp_path, monkeypatch):
    """The script's __main__ run in-process up to where harness.Run would create runs/NAME: its `warning:` lines."""
    import contextlib
    import io
    import runpy
    import sys

    class Stop(Exception):
        pass

    def stop(self):
        raise Stop

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [SCRIPT, *map(str, argv)])
    monkeypatch.setattr(harness.Run, "_own_directory", stop)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), pytest.raises(Stop):
        runpy.run_path(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), SCRIPT),
                       run_name="__main__")
    return [line for line in err.getvalue().splitlines() if line.startswith("warning: ")]


@pytest.mark.parametrize("flags,warning", [
    # the first update is the first step after --learning-starts that --train-frequency divides: 2**62, never
    (["--train-frequency", 2**62, "--total-timesteps", 300], "warning: --train-frequency 4611686018427387904: no update "
     "will run (the first would be at step 4,611,686,018,427,387,904, after --learning-starts 100, past "
     "--total-timesteps 300)"),
    # step 200 is the first update (> 100, a multiple of 100); steps run 0..199 under --total-timesteps 200
    (["--train-frequency", 100, "--total-timesteps", 200], "warning: --train-frequency 100: no update will run (the "
     "first would be at step 200, after --learning-starts 100, past --total-timesteps 200)"),
    (["--train-frequency", 100, "--total-timesteps", 201], None),  # step 200 runs: one update
    # --learning-starts itself past the end: named as before
    (["--learning-starts", 300, "--total-timesteps", 300], "warning: --learning-starts 300 is not before "
     "--total-timesteps 300: no update will run"),
])
def test_a_train_frequency_past_the_budget_warns_no_update(flags, warning, tmp_path, monkeypatch):
    warns = warnings_before_the_run(["--learning-starts", 100, "--buffer-size", 200, "--batch-size", 8,
                                     "--metrics-every", 0, "--compile", "off", *flags], tmp_path, monkeypatch)
    assert warns == ([warning] if warning else []), warns
