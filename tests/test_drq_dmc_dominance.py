"""Tests of drq_dmc_dominance.py: HL-Gauss, pruning, sparse-task modifications, frame replay and its incremental
checkpoints, augmentation, input validation, the update and the GPU fast paths against independent formulations (on
CPU), smoke runs of the real script per mitigation (event files read back), kill/resume and the non-finite stop.

Rendering (~25 frames/s per core) dominates: smoke runs use cartpole (action repeat 8) and a few hundred frames."""
import concurrent.futures
import copy
import functools
import json
import math
import os

import numpy as np
import pytest
import torch
import torch._inductor.config as inductor_config
from scipy.stats import norm

import drq_dmc_dominance as drq
import harness
from conftest import (check_documented_tags, kill_after_checkpoint, probe_reproduces, resume_after_kill,
                      steps_of)

SCRIPT = "drq_dmc_dominance.py"


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: one intra-op thread


# ---------------------------------------------------------------------------------------------------------------
# HL-Gauss


def test_hl_gauss_histogram_matches_gaussian_bin_masses_and_recovers_scalar():
    hl = drq.HLGauss(0.0, 100.0, 101, 0.75)
    width = 100.0 / 101
    ys = torch.tensor([-5.0, 0.0, 0.3, 12.34, 50.0, 77.7, 99.9, 100.0, 130.0], dtype=torch.float64)
    probs = hl.target_probs(ys.float()).double()
    assert probs.shape == (len(ys), 101)
    assert torch.allclose(probs.sum(1), torch.ones(len(ys), dtype=torch.float64), atol=1e-5)
    assert (probs >= 0).all()
    edges = np.linspace(0.0, 100.0, 102)
    centers = (edges[:-1] + edges[1:]) / 2
    for y, p in zip(ys.tolist(), probs.numpy()):
        yc = min(max(y, 0.0), 100.0)  # targets clipped to the support
        # independent reference: truncated-normal bin masses from scipy's CDF, bin by bin
        ref = np.array([norm.cdf(edges[i + 1], yc, 0.75) - norm.cdf(edges[i], yc, 0.75) for i in range(101)])
        ref /= norm.cdf(100.0, yc, 0.75) - norm.cdf(0.0, yc, 0.75)
        np.testing.assert_allclose(p, ref, atol=1e-5)
        expectation = float((p * centers).sum())
        assert abs(expectation - yc) <= width, (y, expectation)
        if 3 < yc < 97:  # away from the truncation the histogram mean is the scalar up to float error
            assert abs(expectation - yc) < 1e-3, (y, expectation)


def test_hl_gauss_loss_is_minimised_at_the_target_histogram():
    torch.manual_seed(0)
    hl = drq.HLGauss(0.0, 100.0, 101, 0.75)
    y = torch.tensor([3.0, 42.0, 88.8])
    best = hl.target_probs(y).clamp_min(1e-30).log().requires_grad_(True)
    loss = hl.loss(best, y)
    loss.backward()
    assert best.grad.abs().max() < 1e-6  # stationary point: softmax(logits) == target histogram
    assert torch.allclose(hl.value(best.detach()), y, atol=1e-2)
    for _ in range(20):
        worse = best.detach() + 0.3 * torch.randn_like(best)
        assert hl.loss(worse, y) > loss.detach()
    uniform = torch.zeros(3, 101)
    assert hl.loss(uniform, y) > loss.detach() + 1.0


# ---------------------------------------------------------------------------------------------------------------
# Gradual magnitude pruning


def test_cubic_sparsity_schedule_known_values():
    f = lambda step: drq.cubic_sparsity(step, 1000, 0.95, 0.2, 0.8)  # noqa: E731
    assert f(0) == 0.0 and f(200) == 0.0
    assert f(500) == pytest.approx(0.95 * (1 - 0.5 ** 3))
    assert f(350) == pytest.approx(0.95 * (1 - 0.75 ** 3))
    assert f(800) == pytest.approx(0.95) and f(1000) == pytest.approx(0.95)
    values = [f(s) for s in range(0, 1001, 10)]
    assert all(b >= a for a, b in zip(values, values[1:]))


def test_pruning_follows_schedule_and_pruned_weights_stay_zero():
    torch.manual_seed(0)
    args = drq.Args(hidden_dim=32, latent_dim=8)  # the real critic, small so the test is fast
    critic = drq.Critic((9, 24, 24), 1, args)
    weights = drq.prunable_weights(critic)
    names = {id(p): n for n, p in critic.named_parameters()}
    pruned_names = {names[id(w)] for w in weights}
    assert not any(n.endswith("bias") or "norm" in n or "head" in n for n in pruned_names)
    expected = {"encoder.convs.0.weight", "proj.weight", "q1.fc1.linears.0.weight", "q2.fc2.linears.0.weight"}
    assert expected <= pruned_names
    pruner = drq.MagnitudePruner(weights)
    opt = torch.optim.Adam(critic.parameters(), lr=1e-2)
    obs = torch.randint(0, 255, (4, 9, 24, 24), dtype=torch.uint8)
    act = torch.rand(4, 1) * 2 - 1
    total = 10_000
    for step in range(2000, 8001, 1000):  # mask updates across the pruning window
        s = drq.cubic_sparsity(step, total, 0.95, 0.2, 0.8)
        before = [w.detach().abs().clone() for w in weights]
        pruner.update(s)
        for w, m, b in zip(weights, pruner.masks, before):
            k = int(round(s * w.numel()))
            assert int((~m).sum()) == k  # per-layer sparsity follows the schedule
            if 0 < k < w.numel():  # the pruned ones are the smallest magnitudes (independent sort)
                kth = torch.sort(b.flatten()).values[k - 1]
                assert (b[~m] <= kth).all() and (b[m] >= kth).all()
        assert pruner.sparsity() == pytest.approx(s, abs=1e-3)
        for _ in range(3):  # optimiser steps with masks re-applied, as the training loop does
            q1, q2 = critic(critic.encoder(obs), act)
            loss = (q1 - 1.0).pow(2).mean() + (q2 + 1.0).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            pruner.apply()
            for w, m in zip(weights, pruner.masks):
                assert (w[~m] == 0).all()
    assert pruner.sparsity() == pytest.approx(0.95, abs=1e-3)


def test_erk_sparsities_match_a_hand_computation():
    """jaxpruner's ERK by hand. (4, 8) and (8, 2) at 0.5: keep 16 + 8 = 24 weights; raw densities 12/32 and 10/16;
    eps = 24 / (12 + 10) = 12/11; sparsities 1 - (3/8)(12/11) = 13/22 and 1 - (5/8)(12/11) = 7/22.
    (100, 100) and (2, 1) at 0.9: eps = 1001 / 203 would give the small layer density 1.5 * 4.93 > 1, so it becomes
    dense, its floor(1.8) = 1 pruned weight is charged to the big one: eps = (1000 - 1) / 200, sparsity
    1 - 0.02 * 999 / 200 = 0.9001."""
    got = drq.erk_sparsities([(4, 8), (8, 2)], 0.5)
    assert got == pytest.approx([13 / 22, 7 / 22])
    assert 32 * (1 - got[0]) + 16 * (1 - got[1]) == pytest.approx(24)  # the kept count of uniform 0.5
    assert drq.erk_sparsities([(100, 100), (2, 1)], 0.9) == pytest.approx([0.9001, 0.0])
    assert drq.erk_sparsities([(3, 5, 7), (5, 7, 3)], 0.8) == pytest.approx([0.8, 0.8])  # same sum, same size
    assert drq.layer_sparsities("uniform", [(4, 8), (8, 2)], 0.5) == [0.5, 0.5]
    assert drq.layer_sparsities("erk", [(4, 8), (8, 2)], 0.5) == pytest.approx([13 / 22, 7 / 22])
    assert drq.Args().prune_distribution == "erk"
    weights = [torch.randn(4, 8), torch.randn(8, 2)]  # the pruner takes one sparsity per weight
    pruner = drq.MagnitudePruner(weights)
    pruner.update([0.5, 0.25])
    assert [int((~m).sum()) for m in pruner.masks] == [16, 4]


def test_redo_zeroes_outgoing_weights_after_every_incoming_reinit():
    """Neuron 3 of fc1 and neuron 5 of fc2 (Q1) are made dead (zero incoming weights, bias -1: ReLU output 0, score
    0). After ReDo (tau 0: exactly the dead neurons) both have fresh, non-zero incoming rows inside Xavier's bound and
    zero biases, and their outgoing weights are zero -- including fc2[5, 3], which joins them: re-initialising fc2's
    row 5 after zeroing fc1's outgoing column 3 (the old order) left a stale random weight there."""
    torch.manual_seed(0)
    a = small_agent()
    critic, actor = a["critic"], a["actor"]
    q = critic.q1
    with torch.no_grad():
        q.fc1.linears[0].weight[3] = 0.0
        q.fc1.linears[0].bias[3] = -1.0
        q.fc2.linears[0].weight[5] = 0.0
        q.fc2.linears[0].bias[5] = -1.0
    obs = torch.randint(0, 256, (64, *OBS_SHAPE), dtype=torch.uint8)
    actions = torch.rand(64, ACTION_DIM) * 2 - 1
    with torch.no_grad():
        acts = critic.probe(critic.encoder(obs), actions)
    dead1 = (acts["fc1"][0].abs().mean(0) == 0).nonzero().flatten().tolist()
    dead2 = (acts["fc2"][0].abs().mean(0) == 0).nonzero().flatten().tolist()
    assert 3 in dead1 and 5 in dead2
    n = drq.redo_critic_(critic, actor, obs, actions, 0.0, a["critic_opt"], a["actor_opt"])
    assert n >= 2
    fc1, fc2 = q.fc1.linears[0], q.fc2.linears[0]
    for layer, rows in ((fc1, dead1), (fc2, dead2)):
        bound = math.sqrt(6.0 / sum(layer.weight.shape))  # Xavier uniform
        for r in rows:
            assert layer.weight[r].abs().max() <= bound and layer.weight[r].abs().sum() > 0
            assert layer.bias[r] == 0
    for j in dead1:
        assert (fc2.weight[:, j] == 0).all(), j  # every outgoing weight of fc1's recycled neuron, fc2[5, 3] too
    for k in dead2:
        assert (q.head.weight[:, k] == 0).all()
    assert fc2.weight[5, 3] == 0 and fc2.weight[5].abs().sum() > 0


def test_ln_from_step_is_identity_before_and_layernorm_after():
    """A critic built with --ln-from-step has LayerNorm parameters from the start; with the gate off it computes what
    the same weights compute without LayerNorm (--mitigation none), with it on what they compute with it (--mitigation
    ln), exactly. Same seed, same weights: LayerNorm's init draws no random numbers."""
    obs = torch.randint(0, 256, (8, *OBS_SHAPE), dtype=torch.uint8)
    actions = torch.rand(8, ACTION_DIM) * 2 - 1
    torch.manual_seed(4)
    switch = drq.Critic(OBS_SHAPE, ACTION_DIM, drq.Args(hidden_dim=16, latent_dim=8, ln_from_step=7))
    torch.manual_seed(4)
    plain = drq.Critic(OBS_SHAPE, ACTION_DIM, drq.Args(hidden_dim=16, latent_dim=8))
    torch.manual_seed(4)
    ln = drq.Critic(OBS_SHAPE, ACTION_DIM, drq.Args(hidden_dim=16, latent_dim=8, mitigation="ln"))
    assert set(switch.state_dict()) == set(ln.state_dict())  # a checkpoint has the same keys before and after N
    assert not switch.layernorm_on() and ln.layernorm_on() and not plain.layernorm_on()
    with torch.no_grad():
        feats = switch.encoder(obs)
        for x, y in zip(switch(feats, actions), plain(feats, actions)):
            assert torch.equal(x, y)
        switch.set_layernorm_(True)
        assert switch.layernorm_on()
        for x, y in zip(switch(feats, actions), ln(feats, actions)):
            assert torch.equal(x, y)
        pre = switch.probe(feats, actions)["fc1"][1]  # probed pre-activations are LayerNorm's output now
        assert pre.mean(1).abs().max() < 1e-5 and (pre.var(1, unbiased=False) - 1).abs().max() < 1e-3
    assert drq.Args().ln_from_step == 0


def test_resnet18_encoder_shapes_and_the_flax_defaults():
    enc = drq.ResNet18Encoder(9, 84)
    convs = [m for m in enc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 1 + 16 + 3  # stem, 8 blocks x 2, 3 projection shortcuts: 17 weighted layers + FC = 18
    with torch.no_grad():
        out = enc(torch.randint(0, 256, (2, 9, 84, 84), dtype=torch.uint8))
    assert out.shape == (2, 512 * 3 * 3) and enc.out_dim == 4608  # 84 -> 42 -> 21 -> 21, 11, 6, 3
    critic = drq.Critic((9, 84, 84), 1, drq.Args(encoder="resnet18", hidden_dim=16, latent_dim=8))
    assert critic.proj.in_features == 4608 and len(drq.prunable_weights(critic)) == 20 + 1 + 4
    assert critic.proj_norm.eps == 1e-6 and drq.Actor(4608, 1, drq.Args()).proj_norm.eps == 1e-6  # Flax's
    torch.manual_seed(0)
    proj = drq.lecun_normal_(torch.nn.Linear(4000, 300)).weight  # Flax lecun_normal: std sqrt(1/fan_in), |w| <= 2 std'
    std = math.sqrt(1 / 4000) / 0.87962566103423978
    assert proj.std().item() == pytest.approx(math.sqrt(1 / 4000), rel=0.02) and proj.abs().max() <= 2 * std


# ---------------------------------------------------------------------------------------------------------------
# Sparse tasks


def _cartpole_reward(env, cart, angle):
    physics = env.env.physics
    with physics.reset_context():
        physics.named.data.qpos["slider"] = cart
        physics.named.data.qpos["hinge_1"] = angle
    return env.env.task.get_reward(physics)


def test_cartpole_balance_sparse_narrow_is_in_force():
    default = drq.DMCPixels("cartpole-balance_sparse", seed=0)
    narrow = drq.DMCPixels("cartpole-balance_sparse_narrow", seed=0)
    assert narrow.env.task._CART_RANGE == (-1e-4, 1e-4) and narrow.env.task._ANGLE_COSINE_RANGE == (0.9999, 1.0)
    for cart, angle in [(0.01, 0.0), (0.0, 0.02)]:  # inside the default ranges, outside the narrow ones
        assert _cartpole_reward(default, cart, angle) == 1.0
        assert _cartpole_reward(narrow, cart, angle) == 0.0
    assert _cartpole_reward(narrow, 0.0, 0.0) == 1.0  # the narrow target is still reachable


def test_finger_spin_fast_is_in_force():
    def reward(env, velocity):
        physics = env.env.physics
        with physics.reset_context():
            physics.named.data.qvel["hinge"] = velocity
        return env.env.task.get_reward(physics)

    try:
        default = drq.DMCPixels("finger-spin", seed=0)
        assert reward(default, -20.0) == 1.0 and reward(default, -35.0) == 1.0
        fast = drq.DMCPixels("finger-spin_fast", seed=0)
        assert drq.dmc_finger._SPIN_VELOCITY == 30.0  # module-global, read at reward time
        assert reward(fast, -20.0) == 0.0  # spinning at 20 rad/s earned reward under the default task
        assert reward(fast, -35.0) == 1.0
        drq.DMCPixels("finger-spin", seed=0)  # a plain finger env restores dm_control's constant
        assert drq.dmc_finger._SPIN_VELOCITY == drq.DEFAULT_SPIN_VELOCITY
    finally:
        drq.dmc_finger._SPIN_VELOCITY = drq.DEFAULT_SPIN_VELOCITY


def test_reacher_easy_masked_hides_reward_for_the_first_500k_gradient_steps():
    """Paper App. B.1: the critic's reward is 0 in gradient steps 1..500,000 and real from 500,001 on, however long
    the run (the old rule, half of the run, would lift it at 250k in a 500k run and at 2M in a 4M-frame run)."""
    assert drq.Args().reward_mask_steps == 500_000
    for grad_step in (1, 2, 250_000, 499_999, 500_000):
        assert drq.critic_reward_scale("reacher-easy_masked", grad_step, 500_000) == 0.0
    for grad_step in (500_001, 500_002, 1_000_000, 2_000_000):
        assert drq.critic_reward_scale("reacher-easy_masked", grad_step, 500_000) == 1.0
    for grad_step in (1, 500_000, 600_000):
        assert drq.critic_reward_scale("reacher-easy", grad_step, 500_000) == 1.0
    assert drq.critic_reward_scale("reacher-easy_masked", 6, 5) == 1.0  # --reward-mask-steps 5
    assert drq.critic_reward_scale("reacher-easy_masked", 1, 0) == 1.0  # 0: never masked
    assert drq.parse_env_id("reacher-easy_masked") == ("reacher", "easy")


# jaxrl examples/train_pixels.py PLANET_ACTION_REPEAT.get(env_name, 2); a modified task takes its base task's repeat
ACTION_REPEATS = {"cartpole-swingup": 8, "cartpole-swingup_sparse": 2, "cartpole-balance": 2,
                  "cartpole-balance_sparse": 2, "cartpole-balance_sparse_narrow": 2, "reacher-easy": 4,
                  "reacher-easy_masked": 4, "reacher-hard": 2, "cheetah-run": 4, "finger-spin": 2,
                  "finger-spin_fast": 2, "finger-turn_easy": 2, "ball_in_cup-catch": 4, "walker-walk": 2,
                  "walker-run": 2, "walker-stand": 2, "quadruped-run": 2, "hopper-hop": 2}


def test_action_repeat_is_jaxrls_table_by_full_task_name():
    for env_id, repeat in ACTION_REPEATS.items():
        assert drq.planet_action_repeat(env_id) == repeat, env_id
    env = drq.DMCPixels("cartpole-balance_sparse_narrow", seed=0)  # what the env really does
    assert env.action_repeat == 2 and drq.DMCPixels("reacher-easy_masked", seed=0).action_repeat == 4
    assert drq.DMCPixels("cartpole-swingup", seed=0, action_repeat=3).action_repeat == 3  # --action-repeat wins


def test_target_entropy_is_minus_the_action_dimension():
    assert drq.target_entropy_for(drq.Args(), 6) == -6.0  # walker, cheetah: |A| = 6
    assert drq.target_entropy_for(drq.Args(), 1) == -1.0  # cartpole
    assert drq.target_entropy_for(drq.Args(target_entropy=-0.5), 6) == -0.5


def test_sweep_runs_are_long_enough_for_every_figure():
    """scripts/sweep.py's dmc entry: jaxrl's 500k frames, and 4M frames (1M agent steps at repeat 4) for the masked
    reacher, whose mask lasts 500k gradient steps; ln_switch turns LayerNorm on at the first unmasked update; the
    sweep's repeat table agrees with the script's."""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
    import sweep

    for task in sweep.DMC_TASKS:
        assert sweep.DMC_ACTION_REPEAT.get(task, 2) == drq.planet_action_repeat(task), task
    runs = {r.name: r.args for r in sweep.build_runs("dmc", "drq", sweep.DMC_TASKS, ["none", "ln_switch"], [1], "")}

    def flag(name, key):
        args = runs[name]
        return int(args[len(args) - 1 - args[::-1].index(key) + 1])

    masked = "drq__reacher-easy_masked__none__s1"
    agent_steps = flag(masked, "--total-timesteps") // drq.planet_action_repeat("reacher-easy_masked")
    grad_steps = agent_steps - drq.Args().learning_starts + 1
    assert grad_steps > 1.9 * drq.Args().reward_mask_steps  # masked, then about as long unmasked
    assert flag("drq__cartpole-swingup_sparse__none__s1", "--total-timesteps") == drq.Args().total_timesteps == 500_000
    ln_step = flag("drq__reacher-easy_masked__ln_switch__s1", "--ln-from-step")
    assert ln_step - drq.Args().learning_starts + 1 == drq.Args().reward_mask_steps + 1
    assert flag("drq__walker-walk__ln_switch__s1", "--ln-from-step") == 500_000 // 2 // 2
    assert "--encoder resnet18" in " ".join(sweep.build_runs("dmc", "drq", ["cartpole-swingup_sparse"], ["resnet18"],
                                                             [1], "")[0].args)


# ---------------------------------------------------------------------------------------------------------------
# Replay and augmentation


def test_frame_replay_rebuilds_stacks_of_a_scripted_stream_with_wraparound():
    stack, capacity = 3, 23
    rb = drq.FrameReplay(capacity, (3, 2, 2), 1, stack)
    transitions = {}  # id of next frame -> (obs ids, action, reward, terminated, next ids)
    frame_id = 0
    positions = {}  # frame id -> absolute position
    for episode_len in [1, 2, 5, 3, 9, 1, 4, 7, 2, 6]:
        ids = [frame_id]
        rb.add_first(np.full((3, 2, 2), frame_id, np.uint8))
        positions[frame_id] = rb.pos - 1
        frame_id += 1
        for t in range(episode_len):
            ids.append(frame_id)
            term = t == episode_len - 1 and episode_len % 2 == 1
            rb.add(np.full((3, 2, 2), frame_id, np.uint8), [frame_id / 10], frame_id * 0.5, term)
            positions[frame_id] = rb.pos - 1
            # reference stacks: frames before the episode start are the episode's first frame
            obs = [ids[max(t - d, 0)] for d in (2, 1, 0)]
            nxt = [ids[max(t + 1 - d, 0)] for d in (2, 1, 0)]
            transitions[frame_id] = (obs, frame_id / 10, frame_id * 0.5, term, nxt)
            frame_id += 1
    oldest = rb.pos - capacity
    valid = {fid for fid, tr in transitions.items() if min(positions[i] for i in tr[0] + tr[4]) >= oldest}
    assert 0 < len(valid) < len(transitions)
    obs, actions, rewards, terms, next_obs = rb.sample(2000, np.random.default_rng(0))
    assert obs.shape == (2000, 9, 2, 2) and obs.dtype == np.uint8
    seen = set()
    for o, a, r, term, n in zip(obs, actions, rewards, terms, next_obs):
        fid = int(n[-1, 0, 0])
        assert fid in valid
        seen.add(fid)
        ref_obs, ref_a, ref_r, ref_term, ref_next = transitions[fid]
        assert [int(o[3 * k, 0, 0]) for k in range(stack)] == ref_obs
        assert [int(n[3 * k, 0, 0]) for k in range(stack)] == ref_next
        assert a[0] == pytest.approx(ref_a) and r == pytest.approx(ref_r) and bool(term) == ref_term
    assert seen == valid  # every valid transition can be drawn


def test_frame_replay_matches_the_real_env_stacks_across_episode_boundaries():
    env = drq.DMCPixels("cartpole-swingup", seed=0, frame_stack=3)
    env.env._step_limit = 3 * env.action_repeat  # 3 agent steps per episode keeps rendering cheap
    rb = drq.FrameReplay(100, (3, 84, 84), 1, 3)
    expected = {}  # position -> (obs, next_obs) from the env
    rng = np.random.default_rng(0)
    for _ in range(3):
        obs, frame = env.reset()
        rb.add_first(frame)
        done = False
        while not done:
            nxt, frame, r, term, trunc, _ = env.step(rng.uniform(-1, 1, 1))
            rb.add(frame, 0.0, r, term)
            expected[rb.pos - 1] = (obs, nxt)
            obs, done = nxt, term or trunc
    assert len(expected) == 9

    class At:  # an rng stub that draws exactly position p
        def __init__(self, p):
            self.p = p

        def integers(self, lo, hi, size):
            assert lo <= self.p < hi
            return np.full(size, self.p)

    for p, (obs, nxt) in expected.items():
        o, _, _, _, n = rb.sample(2, At(p))
        np.testing.assert_array_equal(o[0], obs)
        np.testing.assert_array_equal(n[0], nxt)


def test_random_shift_is_a_replicate_padded_crop():
    torch.manual_seed(0)
    x = torch.rand(6, 2, 10, 10)
    y = drq.random_shift(x, 4)
    assert y.shape == x.shape
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4), mode="replicate")
    offsets = set()
    for i in range(6):
        match = [(dy, dx) for dy in range(9) for dx in range(9)
                 if torch.equal(padded[i, :, dy:dy + 10, dx:dx + 10], y[i])]
        assert match, "each sample is a crop of its padded image"
        offsets.add(match[0])
    assert len(offsets) > 1  # independent offsets per sample


# ---------------------------------------------------------------------------------------------------------------
# GPU fast paths (docs/running.md "GPU fast paths"): equivalence with the code they replaced, on CPU


def scripted_replay(capacity=40, size=20, action_dim=2, episodes=12, seed=0):
    """A FrameReplay of random frames, rewards, actions and terminations over episodes of mixed length."""
    gen = np.random.default_rng(seed)
    rb = drq.FrameReplay(capacity, (3, size, size), action_dim, 3)
    for e in range(episodes):
        rb.add_first(gen.integers(0, 256, (3, size, size), dtype=np.uint8))
        length = int(gen.integers(1, 8))
        for t in range(length):
            rb.add(gen.integers(0, 256, (3, size, size), dtype=np.uint8), gen.uniform(-1, 1, action_dim),
                   float(gen.uniform(0, 2)), t == length - 1 and e % 2 == 0)
    return rb


@pytest.mark.parametrize("on_device", [False, True])
def test_batched_sampler_returns_what_frame_replay_sample_returned(on_device):
    rb = scripted_replay()
    assert rb.pos > rb.capacity  # wrapped: stacks reaching overwritten frames are rejected
    sampler = drq.BatchSampler(rb, 32, torch.device("cpu"), on_device=on_device)
    rng, ptrs, n_term = np.random.default_rng(7), None, 0
    for _ in range(5):
        state = rng.bit_generator.state
        want = rb.sample(32, rng)
        after = rng.bit_generator.state
        rng.bit_generator.state = state  # the same RNG state for both
        got = sampler.sample(rng)
        assert rng.bit_generator.state == after  # the same draws
        assert isinstance(got, drq.Batch) and isinstance(want, drq.Batch)
        assert [g.dtype for g in got] == [torch.uint8, torch.float32, torch.float32, torch.float32, torch.uint8]
        for g, w in zip(got, want):
            w = torch.from_numpy(np.asarray(w)).float() if w.dtype == np.bool_ else torch.from_numpy(np.asarray(w))
            assert g.shape == w.shape and torch.equal(g, w)
        n_term += int(got[3].sum())
        # cuda_graphed captures on clones of its inputs: they keep the strides, so dynamo does not recompile there
        assert [t.clone().stride() for t in got] == [t.stride() for t in got]
        now = [t.data_ptr() for t in got]  # persistent tensors: a CUDA graph reads its inputs at fixed addresses
        assert ptrs is None or now == ptrs
        ptrs = now
    assert n_term > 0  # terminal transitions were among the samples


def test_device_gather_samples_the_batches_of_the_host_gather_as_the_ring_keeps_changing(tmp_path):
    """The ring gathered by index where the update runs (forced on the CPU: the host ring itself, no second copy) and
    the old np.take into a staging buffer give identical batches for the same RNG, while frames keep being written
    (wrapping) between batches; a ring restored from its checkpoint chunks, then mirrored, gives them too."""
    rb = scripted_replay(capacity=30, episodes=6, seed=1)
    host = drq.BatchSampler(rb, 16, torch.device("cpu"), on_device=False)
    dev = drq.BatchSampler(rb, 16, torch.device("cpu"))  # the CPU default: gathered by torch from the ring in place
    assert dev.on_device and not host.on_device
    assert rb.frames_dev.data_ptr() == rb.frames.ctypes.data  # the mirror on the CPU is the host array
    rng_h, rng_d, gen = np.random.default_rng(11), np.random.default_rng(11), np.random.default_rng(2)
    for i in range(12):
        for t in range(5):  # 60 writes in all: the 30-slot ring wraps twice
            frame = gen.integers(0, 256, rb.frames.shape[1:], dtype=np.uint8)
            rb.add_first(frame) if (i * 5 + t) % 9 == 0 else rb.add(frame, gen.uniform(-1, 1, 2), float(t), t == 3)
        want = [t.clone() for t in host.sample(rng_h)]
        got = dev.sample(rng_d)
        assert all(torch.equal(g, w) for g, w in zip(got, want)), i
    assert rng_h.bit_generator.state == rng_d.bit_generator.state
    manifest, _ = rb.store.save(str(tmp_path), "1", rb.filled)
    restored = drq.FrameReplay(30, rb.frames.shape[1:], 2, 3)
    restored.store.load(str(tmp_path), manifest)
    restored.pos, restored.episode_start = rb.pos, rb.episode_start
    again = drq.BatchSampler(restored, 16, torch.device("cpu"), on_device=True)
    want = [t.clone() for t in host.sample(np.random.default_rng(4))]
    assert all(torch.equal(g, w) for g, w in zip(again.sample(np.random.default_rng(4)), want))


def test_frames_stay_on_the_host_when_the_gpu_copy_would_not_fit(monkeypatch):
    """On CUDA the ring is mirrored only when it takes at most half the free GPU memory (mem_get_info mocked)."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * 2 ** 30, 80 * 2 ** 30))
    cuda = torch.device("cuda")
    assert drq.frames_fit_on(cuda, 5 * 2 ** 30) and not drq.frames_fit_on(cuda, 5 * 2 ** 30 + 1)
    assert drq.frames_fit_on(torch.device("cpu"), 10 ** 15)  # on the CPU the ring is where the update runs


def test_bench_drq_replay_quick_prints_both_paths(run_script, tmp_path):
    proc = run_script("scripts/bench_drq_replay.py", ["--quick", "--no-cuda"], cwd=tmp_path, timeout=120,
                      env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("device cpu") and "batch 128, stack 3" in lines[0]
    rows = {r.split("|")[1].strip(): [float(x) for x in r.split("|")[2:5]] for r in lines[3:]}
    assert sorted(rows) == ["device", "host"]
    for write, batch, ready in rows.values():
        assert 0 < write and 0 < batch <= ready


def test_random_shift_on_uint8_equals_shift_of_the_float_stack():
    x = torch.randint(0, 256, (5, 9, 12, 12), dtype=torch.uint8)
    torch.manual_seed(3)
    a = drq.random_shift(x, 4)
    torch.manual_seed(3)
    b = drq.random_shift(x.float(), 4)
    assert a.dtype == torch.uint8 and torch.equal(a.float(), b)


OBS_SHAPE, ACTION_DIM = (9, 20, 20), 2


def small_agent(mitigation="none", seed=0, **kw):
    """Critic, target, actor, log-alpha and the three optimisers as the script builds them, with tiny networks."""
    args = drq.Args(hidden_dim=16, latent_dim=8, image_pad=2, mitigation=mitigation, **kw)
    torch.manual_seed(seed)
    critic = drq.Critic(OBS_SHAPE, ACTION_DIM, args)
    target = copy.deepcopy(critic).requires_grad_(False)
    actor = drq.Actor(critic.encoder.out_dim, ACTION_DIM, args)
    log_alpha = torch.tensor(math.log(args.init_temperature), requires_grad=True)
    if mitigation == "lnwd":
        critic_opt = torch.optim.AdamW(critic.parameters(), lr=1e-2, weight_decay=1e-2)
    else:
        critic_opt = torch.optim.Adam(critic.parameters(), lr=1e-2)
    a = dict(args=args, critic=critic, target_critic=target, actor=actor, log_alpha=log_alpha, critic_opt=critic_opt,
             actor_opt=torch.optim.Adam(actor.parameters(), lr=1e-2),
             alpha_opt=torch.optim.Adam([log_alpha], lr=1e-2), target_entropy=-ACTION_DIM / 2.0,
             hl=drq.HLGauss(args.hl_min, args.hl_max, args.hl_bins, args.hl_sigma) if mitigation == "hlgauss" else None,
             pruner=drq.MagnitudePruner(drq.prunable_weights(critic)) if mitigation == "prune" else None)
    if a["pruner"] is not None:
        a["pruner"].update(0.5)
    return a


def agent_update(a, compile_loss=False):
    return drq.make_train_step(a["critic"], a["target_critic"], a["actor"], a["log_alpha"], a["critic_opt"],
                               a["actor_opt"], a["alpha_opt"], a["args"], a["target_entropy"], a["hl"], a["pruner"],
                               compile_loss)


def agent_tensors(a, optimizer_state=True):
    """Everything an update changes: parameters, log-alpha and the optimisers' state."""
    out = [*a["critic"].parameters(), *a["target_critic"].parameters(), *a["actor"].parameters(), a["log_alpha"]]
    for opt in ("critic_opt", "actor_opt", "alpha_opt") if optimizer_state else ():
        for st in a[opt].state.values():
            out += [v for v in st.values() if torch.is_tensor(v)]
    return out


def reference_shift(x, pad):
    """DrQ's augmentation as the paper writes it: replicate-pad, then crop back at a random offset per sample (the
    offsets drawn as random_shift draws them: all rows, then all columns)."""
    n, _, h, w = x.shape
    oy, ox = torch.randint(0, 2 * pad + 1, (n,)), torch.randint(0, 2 * pad + 1, (n,))
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="replicate")
    return torch.stack([padded[i, :, oy[i]:oy[i] + h, ox[i]:ox[i] + w] for i in range(n)])


def reference_update(a, batch, reward_scale):
    """The update written out step by step as the inline update of the training loop was (numpy batch in, stats
    dict and gradient magnitudes as floats out), with its own augmentation (pad, then crop)."""
    critic, target_critic, actor, log_alpha = a["critic"], a["target_critic"], a["actor"], a["log_alpha"]
    critic_opt, actor_opt, alpha_opt, hl, pruner, args = (a["critic_opt"], a["actor_opt"], a["alpha_opt"], a["hl"],
                                                          a["pruner"], a["args"])
    target_entropy = a["target_entropy"]
    F = torch.nn.functional

    def q_value(out):
        return hl.value(out) if hl is not None else out.squeeze(-1)

    def to_torch(x):
        return torch.as_tensor(x)

    def mean_abs_grad(params):
        grads = [p.grad.abs().flatten() for p in params if p.grad is not None]
        return torch.cat(grads).mean().item() if grads else 0.0

    obs_u8, actions, rewards, terminated, next_u8 = batch
    obs = reference_shift(to_torch(obs_u8).float(), args.image_pad)
    next_obs = reference_shift(to_torch(next_u8).float(), args.image_pad)
    actions, rewards = to_torch(actions), to_torch(rewards) * reward_scale
    not_done = 1.0 - to_torch(terminated).float()
    alpha = log_alpha.exp().detach()
    with torch.no_grad():
        next_a, next_logp = actor.sample(critic.encoder(next_obs))
        tq1, tq2 = target_critic(target_critic.encoder(next_obs), next_a)
        if hl is not None and not args.hl_target_entropy:  # the first author's code: histogram of r + gamma min Q'
            next_v = torch.min(q_value(tq1), q_value(tq2))
        else:
            next_v = torch.min(q_value(tq1), q_value(tq2)) - alpha * next_logp
        target = rewards + args.gamma * not_done * next_v
    q1, q2 = critic(critic.encoder(obs), actions)
    if hl is not None:
        critic_loss = hl.loss(q1, target) + hl.loss(q2, target)
    else:
        critic_loss = F.mse_loss(q1.squeeze(-1), target) + F.mse_loss(q2.squeeze(-1), target)
    critic_opt.zero_grad(set_to_none=True)
    critic_loss.backward()
    grads = {"latent": mean_abs_grad([critic.proj.weight]),
             "fc1": mean_abs_grad([lin.weight for lin in critic.q1.fc1.linears]),
             "fc2": mean_abs_grad([lin.weight for lin in critic.q1.fc2.linears])}
    critic_opt.step()
    if pruner is not None:
        pruner.apply()
    with torch.no_grad():
        torch._foreach_lerp_(list(target_critic.parameters()), list(critic.parameters()), args.tau)
    with torch.no_grad():
        feats = critic.encoder(obs)
    pi, logp = actor.sample(feats)
    pq1, pq2 = critic(feats, pi)
    actor_loss = (alpha * logp - torch.min(q_value(pq1), q_value(pq2))).mean()
    actor_opt.zero_grad(set_to_none=True)
    actor_loss.backward()
    actor_opt.step()
    entropy = -logp.detach().mean()
    alpha_loss = log_alpha.exp() * (entropy - target_entropy)
    alpha_opt.zero_grad(set_to_none=True)
    alpha_loss.backward()
    alpha_opt.step()
    stats = {"losses/qf_loss": critic_loss.detach(), "losses/qf1_values": q_value(q1).detach().mean(),
             "losses/actor_loss": actor_loss.detach(), "losses/alpha_loss": alpha_loss.detach(),
             "losses/alpha": alpha, "losses/entropy": entropy}
    return stats, grads


@pytest.mark.parametrize("mitigation, hr, kw", [("none", False, {}), ("hlgauss", False, {}), ("lnwd", True, {}),
                                                ("prune", False, {}), ("hlgauss", False, {"hl_target_entropy": True})])
def test_update_matches_the_reference_update(mitigation, hr, kw):
    """make_train_step fed by BatchSampler performs exactly the steps of the update written out, fed by
    FrameReplay.sample: the same stats, gradient magnitudes, parameters and optimiser state, bit for bit."""
    ref, new = small_agent(mitigation, hr=hr, **kw), small_agent(mitigation, hr=hr, **kw)
    update = agent_update(new)
    rb = scripted_replay()
    sampler = drq.BatchSampler(rb, 6, torch.device("cpu"))
    rng_ref, rng_new = np.random.default_rng(1), np.random.default_rng(1)
    scale = torch.ones(())
    for i, reward_scale in enumerate([1.0, 0.0, 1.0]):  # 0: the reacher-easy_masked critic reward
        scale.fill_(reward_scale)
        torch.manual_seed(100 + i)  # the same augmentation offsets and policy noise for both
        want, want_grads = reference_update(ref, rb.sample(6, rng_ref), reward_scale)
        torch.manual_seed(100 + i)
        stats, grads = update(*sampler.sample(rng_new), scale)
        assert stats.shape == (len(drq.STAT_NAMES),) and grads.shape == (len(drq.GRAD_LAYERS),)
        assert not stats.requires_grad and not grads.requires_grad
        assert stats.tolist() == [float(want[k]) for k in drq.STAT_NAMES]
        assert grads.tolist() == [want_grads[k] for k in drq.GRAD_LAYERS]
    got_t, want_t = agent_tensors(new), agent_tensors(ref)
    assert len(got_t) == len(want_t) > 0
    for g, w in zip(got_t, want_t):
        assert torch.equal(g, w)
    assert not torch.equal(new["critic"].proj.weight, small_agent(mitigation, hr=hr, **kw)["critic"].proj.weight)
    if mitigation == "prune":
        for w, m in zip(new["pruner"].weights, new["pruner"].masks):
            assert (w[~m] == 0).all()
    # the acting step: make_act is the loop's former inline expressions
    obs = torch.from_numpy(rb.sample(1, rng_ref)[0])
    with torch.no_grad():
        torch.manual_seed(5)
        want = new["actor"].sample(new["critic"].encoder(obs))[0]
        det = new["actor"].act_deterministic(new["critic"].encoder(obs))
    torch.manual_seed(5)
    assert torch.equal(drq.make_act(new["critic"], new["actor"])(obs), want)
    assert torch.equal(drq.make_act(new["critic"], new["actor"], deterministic=True)(obs), det)


def reference_reset_(critic, target, fresh, optimizer):
    """reset_critic_heads_ before it zeroed the optimiser state in place: it dropped it."""
    with torch.no_grad():
        for mod, tmod, fmod in zip(critic.head_modules(), target.head_modules(), fresh.head_modules()):
            mod.load_state_dict(fmod.state_dict())
            tmod.load_state_dict(fmod.state_dict())
            for p in mod.parameters():
                optimizer.state.pop(p, None)


@pytest.mark.parametrize("mitigation", ["none", "lnwd"])
def test_in_place_reset_equals_dropping_the_optimizer_state(mitigation):
    """Zeroing exp_avg, exp_avg_sq and step is Adam/AdamW with fresh state: the steps after the reset are the same
    as with the state popped, while every tensor a CUDA graph reads stays where it was."""
    ref, new = small_agent(mitigation), small_agent(mitigation)
    obs = torch.randint(0, 256, (4, *OBS_SHAPE), dtype=torch.uint8)
    act = torch.rand(4, ACTION_DIM) * 2 - 1

    def step(a):
        q1, q2 = a["critic"](a["critic"].encoder(obs), act)
        loss = (q1 - 1.0).pow(2).mean() + (q2 + 1.0).pow(2).mean()
        a["critic_opt"].zero_grad()
        loss.backward()
        a["critic_opt"].step()
        return loss.detach()

    for _ in range(3):
        assert torch.equal(step(ref), step(new))
    ptrs = [t.data_ptr() for t in agent_tensors(new)]
    torch.manual_seed(9)
    reference_reset_(ref["critic"], ref["target_critic"], drq.Critic(OBS_SHAPE, ACTION_DIM, ref["args"]),
                     ref["critic_opt"])
    torch.manual_seed(9)
    drq.reset_critic_heads_(new["critic"], new["target_critic"], drq.Critic(OBS_SHAPE, ACTION_DIM, new["args"]),
                            new["critic_opt"])
    assert [t.data_ptr() for t in agent_tensors(new)] == ptrs  # in place
    head = set(map(id, new["critic"].q1.parameters()))
    assert all(float(st["step"]) == 0 for p, st in new["critic_opt"].state.items() if id(p) in head)
    for _ in range(4):
        assert torch.equal(step(ref), step(new))
    for (name, p), q in zip(ref["critic"].named_parameters(), new["critic"].parameters()):
        assert torch.equal(p, q), name
    for p, q in zip(ref["target_critic"].parameters(), new["target_critic"].parameters()):
        assert torch.equal(p, q)
    conv = ref["critic"].encoder.convs[0].weight  # the encoder kept its Adam state: step counts on
    assert float(ref["critic_opt"].state[conv]["step"]) == 7


@inductor_config.patch(fallback_random=True)  # restored on exit (monkeypatch's undo breaks inductor's config module)
def test_compiled_paths_match_eager(monkeypatch):
    """torch.compile (inductor, on CPU here) of the critic and actor losses and of the acting step gives the eager
    results. strict: a compiler failure fails the test instead of silently falling back to eager. Inductor draws its
    own random numbers unless fallback_random is set, which makes it draw torch's eager ones."""
    monkeypatch.setattr(drq.harness, "compiled", functools.partial(harness.compiled, strict=True))
    torch._dynamo.reset()
    eager, fast = small_agent("hlgauss"), small_agent("hlgauss")
    eager_update, fast_update = agent_update(eager), agent_update(fast, compile_loss=True)
    rb = scripted_replay()
    sampler = drq.BatchSampler(rb, 6, torch.device("cpu"))
    rng = np.random.default_rng(2)
    scale = torch.ones(())
    for i in range(2):
        batch = [t.clone() for t in sampler.sample(rng)]
        torch.manual_seed(i)
        want = eager_update(*batch, scale)
        torch.manual_seed(i)
        got = fast_update(*batch, scale)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    # Adam moves each weight by about lr = 1e-2 whatever its gradient's size, so float noise in a near-zero gradient
    # (inductor sums in another order) can move a weight by a fraction of lr: compare to a tenth of one step
    for g, w in zip(agent_tensors(fast, False), agent_tensors(eager, False)):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-3)
    act = harness.compiled(drq.make_act(fast["critic"], fast["actor"], deterministic=True), True)
    eager_act = drq.make_act(fast["critic"], fast["actor"], deterministic=True)
    for i in range(2):
        torch.testing.assert_close(act(batch[0][i:i + 1]), eager_act(batch[0][i:i + 1]), rtol=1e-5, atol=1e-6)


def _one_error_line(proc, gl):
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: MuJoCo's renderer MUJOCO_GL='{gl}' cannot start"), lines
    assert "MUJOCO_GL=osmesa" in lines[0]  # what to try


@pytest.mark.parametrize("gl, env, flags", [
    ("egl", {"__EGL_VENDOR_LIBRARY_FILENAMES": "/nonexistent.json"}, ["--help"]),
    # a tiny real run: OSMesa fails at the import on this box (no libOSMesa); where it imports, at the first frame
    ("osmesa", {}, ["--env-id", "cartpole-swingup", "--batch-size", "8", "--buffer-size", "50", "--learning-starts",
                    "5", "--total-timesteps", "80", "--eval-every", "0", "--metrics-every", "0"]),
])
def test_a_renderer_that_cannot_start_ends_with_one_line(run_script, tmp_path, gl, env, flags):
    _one_error_line(run_script(SCRIPT, flags, cwd=tmp_path, timeout=120, env={"MUJOCO_GL": gl, **env}), gl)


def test_the_first_frame_of_an_env_is_rendered_under_first_frame(monkeypatch):
    """A renderer that imports but cannot draw (its context is made at the first frame) ends the run with one line;
    once an env has drawn, a later render error is an ordinary exception."""
    env = drq.DMCPixels("cartpole-swingup", 0, image_size=16)

    def broken(*a, **k):
        raise AttributeError("'NoneType' object has no attribute 'glGetError'")

    real = env.env.physics.render
    monkeypatch.setattr(env.env.physics, "render", broken)
    with pytest.raises(SystemExit) as e:
        env.reset()
    assert str(e.value.code).startswith("error: MuJoCo's renderer MUJOCO_GL=") and "glGetError" in str(e.value.code)
    monkeypatch.setattr(env.env.physics, "render", real)
    obs, _ = env.reset()
    assert obs.shape == (9, 16, 16)
    monkeypatch.setattr(env.env.physics, "render", broken)
    with pytest.raises(AttributeError):
        env.step(np.zeros(1))


def test_mitigation_is_a_choice_and_the_probe_batch_must_fit_the_replay():
    with pytest.raises(SystemExit) as e:
        harness.cli(drq.Args, ["--mitigation", "dropout"])
    assert str(e.value.code).startswith("error: invalid choice 'dropout' for argument '--mitigation'")
    assert harness.cli(drq.Args, ["--mitigation", "hlgauss"]).mitigation == "hlgauss"
    with pytest.raises(SystemExit) as e:
        drq.validate(drq.Args(buffer_size=200, batch_size=8, metrics_batch=256))
    assert e.value.code == "error: --metrics-batch 256 exceeds --buffer-size 200"
    drq.validate(drq.Args(buffer_size=200, batch_size=8, metrics_batch=256, metrics_every=0))  # no probe: fine


def test_probe_depends_only_on_the_network_and_batch_and_flags_dominance():
    """probe_metrics: every tag of the three layers, each layer's `dominant` = (max_score > width / 2), the same result
    however many probes ran before, and no draw from torch's global RNG (which drives the agent)."""
    agent = small_agent(kde_noise_std=1e-3)
    obs = torch.randint(0, 256, (32, *OBS_SHAPE), dtype=torch.uint8)
    actions = torch.rand(32, ACTION_DIM) * 2 - 1
    grads = torch.tensor([0.1, 0.2, 0.3])
    before = torch.get_rng_state()
    first = drq.probe_metrics(agent["critic"], obs, actions, grads, agent["args"])
    assert torch.equal(torch.get_rng_state(), before)
    assert drq.probe_metrics(agent["critic"], obs, actions, grads, agent["args"]) == first
    widths = {"latent": 8, "fc1": 16, "fc2": 16}
    for layer, width in widths.items():
        for key in ("max_score", "dormant_score", "dormant_kde", "srank", "saturated", "zombie"):
            assert math.isfinite(first[f"representation/{layer}/{key}"])
        assert first[f"representation/{layer}/dominant"] == float(first[f"representation/{layer}/max_score"] > width / 2)
    assert first["representation/dominant"] == max(first[f"representation/{k}/dominant"] for k in widths)
    assert [first[f"grad/{k}"] for k in ("latent", "fc1", "fc2")] == pytest.approx([0.1, 0.2, 0.3])


def test_only_flags_that_do_not_change_training_may_differ_on_resume():
    may = set(harness.MAY_DIFFER_ON_RESUME)
    assert {"total_timesteps", "seed", "buffer_size", "batch_size", "q_lr", "mitigation", "env_id", "learning_starts",
            "metrics_every", "log_every", "eval_every", "action_repeat", "image_pad"}.isdisjoint(may)
    assert {"torch_deterministic", "compile", "cudagraphs", "cuda", "checkpoint_every"} <= may


# ---------------------------------------------------------------------------------------------------------------
# The real script


SMOKE_COMMON = ["--env-id", "cartpole-swingup", "--batch-size", "8", "--buffer-size", "200", "--learning-starts",
                "20", "--metrics-every", "80", "--metrics-batch", "16", "--log-every", "80", "--eval-every", "0",
                "--total-timesteps", "240"]
# name -> (extra flags, probe steps); cartpole-swingup repeats actions 8 times, so 240 frames = 30 agent steps (30
# renders); learning starts at agent step 20 (frame 160): updates at agent steps 20..30, 11 of them. Every
# interval flag counts agent steps, every logged step is a frame.
SMOKE = {
    "none": (["--mitigation", "none", "--total-timesteps", "1040", "--learning-starts", "110", "--eval-every", "1040",
              "--eval-episodes", "1"], [880, 960, 1040]),  # one full 1000-frame episode and an evaluation
    # the torch.compile fast path (critic and actor losses, acting step) in the real loop, on CPU (~40 s compiling)
    "compiled": (["--mitigation", "none", "--compile", "on"], [160, 240]),
    "ln_hr": (["--mitigation", "ln", "--hr"], [160, 240]),
    "lnwd": (["--mitigation", "lnwd"], [160, 240]),
    "hlgauss": (["--mitigation", "hlgauss"], [160, 240]),
    "reset": (["--mitigation", "reset", "--reset-every", "10"], [160, 240]),  # agent steps 20, 30: frames 160, 240
    "redo": (["--mitigation", "redo", "--redo-every", "25", "--redo-tau", "0.5"], [160, 240]),  # 25: frame 200
    # ERK (the default); snapshots at 80 (before learning starts), 160, 240 (test_probe_recomputes_the_inline_metrics)
    "prune": (["--mitigation", "prune", "--prune-every", "5", "--snapshot-every", "80"], [160, 240]),
    # reacher (repeat 4): 120 frames = 30 agent steps; updates = gradient steps 1..11 at agent steps 20..30; the
    # reward is masked in gradient steps 1..5 (agent steps 20..24, frames 80..96) and LayerNorm is on from agent step 25
    # (frame 100): snapshots at 40 and 80 with it off, at 120 with it on
    "masked_ln_from": (["--mitigation", "none", "--env-id", "reacher-easy_masked", "--total-timesteps", "120",
                        "--reward-mask-steps", "5", "--ln-from-step", "25", "--metrics-every", "40", "--log-every",
                        "4", "--snapshot-every", "40"], [80, 120]),
    "resnet18": (["--mitigation", "none", "--encoder", "resnet18"], [160, 240]),
}


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """All smoke runs, two at a time (the box has 2 cores); {name: (proc, run_dir)}."""
    from conftest import run_script

    def go(name):
        cwd = tmp_path_factory.mktemp(name)
        proc = run_script(SCRIPT, SMOKE_COMMON + SMOKE[name][0] + ["--run-name", name, "--seed", "3"], cwd=cwd,
                          timeout=400, env={"OMP_NUM_THREADS": "1"})
        return name, (proc, cwd / "runs" / name)

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(go, SMOKE))


@pytest.mark.parametrize("name", list(SMOKE))
def test_smoke_run_logs_training_and_dominance_metrics(smoke_runs, read_scalars, name):
    proc, run_dir = smoke_runs[name]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    args = json.loads((run_dir / "args.json").read_text())
    assert args["mitigation"] == SMOKE[name][0][1] and args["hr"] == name.endswith("hr")
    repeat = 4 if name == "masked_ln_from" else 8
    s = read_scalars(str(run_dir))
    check_documented_tags("drq_dmc_dominance.py", s)  # the page's tag table, both ways
    for tag in ["losses/qf_loss", "losses/actor_loss", "losses/alpha", "charts/SPS", "representation/dominant",
                "grad/latent", "grad/fc1", "grad/fc2"]:
        assert tag in s, (tag, sorted(s))
    for layer in ["latent", "fc1", "fc2"]:
        for key in ["max_score", "dormant_score", "dormant_kde", "saturated", "zombie", "srank", "dominant"]:
            values = [v for _, v in s[f"representation/{layer}/{key}"]]
            assert values and all(math.isfinite(v) for v in values)
        width = 50 if layer == "latent" else 256
        for (_, mx), (_, dom) in zip(s[f"representation/{layer}/max_score"], s[f"representation/{layer}/dominant"]):
            assert 0 < mx <= width and dom == float(mx > width / 2)
    assert all(v > 0 for _, v in s["grad/fc1"])  # gradients reach the hidden layers
    assert [step for step, _ in s["representation/fc1/max_score"]] == SMOKE[name][1]
    done = {"none": 1040, "masked_ln_from": 120}.get(name, 240)
    assert f"done: {done} steps" in proc.stdout and "seconds: physics=" in proc.stdout
    assert json.loads((run_dir / "finished").read_text())["global_step"] == done
    compiled = "on" if name == "compiled" else "off"
    assert f"fast paths: torch.compile {compiled}, CUDA graphs off, pinned transfers off (CPU)" in proc.stdout
    assert "warning: torch.compile" not in proc.stderr  # compiled for real, no eager fallback

    if name == "none":  # one full episode (1000 frames) and an evaluation
        assert s["charts/episodic_length"][0][1] == 1000
        assert 0 <= s["charts/episodic_return"][0][1] <= 1000
        assert [step for step, _ in s["eval/episodic_return"]] == [1040]
    if name == "hlgauss":  # Q is an expectation over bin centres, so it lies inside the support
        assert all(0 <= v <= 100 for _, v in s["losses/qf1_values"])
    # the unit conversions, logged beside the losses: agent step = frame / repeat, gradient steps from agent step 20
    for (step, agent), (_, grads) in zip(s["charts/agent_steps"], s["charts/gradient_steps"]):
        learning_starts = 110 if name == "none" else 20
        assert agent == step // repeat and grads == agent - learning_starts + 1
    if name == "reset":  # --reset-every 10 agent steps: agent steps 20 and 30 (the first 10 has no update yet)
        assert s["charts/critic_resets"] == [(160, 2.0), (240, 3.0)]
    if name == "redo":  # --redo-every 25 agent steps: agent step 25 = frame 200
        assert [step for step, _ in s["charts/redo_recycled"]] == [200] and s["charts/redo_recycled"][0][1] > 0
    if name == "prune":
        got = dict(s["charts/critic_sparsity"])
        assert sorted(got) == [160, 200, 240]  # --prune-every 5 agent steps: 20, 25, 30 once learning runs
        for step, value in got.items():  # ERK keeps the overall sparsity of uniform
            assert value == pytest.approx(drq.cubic_sparsity(step, 240, 0.95, 0.2, 0.8), abs=2e-3)
    if name == "masked_ln_from":
        scale = dict(s["charts/critic_reward_scale"])
        assert sorted(scale) == list(range(80, 121, 4))  # one log per agent step once learning runs
        assert all(scale[f] == (0.0 if f < 100 else 1.0) for f in scale), scale  # lifts at gradient step 6
        assert s["charts/layernorm_on"] == [(100, 1.0)]  # agent step 25
        assert "LayerNorm switched on at agent step 25 (frame 100)" in proc.stdout
        assert args["ln_from_step"] == 25 and args["encoder"] == "drq"
    if name == "resnet18":
        assert args["encoder"] == "resnet18" and "encoder resnet18" in proc.stdout


def test_probe_recomputes_the_inline_metrics(smoke_runs, tmp_path):
    """scripts/probe.py on the smoke runs' snapshots (conftest.probe_reproduces): every representation/* tag (the
    dominance tags included; grad/* is not recomputable and not recomputed) equals the inline value at the run's own
    thresholds, and the known answers at others. The LayerNorm switched on part-way travels in the snapshot (its gate
    is no part of the state_dict): probed with the other switch, the critic gives other values; the pruned critic's
    masks are zeros in its weights. A snapshot from before learning started is probed on the batch drawn later."""
    proc, run_dir = smoke_runs["masked_ln_from"]
    assert "snapshots: every 40 steps, about 3 x" in proc.stdout
    assert sorted(os.listdir(run_dir / "snapshots")) == ["probe.pt"] + [harness.snapshot_name(s) for s in (40, 80, 120)]
    snaps = {s: torch.load(run_dir / "snapshots" / harness.snapshot_name(s), weights_only=False) for s in (40, 80, 120)}
    assert {s: snap["extra"]["ln_on"] for s, snap in snaps.items()} == {40: False, 80: False, 120: True}
    assert set(snaps[120]["networks"]) == {"critic"} and snaps[120]["build"]["action_dim"] == 2
    got = probe_reproduces(run_dir, tmp_path / "ln", steps=[80, 120])
    assert [s for s, _ in got["own"]["representation/fc1/max_score"]] == [40, 80, 120]
    assert not any(t.startswith("grad/") for t in got["own"])
    args = drq.Args(**json.loads((run_dir / "args.json").read_text()))
    probe = torch.load(run_dir / "snapshots" / "probe.pt", weights_only=False)["probe"]
    off = {**snaps[120], "extra": {"ln_on": False}}
    assert drq.probe_snapshot(args, off, probe, "cpu") != drq.probe_snapshot(args, snaps[120], probe, "cpu")
    proc, run_dir = smoke_runs["prune"]
    assert "snapshots: every 80 steps, about 3 x" in proc.stdout
    got = probe_reproduces(run_dir, tmp_path / "prune", steps=[160, 240])
    assert [s for s, _ in got["own"]["representation/dominant"]] == [80, 160, 240]


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint, resume, non-finite stop


def filled_replay(rb, n, gen, start=0):
    """n writes into rb: random frames, actions, rewards; an episode every 7 writes, every other one terminated."""
    for t in range(start, start + n):
        frame = gen.integers(0, 256, rb.frames.shape[1:], dtype=np.uint8)
        if t % 7 == 0:
            rb.add_first(frame)
        else:
            rb.add(frame, gen.uniform(-1, 1, rb.actions.shape[1]), float(t), t % 14 == 13)
    return rb


def test_replay_checkpoints_rewrite_only_changed_chunks_and_restore_exactly(tmp_path):
    """Through the ring's ChunkStore (chunks of 8 slots in a 40-slot ring): a checkpoint after 5 more writes rewrites
    the 2 chunks they touched and keeps the others' files; after wrapping, the restored ring (its arrays, and the
    transitions it samples) equals the original."""
    gen, directory = np.random.default_rng(0), str(tmp_path / "replay")
    rb = filled_replay(drq.FrameReplay(40, (3, 6, 6), 2, 3, chunk=8), 20, gen)
    first, size = rb.store.save(directory, "100", rb.filled)
    assert sorted(first["files"]) == [0, 1, 2] and size > 0  # slots 0..19: chunks 0-2
    filled_replay(rb, 5, gen, start=20)  # slots 20..24: chunks 2 and 3
    second, _ = rb.store.save(directory, "200", rb.filled)
    assert second["files"] == {0: first["files"][0], 1: first["files"][1], 2: "chunk00002_200.pt",
                               3: "chunk00003_200.pt"}
    harness.ChunkStore.prune(directory, second)
    assert sorted(os.listdir(directory)) == sorted(second["files"].values())
    filled_replay(rb, 30, gen, start=25)  # wraps: slots 25..39 and 0..14
    assert rb.pos == 55 and rb.filled == 40
    third, _ = rb.store.save(directory, "300", rb.filled)
    assert third["files"][2] == second["files"][2]  # slots 16..23 untouched since the second checkpoint
    assert {i for i, f in third["files"].items() if f.endswith("_300.pt")} == {0, 1, 3, 4}

    restored = drq.FrameReplay(40, (3, 6, 6), 2, 3, chunk=8)
    restored.store.load(directory, third)
    restored.pos, restored.episode_start = rb.pos, rb.episode_start
    for k in ("frames", "actions", "rewards", "terminated", "first", "start"):
        np.testing.assert_array_equal(getattr(restored, k), getattr(rb, k), err_msg=k)
    for x, y in zip(rb.sample(64, np.random.default_rng(5)), restored.sample(64, np.random.default_rng(5))):
        np.testing.assert_array_equal(x, y)
    assert not restored.store.dirty.any()  # the next checkpoint writes only what changes after the restore


def _checksum(state):
    """Independent of the script: float64 sum of every float tensor of the three networks in the checkpoint."""
    return sum(float(t.double().sum()) for key in ("critic", "target_critic", "actor")
               for t in state[key].values() if torch.is_floating_point(t))


KILL_FLAGS = ["--env-id", "cartpole-swingup", "--batch-size", "8", "--buffer-size", "24", "--learning-starts", "10",
              "--metrics-every", "80", "--metrics-batch", "16", "--log-every", "80", "--eval-every", "0",
              "--total-timesteps", "640", "--checkpoint-every", "240", "--mitigation", "prune", "--prune-every", "5",
              "--ln-from-step", "50", "--seed", "3", "--run-name", "killed"]


def test_sigkill_after_checkpoint_then_resume_continues_the_run(tmp_path):
    """A real run (cartpole: 8 frames per render; 640 frames, checkpoints at 240 and 480, pruning masks and a wrapped
    replay of 24 slots, LayerNorm switched on at agent step 50 = frame 400, between the checkpoints) is SIGKILLed
    after a checkpoint, then resumed to the end with --no-torch-deterministic (a flag that may differ on resume)."""
    run_dir = tmp_path / "runs" / "killed"
    out, ckpt, _ = kill_after_checkpoint(SCRIPT, KILL_FLAGS, tmp_path, "killed", 240)
    step, state = ckpt["global_step"], ckpt["state"]
    assert step in (240, 480) and f"checkpoint: step {step}," in out
    assert "probe at step 80 skipped: the replay holds 10 transitions, fewer than --metrics-batch 16" in out
    assert ckpt["format"] == harness.CHECKPOINT_FORMAT and ckpt["args"]["run_name"] == "killed"
    assert state["replay"]["pos"] > 24 and ckpt["replay"]["layout"]["capacity"] == 24  # wrapped
    assert sorted(ckpt["replay"]["files"].values()) == sorted(p.name for p in (run_dir / "replay").iterdir())
    assert state["probe_batch"] is not None and state["probe_batch"][0].shape == (16, 9, 84, 84)
    assert len(state["prune_masks"]) == 4 + 1 + 2 * 2 and not all(bool(m.all()) for m in state["prune_masks"])
    assert len(state["rng"]["generators"]) == 2  # the agent's RNG and the probe batch's
    assert state["agent_step"] == step // 8 and state["grad_step"] == step // 8 - 10 + 1
    assert state["ln_on"] == (step >= 400)  # the LayerNorm gate, outside the state_dicts
    assert any("norms" in k for k in state["critic"])  # the LayerNorm parameters exist from the start

    proc, checksum, s = resume_after_kill(SCRIPT, KILL_FLAGS + ["--no-torch-deterministic"], tmp_path,
                                          "killed", ckpt)
    assert checksum == pytest.approx(_checksum(state), rel=1e-12, abs=1e-9)  # restored == checkpointed
    assert json.loads((run_dir / "finished").read_text())["global_step"] == 640
    assert not (run_dir / "checkpoint.pt").exists() and not (run_dir / "replay").exists()  # dropped once finished
    assert json.loads((run_dir / "args.json").read_text())["torch_deterministic"] is True  # the run's own args
    assert steps_of(s, "charts/SPS") == list(range(80, 641, 80))  # no gap, no duplicate at the resume point
    assert steps_of(s, "losses/qf_loss") == list(range(80, 641, 80))
    assert steps_of(s, "representation/fc1/max_score") == list(range(160, 641, 80))  # 80: too few transitions
    assert steps_of(s, "charts/critic_sparsity") == list(range(80, 641, 40))
    assert s["charts/layernorm_on"] == [(400, 1.0)]  # once, whether the resume started before or after it
    for st, value in s["charts/critic_sparsity"]:  # the schedule went on from the restored masks
        assert value == pytest.approx(drq.cubic_sparsity(st, 640, 0.95, 0.2, 0.8), abs=2e-3)


@pytest.mark.parametrize("flags, what, good_step, resumable", [
    (["--policy-lr", "1e30"], "action at step 80", 80, "runs/nf/checkpoint.pt (step 80)"),
    (["--q-lr", "1e30"], "loss (losses/actor_loss", 0, "runs/nf/checkpoint.pt (none yet)"),
])
def test_non_finite_training_stops_with_last_good_state(run_script, tmp_path, flags, what, good_step, resumable):
    """Absurd learning rates: the critic's blows the actor loss up in the first update (step 80); the actor's passes
    the check at step 80 (its parameters are huge but finite) and makes the next action NaN. Both are deterministic
    (tried seeds 1-6 and --mitigation hlgauss, ln: the same every time)."""
    proc = run_script(SCRIPT, ["--env-id", "cartpole-swingup", "--batch-size", "8", "--buffer-size", "40",
                               "--learning-starts", "10", "--metrics-every", "80", "--metrics-batch", "16",
                               "--log-every", "80", "--eval-every", "0", "--total-timesteps", "400",
                               "--checkpoint-every", "80", "--run-name", "nf", *flags],
                      cwd=tmp_path, timeout=300, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: non-finite {what}"), proc.stderr[-3000:]
    assert f"at step 80; last good state (step {good_step}) written to runs/nf/checkpoint_last_good.pt" in lines[0]
    assert lines[0].endswith(f"the resumable checkpoint is {resumable}")
    good = torch.load(tmp_path / "runs" / "nf" / "checkpoint_last_good.pt", map_location="cpu", weights_only=False)
    assert good["global_step"] == good_step
    for key in ("critic", "target_critic", "actor", "critic_opt", "actor_opt", "alpha_opt", "log_alpha"):
        tensors = list(_tensors(good["state"][key]))
        assert all(bool(torch.isfinite(t).all()) for t in tensors), key
        assert tensors or (good_step == 0 and key.endswith("_opt")), key  # no optimiser state before the first update
    if good_step:
        assert (tmp_path / "runs" / "nf" / "checkpoint.pt").exists()  # the resume point is left alone
        assert torch.load(tmp_path / "runs" / "nf" / "checkpoint.pt", weights_only=False)["global_step"] == 80


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from _tensors(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _tensors(v)
