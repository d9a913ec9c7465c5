"""Tests for pqn_atari_hr.py: Q(lambda) targets against a slow reference, the network variants (Hadamax shapes and
parameter count, LayerNorm over channels, HR product, ReDo wiring), the update against a slow per-sample reference,
the metric probe, smoke runs of the real script, bad input, kill / resume, the non-finite stop. The run's lifecycle
itself (resume gate, atomic save, last-good copies) is tested once, in tests/test_harness.py."""
import dataclasses
import json
import math
import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import harness
import pqn_atari_hr as pqn
from conftest import (check_documented_tags, kill_after_checkpoint, probe_reproduces, resume_after_kill, run_script,
                      steps_of)

SCRIPT = "pqn_atari_hr.py"


# ---------------------------------------------------------------------------------------------------------------
# Q(lambda)


def slow_q_lambda(r, d, nq, gamma, lam):
    """Lambda-return by its definition: G^lam_t = (1 - lam) sum_{n=1}^{H-1} lam^(n-1) G^(n)_t + lam^(H-1) G^(H)_t,
    H = T - t, where the n-step return G^(n)_t sums discounted rewards and bootstraps with max Q(s_{t+n}) unless an
    episode ended on the way (then it is the plain discounted sum up to the end)."""
    T, N = r.shape
    out = np.zeros((T, N))
    for i in range(N):
        for t in range(T):
            H = T - t
            returns, acc, disc, ended = [], 0.0, 1.0, False
            for n in range(1, H + 1):
                k = t + n - 1
                if not ended:
                    acc += disc * r[k, i]
                    disc *= gamma
                    ended = bool(d[k, i])
                returns.append(acc if ended else acc + disc * nq[k, i])
            g = sum((1 - lam) * lam ** (n - 1) * returns[n - 1] for n in range(1, H))
            out[t, i] = g + lam ** (H - 1) * returns[H - 1]
    return out


@pytest.mark.parametrize("lam", [0.0, 0.65, 1.0])
def test_q_lambda_matches_slow_reference(lam):
    rng = np.random.default_rng(0)
    T, N = 13, 6
    r = rng.normal(size=(T, N))
    d = (rng.random((T, N)) < 0.2).astype(np.float64)
    d[-1, 0], d[0, 1] = 1.0, 1.0  # an episode end on the last and on the first step
    nq = rng.normal(size=(T, N))
    got = pqn.q_lambda_targets(torch.tensor(r), torch.tensor(d), torch.tensor(nq), 0.99, lam).numpy()
    np.testing.assert_allclose(got, slow_q_lambda(r, d, nq, 0.99, lam), rtol=1e-10, atol=1e-10)
    assert d.sum() > 3  # the data really has episode ends


# ---------------------------------------------------------------------------------------------------------------
# network


def make_args(**kw):
    return pqn.Args(**kw)


def test_nature_default_parameter_count():
    net = pqn.QNetwork(make_args(), 4)
    # convs 8224 + 32832 + 36928, dense 1606144, head 2052, LayerNorm affine 2 * (32 + 64 + 64 + 512)
    assert sum(p.numel() for p in net.parameters()) == 8224 + 32832 + 36928 + 1606144 + 2052 + 1344


def test_hadamax_shapes_and_parameter_count():
    net = pqn.QNetwork(make_args(encoder="hadamax"), 6)
    x = torch.randint(0, 256, (3, 4, 84, 84), dtype=torch.uint8)
    q, acts = net(x, probe=True)
    assert q.shape == (3, 6)
    shapes = {name: tuple(post.shape) for name, (post, _) in acts.items()}
    assert shapes == {"conv1": (3, 32, 21, 21), "conv2": (3, 64, 11, 11), "conv3": (3, 64, 11, 11),
                      "latent": (3, 512)}
    latent, convs = net.encoder.hidden["latent"], [net.encoder.hidden[f"conv{i}"] for i in (1, 2, 3)]
    assert latent.fused.in_features == 7744
    assert [layer.branches for layer in convs] == [2, 2, 2] and latent.branches == 1
    assert latent.activation == "gelu" and all(layer.activation == "gelu" for layer in convs)
    trunk = sum(p.numel() for n, p in net.named_parameters() if not n.startswith("head"))
    convs = 2 * (4 * 64 * 32 + 32) + 2 * (32 * 16 * 64 + 64) + 2 * (64 * 9 * 64 + 64)
    ln = 2 * 2 * (32 + 64 + 64) + 2 * 512
    assert trunk == convs + 7744 * 512 + 512 + ln
    assert 4.0e6 < trunk < 4.2e6  # "about 4.1M" (Hadamax paper)


def test_hadamax_network_raises_no_warning():
    """SAME padding is an explicit F.pad: no PyTorch "padding='same' with even kernel lengths" UserWarning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        net = pqn.QNetwork(make_args(encoder="hadamax"), 4)
        net(torch.zeros(2, 4, 84, 84, dtype=torch.uint8)).sum().backward()


def test_hadamax_block_matches_explicit_computation():
    """Block 1 by hand: two SAME convs (pad 3 before, 4 after for k=8), LayerNorm over channels per position
    (eps 1e-6), tanh-GELU, product, 4x4 max-pool."""
    torch.manual_seed(0)
    net = pqn.QNetwork(make_args(encoder="hadamax"), 4)
    layer = net.encoder.hidden["conv1"]
    with torch.no_grad():
        layer.ln_weight.uniform_(0.5, 1.5)
        layer.ln_bias.uniform_(-0.5, 0.5)
    x = torch.rand(2, 4, 84, 84)
    out = net.encoder.pools["conv1"](layer(x)[0])
    w, b = layer.fused.weight, layer.fused.bias
    xp = F.pad(x, (3, 4, 3, 4))
    branches = []
    for k in range(2):
        z = F.conv2d(xp, w[32 * k:32 * (k + 1)], b[32 * k:32 * (k + 1)])
        zc = z.permute(0, 2, 3, 1)
        mu, var = zc.mean(-1, keepdim=True), zc.var(-1, unbiased=False, keepdim=True)
        zc = (zc - mu) / torch.sqrt(var + 1e-6) * layer.ln_weight[32 * k:32 * (k + 1)] + layer.ln_bias[32 * k:32 * (k + 1)]
        branches.append(0.5 * zc * (1 + torch.tanh(math.sqrt(2 / math.pi) * (zc + 0.044715 * zc ** 3))))
    ref = F.max_pool2d((branches[0] * branches[1]).permute(0, 3, 1, 2), 4, 4)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_hr_dense_layer_is_product_of_independent_branches():
    torch.manual_seed(0)
    layer = pqn.HiddenLayer("linear", 10, 7, "tanh", True, branches=2)
    x = torch.randn(5, 10)
    out, pre = layer(x)
    w, b = layer.fused.weight, layer.fused.bias
    ref = torch.ones(5, 7)
    for k in range(2):
        z = F.layer_norm(x @ w[7 * k:7 * (k + 1)].T + b[7 * k:7 * (k + 1)], (7,), eps=1e-6)
        ref = ref * torch.tanh(z)
    torch.testing.assert_close(out, ref)
    assert pre.shape == (5, 14)
    assert not torch.equal(w[:7], w[7:])  # independently initialised


def test_conv_layernorm_normalises_over_channels_at_each_position():
    torch.manual_seed(0)
    layer = pqn.HiddenLayer("conv", 4, 16, "relu", True, kernel=3)
    _, pre = layer(torch.randn(2, 4, 9, 9))
    assert pre.shape == (2, 16, 7, 7)
    torch.testing.assert_close(pre.mean(dim=1), torch.zeros(2, 7, 7), atol=1e-5, rtol=0)
    torch.testing.assert_close(pre.var(dim=1, unbiased=False), torch.ones(2, 7, 7), atol=1e-3, rtol=0)


def test_crelu_doubles_width():
    net = pqn.QNetwork(make_args(activation="crelu"), 4)
    _, acts = net(torch.zeros(2, 4, 84, 84, dtype=torch.uint8), probe=True)
    assert acts["conv1"][0].shape[1] == 64 and acts["conv1"][1].shape[1] == 32
    assert acts["latent"][0].shape == (2, 1024) and net.head.in_features == 1024


def test_redo_step_recycles_dormant_units_only():
    torch.manual_seed(0)
    # sigmoid HR: live units score ~1, so with a tiny tau only the units made dead below are dormant
    args = make_args(activation="sigmoid", hr=True, layernorm=False, redo_tau=1e-6)
    net = pqn.QNetwork(args, 4)
    opt = torch.optim.RAdam(net.parameters(), lr=1e-3)
    x = torch.randint(0, 256, (16, 4, 84, 84), dtype=torch.uint8)
    net(x).pow(2).mean().backward()
    opt.step()
    latent = net.encoder.hidden["latent"]
    dead = torch.tensor([3, 100, 511])
    with torch.no_grad():  # make three latent units dead in both branches: zero weights, very negative bias
        for k in range(2):
            latent.fused.weight[k * 512 + dead] = 0.0
            latent.fused.bias[k * 512 + dead] = -40.0
        conv3 = net.encoder.hidden["conv3"]  # and conv3 channel 5: its outgoing weights are 49 latent columns
        for k in range(2):
            conv3.fused.weight[k * 64 + 5] = 0.0
            conv3.fused.bias[k * 64 + 5] = -40.0
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    moments = opt.state[latent.fused.weight]["exp_avg"].clone()
    out = pqn.redo_step(net, opt, x, args)
    assert out["redo/latent/recycled_fraction"] == pytest.approx(3 / 512)
    rows = torch.cat([dead, dead + 512])
    w = latent.fused.weight.detach()
    assert (w[rows].abs().sum(dim=1) > 0).all()  # fresh incoming weights in both branches
    assert (latent.fused.bias.detach()[rows] == 0).all()
    assert (net.head.weight.detach()[:, dead] == 0).all()  # zero outgoing weights
    assert (opt.state[latent.fused.weight]["exp_avg"][rows] == 0).all()
    keep = torch.ones(1024, dtype=torch.bool)
    keep[rows] = False
    assert out["redo/conv1/recycled_fraction"] == out["redo/conv2/recycled_fraction"] == 0.0
    assert out["redo/conv3/recycled_fraction"] == pytest.approx(1 / 64)
    assert (conv3.fused.weight.detach()[[5, 69]].abs().sum() > 0) and (conv3.fused.bias.detach()[[5, 69]] == 0).all()
    cols = torch.zeros(3136, dtype=torch.bool)
    cols[5 * 49:6 * 49] = True  # channel-major flatten of the 64 x 7 x 7 conv3 map
    # zero outgoing weights and moments (the latent's own recycled rows got fresh full rows)
    assert (w[keep][:, cols] == 0).all() and (opt.state[latent.fused.weight]["exp_avg"][:, cols] == 0).all()
    # everything else of the latent layer is untouched
    torch.testing.assert_close(w[keep][:, ~cols], before["encoder.hidden.latent.fused.weight"][keep][:, ~cols])
    torch.testing.assert_close(opt.state[latent.fused.weight]["exp_avg"][keep][:, ~cols], moments[keep][:, ~cols])
    assert out["redo/recycled_fraction"] == pytest.approx(4 / (32 + 64 + 64 + 512))
    live = torch.ones(512, dtype=torch.bool)
    live[dead] = False
    torch.testing.assert_close(net.head.weight.detach()[:, live], before["head.weight"][:, live])


def test_redo_step_crelu_recycles_a_unit_only_when_both_halves_are_dormant():
    """CReLU: unit u feeds columns u and out_dim + u of the next layer; it is recycled only when relu(x) and relu(-x)
    are both dormant (pre-activation 0 everywhere), not when one half is dead (a very negative bias)."""
    torch.manual_seed(0)
    args = make_args(activation="crelu", layernorm=False, hidden_dim=32, redo_tau=1e-6)
    net = pqn.QNetwork(args, 4)
    latent = net.encoder.hidden["latent"]
    with torch.no_grad():
        latent.fused.weight[[3, 9]] = 0.0
        latent.fused.bias[3], latent.fused.bias[9] = 0.0, -40.0  # unit 3: both halves 0; unit 9: relu(-x) = 40
    head_before = net.head.weight.detach().clone()
    out = pqn.redo_step(net, None, torch.randint(0, 256, (8, 4, 84, 84), dtype=torch.uint8), args)
    assert out["redo/latent/recycled_fraction"] == pytest.approx(1 / 32)
    assert latent.fused.weight.detach()[3].abs().sum() > 0 and latent.fused.weight.detach()[9].abs().sum() == 0
    zeroed = (net.head.weight.detach() == 0).all(dim=0)
    assert zeroed[[3, 35]].all() and not zeroed[[9, 41]].any()
    torch.testing.assert_close(net.head.weight.detach()[:, ~zeroed], head_before[:, ~zeroed])


# ---------------------------------------------------------------------------------------------------------------
# fast paths (docs/running.md "GPU fast paths"): equivalence with the plain code on CPU


def tiny_rollout(seed=0, n=64, n_actions=4):
    g = torch.Generator().manual_seed(seed)
    return pqn.Batch(torch.randint(0, 256, (n, 4, 84, 84), dtype=torch.uint8, generator=g),
                     torch.randint(0, n_actions, (n,), generator=g), torch.randn(n, generator=g))


def reference_steps(net, optimizer, data, idxs, lrs, max_grad_norm):
    """The update written out slowly: the loss as a sum over samples, each forwarded on its own (0.5 * squared TD
    error to its target, averaged), the global gradient norm from its definition and the clip by
    max_norm / (norm + 1e-6) when it is larger; a float learning rate set in the param group, then RAdam."""
    out = []
    for idx, lr in zip(idxs, lrs):
        optimizer.param_groups[0]["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss, q_sum = 0.0, 0.0
        for i in idx.tolist():
            q = net(data.obs[i:i + 1])[0, int(data.actions[i])]
            loss = loss + 0.5 * (q - data.targets[i]) ** 2 / len(idx)
            q_sum += q.item()
        loss.backward()
        norm = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in net.parameters()))
        if norm > max_grad_norm:
            for p in net.parameters():
                p.grad.mul_(max_grad_norm / (norm + 1e-6))
        optimizer.step()
        out.append((loss.detach(), torch.tensor(q_sum / len(idx))))
    return out


def twin_networks(**kw):
    torch.manual_seed(0)
    a = pqn.QNetwork(make_args(hidden_dim=64, **kw), 4)
    b = pqn.QNetwork(make_args(hidden_dim=64, **kw), 4)
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("tensor_lr", [False, True])
def test_train_step_matches_reference_update(tensor_lr):
    """make_train_step + set_lr (a float lr, or a tensor lr filled in place as the CUDA-graph path does) performs the
    same clipped RAdam steps as the slow per-sample reference."""
    ref_net, net = twin_networks()
    data = tiny_rollout()
    ref_opt = torch.optim.RAdam(ref_net.parameters(), lr=2.5e-4)
    opt = torch.optim.RAdam(net.parameters(), lr=torch.tensor(2.5e-4) if tensor_lr else 2.5e-4)
    idxs = [torch.randperm(64, generator=torch.Generator().manual_seed(i))[:16] for i in range(4)]
    lrs = [2.5e-4 * (1 - i / 4) for i in range(4)]
    ref = reference_steps(ref_net, ref_opt, data, idxs, lrs, 0.5)
    step = pqn.make_train_step(net, opt, data, 0.5)
    for (ref_loss, ref_q), idx, lr in zip(ref, idxs, lrs):
        harness.set_lr(opt, lr)
        loss, q_mean = step(idx)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(q_mean, ref_q, rtol=1e-5, atol=1e-6)
    for (name, p_ref), p in zip(ref_net.named_parameters(), net.parameters()):
        torch.testing.assert_close(p, p_ref, rtol=1e-4, atol=1e-6, msg=name)
    clipped = sum(float((p.grad ** 2).sum()) for p in net.parameters()) ** 0.5
    assert clipped == pytest.approx(0.5, rel=1e-4)  # the clip was active: the test exercises it
    assert not torch.equal(ref_net.head.weight, twin_networks()[0].head.weight)  # the steps did change the net


def test_policy_matches_inline_epsilon_greedy():
    """make_act draws the same random numbers in the same order as the inline code it replaced."""
    net, _ = twin_networks()
    obs = tiny_rollout(n=10).obs
    eps_mask = torch.tensor([1.0] * 8 + [0.0] * 2)
    act = pqn.make_act(net, 4, eps_mask)
    torch.manual_seed(5)
    action, q_best = act(obs, torch.tensor(0.5))
    torch.manual_seed(5)
    with torch.no_grad():
        q = net(obs)
    explore = torch.rand(10) < 0.5 * eps_mask
    expected = torch.where(explore, torch.randint(0, 4, (10,)), q.argmax(dim=1))
    assert torch.equal(action, expected) and torch.equal(q_best, q.max(dim=1).values)
    assert torch.equal(action[8:], q[8:].argmax(dim=1))  # test envs are greedy
    assert explore.any() and not explore.all()


def test_compiled_paths_match_eager(monkeypatch):
    """torch.compile (inductor, on CPU here) of the acting step, the TD loss and the Q(lambda) targets gives the eager
    results. strict: a compiler failure fails the test instead of silently falling back to eager."""
    import functools

    monkeypatch.setattr(harness, "compiled", functools.partial(harness.compiled, strict=True))
    torch._dynamo.reset()
    eager_net, net = twin_networks(activation="tanh", hr=True)
    data = tiny_rollout()
    b_obs = data.obs
    eager_opt = torch.optim.RAdam(eager_net.parameters(), lr=1e-3)
    opt = torch.optim.RAdam(net.parameters(), lr=1e-3)
    eager_step = pqn.make_train_step(eager_net, eager_opt, data, 10.0)
    fast_step = pqn.make_train_step(net, opt, data, 10.0, compile_loss=True)
    for i in range(3):
        idx = torch.arange(16 * i, 16 * i + 16)
        for got, want in zip(fast_step(idx), eager_step(idx)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for p, q in zip(net.parameters(), eager_net.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    # greedy acting: identical choices up to exact ties, same max Q
    mask = torch.ones(12)
    fast_act = harness.compiled(pqn.make_act(net, 4, mask), True)
    action, q_best = fast_act(b_obs[:12], torch.tensor(0.0))
    want_action, want_q = pqn.make_act(net, 4, mask)(b_obs[:12], torch.tensor(0.0))
    torch.testing.assert_close(q_best, want_q, rtol=1e-4, atol=1e-5)
    assert torch.equal(action, want_action)
    # with epsilon 1 every action is a uniform random one (inductor draws its own random numbers)
    action, _ = fast_act(b_obs[:12], torch.tensor(1.0))
    assert action.min() >= 0 and action.max() < 4
    r, d = torch.rand(8, 3), (torch.rand(8, 3) < 0.3).float()
    nq = torch.randn(8, 3)
    torch.testing.assert_close(harness.compiled(pqn.q_lambda_targets, True)(r, d, nq, 0.99, 0.65),
                               pqn.q_lambda_targets(r, d, nq, 0.99, 0.65), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# metric probe


def test_probe_depends_only_on_network_and_batch():
    """Two consecutive probes of the same network and batch give identical scalars (the KDE jitter comes from a
    fresh generator per layer, seeded with --seed), and a probe draws nothing from the RNG that drives the agent.
    With one generator advanced across layers and probes (the old rule) conv1/dormant_kde differs here."""
    torch.manual_seed(0)
    args = make_args(hidden_dim=32, activation="relu")
    net = pqn.QNetwork(args, 4)
    obs = torch.randint(0, 256, (48, 4, 84, 84), dtype=torch.uint8)
    agent_rng = torch.get_rng_state()
    first = pqn.probe_metrics(net, obs, args)
    second = pqn.probe_metrics(net, obs, args)
    assert first == second
    assert torch.equal(torch.get_rng_state(), agent_rng)
    assert set(first) == {f"representation/{layer}/{m}" for layer in LAYERS for m in METRICS} | {
        "representation/hidden_bias", "representation/live_contribution"}


# ---------------------------------------------------------------------------------------------------------------
# smoke runs of the real script

SMALL = ["--env-id", "Breakout-v5", "--num-envs", 8, "--num-test-envs", 2, "--num-steps", 16,
         "--total-timesteps", 512, "--num-minibatches", 4, "--metrics-every", 256, "--metrics-batch", 64,
         "--max-episode-steps", 30, "--torch-threads", 1]
# Hadamax is ~16x the Nature CNN's compute per sample: a smaller run
HADAMAX = ["--env-id", "Breakout-v5", "--num-envs", 2, "--num-test-envs", 1, "--num-steps", 8,
           "--total-timesteps", 128, "--num-minibatches", 2, "--update-epochs", 1, "--metrics-every", 64,
           "--metrics-batch", 16, "--max-episode-steps", 20, "--torch-threads", 1, "--encoder", "hadamax"]

VARIANTS = {
    "relu": SMALL,
    # snapshots (scripts/probe.py reproduces them: test_probe_recomputes_the_inline_metrics) at both probes; with
    # ReDo every 128 steps: the first before the probe batch exists (probed on it all the same), two between probes
    "tanh_hr": SMALL + ["--activation", "tanh", "--hr", "--snapshot-every", 256],
    "hadamax": HADAMAX,
    "crelu": SMALL + ["--activation", "crelu"],
    "redo": SMALL + ["--redo", "--redo-interval", 2, "--snapshot-every", 128],
    "compiled": SMALL + ["--compile", "on"],  # the torch.compile fast path in the real loop, on CPU
}
LAYERS = ["conv1", "conv2", "conv3", "latent"]
METRICS = ["dormant_kde", "dormant_score", "srank", "max_score", "saturated", "zombie"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """smoke_run(variant) -> (process, its cwd): each VARIANTS run once per module, when a test first asks for it."""
    done = {}

    def get(variant):
        if variant not in done:
            cwd = tmp_path_factory.mktemp(variant)
            done[variant] = run_script(SCRIPT, VARIANTS[variant] + ["--run-name", variant, "--seed", 3], cwd=cwd,
                                       timeout=300, env={"OMP_NUM_THREADS": "1"}), cwd
        return done[variant]

    return get


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_smoke_run_logs_every_tag(variant, smoke_run, read_scalars):
    args = VARIANTS[variant]
    proc, tmp_path = smoke_run(variant)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "SPS=" in proc.stdout and "parameters:" in proc.stdout
    compiled = variant == "compiled"
    assert f"torch.compile {'on' if compiled else 'off'}, CUDA graphs off" in proc.stdout
    assert "warning: torch.compile" not in proc.stderr  # compiled for real, no eager fallback
    run_dir = tmp_path / "runs" / variant
    saved = json.loads((run_dir / "args.json").read_text())
    assert saved["seed"] == 3 and saved["run_name"] == variant
    s = read_scalars(str(run_dir))
    check_documented_tags("pqn_atari_hr.py", s)  # the page's tag table, both ways
    total = args[args.index("--total-timesteps") + 1]
    expected = ["charts/episodic_return", "charts/episodic_length", "charts/human_normalized", "charts/SPS",
                "charts/learning_rate", "charts/epsilon", "losses/td_loss", "losses/q_values",
                "eval/episodic_return", "eval/human_normalized", "representation/hidden_bias",
                "representation/live_contribution"]
    expected += [f"representation/{layer}/{m}" for layer in LAYERS for m in METRICS]
    if variant == "redo":
        expected += ["redo/recycled_fraction"] + [f"redo/{layer}/recycled_fraction" for layer in LAYERS]
    missing = [t for t in expected if t not in s]
    assert not missing, f"missing tags: {missing}; got {sorted(s)}"
    for tag in expected:
        assert all(math.isfinite(v) for _, v in s[tag]), tag
    assert s["charts/SPS"][-1][0] == total
    assert s["charts/epsilon"][0][1] == pytest.approx(1.0) and s["charts/epsilon"][-1][1] == pytest.approx(0.001)
    # human-normalised = (score - random) / (human - random) with Breakout's (1.7, 30.5)
    for prefix in ("charts", "eval"):
        for (step, ret), (step2, hn) in zip(s[f"{prefix}/episodic_return"], s[f"{prefix}/human_normalized"]):
            assert step == step2 and hn == pytest.approx((ret - 1.7) / (30.5 - 1.7), abs=1e-5)
    for layer in LAYERS:
        for m in ("dormant_kde", "dormant_score", "saturated", "zombie"):
            assert all(0.0 <= v <= 1.0 for _, v in s[f"representation/{layer}/{m}"])
        assert all(v >= 1 for _, v in s[f"representation/{layer}/srank"])
    if variant == "redo":
        assert all(0.0 <= v <= 1.0 for _, v in s["redo/recycled_fraction"])


def test_probe_recomputes_the_inline_metrics(smoke_run, tmp_path, capsys):
    """scripts/probe.py on the smoke runs' snapshots: the inline metrics at the run's own thresholds, the known answers
    at others (conftest.probe_reproduces); the ReDo run's snapshot taken before the probe batch existed, and those
    between probes, are probed on it too."""
    proc, cwd = smoke_run("tanh_hr")
    assert "snapshots: every 256 steps, about 2 x" in proc.stdout
    assert sorted(os.listdir(cwd / "runs" / "tanh_hr" / "snapshots")) == [
        "probe.pt", "step_000000000256.pt", "step_000000000512.pt"]
    probe_reproduces(cwd / "runs" / "tanh_hr", tmp_path, steps=[256, 512])
    proc, cwd = smoke_run("redo")
    got = probe_reproduces(cwd / "runs" / "redo", tmp_path, steps=[256, 512])
    assert [s for s, _ in got["own"]["representation/latent/srank"]] == [128, 256, 384, 512]
    # PQN's probe has no --kde-threshold (fixed at common.probe_scalars' default): one line, exit 1
    import probe  # scripts/ (probe_reproduces put it on the path)

    capsys.readouterr()
    assert probe.main([str(tmp_path / "redo"), "--kde-threshold", "10"]) == 1
    err = capsys.readouterr().err
    assert err == (f"error: {tmp_path / 'redo'} was made by pqn_atari_hr.py, whose probe has no --kde-threshold "
                   f"(fixed at the default)\n"), err


@pytest.mark.parametrize("bad, flag", [
    (dict(env_id="NotAGame-v5"), "--env-id"),
    (dict(env_id="CartPole-v1"), "--env-id"),
    (dict(hr=True, hr_branches=1), "--hr-branches"),
    (dict(combine="sum"), "--combine"),
    (dict(num_envs=8, num_steps=16, num_minibatches=3), "--num-minibatches"),
    (dict(num_envs=8, num_steps=16, num_minibatches=4, metrics_batch=1024),
     "--metrics-batch 1024 exceeds the rollout (--num-envs x --num-steps = 128)"),
    (dict(num_envs=8, num_steps=16, num_minibatches=4, metrics_every=0, redo=True, metrics_batch=129),
     "--metrics-batch 129 exceeds the rollout"),  # ReDo scores on --metrics-batch samples of the rollout too
    (dict(num_envs=8, num_steps=16, total_timesteps=100), "--total-timesteps (100) must be >="),
    (dict(num_envs=0), "--num-envs must be >= 1, got 0"),
    (dict(learning_rate=0.0), "--learning-rate must be a finite number > 0"),
    (dict(learning_rate=float("nan")), "--learning-rate"),
    (dict(max_grad_norm=-1.0), "--max-grad-norm"),
    (dict(end_e=1.5), "--end-e must be in [0, 1], got 1.5"),
    (dict(q_lambda=-0.1), "--q-lambda"),
    (dict(exploration_fraction=0.0), "--exploration-fraction"),
    (dict(capture_video=True), "--capture-video"),
    (dict(encoder="hadamax", conv_activation="tanh"),
     "--conv-activation applies to the Nature conv trunk; --encoder hadamax convs always use GELU"),
])
def test_validate_rejects_bad_input(bad, flag):
    with pytest.raises(SystemExit) as e:
        pqn.validate(pqn.Args(**bad))
    msg = str(e.value.code)
    assert msg.startswith("error:") and flag in msg and "\n" not in msg


def test_validate_accepts_a_probe_batch_without_probes():
    """--metrics-batch is only drawn from the rollout by the probe and ReDo: without either it is not checked."""
    pqn.validate(pqn.Args(num_envs=8, num_steps=16, num_minibatches=4, metrics_every=0, metrics_batch=1024))


def test_bad_input_exits_with_one_clear_line(tmp_path, run_script):
    """The command-line path: non-zero exit, one line on stderr naming the flag, nothing written."""
    proc = run_script(SCRIPT, ["--hr", "--hr-branches", 1], cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "--hr-branches" in lines[0], proc.stderr
    assert not os.path.exists(tmp_path / "runs")



def assert_one_error_line(proc, message):
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 1, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("error:") and message in lines[0], lines[0]


def test_resume_of_unreadable_checkpoint_fails_clearly(tmp_path, run_script):
    run_dir = tmp_path / "runs" / "broken"
    run_dir.mkdir(parents=True)
    saved = dataclasses.asdict(pqn.Args(activation="relu", run_name="broken"))
    (run_dir / "args.json").write_text(json.dumps(saved))
    (run_dir / "checkpoint.pt").write_bytes(b"not a checkpoint")
    proc = run_script(SCRIPT, ["--resume", "--run-name", "broken"], cwd=tmp_path, timeout=120)
    assert_one_error_line(proc, "--resume: cannot read runs/broken/checkpoint.pt")
    assert json.loads((run_dir / "args.json").read_text()) == saved  # untouched


def test_resume_of_finished_run_exits_0(tmp_path, run_script):
    run_dir = tmp_path / "runs" / "done"
    run_dir.mkdir(parents=True)
    (run_dir / "finished").write_text(json.dumps({"global_step": 512, "wall_seconds": 3.0}))
    proc = run_script(SCRIPT, ["--resume", "--run-name", "done"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "run done already finished (at step 512); nothing to resume" in proc.stdout
    assert sorted(p.name for p in run_dir.iterdir()) == ["finished"]


# ---------------------------------------------------------------------------------------------------------------
# checkpoint, SIGKILL, resume

# batch 32, 20 updates, a checkpoint every 4 updates; ReDo every 2 updates and metric probes every 2 updates so
# their tags cross the resume point too; a snapshot at every checkpoint (the resume purges it and saves it again)
RESUMABLE = ["--env-id", "Breakout-v5", "--num-envs", 4, "--num-test-envs", 1, "--num-steps", 8,
             "--total-timesteps", 640, "--num-minibatches", 4, "--metrics-every", 64, "--metrics-batch", 16,
             "--max-episode-steps", 30, "--torch-threads", 1, "--checkpoint-every", 128, "--redo",
             "--redo-interval", 2, "--seed", 5, "--run-name", "kr", "--snapshot-every", 128]


def checksum(state_dict):
    return sum(t.double().sum().item() for t in state_dict.values() if t.is_floating_point())


def test_kill_and_resume_continues_without_gap(tmp_path):
    snapshots = tmp_path / "runs" / "kr" / "snapshots"
    # killed once it has logged an update past its first checkpoint (128): those events must go on resume
    _, ckpt, killed = kill_after_checkpoint(SCRIPT, RESUMABLE, tmp_path, "kr", 160)
    k, state = ckpt["global_step"], ckpt["state"]
    assert k % 128 == 0 and state["update"] == k // 32 and state["grad_steps"] == (k // 32) * 8
    assert state["probe_obs"].shape == (16, 4, 84, 84) and state["probe_obs"].dtype == torch.uint8
    assert state["optimizer"]["state"] and state["rng"]["generators"] == []
    assert state["logs"]["charts/epsilon"] == pytest.approx(0.001) and "losses/td_loss" in state["logs"]
    assert max(st for st, _ in killed["charts/SPS"]) >= k

    assert harness.snapshot_name(k) in os.listdir(snapshots)  # taken before the checkpoint

    proc, resumed_checksum, s = resume_after_kill(SCRIPT, RESUMABLE, tmp_path, "kr", ckpt)
    assert resumed_checksum == pytest.approx(checksum(state["network"]), rel=1e-12, abs=1e-9)
    run_dir = tmp_path / "runs" / "kr"
    assert json.loads((run_dir / "finished").read_text())["global_step"] == 640
    assert (run_dir / "checkpoint.pt").exists()  # PQN's small checkpoint stays after the run

    steps = steps_of(s, "charts/SPS")
    assert steps == list(range(32, 641, 32)), steps  # no gap, no duplicate, up to the total
    for tag in ("losses/td_loss", "charts/epsilon", "charts/learning_rate"):
        assert steps_of(s, tag) == steps, tag
    for tag in ("redo/recycled_fraction", "representation/latent/srank", "representation/hidden_bias"):
        assert steps_of(s, tag) == list(range(64, 641, 64)), tag
    # the schedules continue from the checkpointed update: epsilon over the first 10% of the 20 updates, the
    # learning rate annealed over the 160 gradient steps (logged after the update's last one)
    for st, eps in s["charts/epsilon"]:
        u = st // 32 - 1
        assert eps == pytest.approx(1.0 + min(u / 2.0, 1.0) * (0.001 - 1.0), rel=1e-6), st
    for st, lr in s["charts/learning_rate"]:
        assert lr == pytest.approx(2.5e-4 * (1 - (st // 32 * 8 - 1) / 160), rel=1e-5), st
    saved = json.loads((run_dir / "args.json").read_text())
    assert saved["resume"] is False and saved["total_timesteps"] == 640  # args.json was not rewritten
    # the snapshots: each step once, the checkpoint's saved again by the resumed run from the checkpointed network
    # (the network its probe saw: the metrics the checkpoint carried reproduce)
    assert sorted(os.listdir(snapshots)) == ["probe.pt"] + [harness.snapshot_name(st) for st in range(128, 641, 128)]
    probe_reproduces(run_dir, tmp_path / "probed", steps=list(range(128, 641, 128)))


# ---------------------------------------------------------------------------------------------------------------
# non-finite stop

NONFINITE = ["--env-id", "Breakout-v5", "--num-envs", 4, "--num-test-envs", 1, "--num-steps", 8,
             "--total-timesteps", 640, "--num-minibatches", 4, "--metrics-every", 0, "--max-episode-steps", 30,
             "--torch-threads", 1, "--checkpoint-every", 32, "--run-name", "nf"]


@pytest.mark.parametrize("flags, bad_step, good_step, resumable", [
    # without LayerNorm, learning rate 1e3: the first update stays finite, the second overflows (seeds 1-8 all did)
    (["--no-layernorm", "--learning-rate", 1e3], 64, 32, "(step 32)"),
    # an absurd learning rate overflows in the first update: the last good state is the initial one
    (["--learning-rate", 1e38], 32, 0, "(none yet)"),
])
def test_non_finite_loss_stops_with_last_good_state(flags, bad_step, good_step, resumable, tmp_path, run_script):
    proc = run_script(SCRIPT, NONFINITE + flags, cwd=tmp_path, timeout=300, env={"OMP_NUM_THREADS": "1"})
    assert_one_error_line(proc, f"error: non-finite loss at step {bad_step}; last good state (step {good_step}) "
                                "written to runs/nf/checkpoint_last_good.pt; the resumable checkpoint is "
                                f"runs/nf/checkpoint.pt {resumable}")
    run_dir = tmp_path / "runs" / "nf"
    good = torch.load(run_dir / "checkpoint_last_good.pt", map_location="cpu", weights_only=False)
    assert good["global_step"] == good_step
    assert all(torch.isfinite(t).all() for t in good["state"]["network"].values())
    moments = [t for st in good["state"]["optimizer"]["state"].values() for t in st.values()]
    assert all(torch.isfinite(t).all() for t in moments) and (len(moments) > 0) == (good_step > 0)
    if good_step:  # the last good state is the checkpointed state itself, and checkpoint.pt was left alone
        ckpt = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
        assert ckpt["global_step"] == good_step
        assert all(torch.equal(good["state"]["network"][n], t) for n, t in ckpt["state"]["network"].items())
    else:
        assert not (run_dir / "checkpoint.pt").exists()
    assert not (run_dir / "finished").exists()


def test_envpool_threads_default_to_the_cpus_this_process_may_use(monkeypatch):
    """As in PPO: envpool's default would take the host's CPU count; ours the affinity mask's, one per env at most."""
    seen = {}
    monkeypatch.setattr(pqn.envpool, "make", lambda *a, **kw: seen.update(kw))
    monkeypatch.setattr(harness, "available_cpus", lambda: 3)
    args = pqn.Args()
    pqn.make_env(args, 128, 1)
    assert seen["num_threads"] == 3
    pqn.make_env(args, 2, 1)
    assert seen["num_threads"] == 2
    pqn.make_env(dataclasses.replace(args, envpool_threads=7), 128, 1)
    assert seen["num_threads"] == 7
