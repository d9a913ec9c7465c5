"""Tests of mrq_dmc_hr.py: the two-hot encoding, the multi-step target, LAP priorities and sampling, the frame replay's
rollouts (scripted stream with wraparound, terminations and truncations; real environment stacks), the affine-free
LayerNorm, the encoder loss against a slow reference, HR vs widen parameter arithmetic, input validation, smoke runs
of the real script (event files read back), kill/resume and the non-finite stop.

Costs on the 2-core CPU box: a render is ~50 ms and an 84x84 update at batch 8 ~0.1 s, so the runs use 40-frame
episodes, tiny widths and a few dozen updates."""
import concurrent.futures
import copy
import functools
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import harness
import mrq_dmc_hr as mrq
from conftest import (check_documented_tags, kill_after_checkpoint, probe_reproduces, resume_after_kill,
                      steps_of)

SCRIPT = "mrq_dmc_hr.py"


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: one intra-op thread


# ---------------------------------------------------------------------------------------------------------------
# Two-hot, multi-step target, LAP


def test_two_hot_encoding_and_inverse_on_known_values():
    th = mrq.TwoHot(-10, 10, 65)
    step = 20 / 64  # linspace(-10, 10, 65)
    symexp = [math.copysign(math.expm1(abs(-10 + i * step)), -10 + i * step) for i in range(65)]
    assert th.bins.tolist() == pytest.approx(symexp, rel=1e-5)
    b33, b34, b35 = math.expm1(step), math.expm1(2 * step), math.expm1(3 * step)  # 0.3668, 0.8682, 1.5535
    cases = {0.0: {32: 1.0}, 0.2: {32: 1 - 0.2 / b33, 33: 0.2 / b33}, -0.2: {31: 0.2 / b33, 32: 1 - 0.2 / b33},
             1.0: {34: 1 - (1 - b34) / (b35 - b34), 35: (1 - b34) / (b35 - b34)}, b34: {34: 1.0},
             1e9: {64: 1.0}, -1e9: {0: 1.0}}  # outside the support: clipped to its ends
    x = torch.tensor(list(cases))
    enc = th.encode(x)
    for row, want in zip(enc, cases.values()):
        expected = torch.zeros(65)
        for k, v in want.items():
            expected[k] = v
        assert torch.allclose(row, expected, atol=1e-5), (row.nonzero(), want)
    assert torch.allclose(enc.sum(1), torch.ones(len(cases)))
    inside = x.abs() < 1e4
    assert torch.allclose(th.inverse(torch.log(enc[inside] + 1e-30)), x[inside], atol=1e-5)  # expectation = x
    # the cross-entropy to a histogram is smallest at the logits of that histogram
    logits = torch.log(enc[1:2] + 1e-6).requires_grad_(True)
    assert th.cross_entropy(logits, x[1:2]) < th.cross_entropy(torch.zeros(1, 65), x[1:2])


def slow_return(rewards, not_done, gamma):
    """Reference n-step return: rewards until (and including) the first termination, bootstrap only without one."""
    g, disc = 0.0, 1.0
    for r, nd in zip(rewards, not_done):
        g += disc * r
        if nd == 0:
            return g, 0.0
        disc *= gamma
    return g, 1.0


def test_multi_step_return_with_a_termination_against_a_slow_loop():
    gen = torch.Generator().manual_seed(0)
    rewards = torch.rand(64, 3, generator=gen) * 4 - 2
    not_done = (torch.rand(64, 3, generator=gen) > 0.3).float()
    ret, boot = mrq.multi_step_return(rewards, not_done, 0.99)
    for i in range(64):
        g, b = slow_return(rewards[i].tolist(), not_done[i].tolist(), 0.99)
        assert ret[i].item() == pytest.approx(g, abs=1e-5) and boot[i].item() == b
    assert (not_done.prod(1) == 0).any() and (not_done.prod(1) == 1).any()


def test_value_target_of_the_script_against_a_per_sample_reference():
    """value_loss's target, (3-step return + gamma^3 min Qbar(zsbar', pibar(zsbar')) * target_scale) / scale, with the
    smoothing noise off, against one sample at a time through the target networks; the loss is the Huber loss."""
    args = tiny_args(target_policy_noise=0.0)
    torch.manual_seed(0)
    nets = networks(args)
    obs = torch.randint(0, 256, (6, 9, 36, 36), dtype=torch.uint8)
    nxt = torch.randint(0, 256, (6, 9, 36, 36), dtype=torch.uint8)
    actions = torch.rand(6, 3, 2) * 2 - 1
    rewards = torch.rand(6, 3)
    not_done = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 1.0]])
    scales = torch.tensor([0.5, 2.0])
    loss, q, target, zs = mrq.value_loss(nets["encoder"], nets["encoder_target"], nets["policy_target"],
                                         nets["value"], nets["value_target"], args, obs, nxt, actions, rewards,
                                         not_done, scales)
    with torch.no_grad():
        for i in range(6):
            g, boot = slow_return(rewards[i].tolist(), not_done[i].tolist(), args.gamma)
            z = nets["encoder_target"].zs(nxt[i:i + 1])
            a = nets["policy_target"](z)[0].clamp(-1, 1)
            q_next = min(nets["value_target"](nets["encoder_target"].zsa(z, a))[0].tolist())
            assert target[i].item() == pytest.approx((g + boot * args.gamma ** 3 * q_next * 2.0) / 0.5, rel=1e-5)
            qi = nets["value"](nets["encoder"].zsa(nets["encoder"].zs(obs[i:i + 1]), actions[i:i + 1, 0]))[0]
            assert torch.allclose(q[i], qi, atol=1e-5)
        huber = [F.smooth_l1_loss(q[i, j], target[i]).item() for i in range(6) for j in range(2)]
    assert loss.item() == pytest.approx(float(np.mean(huber)), rel=1e-5)


def test_lap_priority_formula_and_sampling_frequencies():
    q = torch.tensor([[0.5, 3.0], [2.0, -2.0], [1.2, 1.1]])
    target = torch.tensor([1.0, 0.0, 1.0])
    # max_i |Q_i - target| = 2, 2, 0.2 -> floored at 1 -> ^0.4
    assert mrq.lap_priority(q, target, 1.0, 0.4).tolist() == pytest.approx([2 ** 0.4, 2 ** 0.4, 1.0])
    rb = mrq.FrameReplay(64, (3, 2, 2), 1, 3, 2)
    rb.add_first(np.zeros((3, 2, 2), np.uint8))
    for t in range(12):  # one episode of 12 transitions: starts 1..10 are valid (horizon 2)
        rb.add(np.zeros((3, 2, 2), np.uint8), 0.0, 0.0, False)
    assert rb.valid.nonzero().flatten().tolist() == list(range(1, 11))
    assert torch.all(rb.priority[:13] == 1.0)  # new transitions at the running maximum (the floor, at first)
    slots = torch.arange(1, 11)
    pri = torch.arange(1.0, 11.0)
    rb.update_priority(slots, pri)
    assert float(rb.max_priority) == 10.0
    rb.add(np.zeros((3, 2, 2), np.uint8), 0.0, 0.0, False)  # slot 13, and start 11 becomes valid
    assert rb.priority[13].item() == 10.0
    torch.manual_seed(0)
    drawn = torch.cat([rb.sample_slots(10_000) for _ in range(20)])
    counts = torch.bincount(drawn, minlength=64).double()
    assert counts[0] == 0 and counts[12:].sum() == 0  # reset frame, starts without a whole rollout: never
    expected = torch.cat([pri, torch.tensor([1.0])])  # slot 11 kept its first priority
    expected = expected / expected.sum() * drawn.numel()
    assert torch.allclose(counts[1:12], expected.double(), rtol=0.06)


def test_prefix_sum_equals_cumsum_at_and_off_block_multiples():
    """The deterministic (matmul) prefix sum against torch.cumsum in float64: sizes that are and are not multiples of
    the block, one to three levels of block totals; nondecreasing and flat across zero weights, as the draw needs."""
    gen = torch.Generator().manual_seed(0)
    for n, block in [(1, 256), (255, 256), (256, 256), (257, 256), (768, 256), (773, 256), (65_537, 256),
                     (1000, 7), (343, 7), (4097, 4)]:
        x = torch.exp(torch.randn(n, generator=gen, dtype=torch.float64) * 4)  # wide range: rounding happens
        x[torch.rand(n, generator=gen) < 0.3] = 0.0
        got, want = mrq.prefix_sum(x, block), torch.cumsum(x, 0)
        assert got.dtype == torch.float64 and got.shape == (n,)
        assert torch.allclose(got, want, rtol=1e-12, atol=0), (n, block, ((got - want) / want).abs().max())
        assert torch.all(got.diff() >= 0) and torch.all(got[1:][x[1:] == 0] == got[:-1][x[1:] == 0]), (n, block)
    # float32 priorities of a bounded range: float64 sums of them are exact, so both formulations agree bit for bit
    x = torch.rand(100_003, generator=gen) * 3 + 1
    x[::5] = 0.0
    assert torch.equal(mrq.prefix_sum(x), torch.cumsum(x, 0, dtype=torch.float64))


def test_lap_sampler_draws_the_same_slots_with_either_prefix_sum():
    """sample_slots(deterministic=True), the CUDA path under torch's deterministic mode, draws what torch.cumsum
    draws for the same generator state, on a wrapped replay whose ring (1000 slots) is no multiple of the block."""
    rb = mrq.FrameReplay(1000, (3, 2, 2), 1, 3, 3)
    frame, gen = np.zeros((3, 2, 2), np.uint8), torch.Generator().manual_seed(0)
    for episode in range(30):  # 1200 positions: the ring wraps
        rb.add_first(frame)
        for t in range(39):
            rb.add(frame, 0.0, 0.0, t == 38 and episode % 3 == 0)
        slots = torch.randint(0, 1000, (64,), generator=gen)
        rb.update_priority(slots, torch.rand(64, generator=gen) * 5 + 1)
    valid = set(rb.valid.nonzero().flatten().tolist())
    assert 0 < len(valid) < 1000
    draws = {}
    for deterministic in (False, True, None):  # None: the CPU picks torch.cumsum
        torch.manual_seed(7)
        draws[deterministic] = torch.cat([rb.sample_slots(4096, deterministic=deterministic) for _ in range(4)])
    assert torch.equal(draws[False], draws[True]) and torch.equal(draws[False], draws[None])
    assert set(draws[True].tolist()) <= valid and len(set(draws[True].tolist())) > len(valid) // 2
    torch.manual_seed(7)  # an independent draw: inverse CDF of priority * valid by hand
    w = (rb.priority * rb.valid).double()
    u = torch.rand(4096, dtype=torch.float64) * w.sum()
    cdf = torch.cumsum(w, 0)
    assert draws[True][:4096].tolist() == [int((cdf <= v).sum()) for v in u.tolist()]


# ---------------------------------------------------------------------------------------------------------------
# Replay


def scripted_replay(capacity=40, horizon=3, mirror=None):
    """Episodes of frames with ids (frame f is filled with f % 256), some terminated, some truncated, written into a
    ring that wraps. Returns (replay, {start position: reference rollout})."""
    rb = mrq.FrameReplay(capacity, (3, 2, 2), 1, 3, horizon, chunk=8, mirror=mirror)
    episodes, fid = [], 0
    for n, terminated in [(7, False), (2, True), (9, True), (4, False), (3, True), (12, False), (6, True),
                          (1, True), (8, False)]:
        ids = [fid]
        rb.add_first(np.full((3, 2, 2), fid % 256, np.uint8))
        start = rb.pos - 1
        fid += 1
        trans = []
        for t in range(n):
            term = terminated and t == n - 1
            rb.add(np.full((3, 2, 2), fid % 256, np.uint8), [fid / 100], fid * 0.5, term)
            ids.append(fid)
            trans.append((fid / 100, fid * 0.5, term))
            fid += 1
        episodes.append((start, ids, trans, terminated))
    oldest = rb.pos - capacity
    expected = {}
    for start, ids, trans, terminated in episodes:
        for t in range(len(trans)):  # rollout from the t-th transition (position start + 1 + t)
            if not (t + horizon < len(trans) or (terminated and t + horizon >= len(trans))):
                continue  # truncated episodes: the last `horizon` starts never have a whole rollout
            stacks = [[ids[min(max(t + k - d, 0), len(trans))] for d in (2, 1, 0)] for k in range(horizon + 1)]
            if oldest > 0 and start + 1 + t - 3 < oldest:
                continue  # its first stack could reach an overwritten frame (the replay does not look at clamping)
            expected[start + 1 + t] = (stacks, [trans[min(t + i, len(trans) - 1)] for i in range(horizon)], t,
                                       len(trans))
    return rb, expected


def test_frame_replay_rollouts_of_a_scripted_stream_with_wraparound_terminations_and_truncations():
    horizon = 3
    rb, expected = scripted_replay(horizon=horizon)
    assert rb.pos > rb.capacity
    last = rb.pos - 1
    valid_positions = {last - (last - s) % rb.capacity for s in rb.valid.nonzero().flatten().tolist()}
    assert valid_positions == set(expected)
    slots = torch.tensor(sorted(p % rb.capacity for p in expected))
    b = rb.batch(slots, horizon, all_stacks=True)
    assert b.obs.shape == (len(slots), horizon + 1, 9, 2, 2) and b.obs.dtype == torch.uint8
    two = rb.batch(slots, horizon, all_stacks=False)
    assert torch.equal(two.obs, b.obs[:, [0, horizon]])
    for j, s in enumerate(slots.tolist()):
        p = last - (last - s) % rb.capacity
        stacks, trans, t, n = expected[p]
        got = [[int(b.obs[j, k, 3 * d, 0, 0]) for d in range(3)] for k in range(horizon + 1)]
        for k in range(horizon + 1):
            if k == 0 or t + k - 1 < n:  # stacks up to the termination are the episode's; later ones are masked
                assert got[k] == [i % 256 for i in stacks[k]], (p, k)
        for i in range(horizon):
            if t + i < n:  # transitions after a termination are masked by the losses: any stored values
                a, r, term = trans[i]
                assert b.actions[j, i, 0].item() == pytest.approx(a) and b.rewards[j, i].item() == pytest.approx(r)
                assert b.not_done[j, i].item() == float(not term)


def test_frame_replay_matches_the_real_env_stacks_across_episode_boundaries():
    env = mrq.DMCPixels("cartpole-swingup", seed=0, image_size=36, episode_frames=12)  # 6 agent steps per episode
    rb = mrq.FrameReplay(100, (3, 36, 36), 1, 3, 2)
    expected, rng = {}, np.random.default_rng(0)
    for _ in range(3):
        obs, frame = env.reset()
        rb.add_first(frame)
        stacks, done = [obs], False
        while not done:
            nxt, frame, r, term, trunc, frames = env.step(rng.uniform(-1, 1, 1))
            assert frames == 2 and not term
            rb.add(frame, 0.0, r, term)
            stacks.append(nxt)
            done = trunc
        first = rb.pos - len(stacks)
        for t in range(len(stacks) - 1 - 2):  # the valid starts of a truncated episode: 4 of 6 at horizon 2
            expected[first + 1 + t] = stacks[t:t + 3]
    assert len(expected) == 12
    slots = torch.tensor(sorted(expected))
    assert rb.valid.nonzero().flatten().tolist() == slots.tolist()
    b = rb.batch(slots, 2, all_stacks=True)
    for j, p in enumerate(slots.tolist()):
        for k in range(3):
            assert np.array_equal(b.obs[j, k].numpy(), expected[p][k]), (p, k)


def test_device_mirror_written_through_staging_rows_equals_the_host_arrays():
    """The CUDA write path (each slot through a harness.Staging row into the device mirror), run on the CPU with
    mirror=True: after a wrapped scripted stream the mirror equals the host arrays without sharing their memory, and
    batches equal those of the unmirrored replay."""
    mirrored, _ = scripted_replay(mirror=True)
    plain, _ = scripted_replay()
    assert mirrored.mirror and not plain.mirror and mirrored.pos > mirrored.capacity
    for k, t in mirrored.dev.items():
        host = torch.from_numpy(getattr(mirrored, k))
        assert t.data_ptr() != host.data_ptr() and torch.equal(t, host), k
        assert torch.equal(t, plain.dev[k]), k
    for all_stacks, horizon in ((True, 3), (False, 3), (False, 1)):
        torch.manual_seed(3)
        a = mirrored.sample(32, horizon, all_stacks)
        torch.manual_seed(3)
        b = plain.sample(32, horizon, all_stacks)
        assert all(torch.equal(x, y) for x, y in zip(a, b)), (all_stacks, horizon)


def test_replay_checkpoint_restores_frames_priorities_and_valid_starts(tmp_path):
    rb, _ = scripted_replay()
    rb.update_priority(torch.tensor([3, 5]), torch.tensor([4.0, 2.5]))
    manifest, _ = rb.store.save(str(tmp_path), "1", rb.filled)
    restored = mrq.FrameReplay(40, (3, 2, 2), 1, 3, 3, chunk=8)
    restored.store.load(str(tmp_path), manifest)
    restored.load_state(rb.state())
    for k in ("frames", "actions", "rewards", "terminated", "first", "start"):
        assert np.array_equal(getattr(restored, k), getattr(rb, k)), k
    assert torch.equal(restored.priority, rb.priority) and torch.equal(restored.valid, rb.valid)
    assert float(restored.max_priority) == 4.0 and restored.pos == rb.pos
    torch.manual_seed(1)
    a = rb.sample(16, 3, all_stacks=True)
    torch.manual_seed(1)
    b = restored.sample(16, 3, all_stacks=True)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_random_shift_is_a_replicate_padded_crop():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (5, 2, 3, 9, 9), dtype=torch.uint8)
    y = mrq.augment(x, 2)
    padded = F.pad(x.flatten(0, 1).float(), (2, 2, 2, 2), mode="replicate")
    for i, img in enumerate(y.flatten(0, 1).float()):  # every stack is some 9x9 window of its padded image
        assert any(torch.equal(img, padded[i, :, r:r + 9, c:c + 9]) for r in range(5) for c in range(5))


# ---------------------------------------------------------------------------------------------------------------
# Networks and losses


def tiny_args(**kw):
    return mrq.Args(zs_dim=12, za_dim=4, zsa_dim=10, enc_hdim=8, value_hdim=8, policy_hdim=8, conv_channels=4,
                    num_bins=9, image_size=36, image_pad=2, **kw)


def networks(args, hr=()):
    widths = mrq.Widths(args.conv_channels, args.zs_dim, args.enc_hdim)
    enc, value, policy = mrq.build_networks(args, (9, args.image_size, args.image_size), 2, widths, hr)
    return {"encoder": enc, "value": value, "policy": policy, "encoder_target": copy.deepcopy(enc),
            "value_target": copy.deepcopy(value), "policy_target": copy.deepcopy(policy)}


def test_layernorm_is_affine_free_and_every_parameter_is_a_linear_or_conv():
    args = tiny_args()
    nets = networks(args, hr=("zs", "zsa", "convs"))
    for net in (nets["encoder"], nets["value"], nets["policy"]):
        for m in net.modules():
            assert not isinstance(m, torch.nn.LayerNorm)
            if any(True for _ in m.parameters(recurse=False)):
                assert isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)), m
    layer = mrq.HiddenLayer(lambda: torch.nn.Linear(5, 7), branches=2, layernorm=True)
    x = torch.randn(4, 5)
    y, pre = layer(x, probe=True)
    assert pre.shape == (4, 14)
    for p in pre.split(7, dim=1):  # each branch normalised on its own: mean 0, (biased) variance 1
        assert torch.allclose(p.mean(1), torch.zeros(4), atol=1e-5)
        assert torch.allclose(p.var(1, unbiased=False), torch.ones(4), atol=1e-3)
    l1, l2 = layer.branches
    manual = F.elu(F.layer_norm(l1(x), (7,))) * F.elu(F.layer_norm(l2(x), (7,)))
    assert torch.allclose(y, manual)
    gain = math.sqrt(2)  # xavier-uniform with ReLU gain, zero biases
    bound = gain * math.sqrt(6 / (5 + 7))
    assert l1.weight.abs().max() <= bound and torch.all(l1.bias == 0)


def slow_encoder_loss(nets, two_hot_bins, args, obs, actions, rewards, not_done, terminates):
    """One sample at a time: roll the model from zs(s_0), compare with the target encoder's zs(s_i), two-hot by hand,
    every term dropped after the first termination."""
    enc, tgt = nets["encoder"], nets["encoder_target"]
    b, h = actions.shape[:2]
    d = enc.zs_dim
    total = 0.0
    for j in range(b):
        zs = enc.zs(obs[j:j + 1, 0])
        alive = 1.0
        for i in range(h):
            out = enc.model(enc.zsa(zs, actions[j:j + 1, i]))[0]
            done, zs, logits = out[0], out[1:1 + d][None], out[1 + d:]
            target = tgt.zs(obs[j:j + 1, i + 1])
            r = float(rewards[j, i].clamp(two_hot_bins[0], two_hot_bins[-1]))
            k = max(kk for kk in range(len(two_hot_bins) - 1) if two_hot_bins[kk] <= r)
            w = (r - two_hot_bins[k]) / (two_hot_bins[k + 1] - two_hot_bins[k])
            logp = F.log_softmax(logits, -1)
            ce = -((1 - w) * logp[k] + w * logp[k + 1])
            total = total + alive * (args.dyn_weight * ((zs - target) ** 2).mean() / b
                                     + args.reward_weight * ce / b
                                     + args.done_weight * terminates * (done - (1 - not_done[j, i])) ** 2 / b)
            alive *= float(not_done[j, i])
    return total


def test_encoder_loss_against_a_slow_reference():
    args = tiny_args()
    torch.manual_seed(0)
    nets = networks(args, hr=("zs",))
    with torch.no_grad():  # a target that differs from the online encoder
        for p in nets["encoder_target"].parameters():
            p.add_(0.05 * torch.randn_like(p))
    two_hot = mrq.TwoHot(args.bin_lower, args.bin_upper, args.num_bins)
    obs = torch.randint(0, 256, (4, 4, 9, 36, 36), dtype=torch.uint8)
    actions = torch.rand(4, 3, 2) * 2 - 1
    rewards = torch.tensor([[0.1, 1.5, 0.0], [2.0, 0.3, 7.0], [0.0, 0.0, 1.0], [1e5, -3.0, 0.5]])
    not_done = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 1, 1], [1, 1, 1.0]])
    for terminates in (0.0, 1.0):
        loss, stats = mrq.encoder_loss(nets["encoder"], nets["encoder_target"], two_hot, args, obs, actions, rewards,
                                       not_done, torch.tensor(terminates))
        want = slow_encoder_loss(nets, two_hot.bins.tolist(), args, obs, actions, rewards, not_done, terminates)
        assert loss.item() == pytest.approx(want.item(), rel=1e-4)
        assert stats[0].item() == pytest.approx(loss.item())


def test_rl_step_updates_value_and_policy_only_and_sets_priorities():
    """The value loss reaches only the value nets (RL features without gradient), the policy loss only the policy;
    the encoder and every target stay as they were; priorities are the LAP formula of the batch's TD errors."""
    args = tiny_args()
    torch.manual_seed(0)
    nets = networks(args)
    opts = [torch.optim.AdamW(nets[k].parameters(), lr=1e-3) for k in ("encoder", "value", "policy")]
    two_hot = mrq.TwoHot(args.bin_lower, args.bin_upper, args.num_bins)
    _, rl_step = mrq.make_train_step(nets["encoder"], nets["encoder_target"], nets["value"], nets["value_target"],
                                     nets["policy"], nets["policy_target"], *opts, two_hot, args)
    before = {k: copy.deepcopy(m.state_dict()) for k, m in nets.items()}
    batch = mrq.Batch(torch.randint(0, 256, (8, 2, 9, 36, 36), dtype=torch.uint8), torch.rand(8, 3, 2) * 2 - 1,
                      torch.rand(8, 3), torch.ones(8, 3), torch.arange(8))
    stats, priority = rl_step(batch, torch.tensor([0.5, 1.0]))
    for key, m in nets.items():
        same = all(torch.equal(v, before[key][n]) for n, v in m.state_dict().items())
        assert same == (key not in ("value", "policy")), key
    assert all(p.grad is None for p in nets["encoder"].parameters())
    assert priority.shape == (8,) and torch.all(priority >= 1.0) and len(stats) == len(mrq.RL_STATS)


# ---------------------------------------------------------------------------------------------------------------
# HR and widen: parameter arithmetic


def test_hr_and_widen_parameter_arithmetic_at_the_official_sizes():
    """HR adds one copy of each layer at its sites (A = 6, 84x84x9 input): the zs projection 1568*512 + 512, the convs
    9*32*9 + 32 + 3 (32*32*9 + 32), the zsa hidden layers (768*512 + 512) + (512*512 + 512). --widen at zs grows zs_dim,
    each unit costing 1569 (projection) + 512 (zsa input) + 513 (model head) + 512 (policy input) parameters."""
    args = mrq.Args()
    shape, base = (9, 84, 84), mrq.Widths(32, 512, 512)
    n0 = mrq.parameter_count(args, shape, 6, base)
    added = {"zs": 1568 * 512 + 512, "convs": 9 * 32 * 9 + 32 + 3 * (32 * 32 * 9 + 32),
             "zsa": 768 * 512 + 512 + 512 * 512 + 512}
    for site, n in added.items():
        assert mrq.parameter_count(args, shape, 6, base, (site,)) - n0 == n, site
    assert added["zs"] == 803_328 and added["convs"] == 30_368 and added["zsa"] == 656_384
    per_unit = 1569 + 512 + 513 + 512
    assert mrq.parameter_count(args, shape, 6, base._replace(zs=513)) - n0 == per_unit
    wide = mrq.matched_widths(args, shape, 6)
    assert wide == mrq.Widths(32, 512 + round(added["zs"] / per_unit), 512) == mrq.Widths(32, 771, 512)
    assert abs(mrq.parameter_count(args, shape, 6, wide) - n0 - added["zs"]) <= per_unit / 2
    for layers in ("zsa", "convs", "all"):  # every site: the widened count is within one width unit of HR's
        args.hr_layers = layers
        wide = mrq.matched_widths(args, shape, 6)
        n_hr = mrq.parameter_count(args, shape, 6, base, mrq.hr_sites(args))
        n_w = mrq.parameter_count(args, shape, 6, wide)
        unit = max(mrq.parameter_count(args, shape, 6, wide._replace(**{k: getattr(wide, k) + 1})) - n_w
                   for k in ("conv", "zs", "enc_hdim"))
        assert abs(n_w - n_hr) <= unit / 2, (layers, wide, n_w, n_hr)


def test_validation_names_the_flag():
    cases = [({"hr_layers": "zs,heads"}, "--hr-layers must be comma-separated sites from convs, zs, zsa"),
             ({"hr": True, "widen": True}, "--hr and --widen exclude each other"),
             ({"hr": True, "hr_branches": 1}, "--hr-branches must be >= 2 with --hr"),
             ({"cudagraphs": "on"}, "--cudagraphs on: mrq_dmc_hr.py has no CUDA-graph path"),
             ({"env_id": "walker-fly"}, "--env-id 'walker-fly' is not a dm_control task"),
             ({"image_size": 24}, "--image-size must be >= 31"),
             ({"learning_starts": 4}, "--learning-starts must be >= 12 frames"),
             ({"enc_lr": 0.0}, "--enc-lr must be a finite number > 0, got 0.0"),
             ({"metrics_batch": 300, "buffer_size": 200}, "--metrics-batch 300 exceeds --buffer-size 200")]
    for kw, message in cases:
        with pytest.raises(SystemExit) as e:
            mrq.validate(mrq.Args(**kw))
        assert str(e.value.code).startswith(f"error: {message}"), (kw, e.value.code)
    for env_id in mrq.DMC_VISUAL:
        mrq.validate(mrq.Args(env_id=env_id))
    assert mrq.resolve_defaults(mrq.Args()).cudagraphs == "off"
    assert mrq.replay_capacity(mrq.Args()) == 500_000 + 1_000 + 1  # 1M frames fill half of a 1M ring


# ---------------------------------------------------------------------------------------------------------------
# The real script

TINY = ["--env-id", "cartpole-swingup", "--batch-size", "8", "--episode-frames", "40", "--target-update-freq", "5",
        "--zs-dim", "32", "--za-dim", "16", "--zsa-dim", "32", "--enc-hdim", "32", "--value-hdim", "32",
        "--policy-hdim", "32", "--log-every", "40", "--seed", "3"]
LAYERS = ["conv1", "conv2", "conv3", "conv4", "zs", "zsa_fc1", "zsa_fc2", "fc1", "fc2", "latent"]
SMOKE = {  # name -> extra flags; snapshots: test_probe_recomputes_the_inline_metrics
    "hr": ["--hr", "--buffer-size", "200", "--learning-starts", "80", "--total-timesteps", "120", "--metrics-every",
           "40", "--metrics-batch", "8", "--eval-every", "120", "--eval-episodes", "1", "--snapshot-every", "40"],
    "widen": ["--widen", "--hr-layers", "zsa,convs", "--image-size", "36", "--buffer-size", "30", "--learning-starts",
              "60", "--total-timesteps", "120", "--metrics-every", "40", "--metrics-batch", "8", "--eval-every", "0",
              "--snapshot-every", "60"],
}


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    from conftest import run_script

    def go(name):
        cwd = tmp_path_factory.mktemp(name)
        proc = run_script(SCRIPT, TINY + SMOKE[name] + ["--run-name", name], cwd=cwd, timeout=300,
                          env={"OMP_NUM_THREADS": "1"})
        return name, (proc, cwd / "runs" / name)

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(go, SMOKE))


@pytest.mark.parametrize("name", list(SMOKE))
def test_smoke_run_logs_every_tag(smoke_runs, read_scalars, name):
    proc, run_dir = smoke_runs[name]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "fast paths: torch.compile off, CUDA graphs off, pinned transfers off (CPU)" in out
    assert "parameters: " in out and "parameter arithmetic at sites" in out
    args = json.loads((run_dir / "args.json").read_text())
    assert args["cudagraphs"] == "off" and args[name] is True
    s = read_scalars(str(run_dir))
    check_documented_tags("mrq_dmc_hr.py", s)  # the page's tag table, both ways
    tags = ["charts/SPS", "charts/episodic_return", "charts/episodic_length", "charts/reward_scale",
            "charts/max_priority", "charts/training_steps", *mrq.ENC_STATS, *mrq.RL_STATS,
            "representation/hidden_bias", "representation/live_contribution"]
    tags += [f"representation/{layer}/{key}" for layer in LAYERS
             for key in ("dormant_kde", "dormant_score", "srank", "max_score", "saturated", "zombie")]
    for tag in tags:
        assert tag in s and all(math.isfinite(v) for _, v in s[tag]), tag
    assert [st for st, _ in s["charts/episodic_length"]] == [40, 80, 120]
    assert all(v == 40 for _, v in s["charts/episodic_length"])
    assert json.loads((run_dir / "finished").read_text())["global_step"] == 120
    if name == "hr":  # learning from step 80: one update per agent step, encoder updates every 5
        assert [st for st, _ in s["representation/zs/srank"]] == [80, 120]
        assert [v for _, v in s["charts/training_steps"]] == [1, 21]
        assert [st for st, _ in s["eval/episodic_return"]] == [120]
        assert "(0-1): 2 x Linear(in_features=1568, out_features=32" in out  # the two branches of zs
    else:  # learning from step 60: the probe due at 40 is skipped; the 30-slot replay has wrapped by then
        assert [st for st, _ in s["representation/zs/srank"]] == [80, 120]
        assert "eval/episodic_return" not in s
        assert "Widths(conv=" in out and "--widen" in out


def test_probe_recomputes_the_inline_metrics(smoke_runs, tmp_path):
    """scripts/probe.py on the smoke runs' snapshots (conftest.probe_reproduces): encoder and value network built with
    the run's HR sites or widened widths give the inline values at the run's own thresholds, and the known answers at
    others; a snapshot from before learning started (no probe batch yet) is probed on the batch drawn later."""
    proc, run_dir = smoke_runs["hr"]
    assert "snapshots: every 40 steps, about 3 x" in proc.stdout
    assert sorted(os.listdir(run_dir / "snapshots")) == ["probe.pt"] + [harness.snapshot_name(s) for s in (40, 80, 120)]
    got = probe_reproduces(run_dir, tmp_path / "hr", steps=[80, 120])
    assert [s for s, _ in got["own"]["representation/zs/srank"]] == [40, 80, 120]
    proc, run_dir = smoke_runs["widen"]
    snap = torch.load(run_dir / "snapshots" / harness.snapshot_name(120), weights_only=False)
    assert set(snap["networks"]) == {"encoder", "value"} and snap["build"]["hr"] == []
    assert tuple(snap["build"]["widths"]) != (32, 32, 32)  # conv channels and zsa width grown: --widen
    got = probe_reproduces(run_dir, tmp_path / "widen", steps=[120])
    assert [s for s, _ in got["own"]["representation/zs/srank"]] == [60, 120]


RENDERER_RUN = TINY + ["--image-size", "36", "--buffer-size", "40", "--learning-starts", "20", "--total-timesteps",
                       "40", "--eval-every", "0", "--metrics-every", "0", "--checkpoint-every", "0", "--no-cuda"]
RENDERERS = {  # name -> (environment, command): a renderer that fails at the import, or at the first frame
    "egl_broken": ({"MUJOCO_GL": "egl", "__EGL_VENDOR_LIBRARY_FILENAMES": "/nonexistent.json"}, ["--help"]),
    "osmesa": ({"MUJOCO_GL": "osmesa"}, RENDERER_RUN),  # no libOSMesa here: PyOpenGL fails
    "disable": ({"MUJOCO_GL": "disable"}, RENDERER_RUN),  # dm_control imports, the first frame raises
}


@pytest.mark.parametrize("name", list(RENDERERS))
def test_a_renderer_that_cannot_start_ends_with_one_line(run_script, tmp_path, name):
    import ctypes.util

    if name == "osmesa" and ctypes.util.find_library("OSMesa"):
        pytest.skip("libOSMesa is installed: software rendering works here")
    env, flags = RENDERERS[name]
    proc = run_script(SCRIPT, flags + ["--run-name", name] * (flags is RENDERER_RUN), cwd=tmp_path, timeout=300,
                      env={"OMP_NUM_THREADS": "1", **env})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert lines[0].startswith(f"error: MuJoCo's renderer MUJOCO_GL='{env['MUJOCO_GL']}' cannot start ("), lines[0]
    assert "try MUJOCO_GL=egl" in lines[0] and "Traceback" not in proc.stdout + proc.stderr
    if name == "disable":  # the run was set up before its first frame failed
        assert "fast paths: torch.compile off" in proc.stdout and "No OpenGL rendering backend" in lines[0]


def _checksum(state):
    """Independent of the script: float64 sum of every float tensor of the trained networks in the checkpoint."""
    return sum(float(t.double().sum()) for key in ("encoder", "value", "policy")
               for t in state[key].values() if torch.is_floating_point(t))


KILL_FLAGS = TINY + ["--image-size", "36", "--buffer-size", "40", "--learning-starts", "40", "--total-timesteps",
                     "200", "--checkpoint-every", "80", "--metrics-every", "40", "--metrics-batch", "8",
                     "--eval-every", "0", "--run-name", "killed"]


def test_sigkill_after_checkpoint_then_resume_continues_the_run(tmp_path):
    """A real run (200 frames, checkpoints at 80 and 160, a 40-slot replay that wraps) is SIGKILLed after a
    checkpoint, then resumed to the end with --no-torch-deterministic (a flag that may differ on resume)."""
    run_dir = tmp_path / "runs" / "killed"
    out, ckpt, _ = kill_after_checkpoint(SCRIPT, KILL_FLAGS, tmp_path, "killed", 80)
    step, state = ckpt["global_step"], ckpt["state"]
    assert step in (80, 160) and f"checkpoint: step {step}," in out
    assert ckpt["format"] == harness.CHECKPOINT_FORMAT and ckpt["replay"]["layout"]["capacity"] == 40
    replay = state["replay"]
    assert replay["pos"] > 40 and replay["priority"].shape == (40,) and replay["valid"].dtype == torch.bool
    assert replay["max_priority"] >= 1.0 and int(replay["valid"].sum()) > 0
    assert state["training_steps"] == (step - 40) // 2 + 1 and state["scales"][0] > 0
    assert state["probe_batch"][0].shape == (8, 9, 36, 36)
    assert sorted(ckpt["replay"]["files"].values()) == sorted(p.name for p in (run_dir / "replay").iterdir())

    proc, checksum, s = resume_after_kill(SCRIPT, KILL_FLAGS + ["--no-torch-deterministic"], tmp_path, "killed", ckpt)
    assert checksum == pytest.approx(_checksum(state), rel=1e-12, abs=1e-9)  # restored == checkpointed
    assert json.loads((run_dir / "finished").read_text())["global_step"] == 200
    assert not (run_dir / "checkpoint.pt").exists() and not (run_dir / "replay").exists()
    assert steps_of(s, "charts/SPS") == list(range(40, 201, 40))  # no gap, no duplicate at the resume point
    assert steps_of(s, "losses/value_loss") == list(range(40, 201, 40))
    assert steps_of(s, "representation/zs/srank") == list(range(40, 201, 40))
    assert [v for _, v in s["charts/training_steps"]] == [1, 21, 41, 61, 81]  # the update count went on


def test_non_finite_training_stops_with_last_good_state(run_script, tmp_path):
    """An absurd value learning rate blows the value net up in its first updates: the check at the first log step
    stops the run and writes the last good state (from before learning)."""
    proc = run_script(SCRIPT, TINY + ["--image-size", "36", "--buffer-size", "40", "--learning-starts", "20",
                                      "--total-timesteps", "120", "--value-lr", "1e30", "--eval-every", "0",
                                      "--metrics-every", "0", "--run-name", "nf"],
                      cwd=tmp_path, timeout=300, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: non-finite "), proc.stderr[-3000:]
    assert "last good state (step 0) written to runs/nf/checkpoint_last_good.pt" in lines[0]
    good = torch.load(tmp_path / "runs" / "nf" / "checkpoint_last_good.pt", map_location="cpu", weights_only=False)
    assert all(bool(torch.isfinite(t).all()) for key in ("encoder", "value", "policy")
               for t in good["state"][key].values())


def test_compiled_losses_trace_and_match_eager(monkeypatch, capsys):
    """--compile: dynamo traces the encoder, value and policy losses without falling back (the eager backend: the
    inductor build takes minutes on this CPU; the GPU run checks it), and one encoder + one RL update give the same
    parameters as eager."""
    args = tiny_args()
    results = []
    for compile_losses in (False, True):
        torch._dynamo.reset()
        if compile_losses:
            monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
        torch.manual_seed(0)
        nets = networks(args, hr=("zs",))
        opts = [torch.optim.AdamW(nets[k].parameters(), lr=1e-3) for k in ("encoder", "value", "policy")]
        two_hot = mrq.TwoHot(args.bin_lower, args.bin_upper, args.num_bins)
        enc_step, rl_step = mrq.make_train_step(nets["encoder"], nets["encoder_target"], nets["value"],
                                                nets["value_target"], nets["policy"], nets["policy_target"], *opts,
                                                two_hot, args, compile_losses)
        gen = torch.Generator().manual_seed(1)
        obs = torch.randint(0, 256, (6, 4, 9, 36, 36), dtype=torch.uint8, generator=gen)
        acts, rews = torch.rand(6, 3, 2, generator=gen) * 2 - 1, torch.rand(6, 3, generator=gen)
        torch.manual_seed(2)
        s1 = enc_step(mrq.Batch(obs, acts, rews, torch.ones(6, 3), torch.arange(6)), torch.tensor(1.0))
        s2, pri = rl_step(mrq.Batch(obs[:, [0, 3]], acts, rews, torch.ones(6, 3), torch.arange(6)),
                          torch.tensor([0.5, 1.0]))
        results.append((s1, s2, pri, [p.detach().clone() for k in ("encoder", "value", "policy")
                                      for p in nets[k].parameters()]))
    assert "warning: torch.compile" not in capsys.readouterr().err
    (a1, a2, ap, aw), (b1, b2, bp, bw) = results
    assert torch.allclose(a1, b1, rtol=1e-4) and torch.allclose(a2, b2, rtol=1e-4) and torch.allclose(ap, bp)
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(aw, bw))
