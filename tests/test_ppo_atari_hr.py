"""Tests of ppo_atari_hr.py: GAE against a slow reference, the fast paths (--compile/--cudagraphs) against the plain
code, smoke runs of the real script, checkpoint / kill / resume, the non-finite stop, bad-input handling (the README's
bad-input table is run by tests/test_readme.py)."""
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import common
import ppo_atari_hr
from conftest import read_scalars as read_scalars_now

SCRIPT = "ppo_atari_hr.py"
PROBED = ["conv1", "conv2", "conv3", "latent"]
METRIC_KEYS = ["dormant_kde", "dormant_score", "srank", "max_score", "saturated", "zombie"]
PPO_TAGS = ["losses/value_loss", "losses/policy_loss", "losses/entropy", "losses/old_approx_kl", "losses/approx_kl",
            "losses/clipfrac", "losses/explained_variance", "charts/learning_rate", "charts/SPS"]



@pytest.fixture(autouse=True)
def one_torch_thread():
    """In-process tests use one intra-op thread: on a shared 2-core box two OpenMP threads are ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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

    adv, ret = ppo_atari_hr.compute_gae(rewards, values, dones, next_value.view(1, -1), next_done, gamma, lam)
    expected = slow_gae(rewards, values, dones, next_value, next_done, gamma, lam)
    torch.testing.assert_close(adv, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ret, expected + values, rtol=1e-10, atol=1e-10)


def test_gae_known_answer():
    # one env, 3 steps, episode ends after step 1 (dones[2] = 1), gamma = lam = 0.5, bootstrap V=8 at the end
    rewards = torch.tensor([[1.0], [2.0], [3.0]])
    values = torch.tensor([[4.0], [6.0], [2.0]])
    dones = torch.tensor([[0.0], [0.0], [1.0]])
    adv, _ = ppo_atari_hr.compute_gae(rewards, values, dones, torch.tensor([[8.0]]), torch.tensor([0.0]), 0.5, 0.5)
    d2 = 3 + 0.5 * 8 - 2  # 5
    d1 = 2 - 6  # episode ends: no bootstrap, -4
    d0 = 1 + 0.5 * 6 - 4  # 0
    torch.testing.assert_close(adv.flatten(), torch.tensor([d0 + 0.25 * d1, d1, d2]))


# ---------------------------------------------------------------------------------------------------------------
# network


def test_hr_layer_is_product_of_branches_and_probe_stacks_preacts():
    args = ppo_atari_hr.Args(activation="tanh", hr=True, hr_branches=3)
    agent = ppo_atari_hr.Agent(args, num_actions=4)
    layer = agent.hidden["latent"]
    assert len(layer.branches) == 3 and len(agent.hidden["conv1"].branches) == 1
    x = torch.randn(7, layer.branches[0].in_features)
    out, pre = layer(x, with_preacts=True)
    torch.testing.assert_close(layer(x), out)
    expected = torch.ones(7, 512)
    for branch in layer.branches:
        expected = expected * torch.tanh(branch(x))
    torch.testing.assert_close(out, expected)
    assert pre.shape == (7, 3 * 512)
    # orthogonal init, sqrt(2) gain on every branch: rows of W are orthogonal with norm sqrt(2)
    for branch in layer.branches:
        w = branch.weight.detach()
        torch.testing.assert_close(w @ w.T, 2.0 * torch.eye(512), atol=1e-4, rtol=0)


def test_hadamax_encoder_shapes_and_variants():
    agent = ppo_atari_hr.Agent(ppo_atari_hr.Args(encoder="hadamax", activation="gelu", layernorm=True), 6)
    record = {}
    obs = torch.randint(0, 256, (2, 4, 84, 84), dtype=torch.uint8)
    latent = agent.latent(obs, record)
    assert latent.shape == (2, 512)
    assert agent.hidden["latent"].branches[0].in_features == 7744  # 64 x 11 x 11
    # outputs after max-pooling; conv pre-activations as (max, min) over space of both branches' channels
    assert record["conv1"][0].shape == (2, 32, 21, 21) and record["conv1"][1].shape == (2, 64, 1, 2)
    assert record["conv2"][0].shape == (2, 64, 11, 11) and record["conv3"][0].shape == (2, 64, 11, 11)
    assert record["latent"][1].shape == (2, 512)
    # crelu doubles widths; stacked 2HR gives fc1 and latent
    args = ppo_atari_hr.Args(activation="crelu", hr=True, hidden_layers=2, hr_layers="all", hidden_dim=64)
    agent = ppo_atari_hr.Agent(args, 4)
    assert agent.hidden["conv2"].branches[0].in_channels == 64 and len(agent.hidden["conv2"].branches) == 2
    assert agent.hidden["fc1"].branches[0].in_features == 2 * 64 * 7 * 7
    assert agent.actor.in_features == 128 and list(agent.hidden) == ["conv1", "conv2", "conv3", "fc1", "latent"]


def test_spatial_extremes_keep_saturation_fractions():
    g = torch.Generator().manual_seed(1)
    pre = torch.randn(16, 40, 9, 9, generator=g)
    pre[:, :10] = -pre[:, :10].abs() - 0.1  # always <= 0 (saturated)
    pre[:, 10:18] = pre[:, 10:18].abs() + 0.1  # always > 0 (zombie)
    pre[3, 12, 4, 5] = -1.0  # one negative value anywhere un-zombies a channel
    full = common.saturation_fractions(pre)
    assert full == (10 / 40, 7 / 40)
    assert common.saturation_fractions(ppo_atari_hr.spatial_extremes(pre)) == full


# ---------------------------------------------------------------------------------------------------------------
# fast paths (--compile / --cudagraphs): equivalence with the plain code on CPU


def test_categorical_samples_and_scores_like_torch_distributions():
    """ppo_atari_hr.categorical (no argument check, so no host sync) samples from softmax(logits) (known answer), with
    the same random numbers draws Categorical's actions, and gives Categorical's log-probabilities and entropy."""
    from torch.distributions import Categorical
    logits = torch.tensor([2.0, 0.5, -1.0, 0.0, -float("inf")])
    torch.manual_seed(0)
    action, _, _ = ppo_atari_hr.categorical(logits.expand(20_000, 5))
    freq = torch.bincount(action, minlength=5).double() / 20_000
    assert (freq - torch.softmax(logits.double(), 0)).abs().max() < 0.02 and freq[4] == 0

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 6, generator=g) * 3
    logits[0, 2] = -float("inf")  # an impossible action
    torch.manual_seed(2)
    want, want_next = Categorical(logits=logits).sample(), torch.rand(3)
    torch.manual_seed(2)
    action, logprob, entropy = ppo_atari_hr.categorical(logits)
    # the exponential race of torch.multinomial: same actions, same random numbers used
    assert torch.equal(action, want) and torch.equal(torch.rand(3), want_next)
    dist = Categorical(logits=logits)
    assert torch.equal(logprob, dist.log_prob(action)) and torch.equal(entropy, dist.entropy())
    given = torch.randint(0, 6, (64,), generator=g)
    given[0] = 1
    _, logprob, entropy = ppo_atari_hr.categorical(logits, given)
    assert torch.equal(logprob, dist.log_prob(given)) and torch.equal(entropy, dist.entropy())

    # logits that are no distribution (where Categorical's check raises) sample the action -1 in their row only
    logits[3, 1] = float("inf")
    logits[5] = float("nan")
    with pytest.raises(ValueError):  # explicit: a torch.compile anywhere in the process turns the default check off
        Categorical(logits=logits, validate_args=True)
    action, _, _ = ppo_atari_hr.categorical(logits)
    assert action[3] == -1 and action[5] == -1 and (action[[0, 1, 2, 4]] >= 0).all() and (action[6:] >= 0).all()


def test_policy_matches_agent():
    torch.manual_seed(0)
    agent = ppo_atari_hr.Agent(ppo_atari_hr.Args(hidden_dim=64), num_actions=4)
    obs = torch.randint(0, 256, (6, 4, 84, 84), dtype=torch.uint8)
    torch.manual_seed(3)
    action, logprob, value = ppo_atari_hr.make_policy(agent)(obs)
    torch.manual_seed(3)
    with torch.no_grad():
        want = agent.get_action_and_value(obs)
    assert torch.equal(action, want[0]) and torch.equal(logprob, want[1]) and torch.equal(value, want[3].flatten())
    assert not value.requires_grad


def tiny_rollout(agent, seed=0, n=64, num_actions=4):
    """A rollout batch (obs, logprobs, actions, advantages, returns, values) with ratios away from 1 and clipping."""
    g = torch.Generator().manual_seed(seed)
    obs = torch.randint(0, 256, (n, 4, 84, 84), dtype=torch.uint8, generator=g)
    actions = torch.randint(0, num_actions, (n,), generator=g)
    with torch.no_grad():
        _, logprobs, _, values = agent.get_action_and_value(obs, actions)
    logprobs = logprobs + 0.2 * torch.randn(n, generator=g)
    values = values.flatten() + 0.2 * torch.randn(n, generator=g)
    advantages = torch.randn(n, generator=g)
    return obs, logprobs, actions, advantages, advantages + values, values


def reference_update(agent, optimizer, rollout, mb_inds, args):
    """The minibatch update as written before the fast paths (inline loop body; Categorical without its check).
    Returns (pg_loss, v_loss, entropy, old_approx_kl, approx_kl, clipfrac, loss finite)."""
    from torch.distributions import Categorical
    b_obs, b_logprobs, b_actions, b_advantages, b_returns, b_values = rollout
    hidden = agent.latent(b_obs[mb_inds])
    probs = Categorical(logits=agent.actor(hidden), validate_args=False)
    newlogprob, entropy, newvalue = probs.log_prob(b_actions[mb_inds]), probs.entropy(), agent.critic(hidden)
    logratio = newlogprob - b_logprobs[mb_inds]
    ratio = logratio.exp()
    with torch.no_grad():
        old_approx_kl = (-logratio).mean()
        approx_kl = ((ratio - 1) - logratio).mean()
        clipfrac = ((ratio - 1.0).abs() > args.clip_coef).float().mean()
    mb_advantages = b_advantages[mb_inds]
    if args.norm_adv:
        mb_advantages = (mb_advantages - mb_advantages.mean()) / (mb_advantages.std() + 1e-8)
    pg_loss1 = -mb_advantages * ratio
    pg_loss2 = -mb_advantages * torch.clamp(ratio, 1 - args.clip_coef, 1 + args.clip_coef)
    pg_loss = torch.max(pg_loss1, pg_loss2).mean()
    newvalue = newvalue.view(-1)
    if args.clip_vloss:
        v_loss_unclipped = (newvalue - b_returns[mb_inds]) ** 2
        v_clipped = b_values[mb_inds] + torch.clamp(newvalue - b_values[mb_inds], -args.clip_coef, args.clip_coef)
        v_loss_clipped = (v_clipped - b_returns[mb_inds]) ** 2
        v_loss = 0.5 * torch.max(v_loss_unclipped, v_loss_clipped).mean()
    else:
        v_loss = 0.5 * ((newvalue - b_returns[mb_inds]) ** 2).mean()
    entropy_loss = entropy.mean()
    loss = pg_loss - args.ent_coef * entropy_loss + v_loss * args.vf_coef
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
    optimizer.step()
    return [pg_loss.item(), v_loss.item(), entropy_loss.item(), old_approx_kl.item(), approx_kl.item(),
            clipfrac.item(), float(torch.isfinite(loss).item())]


def twin_agents(**kw):
    args = ppo_atari_hr.Args(hidden_dim=64, **kw)
    torch.manual_seed(0)
    a, b = ppo_atari_hr.Agent(args, 4), ppo_atari_hr.Agent(args, 4)
    b.load_state_dict(a.state_dict())
    return args, a, b


@pytest.mark.parametrize("tensor_lr, variant", [(False, {}), (True, {}),
                                                (False, dict(norm_adv=False, clip_vloss=False))])
def test_train_step_matches_reference_update(tensor_lr, variant):
    """make_train_step + set_lr (a float lr, or a tensor lr filled in place as the CUDA-graph path does) performs the
    same Adam steps and reports the same losses as the inline update it replaced."""
    args, ref_agent, agent = twin_agents(**variant)
    rollout = tiny_rollout(ref_agent)
    ref_opt = torch.optim.Adam(ref_agent.parameters(), lr=2.5e-4, eps=1e-5)
    opt = torch.optim.Adam(agent.parameters(), lr=torch.tensor(2.5e-4) if tensor_lr else 2.5e-4, eps=1e-5)
    step = ppo_atari_hr.make_train_step(agent, opt, *rollout, args)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(1))
    for i, lr in enumerate([2.5e-4, 2.5e-4, 1.25e-4, 1.25e-4, 1e-5]):
        mb_inds = perm[16 * (i % 4):16 * (i % 4) + 16]
        ref_opt.param_groups[0]["lr"] = lr
        want = reference_update(ref_agent, ref_opt, rollout, mb_inds, args)
        ppo_atari_hr.common.set_lr(opt, lr)
        got = step(mb_inds)
        assert got.shape == (len(ppo_atari_hr.STATS),) and not got.requires_grad
        if tensor_lr:  # float32 lr tensor vs a float64 Python lr: equal up to rounding
            torch.testing.assert_close(got, torch.tensor(want), rtol=1e-4, atol=1e-6)
        else:
            assert got.tolist() == want, i
    assert 0 < want[ppo_atari_hr.STATS.index("clipfrac")] < 1  # the clipped branches were exercised
    for (name, p_ref), p in zip(ref_agent.named_parameters(), agent.parameters()):
        if tensor_lr:
            torch.testing.assert_close(p, p_ref, rtol=1e-5, atol=1e-7, msg=name)
        else:
            assert torch.equal(p, p_ref), name
    assert not torch.equal(ref_agent.actor.weight, twin_agents()[1].actor.weight)  # the steps did change the net


def test_compiled_paths_match_eager(monkeypatch):
    """torch.compile (inductor, on CPU here) of the acting step, the PPO loss and GAE gives the eager results.
    strict: a compiler failure fails the test instead of silently falling back to eager."""
    import functools
    monkeypatch.setattr(common, "compiled", functools.partial(common.compiled, strict=True))
    torch._dynamo.reset()
    args, eager_agent, agent = twin_agents()
    rollout = tiny_rollout(eager_agent)
    eager_opt = torch.optim.Adam(eager_agent.parameters(), lr=1e-3, eps=1e-5)
    opt = torch.optim.Adam(agent.parameters(), lr=1e-3, eps=1e-5)
    eager_step = ppo_atari_hr.make_train_step(eager_agent, eager_opt, *rollout, args)
    fast_step = ppo_atari_hr.make_train_step(agent, opt, *rollout, args, compile_loss=True)
    for i in range(3):
        mb_inds = torch.arange(16 * i, 16 * i + 16)
        torch.testing.assert_close(fast_step(mb_inds), eager_step(mb_inds), rtol=1e-4, atol=1e-5)
    for p, q in zip(agent.parameters(), eager_agent.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    # acting: inductor draws its own random numbers, so compare the log-probability and value of the chosen actions
    obs = rollout[0][:12]
    action, logprob, value = common.compiled(ppo_atari_hr.make_policy(agent), True)(obs)
    assert action.shape == (12,) and action.min() >= 0 and action.max() < 4
    with torch.no_grad():
        _, want_logprob, _, want_value = agent.get_action_and_value(obs, action)
    torch.testing.assert_close(logprob, want_logprob, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(value, want_value.flatten(), rtol=1e-4, atol=1e-5)
    g = torch.Generator().manual_seed(0)
    r, v, d = torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g), (torch.rand(8, 3, generator=g) < 0.3)
    d, nv, nd = d.float(), torch.randn(1, 3, generator=g), torch.tensor([0.0, 1.0, 0.0])
    got = common.compiled(ppo_atari_hr.compute_gae, True)(r, v, d, nv, nd, 0.99, 0.95)
    for x, y in zip(got, ppo_atari_hr.compute_gae(r, v, d, nv, nd, 0.99, 0.95)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_cudagraphs_on_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for args in (ppo_atari_hr.Args(cudagraphs="on"), ppo_atari_hr.Args(cudagraphs="on", cuda=False)):
        with pytest.raises(SystemExit) as e:
            ppo_atari_hr.validate(args)
        message = str(e.value.code)
        assert message.startswith("error:") and "--cudagraphs" in message and "\n" not in message
    ppo_atari_hr.validate(ppo_atari_hr.Args(cudagraphs="off", compile="on"))


# ---------------------------------------------------------------------------------------------------------------
# smoke runs of the real script

SMOKE = {
    # name: (extra args, expect full games during training)
    "relu": (["--num-envs", "4", "--num-steps", "32", "--total-timesteps", "1024", "--metrics-every", "256",
              "--save-model", "--eval-episodes", "2"], True),
    "tanh_hr": (["--num-envs", "4", "--num-steps", "32", "--total-timesteps", "512", "--metrics-every", "128",
                 "--activation", "tanh", "--hr", "--hidden-layers", "2"], False),
    "hadamax": (["--num-envs", "2", "--num-steps", "8", "--total-timesteps", "32", "--metrics-every", "16",
                 "--num-minibatches", "2", "--update-epochs", "1", "--encoder", "hadamax", "--activation", "gelu",
                 "--layernorm"], False),
    # the torch.compile fast path (acting step, PPO loss, GAE) in the real loop, on CPU
    "compiled": (["--num-envs", "2", "--num-steps", "8", "--total-timesteps", "32", "--metrics-every", "16",
                  "--num-minibatches", "2", "--update-epochs", "2", "--compile", "on"], False),
}


@pytest.mark.parametrize("name", list(SMOKE))
def test_smoke_run_logs_every_tag(name, tmp_path, run_script, read_scalars):
    extra, expect_games = SMOKE[name]
    # one intra-op thread: on a shared 2-core box, two OpenMP threads per process slow torch down ~8x
    proc = run_script(SCRIPT, ["--run-name", name, "--metrics-batch", "64", "--seed", "1", *extra], cwd=tmp_path,
                      timeout=300, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    compiled = "--compile" in extra
    assert f"fast paths: torch.compile {'on' if compiled else 'off'}, CUDA graphs off, pinned transfers off (CPU)" \
        in proc.stdout
    assert "warning: torch.compile" not in proc.stderr  # compiled for real, no eager fallback
    run_dir = tmp_path / "runs" / name
    args = json.loads((run_dir / "args.json").read_text())
    assert json.loads((run_dir / "finished").read_text())["global_step"] == args["num_iterations"] * args["batch_size"]
    scalars = read_scalars(str(run_dir))
    iterations = args["num_iterations"]
    batch = args["batch_size"]

    for tag in PPO_TAGS:
        assert [s for s, _ in scalars[tag]] == [batch * i for i in range(1, iterations + 1)], tag
    lrs = [v for _, v in scalars["charts/learning_rate"]]
    assert lrs[0] == pytest.approx(2.5e-4) and all(a > b for a, b in zip(lrs, lrs[1:])), "lr must anneal"

    layers = PROBED + (["fc1"] if args["hidden_layers"] == 2 else [])
    # a probe after the first rollout, then after every rollout that crosses a multiple of --metrics-every
    every = args["metrics_every"]
    probe_steps = [s for s in range(batch, batch * iterations + 1, batch)
                   if s == batch or s // every > (s - batch) // every]
    for layer in layers:
        width = 512 if layer in ("latent", "fc1") else (32 if layer == "conv1" else 64)
        for key in METRIC_KEYS:
            points = scalars[f"representation/{layer}/{key}"]
            assert [s for s, _ in points] == probe_steps, (layer, key)
            for _, v in points:
                assert math.isfinite(v)
                if key == "srank":
                    assert 1 <= v <= min(width, 64)
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
        state = torch.load(run_dir / "ppo_atari_hr.pt")
        known = {k: v for k, v in args.items() if k in ppo_atari_hr.Args.__dataclass_fields__}
        agent = ppo_atari_hr.Agent(ppo_atari_hr.Args(**known), num_actions=4)
        agent.load_state_dict(state)


# ---------------------------------------------------------------------------------------------------------------
# bad input


def test_episode_stats_count_full_games_with_raw_rewards():
    stats = ppo_atari_hr.EpisodeStats(3)
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


@pytest.mark.parametrize("bad, flag", [
    (dict(env_id="CartPole-v1"), "--env-id"),
    (dict(combine="sum"), "--combine"),
    (dict(num_envs=0), "--num-envs"),
    (dict(hidden_dim=-3), "--hidden-dim"),
    (dict(total_timesteps=100), "--total-timesteps"),
    (dict(gamma=1.5), "--gamma"),
    (dict(encoder="hadamax", hr_layers="all"), "--hr-layers"),
    (dict(encoder="hadamax", conv_activation="tanh"), "--conv-activation"),
])
def test_validate_rejects_bad_input(bad, flag):
    with pytest.raises(SystemExit) as exc:
        ppo_atari_hr.validate(ppo_atari_hr.Args(**bad))
    message = str(exc.value.code)
    assert message.startswith("error:") and flag in message and "\n" not in message


@pytest.mark.parametrize("bad, flag", [
    (dict(checkpoint_every=-5), "--checkpoint-every"),
    (dict(resume=True), "--resume"),
    (dict(learning_rate=float("nan")), "--learning-rate"),
    (dict(ent_coef=float("inf")), "--ent-coef"),
    (dict(target_kl=0.0), "--target-kl"),
])
def test_validate_rejects_checkpoint_and_numeric_input(bad, flag):
    with pytest.raises(SystemExit) as exc:
        ppo_atari_hr.validate(ppo_atari_hr.Args(**bad))
    message = str(exc.value.code)
    assert message.startswith("error:") and flag in message and "\n" not in message


def test_tyro_parse_errors_become_one_error_line(tmp_path, run_script):
    proc = run_script(SCRIPT, ["--num-envs", "abc"], cwd=tmp_path, timeout=120, env={"COLUMNS": "50"})
    assert proc.returncode == 1 and proc.stderr.strip() == (
        "error: Error parsing --num-envs: invalid literal for int() with base 10: 'abc'"), proc.stderr
    assert not (tmp_path / "runs").exists()


def test_validate_accepts_recipe_defaults():
    ppo_atari_hr.validate(ppo_atari_hr.Args())
    ppo_atari_hr.validate(ppo_atari_hr.Args(activation="tanh", hr=True, hr_branches=3, combine="sum"))
    ppo_atari_hr.validate(ppo_atari_hr.Args(checkpoint_every=0, resume=True, run_name="x", target_kl=0.02))


# ---------------------------------------------------------------------------------------------------------------
# checkpoint, kill, resume

BATCH = 64  # --num-envs 2 x --num-steps 32
RESUME_RUN = ["--run-name", "killed", "--num-envs", "2", "--num-steps", "32", "--update-epochs", "2",
              "--total-timesteps", "1536", "--checkpoint-every", "512", "--metrics-every", "256",
              "--metrics-batch", "64"]
ONE_THREAD = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def checksum(state_dict):
    """What the script prints on resume, recomputed independently from a checkpoint's network state_dict."""
    return sum(t.double().sum().item() for t in state_dict.values() if t.is_floating_point())


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """Start the real script, SIGKILL it once its event file runs past its first checkpoint (so the resume must purge
    events), try a resume with another learning rate (refused), then resume it to the end."""
    cwd = tmp_path_factory.mktemp("resume")
    run_dir = cwd / "runs" / "killed"
    cmd = [sys.executable, ppo_atari_hr.__file__, *RESUME_RUN]
    with open(cwd / "killed.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=ONE_THREAD, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 240
            while not (run_dir / "checkpoint.pt").exists():  # the first checkpoint is at step 512
                assert proc.poll() is None and time.time() < deadline, (cwd / "killed.log").read_text()
                time.sleep(0.05)
            while max((s for s, _ in read_scalars_now(str(run_dir)).get("charts/SPS", [])), default=0) < 640:
                assert proc.poll() is None and time.time() < deadline, (cwd / "killed.log").read_text()
                time.sleep(0.1)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    shutil.copy(run_dir / "checkpoint.pt", cwd / "checkpoint_at_kill.pt")
    killed_sps = [s for s, _ in read_scalars_now(str(run_dir))["charts/SPS"]]
    args_json = (run_dir / "args.json").read_text()
    events_before = sorted(p.name for p in run_dir.glob("events.out.tfevents.*"))

    refused = subprocess.run(cmd + ["--resume", "--learning-rate", "0.001"], cwd=cwd, env=ONE_THREAD,
                             capture_output=True, text=True, timeout=120)
    assert sorted(p.name for p in run_dir.glob("events.out.tfevents.*")) == events_before, "the refusal wrote events"
    # --checkpoint-every and the fast-path flags may differ on resume (args.json holds 512, auto, auto)
    fast_paths_off = ["--compile", "off", "--cudagraphs", "off"]
    resumed = subprocess.run(cmd + ["--resume", "--checkpoint-every", "1024", *fast_paths_off], cwd=cwd, env=ONE_THREAD,
                             capture_output=True, text=True, timeout=300)
    return dict(cwd=cwd, run_dir=run_dir, cmd=cmd, killed_log=(cwd / "killed.log").read_text(),
                checkpoint=torch.load(cwd / "checkpoint_at_kill.pt", weights_only=False), killed_sps=killed_sps,
                args_json=args_json, refused=refused, resumed=resumed)


def test_checkpoint_holds_the_training_state(killed_and_resumed):
    ckpt = killed_and_resumed["checkpoint"]
    assert ckpt["format"] == ppo_atari_hr.CHECKPOINT_FORMAT
    assert ckpt["global_step"] == 512 and ckpt["iteration"] == 512 // BATCH  # written after the update of iteration 8
    assert "checkpoint: step 512, " in killed_and_resumed["killed_log"]
    assert ckpt["args"] == json.loads(killed_and_resumed["args_json"])
    assert ckpt["probe_obs"].shape == (64, 4, 84, 84) and ckpt["probe_obs"].dtype == torch.uint8
    assert ckpt["next_probe"] == 768  # probes at 64 (the first rollout), 256, 512; next at 768
    assert set(ckpt["rng"]) >= {"python", "numpy", "torch", "cuda"}
    assert len(ckpt["optimizer"]["state"]) == len(ckpt["agent"]) and ckpt["probe_time"] > 0
    agent = ppo_atari_hr.Agent(ppo_atari_hr.Args(**{k: v for k, v in ckpt["args"].items()}), num_actions=4)
    agent.load_state_dict(ckpt["agent"])


def test_resume_refuses_other_flags_before_touching_the_run(killed_and_resumed):
    refused = killed_and_resumed["refused"]
    assert refused.returncode == 1
    assert refused.stderr.strip() == ("error: --resume: runs/killed was made with other flags: "
                                      "--learning-rate (saved 0.00025, now 0.001)")


def test_killed_run_resumes_to_the_end_without_gaps(killed_and_resumed, read_scalars):
    resumed, run_dir = killed_and_resumed["resumed"], killed_and_resumed["run_dir"]
    ckpt = killed_and_resumed["checkpoint"]
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    total = 1536
    assert json.loads((run_dir / "finished").read_text())["global_step"] == total
    assert (run_dir / "args.json").read_text() == killed_and_resumed["args_json"], "resume must not rewrite args.json"
    # the killed process had logged past its checkpoint: those events must be purged, not duplicated
    assert max(killed_and_resumed["killed_sps"]) > ckpt["global_step"]

    # the restored network is the checkpointed one
    printed = re.search(r"resumed runs/killed from step (\d+) \(parameter checksum (\S+)\)", resumed.stdout)
    assert printed, resumed.stdout
    assert int(printed.group(1)) == ckpt["global_step"]
    assert float(printed.group(2)) == pytest.approx(checksum(ckpt["agent"]), rel=1e-12, abs=1e-9)

    scalars = read_scalars(str(run_dir))
    iterations = total // BATCH
    for tag in PPO_TAGS:  # one point per iteration, from the first to the last: no gap, no duplicate at step 512
        assert [s for s, _ in scalars[tag]] == [BATCH * i for i in range(1, iterations + 1)], tag
    # learning-rate annealing continues from the checkpoint's iteration
    lrs = [v for _, v in scalars["charts/learning_rate"]]
    assert lrs == pytest.approx([2.5e-4 * (1 - (i - 1) / iterations) for i in range(1, iterations + 1)], rel=1e-6)
    # probes keep their cadence across the resume, on the checkpointed probe batch
    assert [s for s, _ in scalars["representation/latent/srank"]] == [64, 256, 512, 768, 1024, 1280, 1536]
    # a new checkpoint from the resumed process (--checkpoint-every may differ on resume)
    assert "checkpoint: step 1024, " in resumed.stdout
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["global_step"] == 1024


def test_resume_of_a_finished_run_says_so(killed_and_resumed):
    run_dir = killed_and_resumed["run_dir"]
    files = sorted(p.name for p in run_dir.iterdir())
    proc = subprocess.run(killed_and_resumed["cmd"] + ["--resume"], cwd=killed_and_resumed["cwd"], env=ONE_THREAD,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "run killed already finished (at step 1536); nothing to resume" in proc.stdout
    assert sorted(p.name for p in run_dir.iterdir()) == files


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
def test_non_finite_stops_with_the_last_good_state(case, tmp_path, run_script):
    extra, message, checkpoint_step = NON_FINITE[case]
    proc = run_script(SCRIPT, ["--run-name", "nan", "--num-envs", "2", "--num-steps", "32", "--total-timesteps", "640",
                               "--metrics-batch", "64", "--learning-rate", "1e30", *extra],
                      cwd=tmp_path, timeout=300, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: " + message), proc.stderr
    assert "written to runs/nan/checkpoint_last_good.pt" in lines[0]
    if checkpoint_step is None:
        assert lines[0].endswith("the resumable checkpoint is (none yet)")
        assert not (tmp_path / "runs" / "nan" / "checkpoint.pt").exists()
    else:
        assert lines[0].endswith(f"the resumable checkpoint is runs/nan/checkpoint.pt (step {checkpoint_step})")
        resumable = torch.load(tmp_path / "runs" / "nan" / "checkpoint.pt", weights_only=False)
        assert resumable["global_step"] == checkpoint_step  # left alone by the stop
    good = torch.load(tmp_path / "runs" / "nan" / "checkpoint_last_good.pt", weights_only=False)
    assert good["global_step"] == (checkpoint_step or 0)
    for name, tensor in good["agent"].items():
        assert torch.isfinite(tensor).all(), name
    for state in good["optimizer"]["state"].values():
        assert all(torch.isfinite(t).all() for t in state.values())
    agent = ppo_atari_hr.Agent(ppo_atari_hr.Args(**good["args"]), num_actions=4)
    agent.load_state_dict(good["agent"])
    assert not (tmp_path / "runs" / "nan" / "finished").exists()


def test_last_good_snapshot_copies_into_preallocated_clones():
    torch.manual_seed(0)
    agent = ppo_atari_hr.Agent(ppo_atari_hr.Args(hidden_dim=16), num_actions=3)
    optimizer = torch.optim.Adam(agent.parameters(), lr=1e-3, eps=1e-5)
    snapshot = ppo_atari_hr.LastGood(ppo_atari_hr.Args(), "unused")
    snapshot.update(0, agent, optimizer)
    assert snapshot.state["optimizer"]["state"] == {}

    def train_step():
        obs = torch.randint(0, 256, (5, 4, 84, 84), dtype=torch.uint8)
        _, logprob, _, value = agent.get_action_and_value(obs)
        optimizer.zero_grad()
        (value.sum() - logprob.sum()).backward()
        optimizer.step()

    train_step()
    snapshot.update(64, agent, optimizer)  # Adam's moments exist now: allocated once
    kept = {k: v.data_ptr() for k, v in snapshot.state["agent"].items()}
    moments = snapshot.state["optimizer"]["state"][0]["exp_avg"]
    train_step()
    assert not torch.equal(snapshot.state["agent"]["actor.weight"], agent.actor.weight)  # a copy, not the live tensor
    snapshot.update(128, agent, optimizer)
    assert snapshot.step == 128 and {k: v.data_ptr() for k, v in snapshot.state["agent"].items()} == kept
    assert snapshot.state["optimizer"]["state"][0]["exp_avg"] is moments
    for name, tensor in agent.state_dict().items():
        assert torch.equal(snapshot.state["agent"][name], tensor), name
    live = optimizer.state_dict()["state"]
    for idx, state in snapshot.state["optimizer"]["state"].items():
        for key, tensor in state.items():
            assert torch.equal(tensor, live[idx][key]), (idx, key)
