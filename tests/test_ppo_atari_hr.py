"""Tests of ppo_atari_hr.py: GAE and the PPO update against slow independent formulations, the fast paths
(--compile/--cudagraphs) against the plain code, the probe, smoke runs of the real script read back from TensorBoard,
kill / resume, the non-finite stop, bad input (docs/bad-input.md's table is run by tests/test_readme.py; the run
lifecycle itself by tests/test_harness.py)."""
import json
import math
import os

import numpy as np
import pytest
import torch

import common
import harness
import ppo_atari_hr as ppo
from conftest import (check_documented_tags, kill_after_checkpoint, probe_reproduces, resume_after_kill, run_script,
                      steps_of)

SCRIPT = "ppo_atari_hr.py"
ENV = {"OMP_NUM_THREADS": "1"}
PROBED = ["conv1", "conv2", "conv3", "latent"]
METRIC_KEYS = ["dormant_kde", "dormant_score", "srank", "max_score", "saturated", "zombie"]
PPO_TAGS = ["losses/value_loss", "losses/policy_loss", "losses/entropy", "losses/old_approx_kl", "losses/approx_kl",
            "losses/clipfrac", "losses/explained_variance", "charts/learning_rate", "charts/SPS"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: one intra-op thread


# ---------------------------------------------------------------------------------------------------------------
# GAE


def slow_gae(rewards, values, dones, next_value, next_done, gamma, lam):
    """Advantages from the definition A_t = sum_l (gamma*lam)^l delta_{t+l}, summed forward per env until the episode
    ends; delta_k = r_k + gamma * V(s_{k+1}) * [episode goes on] - V(s_k). dones[k] = 1: obs k starts a new episode."""
    T, N = rewards.shape
    adv = torch.zeros(T, N, dtype=torch.float64)
    for n in range(N):
        for t in range(T):
            total, weight = 0.0, 1.0
            for k in range(t, T):
                ended = float(next_done[n]) if k == T - 1 else float(dones[k + 1, n])
                v_next = float(next_value[n]) if k == T - 1 else float(values[k + 1, n])
                delta = float(rewards[k, n]) + gamma * v_next * (1.0 - ended) - float(values[k, n])
                total += weight * delta
                if ended:
                    break
                weight *= gamma * lam
            adv[t, n] = total
    return adv


@pytest.mark.parametrize("next_done_value", [0.0, 1.0])
def test_gae_matches_slow_reference(next_done_value):
    g = torch.Generator().manual_seed(0)
    T, N, gamma, lam = 17, 5, 0.99, 0.95
    rewards = torch.randn(T, N, generator=g, dtype=torch.float64)
    values = torch.randn(T, N, generator=g, dtype=torch.float64)
    dones = (torch.rand(T, N, generator=g) < 0.2).double()
    dones[0, 0], dones[5, 0], dones[6, 0] = 1.0, 1.0, 1.0  # an episode start at t=0 and a one-step episode
    next_value = torch.randn(N, generator=g, dtype=torch.float64)
    next_done = torch.full((N,), next_done_value, dtype=torch.float64)
    next_done[1] = 1.0 - next_done_value  # both bootstrap cases at the end of the rollout
    assert dones[1:].sum() > 3, "the random data must contain episode ends"

    adv, ret = ppo.compute_gae(rewards, values, dones, next_value.view(1, -1), next_done, gamma, lam)
    expected = slow_gae(rewards, values, dones, next_value, next_done, gamma, lam)
    torch.testing.assert_close(adv, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ret, expected + values, rtol=1e-10, atol=1e-10)


def test_gae_known_answer():
    # one env, 3 steps, episode ends after step 1 (dones[2] = 1), gamma = lam = 0.5, bootstrap V=8 at the end
    rewards = torch.tensor([[1.0], [2.0], [3.0]])
    values = torch.tensor([[4.0], [6.0], [2.0]])
    dones = torch.tensor([[0.0], [0.0], [1.0]])
    adv, _ = ppo.compute_gae(rewards, values, dones, torch.tensor([[8.0]]), torch.tensor([0.0]), 0.5, 0.5)
    d2 = 3 + 0.5 * 8 - 2  # 5
    d1 = 2 - 6  # episode ends: no bootstrap, -4
    d0 = 1 + 0.5 * 6 - 4  # 0
    torch.testing.assert_close(adv.flatten(), torch.tensor([d0 + 0.25 * d1, d1, d2]))


# ---------------------------------------------------------------------------------------------------------------
# network and probe


def test_hr_layer_is_product_of_branches_and_probe_stacks_preacts():
    args = ppo.Args(activation="tanh", hr=True, hr_branches=3)
    agent = ppo.Agent(args, num_actions=4)
    layer = agent.encoder.hidden["latent"]
    assert layer.branches == 3 and agent.encoder.hidden["conv1"].branches == 1
    x = torch.randn(7, layer.fused.in_features)
    out, pre = layer(x)
    torch.testing.assert_close(layer(x)[0], out)
    expected = torch.ones(7, 512)
    branches = list(zip(layer.fused.weight.split(512), layer.fused.bias.split(512)))
    for w, b in branches:
        expected = expected * torch.tanh(torch.nn.functional.linear(x, w, b))
    torch.testing.assert_close(out, expected)
    assert pre.shape == (7, 3 * 512)
    # orthogonal init, sqrt(2) gain on every branch: rows of W are orthogonal with norm sqrt(2)
    for w, _ in branches:
        w = w.detach()
        torch.testing.assert_close(w @ w.T, 2.0 * torch.eye(512), atol=1e-4, rtol=0)


def test_hadamax_encoder_shapes_and_variants():
    agent = ppo.Agent(ppo.Args(encoder="hadamax", activation="gelu", layernorm=True), 6)
    record = {}
    obs = torch.randint(0, 256, (2, 4, 84, 84), dtype=torch.uint8)
    latent = agent.latent(obs, record)
    assert latent.shape == (2, 512)
    assert agent.encoder.hidden["latent"].fused.in_features == 7744  # 64 x 11 x 11
    # outputs after max-pooling; conv pre-activations as (max, min) over space of both branches' channels
    assert record["conv1"][0].shape == (2, 32, 21, 21) and record["conv1"][1].shape == (2, 64, 1, 2)
    assert record["conv2"][0].shape == (2, 64, 11, 11) and record["conv3"][0].shape == (2, 64, 11, 11)
    assert record["latent"][1].shape == (2, 512)
    # crelu doubles widths; stacked 2HR gives fc1 and latent
    args = ppo.Args(activation="crelu", hr=True, hidden_layers=2, hr_layers="all", hidden_dim=64)
    agent = ppo.Agent(args, 4)
    assert agent.encoder.hidden["conv2"].fused.in_channels == 64 and agent.encoder.hidden["conv2"].branches == 2
    assert agent.encoder.hidden["fc1"].fused.in_features == 2 * 64 * 7 * 7
    assert agent.actor.in_features == 128
    assert list(agent.encoder.hidden) == ["conv1", "conv2", "conv3", "fc1", "latent"]


def test_spatial_extremes_keep_saturation_fractions():
    g = torch.Generator().manual_seed(1)
    pre = torch.randn(16, 40, 9, 9, generator=g)
    pre[:, :10] = -pre[:, :10].abs() - 0.1  # always <= 0 (saturated)
    pre[:, 10:18] = pre[:, 10:18].abs() + 0.1  # always > 0 (zombie)
    pre[3, 12, 4, 5] = -1.0  # one negative value anywhere un-zombies a channel
    full = common.saturation_fractions(pre)
    assert full == (10 / 40, 7 / 40)
    assert common.saturation_fractions(ppo.spatial_extremes(pre)) == full


def test_probe_counts_both_heads_repeats_and_leaves_the_rngs_alone():
    """hidden_bias sums the actor's and the critic's input from KDE-dormant latent neurons (the mask of the probe's
    own seed, which latent/dormant_kde agrees with); a probe repeats exactly, whatever the chunking, and draws no
    random number that drives the agent."""
    args = ppo.Args(hidden_dim=32, seed=3)
    torch.manual_seed(0)
    agent = ppo.Agent(args, num_actions=4)
    with torch.no_grad():  # neurons 0..9 of the latent output the constant relu(0.5): dormant by the KDE test
        agent.encoder.hidden["latent"].fused.weight[:10] = 0.0
        agent.encoder.hidden["latent"].fused.bias[:10] = 0.5
    obs = torch.randint(0, 256, (48, 4, 84, 84), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    rng = torch.get_rng_state()
    got = ppo.probe_metrics(agent, obs, args, chunk=16)
    assert torch.equal(torch.get_rng_state(), rng)
    again = ppo.probe_metrics(agent, obs, args)
    assert again.keys() == got.keys() and all(again[k] == pytest.approx(got[k], rel=1e-5, abs=1e-6) for k in got)

    with torch.no_grad():
        latent = agent.latent(obs)
        mask = common.dormant_mask_kde(latent, args.kde_threshold, args.kde_noise_std,
                                       torch.Generator().manual_seed(args.seed))
        both = torch.cat([agent.actor.weight, agent.critic.weight])  # (4 + 1, 32)
        dead = torch.stack([(latent[n] * mask) @ both.T for n in range(len(obs))]).norm(dim=1).mean().item()
        actor_only = ((latent * mask) @ agent.actor.weight.T).norm(dim=1).mean().item()
    assert mask[:10].all() and got["representation/latent/dormant_kde"] == pytest.approx(mask.float().mean().item())
    assert got["representation/hidden_bias"] == pytest.approx(dead, rel=1e-5)
    assert dead != pytest.approx(actor_only, rel=1e-3)  # the critic's share is counted


# ---------------------------------------------------------------------------------------------------------------
# the PPO update and the fast paths (--compile / --cudagraphs): against independent formulations, on CPU


def test_categorical_samples_and_scores_like_torch_distributions():
    """ppo.categorical (no argument check, so no host sync) samples from softmax(logits) (known answer), with the same
    random numbers draws Categorical's actions, and gives Categorical's log-probabilities and entropy."""
    from torch.distributions import Categorical
    logits = torch.tensor([2.0, 0.5, -1.0, 0.0, -float("inf")])
    torch.manual_seed(0)
    action, _, _ = ppo.categorical(logits.expand(20_000, 5))
    freq = torch.bincount(action, minlength=5).double() / 20_000
    assert (freq - torch.softmax(logits.double(), 0)).abs().max() < 0.02 and freq[4] == 0

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 6, generator=g) * 3
    logits[0, 2] = -float("inf")  # an impossible action
    torch.manual_seed(2)
    want, want_next = Categorical(logits=logits).sample(), torch.rand(3)
    torch.manual_seed(2)
    action, logprob, entropy = ppo.categorical(logits)
    # the exponential race of torch.multinomial: same actions, same random numbers used
    assert torch.equal(action, want) and torch.equal(torch.rand(3), want_next)
    dist = Categorical(logits=logits)
    assert torch.equal(logprob, dist.log_prob(action)) and torch.equal(entropy, dist.entropy())
    given = torch.randint(0, 6, (64,), generator=g)
    given[0] = 1
    _, logprob, entropy = ppo.categorical(logits, given)
    assert torch.equal(logprob, dist.log_prob(given)) and torch.equal(entropy, dist.entropy())

    # logits that are no distribution (where Categorical's check raises) sample the action -1 in their row only
    logits[3, 1] = float("inf")
    logits[5] = float("nan")
    with pytest.raises(ValueError):  # explicit: a torch.compile anywhere in the process turns the default check off
        Categorical(logits=logits, validate_args=True)
    action, _, _ = ppo.categorical(logits)
    assert action[3] == -1 and action[5] == -1 and (action[[0, 1, 2, 4]] >= 0).all() and (action[6:] >= 0).all()


def test_act_matches_agent():
    torch.manual_seed(0)
    agent = ppo.Agent(ppo.Args(hidden_dim=64), num_actions=4)
    obs = torch.randint(0, 256, (6, 4, 84, 84), dtype=torch.uint8)
    torch.manual_seed(3)
    action, logprob, value = ppo.make_act(agent)(obs)
    torch.manual_seed(3)
    with torch.no_grad():
        want = agent.get_action_and_value(obs)
    assert torch.equal(action, want[0]) and torch.equal(logprob, want[1]) and torch.equal(value, want[3].flatten())
    assert not value.requires_grad


def tiny_rollout(agent, seed=0, n=64, num_actions=4) -> ppo.Batch:
    """A flat rollout batch with ratios away from 1 and clipping."""
    g = torch.Generator().manual_seed(seed)
    obs = torch.randint(0, 256, (n, 4, 84, 84), dtype=torch.uint8, generator=g)
    actions = torch.randint(0, num_actions, (n,), generator=g)
    with torch.no_grad():
        _, logprobs, _, values = agent.get_action_and_value(obs, actions)
    logprobs = logprobs + 0.2 * torch.randn(n, generator=g)
    values = values.flatten() + 0.2 * torch.randn(n, generator=g)
    advantages = torch.randn(n, generator=g)
    return ppo.Batch(obs=obs, actions=actions, logprobs=logprobs, values=values, advantages=advantages,
                     returns=advantages + values)


def slow_ppo_step(agent, optimizer, rollout: ppo.Batch, mb_inds, args) -> list:
    """CleanRL's PPO minibatch step written out one sample at a time: each sample's own forward pass, log-softmax
    policy, ratio, clipped surrogate, (clipped) squared value error and entropy; means and the advantages' normalisation
    (sample std) by hand; gradient clipping to --max-grad-norm by the global norm, by hand; then the Adam step.
    Returns (policy loss, value loss, entropy, old approx kl, approx kl, clipfrac, loss finite)."""
    c, n, idx = args.clip_coef, len(mb_inds), mb_inds.tolist()
    adv = [float(rollout.advantages[i]) for i in idx]
    if args.norm_adv:
        mean = sum(adv) / n
        std = math.sqrt(sum((a - mean) ** 2 for a in adv) / (n - 1))
        adv = [(a - mean) / (std + 1e-8) for a in adv]
    pg, vf, ent, old_kl, kl, clipped = [], [], [], [], [], []
    for a, i in zip(adv, idx):
        hidden = agent.latent(rollout.obs[i:i + 1])
        logp = torch.log_softmax(agent.actor(hidden)[0], dim=0)
        value = agent.critic(hidden)[0, 0]
        logratio = logp[rollout.actions[i]] - rollout.logprobs[i]
        ratio = logratio.exp()
        pg.append(torch.maximum(-a * ratio, -a * ratio.clamp(1 - c, 1 + c)))
        ret, old_value = rollout.returns[i], rollout.values[i]
        if args.clip_vloss:
            clipped_value = old_value + (value - old_value).clamp(-c, c)
            vf.append(0.5 * torch.maximum((value - ret) ** 2, (clipped_value - ret) ** 2))
        else:
            vf.append(0.5 * (value - ret) ** 2)
        ent.append(-(logp.exp() * logp).sum())
        old_kl.append(-logratio.item())
        kl.append((ratio - 1 - logratio).item())
        clipped.append(abs(ratio.item() - 1) > c)
    pg_loss, v_loss, entropy = sum(pg) / n, sum(vf) / n, sum(ent) / n
    loss = pg_loss - args.ent_coef * entropy + args.vf_coef * v_loss
    optimizer.zero_grad()
    loss.backward()
    norm = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in agent.parameters()))
    for p in agent.parameters():
        p.grad.mul_(min(1.0, args.max_grad_norm / (norm + 1e-6)))
    optimizer.step()
    return [pg_loss.item(), v_loss.item(), entropy.item(), sum(old_kl) / n, sum(kl) / n, sum(clipped) / n,
            float(math.isfinite(loss.item()))]


def twin_agents(**kw):
    args = ppo.Args(hidden_dim=64, **kw)
    torch.manual_seed(0)
    a, b = ppo.Agent(args, 4), ppo.Agent(args, 4)
    b.load_state_dict(a.state_dict())
    return args, a, b


@pytest.mark.parametrize("tensor_lr, variant", [(False, {}), (True, {}),
                                                (False, dict(norm_adv=False, clip_vloss=False))])
def test_train_step_matches_slow_ppo_step(tensor_lr, variant):
    """make_train_step + set_lr (a float lr, or a tensor lr filled in place as the CUDA-graph path does) performs the
    Adam steps of the sample-by-sample formulation and reports its losses."""
    args, ref_agent, agent = twin_agents(**variant)
    rollout = tiny_rollout(ref_agent)
    ref_opt = torch.optim.Adam(ref_agent.parameters(), lr=2.5e-4, eps=1e-5)
    opt = torch.optim.Adam(agent.parameters(), lr=torch.tensor(2.5e-4) if tensor_lr else 2.5e-4, eps=1e-5)
    step = ppo.make_train_step(agent, opt, rollout, args)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(1))
    for i, lr in enumerate([2.5e-4, 2.5e-4, 1.25e-4, 1.25e-4, 1e-5]):
        mb_inds = perm[16 * (i % 4):16 * (i % 4) + 16]
        ref_opt.param_groups[0]["lr"] = lr
        want = slow_ppo_step(ref_agent, ref_opt, rollout, mb_inds, args)
        harness.set_lr(opt, lr)
        got = step(mb_inds)
        assert got.shape == (len(ppo.STATS),) and not got.requires_grad
        torch.testing.assert_close(got, torch.tensor(want), rtol=1e-4, atol=1e-6, msg=f"minibatch {i}")
    assert 0 < want[ppo.STATS.index("losses/clipfrac")] < 1  # the clipped branches were exercised
    for (name, p_ref), p in zip(ref_agent.named_parameters(), agent.parameters()):
        torch.testing.assert_close(p, p_ref, rtol=1e-4, atol=1e-6, msg=name)
    assert not torch.equal(ref_agent.actor.weight, twin_agents()[1].actor.weight)  # the steps did change the net


def test_compiled_paths_match_eager(monkeypatch):
    """torch.compile (inductor, on CPU here) of the acting step, the PPO loss and GAE gives the eager results.
    strict: a compiler failure fails the test instead of silently falling back to eager."""
    import functools
    monkeypatch.setattr(harness, "compiled", functools.partial(harness.compiled, strict=True))
    torch._dynamo.reset()
    args, eager_agent, agent = twin_agents()
    rollout = tiny_rollout(eager_agent)
    eager_opt = torch.optim.Adam(eager_agent.parameters(), lr=1e-3, eps=1e-5)
    opt = torch.optim.Adam(agent.parameters(), lr=1e-3, eps=1e-5)
    eager_step = ppo.make_train_step(eager_agent, eager_opt, rollout, args)
    fast_step = ppo.make_train_step(agent, opt, rollout, args, compile_loss=True)
    for i in range(3):
        mb_inds = torch.arange(16 * i, 16 * i + 16)
        torch.testing.assert_close(fast_step(mb_inds), eager_step(mb_inds), rtol=1e-4, atol=1e-5)
    for p, q in zip(agent.parameters(), eager_agent.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    # acting: inductor draws its own random numbers, so compare the log-probability and value of the chosen actions
    obs = rollout.obs[:12]
    action, logprob, value = harness.compiled(ppo.make_act(agent), True)(obs)
    assert action.shape == (12,) and action.min() >= 0 and action.max() < 4
    with torch.no_grad():
        _, want_logprob, _, want_value = agent.get_action_and_value(obs, action)
    torch.testing.assert_close(logprob, want_logprob, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(value, want_value.flatten(), rtol=1e-4, atol=1e-5)
    g = torch.Generator().manual_seed(0)
    r, v, d = torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g), (torch.rand(8, 3, generator=g) < 0.3)
    d, nv, nd = d.float(), torch.randn(1, 3, generator=g), torch.tensor([0.0, 1.0, 0.0])
    got = harness.compiled(ppo.compute_gae, True)(r, v, d, nv, nd, 0.99, 0.95)
    for x, y in zip(got, ppo.compute_gae(r, v, d, nv, nd, 0.99, 0.95)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# smoke runs of the real script

SMOKE = {
    # name: (extra args, expect full games during training)
    # snapshots every 200 steps: at 256, 512 and 1024 with a probe, at 640 and 896 without one (scripts/probe.py
    # reproduces them: test_probe_recomputes_the_inline_metrics)
    "relu": (["--num-envs", "4", "--num-steps", "32", "--total-timesteps", "1024", "--metrics-every", "256",
              "--metrics-batch", "64", "--save-model", "--eval-episodes", "2", "--snapshot-every", "200"], True),
    # and at every probe, the first (the one that draws the probe batch) included
    "tanh_hr": (["--num-envs", "4", "--num-steps", "32", "--total-timesteps", "512", "--metrics-every", "128",
                 "--metrics-batch", "64", "--activation", "tanh", "--hr", "--hidden-layers", "2", "--snapshot-every",
                 "128"], False),
    "hadamax": (["--num-envs", "2", "--num-steps", "8", "--total-timesteps", "32", "--metrics-every", "16",
                 "--metrics-batch", "16", "--num-minibatches", "2", "--update-epochs", "1", "--encoder", "hadamax",
                 "--activation", "gelu", "--layernorm"], False),
    # the torch.compile fast path (acting step, PPO loss, GAE) in the real loop, on CPU
    "compiled": (["--num-envs", "2", "--num-steps", "8", "--total-timesteps", "32", "--metrics-every", "16",
                  "--metrics-batch", "16", "--num-minibatches", "2", "--update-epochs", "2", "--compile", "on"],
                 False),
}


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """Every SMOKE run, two at a time (the CI box has 2 cores): {name: (process, its runs/NAME)}."""
    from concurrent.futures import ThreadPoolExecutor

    def go(name):
        cwd = tmp_path_factory.mktemp(name)
        proc = run_script(SCRIPT, ["--run-name", name, "--seed", "1", *SMOKE[name][0]], cwd, 300, ENV)
        return name, (proc, cwd / "runs" / name)

    with ThreadPoolExecutor(2) as pool:
        return dict(pool.map(go, SMOKE))


@pytest.mark.parametrize("name", list(SMOKE))
def test_smoke_run_logs_every_tag(name, smoke_runs, read_scalars):
    extra, expect_games = SMOKE[name]
    proc, run_dir = smoke_runs[name]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    compiled = "--compile" in extra
    assert f"fast paths: torch.compile {'on' if compiled else 'off'}, CUDA graphs off, pinned transfers off (CPU)" \
        in proc.stdout
    assert "warning: torch.compile" not in proc.stderr  # compiled for real, no eager fallback
    args = json.loads((run_dir / "args.json").read_text())
    iterations, batch = args["num_iterations"], args["batch_size"]
    assert args["activation"] in ("relu", "tanh", "gelu") and batch == args["num_envs"] * args["num_steps"]
    finished = json.loads((run_dir / "finished").read_text())
    assert finished["global_step"] == iterations * batch and finished["steps_this_process"] == iterations * batch
    assert not (run_dir / "checkpoint.pt").exists()  # the default cadence (1M steps) wrote none
    scalars = read_scalars(str(run_dir))
    check_documented_tags("ppo_atari_hr.py", scalars)  # the page's tag table, both ways

    for tag in PPO_TAGS:
        assert steps_of(scalars, tag) == [batch * i for i in range(1, iterations + 1)], tag
    lrs = [v for _, v in scalars["charts/learning_rate"]]
    assert lrs[0] == pytest.approx(2.5e-4) and all(a > b for a, b in zip(lrs, lrs[1:])), "lr must anneal"

    layers = PROBED + (["fc1"] if args["hidden_layers"] == 2 else [])
    # a probe after the first rollout, then after every rollout that crosses a multiple of --metrics-every
    every = args["metrics_every"]
    probe_steps = [s for s in range(batch, batch * iterations + 1, batch)
                   if s == batch or s // every > (s - batch) // every]
    assert finished["n_probes"] == len(probe_steps)
    for layer in layers:
        width = 512 if layer in ("latent", "fc1") else (32 if layer == "conv1" else 64)
        for key in METRIC_KEYS:
            points = scalars[f"representation/{layer}/{key}"]
            assert [s for s, _ in points] == probe_steps, (layer, key)
            for _, v in points:
                assert math.isfinite(v)
                if key == "srank":
                    assert 1 <= v <= min(width, args["metrics_batch"])
                elif key != "max_score":
                    assert 0.0 <= v <= 1.0
    for tag in ("representation/hidden_bias", "representation/live_contribution"):
        assert [s for s, _ in scalars[tag]] == probe_steps and all(v >= 0 for _, v in scalars[tag])

    if expect_games:
        returns = scalars["charts/episodic_return"]
        lengths = scalars["charts/episodic_length"]
        assert returns and len(returns) == len(lengths)
        # full games of Breakout (5 lives) last well over 100 agent steps; life-loss episodes would be shorter
        assert all(v >= 100 for _, v in lengths) and all(v >= 0 and v == int(v) for _, v in returns)
    if "--save-model" in extra:
        assert len(scalars["eval/episodic_return"]) == 2
        agent = ppo.Agent(ppo.Args(**{k: v for k, v in args.items() if k in ppo.Args.__dataclass_fields__}), 4)
        agent.load_state_dict(torch.load(run_dir / "ppo_atari_hr.pt"))


def test_probe_recomputes_the_inline_metrics(smoke_runs, tmp_path):
    """scripts/probe.py on the smoke runs' snapshots: the inline metrics at the run's own thresholds, the known answers
    at others (conftest.probe_reproduces); snapshots between probes are probed too, on the same fixed batch."""
    proc, run_dir = smoke_runs["tanh_hr"]
    assert "snapshots: every 128 steps, about 4 x" in proc.stdout
    assert sorted(os.listdir(run_dir / "snapshots")) == ["probe.pt"] + [f"step_{s:012d}.pt" for s in (128, 256, 384,
                                                                                                       512)]
    probe_reproduces(run_dir, tmp_path, steps=[128, 256, 384, 512])
    proc, run_dir = smoke_runs["relu"]
    assert "snapshots: every 200 steps, about 5 x" in proc.stdout
    got = probe_reproduces(run_dir, tmp_path / "relu", steps=[256, 512, 1024])
    assert [s for s, _ in got["own"]["representation/latent/srank"]] == [256, 512, 640, 896, 1024]


# ---------------------------------------------------------------------------------------------------------------
# bad input


def test_episode_stats_count_full_games_with_raw_rewards():
    stats = ppo.EpisodeStats(3)
    no = np.zeros(3, dtype=bool)

    def step(reward, lives, terminated=no, truncated=no):
        info = {"reward": np.asarray(reward, dtype=np.float32), "lives": np.asarray(lives, dtype=np.int32)}
        return stats.update(np.asarray(terminated), np.asarray(truncated), info)

    assert step([4.0, 0.0, 1.0], [2, 2, 3]) == []
    # env 0 loses a life (episodic-life termination, lives left): not a full game
    assert step([0.0, 7.0, 0.0], [1, 2, 3], terminated=[True, False, False]) == []
    # env 0 loses its last life; env 2 hits the time limit with lives left: both are full games
    assert step([2.0, 0.0, 5.0], [0, 2, 3], terminated=[True, False, False], truncated=[False, False, True]) == [
        (0, 6.0, 3), (2, 6.0, 3)]
    assert step([1.0, 1.0, 1.0], [3, 0, 3], terminated=[False, True, False]) == [(1, 8.0, 4)]
    assert stats.returns.tolist() == [1.0, 0.0, 1.0] and stats.lengths.tolist() == [1, 0, 1]


@pytest.mark.parametrize("bad, message", [
    (dict(env_id="CartPole-v1"), "--env-id 'CartPole-v1' is not an envpool Atari environment"),
    (dict(env_id="BreakoutNoFrameskip-v4"), "did you mean 'Breakout-v5'?"),
    (dict(combine="sum"), "--combine sum only applies to HR layers"),
    (dict(hr=True, hr_branches=1), "--hr-branches must be >= 2 with --hr, got 1"),
    (dict(num_envs=0), "--num-envs must be >= 1, got 0"),
    (dict(hidden_dim=-3), "--hidden-dim must be >= 1, got -3"),
    (dict(total_timesteps=100), "--total-timesteps 100 is less than one rollout"),
    (dict(num_envs=3, num_steps=5), "--num-minibatches 4 does not divide the rollout batch"),
    (dict(gamma=1.5), "--gamma must be in [0, 1], got 1.5"),
    (dict(encoder="hadamax", hr_layers="all"), "--hr-layers all targets the Nature conv trunk"),
    (dict(encoder="hadamax", conv_activation="tanh"), "--conv-activation applies to the Nature conv trunk"),
    (dict(learning_rate=float("nan")), "--learning-rate must be a finite number > 0, got nan"),
    (dict(ent_coef=float("inf")), "--ent-coef must be a finite number >= 0, got inf"),
    (dict(target_kl=0.0), "--target-kl must be a finite number > 0, got 0.0"),
    (dict(capture_video=True), "--capture-video is not supported"),
    # one rule for a probe batch larger than its source: refused at start (it used to shrink with a note)
    (dict(metrics_batch=2048), "--metrics-batch 2048 exceeds the rollout (--num-envs x --num-steps = 1024)"),
])
def test_validate_rejects_bad_input(bad, message):
    with pytest.raises(SystemExit) as exc:
        ppo.validate(ppo.Args(**bad))
    text = str(exc.value.code)
    assert text.startswith("error: ") and message in text and "\n" not in text, text


def test_validate_accepts_recipe_defaults():
    ppo.validate(ppo.Args())
    ppo.validate(ppo.Args(activation="tanh", hr=True, hr_branches=3, combine="sum"))
    ppo.validate(ppo.Args(target_kl=0.02, metrics_every=0, metrics_batch=4096))  # no probe: no probe batch
    args = ppo.resolve_defaults(ppo.Args(encoder="hadamax", num_envs=4, num_steps=16, total_timesteps=1000))
    assert (args.activation, args.layernorm, args.batch_size, args.minibatch_size, args.num_iterations) == (
        "gelu", True, 64, 16, 15)


def test_tyro_parse_errors_become_one_error_line(tmp_path):
    proc = run_script(SCRIPT, ["--num-envs", "abc"], cwd=tmp_path, timeout=120, env={"COLUMNS": "50", **ENV})
    assert proc.returncode == 1 and proc.stderr.strip() == (
        "error: Error parsing --num-envs: invalid literal for int() with base 10: 'abc'"), proc.stderr
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------------------------
# checkpoint, kill, resume

BATCH = 64  # --num-envs 2 x --num-steps 32
RESUME_RUN = ["--run-name", "killed", "--num-envs", "2", "--num-steps", "32", "--update-epochs", "2",
              "--total-timesteps", "1536", "--checkpoint-every", "512", "--metrics-every", "256",
              "--metrics-batch", "64"]
# flags that may differ on resume (args.json holds 512, auto, auto, True)
ON_RESUME = ["--checkpoint-every", "1024", "--compile", "off", "--cudagraphs", "off", "--no-torch-deterministic"]


def checksum(state_dict):
    """What the script prints on resume, recomputed independently from a checkpoint's network state_dict."""
    return sum(t.double().sum().item() for t in state_dict.values() if t.is_floating_point())


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """Start the real script, SIGKILL it once it has logged past its first checkpoint (so the resume must purge
    events), try a resume with another learning rate (refused), then resume it to the end with the flags that may
    differ changed."""
    cwd = tmp_path_factory.mktemp("resume")
    run_dir = cwd / "runs" / "killed"
    out, ckpt, killed = kill_after_checkpoint(SCRIPT, RESUME_RUN, cwd, "killed", 640)
    args_json = (run_dir / "args.json").read_text()
    events = sorted(p.name for p in run_dir.glob("events.out.tfevents.*"))
    refused = run_script(SCRIPT, [*RESUME_RUN, "--resume", "--learning-rate", "0.001"], cwd, 120, ENV)
    assert sorted(p.name for p in run_dir.glob("events.out.tfevents.*")) == events, "the refusal wrote events"
    resumed, printed, scalars = resume_after_kill(SCRIPT, [*RESUME_RUN, *ON_RESUME], cwd, "killed", ckpt)
    return dict(run_dir=run_dir, killed_log=out, checkpoint=ckpt, killed=killed, args_json=args_json,
                refused=refused, resumed=resumed, printed_checksum=printed, scalars=scalars)


def test_checkpoint_holds_the_training_state(killed_and_resumed):
    ckpt = killed_and_resumed["checkpoint"]
    assert ckpt["global_step"] == 512  # written after the update of iteration 8
    assert "checkpoint: step 512, " in killed_and_resumed["killed_log"]
    assert ckpt["args"] == json.loads(killed_and_resumed["args_json"])
    state = ckpt["state"]
    assert state["probe_obs"].shape == (64, 4, 84, 84) and state["probe_obs"].dtype == torch.uint8
    assert set(state["rng"]) >= {"python", "numpy", "torch", "cuda"}
    assert len(state["optimizer"]["state"]) == len(state["agent"]) and ckpt["counters"]["n_probes"] == 3
    agent = ppo.Agent(ppo.Args(**ckpt["args"]), num_actions=4)
    agent.load_state_dict(state["agent"])


def test_resume_refuses_other_flags_before_touching_the_run(killed_and_resumed):
    refused = killed_and_resumed["refused"]
    assert refused.returncode == 1
    assert refused.stderr.strip() == ("error: --resume: runs/killed was made with other flags: "
                                      "--learning-rate (saved 0.00025, now 0.001)")


def test_killed_run_resumes_to_the_end_without_gaps(killed_and_resumed):
    """--checkpoint-every, the fast paths and --no-torch-deterministic may differ on resume (PPO refused the last
    one before the harness); the curves continue without gap or duplicate, the checkpointed iteration's own scalars
    (logged at its step) kept."""
    run_dir, ckpt = killed_and_resumed["run_dir"], killed_and_resumed["checkpoint"]
    total, iterations = 1536, 1536 // BATCH
    assert json.loads((run_dir / "finished").read_text())["global_step"] == total
    assert (run_dir / "args.json").read_text() == killed_and_resumed["args_json"], "resume must not rewrite args.json"
    assert max(s for s, _ in killed_and_resumed["killed"]["charts/SPS"]) > ckpt["global_step"]  # events to purge
    assert killed_and_resumed["printed_checksum"] == pytest.approx(checksum(ckpt["state"]["agent"]), rel=1e-12,
                                                                   abs=1e-9)
    scalars = killed_and_resumed["scalars"]
    for tag in PPO_TAGS:
        assert steps_of(scalars, tag) == [BATCH * i for i in range(1, iterations + 1)], tag
    # learning-rate annealing continues from the checkpoint's iteration
    lrs = [v for _, v in scalars["charts/learning_rate"]]
    assert lrs == pytest.approx([2.5e-4 * (1 - (i - 1) / iterations) for i in range(1, iterations + 1)], rel=1e-6)
    # probes keep their cadence across the resume, on the checkpointed probe batch
    assert steps_of(scalars, "representation/latent/srank") == [64, 256, 512, 768, 1024, 1280, 1536]
    assert "checkpoint: step 1024, " in killed_and_resumed["resumed"].stdout  # the new --checkpoint-every
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["global_step"] == 1024  # kept at the end
    assert json.loads((run_dir / "finished").read_text())["n_probes"] == 7


# ---------------------------------------------------------------------------------------------------------------
# non-finite stop

NON_FINITE = {
    # Adam moves every weight by ~lr on its first step: with lr 1e30 the next minibatch's loss is NaN (first update).
    "loss": (["--checkpoint-every", "64"], "non-finite loss at step 64; last good state (step 0)", None),
    # one optimiser step per update: the weights become ~1e30, still finite, and pass the check (and are
    # checkpointed at step 64); the next rollout's forward overflows, caught by the policy's argument check.
    "logits": (["--checkpoint-every", "64", "--num-minibatches", "1", "--update-epochs", "1"],
               "non-finite policy logits at step 66; last good state (step 64)", 64),
}


@pytest.mark.parametrize("case", list(NON_FINITE))
def test_non_finite_stops_with_the_last_good_state(case, tmp_path):
    extra, message, checkpoint_step = NON_FINITE[case]
    proc = run_script(SCRIPT, ["--run-name", "nan", "--num-envs", "2", "--num-steps", "32", "--total-timesteps", "640",
                               "--metrics-every", "0", "--learning-rate", "1e30", *extra], tmp_path, 300, ENV)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: " + message), proc.stderr
    assert "written to runs/nan/checkpoint_last_good.pt" in lines[0]
    resumable = tmp_path / "runs" / "nan" / "checkpoint.pt"
    if checkpoint_step is None:
        assert lines[0].endswith("the resumable checkpoint is runs/nan/checkpoint.pt (none yet)")
        assert not resumable.exists()
    else:
        assert lines[0].endswith(f"the resumable checkpoint is runs/nan/checkpoint.pt (step {checkpoint_step})")
        assert torch.load(resumable, weights_only=False)["global_step"] == checkpoint_step  # left alone by the stop
    good = torch.load(tmp_path / "runs" / "nan" / "checkpoint_last_good.pt", weights_only=False)
    assert good["global_step"] == (checkpoint_step or 0)
    for name, tensor in good["state"]["agent"].items():
        assert torch.isfinite(tensor).all(), name
    for state in good["state"]["optimizer"]["state"].values():
        assert all(torch.isfinite(t).all() for t in state.values())
    agent = ppo.Agent(ppo.Args(**good["args"]), num_actions=4)
    agent.load_state_dict(good["state"]["agent"])
    assert not (tmp_path / "runs" / "nan" / "finished").exists()


def test_envpool_threads_default_to_the_cpus_this_process_may_use(monkeypatch):
    """envpool's own default (0) sizes its pool from the host's CPU count; ours is the affinity mask's, one per env
    at most, and --envpool-threads N is passed as given."""
    seen = {}
    monkeypatch.setattr(ppo.envpool, "make", lambda *a, **kw: seen.update(kw))
    monkeypatch.setattr(harness, "available_cpus", lambda: 3)
    ppo.make_env("Breakout-v5", 8, 1)
    assert seen["num_threads"] == 3
    ppo.make_env("Breakout-v5", 2, 1)
    assert seen["num_threads"] == 2
    ppo.make_env("Breakout-v5", 8, 1, threads=5)
    assert seen["num_threads"] == 5


def test_initial_weights_at_a_seed_are_cleanrls():
    """CleanRL's ppo_atari_envpool Agent, written out here in its own order: the trunk's layers, then the actor
    (orthogonal 0.01), then the critic (orthogonal 1), each layer_init right after its construction. At one torch
    seed our default Agent holds the same tensors, bit for bit, actor and critic included."""
    import torch.nn as nn

    def layer_init(layer, std=math.sqrt(2), bias_const=0.0):
        nn.init.orthogonal_(layer.weight, std)
        nn.init.constant_(layer.bias, bias_const)
        return layer

    torch.manual_seed(1)
    network = [layer_init(nn.Conv2d(4, 32, 8, stride=4)), layer_init(nn.Conv2d(32, 64, 4, stride=2)),
               layer_init(nn.Conv2d(64, 64, 3, stride=1)), layer_init(nn.Linear(64 * 7 * 7, 512))]
    actor = layer_init(nn.Linear(512, 6), std=0.01)
    critic = layer_init(nn.Linear(512, 1), std=1)
    torch.manual_seed(1)
    agent = ppo.Agent(ppo.Args(), 6)
    ours = list(agent.encoder.parameters())
    theirs = [t for layer in network for t in (layer.weight, layer.bias)]
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b.reshape(a.shape))
    for a, b in [(agent.actor.weight, actor.weight), (agent.actor.bias, actor.bias),
                 (agent.critic.weight, critic.weight), (agent.critic.bias, critic.bias)]:
        assert torch.equal(a, b)
