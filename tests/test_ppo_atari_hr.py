"""Tests of ppo_atari_hr.py: GAE against a slow reference, smoke runs of the real script, bad-input handling."""
import json
import math

import numpy as np
import pytest
import torch

import common
import ppo_atari_hr

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
}


@pytest.mark.parametrize("name", list(SMOKE))
def test_smoke_run_logs_every_tag(name, tmp_path, run_script, read_scalars):
    extra, expect_games = SMOKE[name]
    # one intra-op thread: on a shared 2-core box, two OpenMP threads per process slow torch down ~8x
    proc = run_script(SCRIPT, ["--run-name", name, "--metrics-batch", "64", "--seed", "1", *extra], cwd=tmp_path,
                      timeout=300, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
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
    (["--env-id", "NotAGame-v5"], "--env-id"),
    (["--hr", "--hr-branches", "1"], "--hr-branches"),
    (["--num-envs", "3", "--num-steps", "5", "--num-minibatches", "4"], "--num-minibatches"),
])
def test_bad_input_exits_with_one_clear_line(bad, flag, tmp_path, run_script):
    proc = run_script(SCRIPT, ["--run-name", "bad", *bad], cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and flag in lines[0], proc.stderr
    assert not (tmp_path / "runs").exists(), "validation must happen before anything is created"


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


def test_validate_accepts_recipe_defaults():
    ppo_atari_hr.validate(ppo_atari_hr.Args())
    ppo_atari_hr.validate(ppo_atari_hr.Args(activation="tanh", hr=True, hr_branches=3, combine="sum"))
