"""common.py against independent computations and cases with known answers."""
import math
import time
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import gaussian_kde, trim_mean

import common

# ---------------------------------------------------------------------------------------------- effective rank


def _matrix_with_spectrum(sigma, n=200, seed=0):
    rng = np.random.default_rng(seed)
    d = len(sigma)
    u, _ = np.linalg.qr(rng.standard_normal((n, d)))
    v, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return torch.tensor(u @ np.diag(sigma) @ v.T)


@pytest.mark.parametrize(
    "sigma, delta, expected",
    [
        ([1.0] * 10, 0.01, 10),  # flat spectrum: need every direction
        ([5.0, 0, 0, 0, 0], 0.01, 1),  # rank one
        ([50.0, 49.0, 0.5, 0.5], 0.01, 2),  # 99/100 of the mass in two values: exactly (1 - delta)
        ([50.0, 48.0, 1.0, 1.0], 0.01, 3),  # 98/100 after two: one more needed
        ([4.0, 3.0, 2.0, 1.0], 0.5, 2),  # 7/10 >= 0.5 after two, 4/10 < 0.5 after one
    ],
)
def test_effective_rank_known_spectrum(sigma, delta, expected):
    x = _matrix_with_spectrum(sigma)
    assert common.effective_rank(x, delta) == expected
    assert common.effective_rank(x.numpy(), delta) == expected


def test_effective_rank_zero_conv_and_errors():
    assert common.effective_rank(torch.zeros(8, 4)) == 0
    conv = torch.randn(64, 6, 5, 5)
    assert common.effective_rank(conv) == common.effective_rank(conv.mean(dim=(2, 3)))
    with pytest.raises(ValueError, match="shape"):
        common.effective_rank(torch.zeros(3))
    with pytest.raises(ValueError, match="empty"):
        common.effective_rank(torch.zeros(0, 4))
    with pytest.raises(ValueError, match="NaN"):
        common.effective_rank(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))


# ---------------------------------------------------------------------------------------------- KDE dormancy


def _kde_reference_peak(values, noise, bw_factor):
    """Slow, obvious reference: scipy's Gaussian KDE on the same jittered values, evaluated on a fine grid."""
    v = values + noise
    kde = gaussian_kde(v, bw_method=bw_factor)
    h = v.std(ddof=1) * bw_factor
    grid = np.linspace(v.min() - 3 * h, v.max() + 3 * h, 40001)
    return kde(grid).max()


def _test_neurons(n=400, seed=0):
    rng = np.random.default_rng(seed)
    cols = {
        "constant": np.full(n, 0.3),
        "relu_dead": np.zeros(n),
        "saturated_high": np.clip(1.0 - np.abs(rng.normal(0, 1e-4, n)), -1, 1),  # tanh stuck at +1
        "saturated_low_with_outliers": np.where(rng.random(n) < 0.02, rng.uniform(-1, 1, n), -1.0),
        "uniform": rng.uniform(-1, 1, n),
        "normal_wide": rng.normal(0, 0.5, n),
        "bimodal_saturated": np.where(rng.random(n) < 0.5, -1.0, 1.0),
        "narrow_live": rng.normal(0.2, 0.03, n),  # spread ~0.03: density ~13 < 20, live
        "narrow_dormant": rng.normal(0.2, 0.005, n),  # spread ~0.005: density ~80 > 20, dormant
        "mostly_constant": np.where(rng.random(n) < 0.9, 0.5, rng.uniform(-1, 1, n)),
    }
    return list(cols), np.stack(list(cols.values()), axis=1)


def test_kde_matches_scipy_reference_per_neuron():
    names, acts = _test_neurons()
    n = acts.shape[0]
    noise_std = 1e-3
    gen = torch.Generator().manual_seed(7)
    peaks = common._kde_peak(torch.tensor(acts), noise_std, gen)
    # regenerate the same jitter for the reference
    gen = torch.Generator().manual_seed(7)
    noise = (torch.randn(acts.shape, generator=gen, dtype=torch.float64) * noise_std).numpy()
    for j, name in enumerate(names):
        ref = _kde_reference_peak(acts[:, j], noise[:, j], n ** -0.2)
        assert peaks[j].item() == pytest.approx(ref, rel=0.02), name


def test_kde_dormant_classification():
    names, acts = _test_neurons()
    mask = common.dormant_mask_kde(torch.tensor(acts), threshold=20.0, noise_std=1e-3,
                                   generator=torch.Generator().manual_seed(0))
    got = dict(zip(names, mask.tolist()))
    expected = {
        "constant": True, "relu_dead": True, "saturated_high": True,
        # a few outliers widen Scott's bandwidth (h ~ std), so a neuron stuck on 90-98% of inputs passes as live:
        # a property of the papers' test, kept as they define it
        "saturated_low_with_outliers": False,
        "uniform": False, "normal_wide": False, "bimodal_saturated": False, "narrow_live": False,
        "narrow_dormant": True, "mostly_constant": False,
    }
    assert got == expected
    frac = common.dormant_fraction_kde(torch.tensor(acts), generator=torch.Generator().manual_seed(0))
    assert frac == pytest.approx(sum(expected.values()) / len(expected))


def test_kde_noise_std_matters_and_conv_reduction():
    acts = torch.zeros(300, 3)
    # jitter wider than the threshold allows (1/(2.5*20) = 0.02) makes a dead neuron look live: documented limit
    assert not common.dormant_mask_kde(acts, noise_std=0.1).any()
    assert common.dormant_mask_kde(acts, noise_std=0.0).all()
    conv = torch.rand(50, 4, 3, 3)
    conv[:, 1] = 0.7
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert torch.equal(common.dormant_mask_kde(conv, generator=gen()),
                       common.dormant_mask_kde(conv.mean(dim=(2, 3)), generator=gen()))
    with pytest.raises(ValueError, match="at least 2 samples"):
        common.dormant_mask_kde(torch.ones(1, 4))
    with pytest.raises(ValueError, match="NaN"):
        common.dormant_fraction_kde(torch.tensor([[0.0], [float("nan")]]))


def test_kde_is_fast_enough():
    x = torch.tanh(torch.randn(1024, 512) * torch.linspace(0.01, 30, 512))
    common.dormant_mask_kde(x)
    best = min(_timed(lambda: common.dormant_mask_kde(x)) for _ in range(3))
    assert best < 0.5  # target 0.2 s on an idle 2-core box; slack for a loaded CI machine


def _timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# ---------------------------------------------------------------------------------------------- ReDo scores


def test_activation_scores_hand_computed():
    acts = torch.tensor([[1.0, 0.0, -2.0, 4.0], [3.0, 0.0, 2.0, -4.0]])
    # E|a| per neuron = [2, 0, 2, 4]; layer mean 2 -> scores [1, 0, 1, 2]
    assert torch.allclose(common.activation_scores(acts), torch.tensor([1.0, 0.0, 1.0, 2.0], dtype=torch.float64))
    assert common.dormant_fraction_score(acts, 0.1) == 0.25
    assert common.dormant_fraction_score(acts, 1.0) == 0.75  # s <= tau counts
    assert common.max_activation_score(acts) == 2.0
    assert torch.equal(common.activation_scores(torch.zeros(3, 5)), torch.zeros(5, dtype=torch.float64))


def test_activation_scores_conv_reduce_over_space():
    conv = torch.zeros(2, 3, 2, 2)
    conv[:, 0] = 1.0  # E|a| = 1
    conv[0, 2, 0, 0] = -8.0  # E|a| over 2 samples x 4 positions = 1
    conv[1, 1] = 0.5  # E|a| = 0.25
    expected = torch.tensor([1.0, 0.25, 1.0], dtype=torch.float64) / 0.75
    assert torch.allclose(common.activation_scores(conv), expected)
    assert common.max_activation_score(conv) == pytest.approx(4 / 3)


def test_saturation_fractions():
    pre = torch.tensor([[-1.0, 2.0, 0.0, 1.0], [-3.0, 1.0, -0.5, -1.0], [0.0, 5.0, -2.0, 2.0]])
    assert common.saturation_fractions(pre) == (0.5, 0.25)  # cols 0 and 2 never > 0; col 1 always > 0
    conv = torch.ones(2, 2, 2, 2)
    conv[:, 0] = -1.0
    conv[1, 1, 0, 0] = -1.0  # channel 1 switches off once: neither
    assert common.saturation_fractions(conv) == (0.5, 0.0)


def test_layer_metrics_keys_and_values():
    acts = torch.randn(256, 32).relu()
    acts[:, :4] = 0.0
    out = common.layer_metrics(acts, preacts=acts - 1e-6, generator=torch.Generator().manual_seed(0))
    assert set(out) == {"dormant_kde", "dormant_score", "srank", "max_score", "saturated", "zombie"}
    assert out["dormant_score"] == pytest.approx(4 / 32)
    assert out["saturated"] == pytest.approx(4 / 32)
    assert out["srank"] == common.effective_rank(acts)
    assert all(isinstance(v, float) for v in out.values())
    assert "saturated" not in common.layer_metrics(acts)


def test_head_contributions_by_hand():
    latent = torch.tensor([[1.0, 2.0, 0.0], [1.0, -2.0, 0.0]])
    head = torch.tensor([[3.0, 1.0, 9.0], [4.0, 0.0, 9.0]])
    dead, live = common.head_contributions(latent, head, torch.tensor([True, False, False]))
    assert dead == pytest.approx(5.0)  # neuron 0 outputs 1 -> contribution (3, 4) on every sample
    assert live == pytest.approx(2.0)  # neuron 1 -> (+-2, 0)
    with pytest.raises(ValueError, match="head_weight"):
        common.head_contributions(latent, head[:, :2], torch.tensor([True, False, False]))


# ---------------------------------------------------------------------------------------------- ReDo recycling


def test_redo_recycle_resets_exactly_the_masked_slices():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(2, 4, 3)
    conv_b = torch.nn.Conv2d(2, 4, 3)  # a second HR branch
    nxt = torch.nn.Linear(4 * 5 * 5, 6)  # conv map 4x5x5 flattened
    params = list(conv.parameters()) + list(conv_b.parameters()) + list(nxt.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    x = torch.randn(3, 2, 7, 7)
    nxt(torch.flatten(conv(x) * conv_b(x), 1)).sum().backward()
    opt.step()
    before = {id(p): p.detach().clone() for p in params}
    moments = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in params}
    mask = torch.tensor([False, True, False, True])
    n = common.redo_recycle_(mask, [(conv.weight, conv.bias), (conv_b.weight, conv_b.bias)], [nxt.weight], opt,
                             outgoing_group=25)
    assert n == 2
    out_cols = mask.repeat_interleave(25)
    for layer in (conv, conv_b):
        w0 = before[id(layer.weight)]
        assert torch.equal(layer.weight[~mask], w0[~mask])  # untouched
        assert not torch.isclose(layer.weight[mask], w0[mask]).any()  # fresh
        bound = 1 / math.sqrt(2 * 9)  # kaiming_uniform(a=sqrt 5) bound for fan_in 18
        assert layer.weight[mask].abs().max() <= bound
        assert torch.equal(layer.bias[mask], torch.zeros(2))
        assert torch.equal(layer.bias[~mask], before[id(layer.bias)][~mask])
        for p, m in ((layer.weight, mask), (layer.bias, mask)):
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(opt.state[p][key][m], torch.zeros_like(opt.state[p][key][m]))
                assert torch.equal(opt.state[p][key][~m], moments[id(p)][key][~m])
    assert torch.equal(nxt.weight[:, out_cols], torch.zeros(6, 50))
    assert torch.equal(nxt.weight[:, ~out_cols], before[id(nxt.weight)][:, ~out_cols])
    assert torch.equal(opt.state[nxt.weight]["exp_avg"][:, out_cols], torch.zeros(6, 50))
    assert torch.equal(opt.state[nxt.weight]["exp_avg"][:, ~out_cols], moments[id(nxt.weight)]["exp_avg"][:, ~out_cols])
    assert torch.equal(nxt.bias, before[id(nxt.bias)])  # the next layer's bias is not the neuron's


def test_redo_recycle_layernorm_and_errors():
    ln = torch.nn.LayerNorm(3)
    with torch.no_grad():
        ln.weight.fill_(2.0)
        ln.bias.fill_(0.5)
    common.redo_recycle_(torch.tensor([True, False, False]), [(ln.weight, ln.bias)], [])
    assert ln.weight.tolist() == [1.0, 2.0, 2.0] and ln.bias.tolist() == [0.0, 0.5, 0.5]
    assert common.redo_recycle_(torch.zeros(3, dtype=torch.bool), [(ln.weight, ln.bias)], []) == 0
    lin = torch.nn.Linear(5, 4)
    with pytest.raises(ValueError, match="dim 0"):
        common.redo_recycle_(torch.ones(3, dtype=torch.bool), [(lin.weight, lin.bias)], [])


# ---------------------------------------------------------------------------------------------- Atari scores


def test_atari_table_complete():
    assert len(common.ATARI_RANDOM_HUMAN) == 57
    assert len(common.ATARI_51) == 51
    assert "MontezumaRevenge" not in common.ATARI_51 and "Breakout" in common.ATARI_51
    for game, (rand, human) in common.ATARI_RANDOM_HUMAN.items():
        assert rand != human, game
    assert common.ATARI_RANDOM_HUMAN["Breakout"] == (1.7, 30.5)
    assert common.ATARI_RANDOM_HUMAN["Pong"] == (-20.7, 14.6)
    assert common.ATARI_RANDOM_HUMAN["BeamRider"] == (363.9, 16926.5)


@pytest.mark.parametrize("name", ["Breakout", "Breakout-v5", "BreakoutNoFrameskip-v4", "ALE/Breakout-v5", "breakout"])
def test_human_normalized_names(name):
    assert common.human_normalized(name, 30.5) == pytest.approx(1.0)
    assert common.human_normalized(name, 1.7) == pytest.approx(0.0)
    assert common.human_normalized(name, 16.1) == pytest.approx((16.1 - 1.7) / 28.8)


def test_human_normalized_by_hand():
    assert common.human_normalized("Pong-v5", 0.0) == pytest.approx(20.7 / 35.3)
    assert common.human_normalized("video_pinball", 17667.9) == pytest.approx(1.0)
    assert common.human_normalized("UpNDownNoFrameskip-v4", 533.4) == pytest.approx(0.0)
    np.testing.assert_allclose(common.human_normalized("Breakout", np.array([1.7, 30.5])), [0.0, 1.0])
    with pytest.raises(ValueError, match="unknown Atari game"):
        common.human_normalized("NotAGame-v5", 1.0)


def test_baseline_normalized():
    assert common.baseline_normalized(15.0, 10.0, 20.0) == 0.5
    np.testing.assert_allclose(common.baseline_normalized([10, 30], 10, 20), [0.0, 2.0])
    with pytest.raises(ValueError, match="hi > lo"):
        common.baseline_normalized(1.0, 2.0, 2.0)


# ---------------------------------------------------------------------------------------------- aggregation


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 8, 13, 40, 101])
def test_iqm_matches_scipy_trim_mean(size):
    x = np.random.default_rng(size).normal(size=size)
    assert common.iqm(x) == pytest.approx(trim_mean(x, 0.25))


def test_iqm_ragged_and_errors():
    assert common.iqm([np.array([1.0, 2.0]), np.array([3.0, 4.0, 100.0, -50.0])]) == pytest.approx(
        trim_mean([1, 2, 3, 4, 100, -50], 0.25))
    with pytest.raises(ValueError, match="non-empty"):
        common.iqm([])
    with pytest.raises(ValueError, match="NaN"):
        common.iqm([1.0, float("nan")])


def test_bootstrap_ci_stratified():
    rng = np.random.default_rng(0)
    scores = rng.normal(loc=[0.0, 1.0, 2.0], scale=0.1, size=(10, 3))  # 10 runs x 3 tasks
    point, lo, hi = common.bootstrap_ci(scores, np.mean, reps=500, seed=1)
    assert point == pytest.approx(scores.mean())
    assert lo < point < hi
    # stratified: each task keeps its own runs, so the mean of a resample stays near 1 (plain bootstrap would
    # mix tasks and give a far wider interval)
    assert hi - lo < 0.1
    assert common.bootstrap_ci(scores, np.mean, reps=500, seed=1) == (point, lo, hi)  # seeded
    # identical runs: no spread, interval collapses to the point
    assert common.bootstrap_ci(np.ones((5, 2)), common.iqm, reps=50) == (1.0, 1.0, 1.0)
    # ragged tasks: statistic receives the list of per-task arrays
    point, lo, hi = common.bootstrap_ci([np.array([0.0, 1.0]), np.array([5.0])],
                                        lambda ts: np.mean([t.mean() for t in ts]), reps=200)
    assert point == 2.75 and 2.5 <= lo <= hi <= 3.0
    with pytest.raises(ValueError, match="at least one run"):
        common.bootstrap_ci([np.array([])])


def test_bootstrap_ci_matches_slow_reference():
    scores = np.random.default_rng(3).normal(size=(4, 3))
    point, lo, hi = common.bootstrap_ci(scores, common.iqm, reps=300, alpha=0.1, seed=5)
    rng = np.random.default_rng(5)
    stats = []
    for _ in range(300):
        cols = []
        for t in range(3):
            idx = rng.integers(0, 4, 4)
            cols.append(scores[idx, t])
        stats.append(trim_mean(np.stack(cols, axis=1).ravel(), 0.25))
    assert point == pytest.approx(trim_mean(scores.ravel(), 0.25))
    assert (lo, hi) == pytest.approx(tuple(np.percentile(stats, [5, 95])))


def test_iqm_and_bootstrap_ci_agree_with_rliable():
    """common.iqm / bootstrap_ci stay public (CONVENTIONS) beside analyze.py's rliable: same point estimate as
    rliable's aggregate_iqm on the same (runs x tasks) matrix, and a stratified-bootstrap interval that agrees with
    rliable's (different random streams, so within a small fraction of the interval's width)."""
    from rliable import library as rly, metrics
    scores = np.random.default_rng(11).normal(loc=[0.0, 1.0, 3.0, 5.0], scale=1.0, size=(6, 4))  # 6 runs x 4 tasks
    assert common.iqm(scores) == pytest.approx(metrics.aggregate_iqm(scores))
    point, lo, hi = common.bootstrap_ci(scores, common.iqm, reps=4000, seed=0)
    np.random.seed(0)  # rliable 1.2.0 resamples with numpy's global generator
    with warnings.catch_warnings():  # arch 7 deprecates the random_state rliable passes
        warnings.simplefilter("ignore", FutureWarning)
        points, cis = rly.get_interval_estimates({"x": scores}, lambda x: np.array([metrics.aggregate_iqm(x)]),
                                                 reps=4000, random_state=np.random.RandomState(0))
    assert point == pytest.approx(points["x"][0])
    width = hi - lo
    assert cis["x"][0, 0] == pytest.approx(lo, abs=0.1 * width)
    assert cis["x"][1, 0] == pytest.approx(hi, abs=0.1 * width)


def test_every_public_function_is_documented():
    for name in common.__all__:
        obj = getattr(common, name)
        if callable(obj):
            assert obj.__doc__ and len(obj.__doc__.strip()) > 20, name


# ---------------------------------------------------------------------------------------------------------------
# one probe: every representation/* tag, with one KDE-jitter rule


def _probe_layers():
    g = torch.Generator().manual_seed(0)
    conv_pre = torch.randn(64, 4, 3, 3, generator=g)
    conv_pre[:, 0] = -1.0  # a dead channel
    latent_pre = torch.randn(64, 32, generator=g)
    latent_pre[:, :16] = 0.5  # 16 constant neurons: with jitter near 1/(2.5 * threshold), dormant by chance
    head = torch.randn(6, 32, generator=g)
    return {"conv1": (conv_pre.relu(), conv_pre), "latent": (latent_pre.relu(), latent_pre)}, head


def test_probe_scalars_fresh_generator_per_layer_and_latent_mask_agrees():
    layers, head = _probe_layers()
    kw = dict(tau=0.1, kde_threshold=20.0, kde_noise_std=0.019)  # jitter wide enough that the draw decides
    out = common.probe_scalars(layers, head, seed=7, **kw)
    expected = {f"representation/{name}/{k}" for name in layers for k in
                ("dormant_kde", "dormant_score", "srank", "max_score", "saturated", "zombie")}
    assert set(out) == expected | {"representation/hidden_bias", "representation/live_contribution"}
    for name, (post, pre) in layers.items():  # each layer: layer_metrics with a fresh generator of the same seed
        ref = common.layer_metrics(post, pre, tau=0.1, kde_threshold=20.0, kde_noise_std=0.019,
                                   generator=torch.Generator().manual_seed(7))
        assert {k: out[f"representation/{name}/{k}"] for k in ref} == ref, name
    # no state carried between calls, and the layer order does not matter
    assert common.probe_scalars(layers, head, seed=7, **kw) == out
    assert common.probe_scalars(dict(reversed(list(layers.items()))), head, seed=7, **kw) == out
    # the hidden_bias mask is the one latent/dormant_kde counted
    latent = layers["latent"][0]
    mask = common.dormant_mask_kde(latent, 20.0, 0.019, generator=torch.Generator().manual_seed(7))
    assert mask.double().mean().item() == out["representation/latent/dormant_kde"]
    assert common.head_contributions(latent, head, mask) == (out["representation/hidden_bias"],
                                                             out["representation/live_contribution"])
    # ...and the test can tell: another draw of the jitter gives another mask and other contributions
    other = common.dormant_mask_kde(latent, 20.0, 0.019, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(other, mask)
    assert common.probe_scalars(layers, head, seed=8, **kw)["representation/hidden_bias"] != out[
        "representation/hidden_bias"]
    without_head = common.probe_scalars(layers, seed=7, **kw)
    assert without_head == {k: v for k, v in out.items() if k in expected}


def test_plumbing_aliases_are_the_harness_functions():
    import harness

    for name in ("atomic_save", "rng_state", "set_rng_state", "arg_conflicts", "compiled", "cuda_graphed",
                 "set_capturable_", "set_lr", "Staging"):
        assert getattr(common, name) is getattr(harness, name), name
