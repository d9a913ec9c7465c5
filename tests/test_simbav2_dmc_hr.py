"""Tests of simbav2_dmc_hr.py: HyperDense re-projection, the C51 projection, reward scaling and observation
normalisation against hand/numpy references (the projection also against hand-worked targets and C51's per-atom loop),
the ops of the update and of acting against those torch cannot make deterministic on CUDA, one update against an
independent slow formulation, HR's branches and parameter arithmetic (HR and widen add the same weights), the
environment wrapper, input validation, no renderer needed (--help, gymnasium MuJoCo and the smoke runs under an EGL that
cannot start), a smoke run of the real script on a dm_control state task (every tag read back), and kill/resume through
the shared helper.

Everything is tiny (widths 8-16, batches 16-32, a few hundred frames of cartpole): the file runs in well under two
minutes on the 2-core CPU box."""
import concurrent.futures
import copy
import dataclasses
import functools
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from torch.utils._python_dispatch import TorchDispatchMode

import harness
from conftest import (REPO, check_documented_tags, kill_after_checkpoint, probe_reproduces, read_scalars,
                      resume_after_kill, run_script, steps_of)

import simbav2_dmc_hr as sv2  # noqa: E402 - imports dm_control with no renderer (state tasks)

SCRIPT = "simbav2_dmc_hr.py"
OBS, ACT = 7, 3


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: one intra-op thread


def tiny_args(**kw) -> sv2.Args:
    base = dict(critic_hidden_dim=16, actor_hidden_dim=8, batch_size=16, gamma=0.99, cdq="off", num_bins=11)
    return sv2.Args(**{**base, **kw})


def tiny_agent(lr=1e-3, **kw):
    args = tiny_args(**kw)
    torch.manual_seed(0)
    actor, critic = sv2.Actor(OBS, ACT, args), sv2.Critic(OBS, ACT, args)
    target = copy.deepcopy(critic).requires_grad_(False)
    log_alpha = torch.tensor(math.log(0.01), requires_grad=True)
    opts = (torch.optim.Adam(actor.parameters(), lr), torch.optim.Adam(critic.parameters(), lr),
            torch.optim.Adam([log_alpha], lr))
    return dict(args=args, actor=actor, critic=critic, target=target, log_alpha=log_alpha, opts=opts)


def a_batch(seed=0, n=16, terminated=False):
    g = torch.Generator().manual_seed(seed)
    term = (torch.rand(n, generator=g) < 0.5).float() if terminated else torch.zeros(n)
    return (torch.randn(n, OBS, generator=g) * 3 + 1, torch.rand(n, ACT, generator=g) * 2 - 1,
            torch.randn(n, generator=g), term, torch.randn(n, OBS, generator=g) * 3 + 1)


AFFINE = torch.stack([torch.full((OBS,), 1.0), torch.full((OBS,), 1 / 3)])  # mean, 1/std


def script_step(agent, batch, scale=0.5):
    step = sv2.make_train_step(agent["actor"], agent["critic"], agent["target"], agent["log_alpha"], *agent["opts"],
                               agent["args"], -0.5 * ACT)
    return step(*batch, AFFINE, torch.tensor(scale))


# ---------------------------------------------------------------------------------------------------------------
# HyperDense, Scaler


def test_hyperdense_rows_are_unit_norm_after_init_and_after_every_optimizer_step():
    agent = tiny_agent(lr=0.1, hr=True)  # a large step moves the rows far off the sphere before the re-projection
    before = [w.detach().clone() for w in sv2.hyper_weights(agent["critic"])]
    for w in sv2.hyper_weights(agent["actor"]) + sv2.hyper_weights(agent["critic"]):
        torch.testing.assert_close(w.norm(dim=1), torch.ones(w.shape[0]), rtol=0, atol=1e-6)
    for i in range(2):
        script_step(agent, a_batch(i))
        for net in ("actor", "critic"):
            for w in sv2.hyper_weights(agent[net]):
                torch.testing.assert_close(w.norm(dim=1), torch.ones(w.shape[0]), rtol=0, atol=1e-6)
    assert all(not torch.equal(b, w) for b, w in zip(before, sv2.hyper_weights(agent["critic"])))
    # the target is a Polyak average of unit rows, not re-projected: its rows are slightly shorter
    norms = torch.cat([w.norm(dim=1) for w in sv2.hyper_weights(agent["target"])])
    assert (norms <= 1 + 1e-6).all() and (norms < 1 - 1e-7).any()


def test_scaler_starts_at_init_and_steps_at_lr_times_init_over_scale():
    sc = sv2.Scaler(4, init=0.5, scale=0.1)
    x = torch.ones(3, 4)
    torch.testing.assert_close(sc(x), torch.full((3, 4), 0.5))
    opt = torch.optim.Adam(sc.parameters(), lr=1e-3)
    sc(x).sum().backward()
    opt.step()  # Adam's first step moves the parameter by lr: the gain by lr * init / scale
    torch.testing.assert_close(sc.gain(), torch.full((4,), 0.5 - 1e-3 * 5), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# C51 projection, reward scaling, observation normalisation


def slow_projection(probs, atoms, vmin, vmax):
    """Bellemare et al. (2017) eq. 7 written out: mass at support point z_k = sum_j p_j [1 - |clip(t_j) - z_k| /
    dz]_0^1, one (sample, support point, atom) at a time."""
    n = probs.shape[1]
    z = np.linspace(vmin, vmax, n)
    dz = (vmax - vmin) / (n - 1)
    out = np.zeros(probs.shape)
    for i in range(probs.shape[0]):
        for k in range(n):
            for j in range(n):
                t = min(max(float(atoms[i, j]), vmin), vmax)
                out[i, k] += float(probs[i, j]) * min(max(1.0 - abs(t - z[k]) / dz, 0.0), 1.0)
    return out


@pytest.mark.parametrize("case", range(6))
def test_c51_projection_matches_the_slow_reference(case):
    g = torch.Generator().manual_seed(case)
    n, vmin, vmax, b = (11, -5.0, 5.0, 5) if case % 2 else (101, -5.0, 5.0, 3)
    probs = torch.softmax(torch.randn(b, n, generator=g, dtype=torch.float64) * 2, dim=1)
    support = torch.linspace(vmin, vmax, n, dtype=torch.float64)
    r, gamma = torch.randn(b, 1, generator=g, dtype=torch.float64) * 3, [0.99, 1.0, 0.5][case % 3]
    if case in (1, 4):  # shifts by whole bins: every atom lands exactly on a support point (or is clipped)
        r = torch.randint(-3, 4, (b, 1), generator=g).double() * (vmax - vmin) / (n - 1)
        gamma = 1.0
    atoms = r + gamma * support  # some beyond the support: clipped
    got = sv2.c51_project(probs, atoms.clamp(vmin, vmax), vmin, vmax)
    np.testing.assert_allclose(got.numpy(), slow_projection(probs.numpy(), atoms.numpy(), vmin, vmax), atol=1e-9)
    torch.testing.assert_close(got.sum(1), torch.ones(b, dtype=torch.float64))
    # away from the clipping the projection keeps the mean
    inside = (atoms.abs() < vmax - 1e-9).all(1)
    torch.testing.assert_close((got * support).sum(1)[inside], (probs * atoms).sum(1)[inside])


def per_atom_projection(probs, atoms, vmin, vmax):
    """C51's Algorithm 1 (Bellemare et al. 2017), one atom at a time: b = (clip(t) - vmin) / dz, its mass split
    between floor(b) and ceil(b) in proportion to closeness, all of it to b when b is a support point."""
    n = len(probs)
    dz = (vmax - vmin) / (n - 1)
    out = [0.0] * n
    for p, t in zip(probs, atoms):
        b = (min(max(t, vmin), vmax) - vmin) / dz
        lo, hi = math.floor(b), math.ceil(b)
        if lo == hi:
            out[lo] += p
        else:
            out[lo] += p * (hi - b)
            out[hi] += p * (b - lo)
    return out


# support [-2, -1, 0, 1, 2] (dz = 1), probs p = [0.1, 0.2, 0.3, 0.15, 0.25]; the targets worked out by hand
HAND_CASES = [
    # on bins (-2, 1, 2) and two atoms colliding half-way between bins -1 and 0: 0.1 + 0.15 to each
    ([-2.0, -0.5, -0.5, 1.0, 2.0], [0.1, 0.25, 0.25, 0.15, 0.25]),
    # a terminal transition: every atom at r = 0.25, three quarters of all mass to z = 0, a quarter to z = 1
    ([0.25] * 5, [0.0, 0.0, 0.75, 0.25, 0.0]),
    # colliding on bins: z = 0 takes p0 + p1 + p2, z = -1 takes p3 + p4
    ([0.0, 0.0, 0.0, -1.0, -1.0], [0.0, 0.4, 0.6, 0.0, 0.0]),
    # beyond the support (clipped by the caller): all at the edges
    ([-2.0, -2.0, 2.0, 2.0, 2.0], [0.3, 0.0, 0.0, 0.0, 0.7]),
    # the support shifted by 0.75 with gamma 0.5: atoms -0.25, 0.25, 0.75, 1.25, 1.75
    ([-0.25, 0.25, 0.75, 1.25, 1.75], [0.0, 0.025, 0.075 + 0.15 + 0.075, 0.05 + 0.225 + 0.1125 + 0.0625,
                                       0.0375 + 0.1875]),
]


@pytest.mark.parametrize("atoms, want", HAND_CASES)
def test_c51_projection_matches_hand_worked_targets_and_the_per_atom_loop(atoms, want):
    probs = [0.1, 0.2, 0.3, 0.15, 0.25]
    assert per_atom_projection(probs, atoms, -2.0, 2.0) == pytest.approx(want, abs=1e-12)
    for dtype in (torch.float32, torch.float64):  # float32 is what training uses
        got = sv2.c51_project(torch.tensor([probs], dtype=dtype), torch.tensor([atoms], dtype=dtype), -2.0, 2.0)
        np.testing.assert_allclose(got[0].numpy(), want, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-12)


def test_c51_projection_matches_the_per_atom_loop_on_a_batch():
    """Rows of three kinds: the support shifted by whole bins (gamma 1: every atom on a bin, colliding where clipped),
    terminal (gamma 0: all atoms at r, one or two bins), and a random shift and gamma."""
    g = torch.Generator().manual_seed(0)
    rows, n = 60, 21  # dz = 0.5 on [-5, 5]
    p = torch.softmax(torch.randn(rows, n, generator=g, dtype=torch.float64) * 2, 1)
    z = torch.linspace(-5, 5, n, dtype=torch.float64)
    kind = torch.arange(rows)[:, None] % 3
    r = torch.where(kind == 0, torch.randint(-25, 26, (rows, 1), generator=g) * 0.5,
                    torch.randn(rows, 1, generator=g, dtype=torch.float64) * 4)
    gamma = torch.where(kind == 0, 1.0, torch.where(kind == 1, 0.0, torch.rand(rows, 1, generator=g,
                                                                                dtype=torch.float64)))
    t = (r + gamma * z).clamp(-5, 5)
    got = sv2.c51_project(p, t, -5.0, 5.0)
    assert ((got[1::3] > 0).sum(1) <= 2).all() and ((got[0::3] > 0).sum(1) < n).any()  # the kinds are what they say
    for i in range(rows):
        np.testing.assert_allclose(got[i].numpy(), per_atom_projection(p[i].tolist(), t[i].tolist(), -5.0, 5.0),
                                   rtol=0, atol=1e-12)


# ops that torch.use_deterministic_algorithms(True) (--torch-deterministic on CUDA) cannot make deterministic: they
# raise, or with warn_only stay nondeterministic (torch.use_deterministic_algorithms.__doc__, the "throw" list)
CUDA_NONDETERMINISTIC = ("nll_loss", "cumsum", "histc", "bincount", "median", "nanmedian", "put", "ctc_loss",
                         "grid_sampler", "embedding_bag", "max_unpool", "reflection_pad", "upsample",
                         "adaptive_avg_pool", "adaptive_max_pool", "fractional_max_pool", "avg_pool3d",
                         "scatter_reduce")


class OpRecorder(TorchDispatchMode):
    """Every aten op that runs (forward and backward), by name."""

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.overloadpacket.__name__.strip("_"))  # scatter_add_ -> scatter_add
        return func(*args, **(kwargs or {}))


def flagged(ops) -> set:
    return {op for op in ops if op.startswith(CUDA_NONDETERMINISTIC)}


@pytest.mark.parametrize("flags", [dict(), dict(cdq="on", hr=True)])
def test_update_and_acting_use_only_ops_deterministic_on_cuda(flags):
    """The update (C51 projection included), acting and the probe batch's normalisation run under
    torch.use_deterministic_algorithms(True) and call none of the ops it cannot make deterministic on CUDA; the
    projection's scatter_add_ is one it can. The recorder itself is checked on two ops it must flag."""
    agent = tiny_agent(**flags)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with OpRecorder() as rec:
            script_step(agent, a_batch(0, terminated=True))
            obs = (a_batch(1)[0] - AFFINE[0]) * AFFINE[1]
            sv2.make_act(agent["actor"])(obs[:1])
            sv2.make_act(agent["actor"], deterministic=True)(obs[:1])
        with OpRecorder() as bad:
            logits = torch.randn(4, 3, requires_grad=True)
            torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 0])).backward()  # class-index targets
            torch.randn(5).cumsum(0)
    finally:
        torch.use_deterministic_algorithms(was)
    assert {"scatter_add", "mm", "log_softmax_backward_data"} <= rec.ops, sorted(rec.ops)
    assert flagged(rec.ops) == set(), sorted(rec.ops)
    assert {"nll_loss_forward", "cumsum"} <= flagged(bad.ops)

    rewards, dones = [1.0, 2.0, 3.0, 4.0, 5.0], [False, False, True, False, False]
    # G = gamma (1 - done) G + r with the transition's own done (official RewardNormalizer), gamma 0.9:
    G = [1.0, 0.9 * 1.0 + 2.0, 3.0, 0.9 * 3.0 + 4.0, 0.9 * (0.9 * 3.0 + 4.0) + 5.0]
    # running variance from mean 0, variance 1 with weight 1e-4 (gymnasium's RunningMeanStd): the pooled variance
    c0, n = 1e-4, len(G)
    mean = sum(G) / (n + c0)
    var = (c0 * 1.0 + c0 * mean ** 2 + sum((g - mean) ** 2 for g in G)) / (n + c0)
    for g_max in (5.0, 1.0):  # the variance binds at 5, max|G| / g_max = 10.03 at 1
        rs = sv2.RewardScaler(0.9, g_max)
        for r, d in zip(rewards, dones):
            rs.update(r, d)
        assert rs.G == pytest.approx(G[-1]) and rs.G_abs_max == pytest.approx(max(G))
        want = 1.0 / max(math.sqrt(var + 1e-8), max(G) / g_max)
        assert rs.scale() == pytest.approx(want, rel=1e-9)
    assert math.sqrt(var) > max(G) / 5.0 and max(G) / 1.0 > math.sqrt(var)  # both branches were exercised


def test_observation_normaliser_matches_numpy_mean_and_var():
    x = np.random.default_rng(0).normal([3.0, -2.0, 0.0], [2.0, 0.5, 10.0], size=(300, 3))
    norm = sv2.ObsNormalizer(3)
    for i in range(0, 290):  # one observation per environment step, then a batch of ten
        norm.update(x[i:i + 1])
    norm.update(x[290:])
    np.testing.assert_allclose(norm.mean, x.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(norm.var, x.var(0), rtol=1e-5)  # population variance (ddof 0)
    assert norm.count == pytest.approx(300 + 1e-4)
    want = (x[:5] - x.mean(0)) / np.sqrt(x.var(0) + 1e-8)
    np.testing.assert_allclose(norm.normalize(x[:5]), want, rtol=1e-4, atol=1e-5)
    affine = norm.affine()
    np.testing.assert_allclose((x[:5] - affine[0]) * affine[1], want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# One update against a slow, independent formulation


def reference_update(ag, batch, scale, target_entropy):
    """SimbaV2's update in the official order, written plainly: actor step against the current critic, temperature
    step, critic step with the NEW actor and temperature (C51 by the slow projection), row re-projection after each
    network step, Polyak average last. Noise is drawn in the same order as the script (actor's batch, then next)."""
    args, actor, critic, target, log_alpha = ag["args"], ag["actor"], ag["critic"], ag["target"], ag["log_alpha"]
    actor_opt, critic_opt, alpha_opt = ag["opts"]
    obs, actions, rewards, term, next_obs = batch
    obs, next_obs = (obs - AFFINE[0]) * AFFINE[1], (next_obs - AFFINE[0]) * AFFINE[1]
    rewards = rewards * scale
    z = torch.linspace(-args.g_max, args.g_max, args.num_bins)

    def policy(o):
        h = actor.trunk(o)
        mean = actor.mean(h)
        log_std = -10.0 + 0.5 * 12.0 * (1.0 + torch.tanh(actor.log_std(h)))
        u = mean + log_std.exp() * torch.randn_like(mean)
        logp = torch.distributions.Normal(mean, log_std.exp()).log_prob(u).sum(1)
        return torch.tanh(u), logp - torch.log(1.0 - torch.tanh(u) ** 2).sum(1)

    def qs(net, o, a):
        return [torch.softmax(q(o, a), 1) for q in net.qs]  # each (B, bins)

    alpha = log_alpha.exp().item()
    a, logp = policy(obs)
    q = torch.stack([(p * z).sum(1) for p in qs(critic, obs, a)]).min(0).values
    actor_opt.zero_grad()
    ((alpha * logp - q).mean()).backward()
    actor_opt.step()
    with torch.no_grad():
        for w in sv2.hyper_weights(actor):
            w.copy_(w / w.norm(dim=1, keepdim=True))
    entropy = -logp.detach().mean()
    alpha_opt.zero_grad()
    (log_alpha.exp() * (entropy - target_entropy)).backward()
    alpha_opt.step()
    alpha = log_alpha.exp().item()
    with torch.no_grad():
        na, nlogp = policy(next_obs)
        tps = qs(target, next_obs, na)
        target_p = torch.zeros(obs.shape[0], args.num_bins)
        for i in range(obs.shape[0]):  # the critic whose expected value is lower, sample by sample
            k = min(range(len(tps)), key=lambda c: float((tps[c][i] * z).sum()))
            atoms = rewards[i] + args.gamma * (1 - term[i]) * (z - alpha * nlogp[i])
            target_p[i] = torch.tensor(slow_projection(tps[k][i:i + 1].numpy(), atoms[None].numpy(), -args.g_max,
                                                       args.g_max)[0])
    loss = sum(-(target_p * torch.log_softmax(q(obs, actions), 1)).sum(1).mean() for q in critic.qs)
    critic_opt.zero_grad()
    loss.backward()
    critic_opt.step()
    with torch.no_grad():
        for w in sv2.hyper_weights(critic):
            w.copy_(w / w.norm(dim=1, keepdim=True))
        for tp, p in zip(target.parameters(), critic.parameters()):
            tp.copy_((1 - args.tau) * tp + args.tau * p)


@pytest.mark.parametrize("flags", [dict(), dict(cdq="on", hr=True, hr_scaler="shared")])
def test_update_matches_the_slow_reference(flags):
    ref, new = tiny_agent(**flags), tiny_agent(**flags)
    for i in range(2):
        batch = a_batch(i, terminated=True)
        torch.manual_seed(10 + i)
        reference_update(ref, batch, 0.5, -0.5 * ACT)
        torch.manual_seed(10 + i)
        script_step(new, batch, 0.5)
    for key in ("actor", "critic", "target"):
        for (name, p), q in zip(ref[key].named_parameters(), new[key].parameters()):
            torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=f"{key}.{name}")
    torch.testing.assert_close(new["log_alpha"], ref["log_alpha"])


def test_compiled_losses_match_eager(monkeypatch):
    """The --compile path (torch.compile of the actor and critic losses) gives the eager update. Traced by dynamo and
    AOT autograd (backend aot_eager): inductor's CPU code generation alone takes ~100 s on the CI box, so its numerics
    are left to the GPU check. strict: a failure to compile fails the test instead of falling back to eager."""
    monkeypatch.setattr(sv2.harness, "compiled", functools.partial(harness.compiled, strict=True, backend="aot_eager"))
    torch._dynamo.reset()
    eager, fast = tiny_agent(cdq="on", hr=True), tiny_agent(cdq="on", hr=True)
    steps = [sv2.make_train_step(ag["actor"], ag["critic"], ag["target"], ag["log_alpha"], *ag["opts"], ag["args"],
                                 -1.5, compile_loss=c) for ag, c in ((eager, False), (fast, True))]
    for i in range(2):
        batch = a_batch(i, terminated=True)
        torch.manual_seed(i)
        want = steps[0](*batch, AFFINE, torch.tensor(0.5))
        torch.manual_seed(i)
        torch.testing.assert_close(steps[1](*batch, AFFINE, torch.tensor(0.5)), want, rtol=1e-5, atol=1e-6)
    for p, q in zip(fast["critic"].parameters(), eager["critic"].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_linear_lr_is_optax_linear_schedule():
    assert sv2.linear_lr(0, 1000, 1e-4, 5e-5) == 1e-4
    assert sv2.linear_lr(500, 1000, 1e-4, 5e-5) == pytest.approx(7.5e-5)
    assert sv2.linear_lr(1000, 1000, 1e-4, 5e-5) == sv2.linear_lr(5000, 1000, 1e-4, 5e-5) == pytest.approx(5e-5)


# ---------------------------------------------------------------------------------------------------------------
# HR and widen: branches and parameter arithmetic


def n_params(*nets):
    return sum(p.numel() for n in nets for p in n.parameters())


def n_weights(*nets):
    return sum(w.numel() for n in nets for w in sv2.hyper_weights(n))


@pytest.mark.parametrize("networks", ["both", "critic"])
@pytest.mark.parametrize("scaler", ["own", "shared"])
def test_hr_branches_and_the_widen_adds_exactly_hrs_weights(networks, scaler):
    built = {}
    for name, flags in (("base", {}), ("hr", {"hr": True}), ("widen", {"widen": True})):
        args = tiny_args(hr_networks=networks, hr_scaler=scaler, critic_num_blocks=2, **flags)
        built[name] = (sv2.Actor(OBS, ACT, args), sv2.Critic(OBS, ACT, args))
    hc, ha = 16, 8
    changed = [(hc, 2)] + ([(ha, 1)] if networks == "both" else [])  # (width, blocks) whose blocks change
    actor, critic = built["hr"]
    for block in critic.qs[0].trunk.blocks:
        assert len(block.hidden.linears) == 2 and len(block.hidden.scalers) == (2 if scaler == "own" else 1)
        assert block.hidden.linears[0].weight.shape == (4 * hc, hc)
    assert len(actor.trunk.blocks[0].hidden.linears) == (2 if networks == "both" else 1)
    assert sv2.Critic(OBS, ACT, tiny_args(hr=True, cdq="on")).qs[1].trunk.blocks[0].hidden.linears.__len__() == 2
    assert built["widen"][1].qs[0].trunk.blocks[0].hidden.linears[0].weight.shape == (6 * hc, hc)
    # per changed block: HR adds a second W1 (4h x h); the widen adds 2h x h to W1 and h x 2h to W2: the same
    added = sum(4 * h * h * blocks for h, blocks in changed)
    assert n_weights(*built["hr"]) - n_weights(*built["base"]) == added
    assert n_weights(*built["widen"]) - n_weights(*built["base"]) == added
    # Scaler entries: HR's own second Scaler adds 4h per block (shared: 0), the widen's wider Scaler 2h
    assert n_params(*built["hr"]) - n_params(*built["base"]) == added + sum(
        (4 * h if scaler == "own" else 0) * b for h, b in changed)
    assert n_params(*built["widen"]) - n_params(*built["base"]) == added + sum(2 * h * b for h, b in changed)
    counts = sv2.parameter_counts(OBS, ACT, tiny_args(hr_networks=networks, hr_scaler=scaler, critic_num_blocks=2))
    assert counts == {k: (n_params(*v), n_weights(*v)) for k, v in zip(("baseline", "hr", "widen"), built.values())}


def test_official_sizes_give_the_published_parameter_count():
    """SimbaV2's critic at obs 67 / act 21 (humanoid) has 4.56M parameters; HR on its blocks adds 2 x 4 x 512^2."""
    args = sv2.Args(gamma=0.99, cdq="off")
    with torch.device("meta"):
        critic = sv2.Critic(67, 21, args)
        hr = sv2.Critic(67, 21, dataclasses.replace(args, hr=True))
    assert n_params(critic) == 4_559_973
    assert n_weights(hr) - n_weights(critic) == 2 * 4 * 512 ** 2 == 2_097_152


# ---------------------------------------------------------------------------------------------------------------
# Environment and input validation


def test_dm_control_state_env_sizes_repeat_and_time_limit():
    env = sv2.StateEnv("humanoid-run", 0, action_repeat=2, max_frames=10)
    assert (env.obs_dim, env.action_dim) == (67, 21)
    steps = []
    while True:
        obs, r, term, trunc, frames = env.step(np.zeros(21))
        steps.append(frames)
        assert obs.shape == (67,) and obs.dtype == np.float32 and not term
        if trunc:
            break
    assert steps == [2] * 5 and env.frames == 10  # the 10-frame limit counted inside the repeat
    dog = sv2.StateEnv("dog-trot", 0, 2, 1000)
    assert (dog.obs_dim, dog.action_dim) == (223, 38)


def test_resolved_defaults_follow_the_official_configs():
    dmc = sv2.resolve_defaults(sv2.Args(env_id="dog-run"))
    assert (dmc.action_repeat, dmc.learning_starts, dmc.updates_per_step, dmc.cdq) == (2, 10_000, 2, "off")
    assert dmc.gamma == pytest.approx(0.99) and dmc.cudagraphs == "off"
    mujoco = sv2.resolve_defaults(sv2.Args(env_id="Humanoid-v5"))
    assert (mujoco.action_repeat, mujoco.learning_starts, mujoco.updates_per_step, mujoco.cdq) == (1, 5000, 1, "on")
    assert mujoco.gamma == pytest.approx(0.995)


@pytest.mark.parametrize("argv, message", [
    (["--env-id", "humanoid-fly"], "--env-id 'humanoid-fly' is not a dm_control task"),
    (["--hr", "--widen"], "--hr and --widen are alternatives"),
    (["--hr", "--hr-branches", "1"], "--hr-branches must be >= 2 with --hr, got 1"),
    (["--cudagraphs", "on"], "--cudagraphs on: CUDA graphs are not implemented"),
    (["--tau", "0"], "--tau must be in (0, 1], got 0.0"),
    (["--buffer-size", "100", "--batch-size", "256"], "--batch-size 256 exceeds --buffer-size 100"),
    (["--buffer-size", "300", "--batch-size", "8"], "--metrics-batch 2048 exceeds --buffer-size 300"),
    (["--learning-rate", "nan"], "--learning-rate must be a finite number > 0, got nan"),
    (["--critic-num-blocks", "0"], "--critic-num-blocks must be >= 1, got 0"),
    (["--hr-scaler", "none"], "invalid choice 'none' for argument '--hr-scaler'"),
    (["--kde-scale", "log"], "invalid choice 'log' for argument '--kde-scale'"),
    (["--learning-starts", "-1"], "--learning-starts must be >= 0, got -1"),
    (["--num-bins", "1"], "--num-bins must be >= 2, got 1"),
    (["--g-max", "0"], "--g-max must be a finite number > 0, got 0.0"),
    (["--gamma", "1.5"], "--gamma must be in [0, 1], got 1.5"),
    (["--action-repeat", "0"], "--action-repeat must be >= 1, got 0"),
    (["--updates-per-step", "0"], "--updates-per-step must be >= 1, got 0"),
    (["--c-shift", "inf"], "--c-shift must be a finite number, got inf"),
    (["--capture-video"], "--capture-video is not supported by simbav2_dmc_hr.py: state tasks run without a renderer"),
])
def test_bad_input_is_one_line(argv, message):
    with pytest.raises(SystemExit) as e:
        sv2.validate(harness.cli(sv2.Args, argv))
    assert str(e.value.code).startswith("error: ") and message in str(e.value.code)


def test_gymnasium_mujoco_ids_run():
    """requirements.txt pins imageio, the one piece of gymnasium[mujoco] our pins lacked: Humanoid-v5 validates and
    steps (348-dim observation, 17 actions rescaled from [-1, 1], action repeat 1, an episode that can terminate)."""
    args = sv2.resolve_defaults(harness.cli(sv2.Args, ["--env-id", "Humanoid-v5"]))
    sv2.validate(args)
    env = sv2.make_env(args, seed=0)
    assert (env.obs_dim, env.action_dim, args.action_repeat) == (348, 17, 1)
    obs, reward, terminated, truncated, frames = env.step(np.zeros(17, np.float32))
    assert obs.shape == (348,) and frames == 1 and np.isfinite(reward)
    for _ in range(200):  # falls over: gymnasium MuJoCo episodes terminate, which is why --cdq auto turns on
        if env.step(np.ones(17, np.float32))[2]:
            break
    else:
        raise AssertionError("Humanoid-v5 did not terminate in 200 steps of full torque")


BROKEN_EGL = {"MUJOCO_GL": "egl", "__EGL_VENDOR_LIBRARY_FILENAMES": "/nonexistent.json"}  # EGL fails at import


def test_no_renderer_needed_help_and_gymnasium_mujoco_with_a_broken_egl(tmp_path):
    """State tasks never render: with an EGL that cannot start (a machine without one), --help works and a gymnasium
    MuJoCo task builds and steps (the smoke runs below train a dm_control task under the same environment)."""
    env = {"OMP_NUM_THREADS": "1", **BROKEN_EGL}
    proc = run_script(SCRIPT, ["--help"], cwd=tmp_path, timeout=120, env=env)
    assert proc.returncode == 0 and "--env-id" in proc.stdout and proc.stderr == "", proc.stderr[-3000:]
    # dm_control took no renderer (its backend: 'off'), and the user's MUJOCO_GL is left for child processes
    code = ("import os, numpy as np, harness, simbav2_dmc_hr as s, dm_control._render as r; "
            "assert r.BACKEND == 'off' and os.environ['MUJOCO_GL'] == 'egl'; "
            "a = s.resolve_defaults(harness.cli(s.Args, ['--env-id', 'Humanoid-v5'])); s.validate(a); "
            "e = s.make_env(a, 0); print(e.obs_dim, e.step(np.zeros(17, np.float32))[0].shape)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": REPO, **env})
    assert proc.returncode == 0 and proc.stdout.strip() == "348 (348,)", proc.stderr[-3000:]


# ---------------------------------------------------------------------------------------------------------------
# The real script

TINY = ["--env-id", "cartpole-swingup", "--critic-hidden-dim", "16", "--actor-hidden-dim", "8", "--batch-size", "16",
        "--max-episode-steps", "200", "--metrics-batch", "32", "--seed", "3"]
SMOKE = {  # name -> extra flags; 400 frames = 200 agent steps, updates from frame 200 (2 per agent step)
    # snapshots at 100 (before learning starts) and at every probe: test_probe_recomputes_the_inline_metrics
    "hr": ["--hr", "--snapshot-every", "100"],
    # the KDE test on the raw activations; snapshots at 200 and 400
    "widen_cdq": ["--widen", "--cdq", "on", "--hr-networks", "critic", "--kde-scale", "raw", "--snapshot-every", "200"],
}
SMOKE_COMMON = ["--total-timesteps", "400", "--learning-starts", "200", "--buffer-size", "1000", "--metrics-every",
                "100", "--log-every", "100", "--eval-every", "400", "--eval-episodes", "1", "--checkpoint-every", "0"]
LAYERS = ["critic/embedder", "critic/block1/hidden", "critic/block1/output", "critic/block2/hidden", "latent",
          "actor/embedder", "actor/block1/hidden", "actor/latent"]


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    def go(name):
        cwd = tmp_path_factory.mktemp(name)
        proc = run_script(SCRIPT, TINY + SMOKE_COMMON + SMOKE[name] + ["--run-name", name], cwd=cwd, timeout=300,
                          env={"OMP_NUM_THREADS": "1", **BROKEN_EGL})  # no renderer needed
        return name, (proc, cwd / "runs" / name)

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(go, SMOKE))


@pytest.mark.parametrize("name", list(SMOKE))
def test_smoke_run_logs_every_tag(smoke_runs, name):
    proc, run_dir = smoke_runs[name]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stderr.strip() == "", proc.stderr[-3000:]
    s = read_scalars(str(run_dir))
    check_documented_tags("simbav2_dmc_hr.py", s)  # the page's tag table, both ways
    tags = {"charts/SPS", "charts/learning_rate", "charts/reward_scale", "charts/episodic_return",
            "charts/episodic_length", "eval/episodic_return", "representation/hidden_bias",
            "representation/live_contribution", *sv2.STAT_NAMES}
    for layer in LAYERS:
        tags |= {f"representation/{layer}/{k}" for k in ("dormant_kde", "dormant_score", "srank", "max_score")}
        if layer.endswith("hidden"):
            tags |= {f"representation/{layer}/{k}" for k in ("saturated", "zombie")}
    assert set(s) == tags, (sorted(tags - set(s)), sorted(set(s) - tags))
    for tag, events in s.items():
        assert all(math.isfinite(v) for _, v in events), tag
    assert [step for step, _ in s["representation/latent/srank"]] == [200, 300, 400]
    assert [step for step, _ in s["losses/qf_loss"]] == [200, 300, 400]
    assert [step for step, _ in s["eval/episodic_return"]] == [400]
    assert [v for _, v in s["charts/episodic_length"]] == [200, 200]  # the --max-episode-steps limit, in frames
    assert all(0 < v <= 1e-4 for _, v in s["charts/learning_rate"])
    for layer in LAYERS:
        assert all(1 <= v <= 32 for _, v in s[f"representation/{layer}/srank"])  # at most the probe batch
    args = json.loads((run_dir / "args.json").read_text())
    assert args["action_repeat"] == 2 and args["gamma"] == pytest.approx(0.95)  # resolved: 200 frames / 2 / 5
    summary = json.loads((run_dir / "finished").read_text())
    assert summary["global_step"] == 400 and "physics" in summary["seconds"]
    out = proc.stdout
    assert "fast paths: torch.compile off, CUDA graphs off" in out and "parameter matching" in out
    if name == "hr":
        assert "(linears): ModuleList(\n" in out and "2 x HyperDense(in_features=16, out_features=64" in out
    else:
        assert args["cdq"] == "on" and "HyperDense(in_features=16, out_features=96" in out


def test_probe_recomputes_the_inline_metrics(smoke_runs, tmp_path):
    """scripts/probe.py on the smoke runs' snapshots (conftest.probe_reproduces): the inline values at the run's own
    thresholds (the probe batch saved raw, normalised with the statistics the snapshot holds: those of its moment,
    which change between probes), with --kde-scale rms and raw; the known answers at other thresholds."""
    proc, run_dir = smoke_runs["hr"]
    assert "snapshots: every 100 steps, about 4 x" in proc.stdout
    assert sorted(os.listdir(run_dir / "snapshots")) == ["probe.pt"] + [harness.snapshot_name(s)
                                                                        for s in (100, 200, 300, 400)]
    affine = {s: torch.load(run_dir / "snapshots" / harness.snapshot_name(s), weights_only=False)["extra"]["obs_affine"]
              for s in (100, 200, 300)}
    assert torch.equal(affine[100], torch.stack([torch.zeros(5), torch.ones(5)]))  # the identity until learning starts
    assert not torch.equal(affine[200], affine[300])
    got = probe_reproduces(run_dir, tmp_path / "hr", steps=[200, 300, 400])
    assert [s for s, _ in got["own"]["representation/latent/srank"]] == [100, 200, 300, 400]
    proc, run_dir = smoke_runs["widen_cdq"]
    probe_reproduces(run_dir, tmp_path / "widen", steps=[200, 400])


def _checksum(state):
    return sum(float(t.double().sum()) for key in ("actor", "critic", "target_critic")
               for t in state[key].values() if torch.is_floating_point(t))


KILL_FLAGS = TINY + ["--total-timesteps", "600", "--learning-starts", "100", "--buffer-size", "250",
                     "--metrics-every", "100", "--log-every", "100", "--eval-every", "0", "--checkpoint-every", "200",
                     "--hr", "--run-name", "killed"]


def test_sigkill_after_checkpoint_then_resume_continues_the_run(tmp_path):
    """A real run (600 frames, checkpoints at 200 and 400, a 250-slot replay that wraps) is SIGKILLed after a
    checkpoint and resumed to the end; the normalisers, update count and replay come back with it."""
    run_dir = tmp_path / "runs" / "killed"
    out, ckpt, _ = kill_after_checkpoint(SCRIPT, KILL_FLAGS, tmp_path, "killed", 200)
    step, state = ckpt["global_step"], ckpt["state"]
    assert step in (200, 400) and f"checkpoint: step {step}," in out
    # updates: 2 at every agent step from frame 100 (the 50th) on
    assert state["replay_pos"] == step // 2 and state["n_updates"] == step - 98 and state["probe_batch"] is not None
    assert state["obs_norm"]["count"] == pytest.approx(step // 2 + 1e-4)
    assert state["reward_scaler"]["G_abs_max"] > 0 and len(state["rng"]["generators"]) == 2
    proc, checksum, s = resume_after_kill(SCRIPT, KILL_FLAGS, tmp_path, "killed", ckpt)
    assert checksum == pytest.approx(_checksum(state), rel=1e-12, abs=1e-9)  # restored == checkpointed
    assert json.loads((run_dir / "finished").read_text())["global_step"] == 600
    assert not (run_dir / "checkpoint.pt").exists() and not (run_dir / "replay").exists()
    assert steps_of(s, "charts/SPS") == list(range(100, 601, 100))  # no gap, no duplicate at the resume point
    assert steps_of(s, "representation/latent/srank") == list(range(100, 601, 100))
    assert steps_of(s, "charts/learning_rate")[-1] == 600


def test_non_finite_training_stops_with_last_good_state(tmp_path):
    """An absurd learning rate blows the losses up in the first updates (step 100; deterministic at seed 3)."""
    flags = KILL_FLAGS[:-2] + ["--run-name", "nf", "--learning-rate", "1e30"]  # the killed run's, renamed
    proc = run_script(SCRIPT, flags, cwd=tmp_path, timeout=300, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: non-finite loss (losses/qf_loss"), proc.stderr[-3000:]
    assert "at step 100; last good state (step 0) written to runs/nf/checkpoint_last_good.pt" in lines[0]
    good = torch.load(tmp_path / "runs" / "nf" / "checkpoint_last_good.pt", map_location="cpu", weights_only=False)
    assert good["global_step"] == 0
    for key in ("actor", "critic", "target_critic"):
        assert all(bool(torch.isfinite(t).all()) for t in good["state"][key].values()), key
