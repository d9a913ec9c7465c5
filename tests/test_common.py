"""common.py against independent computations and cases with known answers."""
import math
import os
import random
import time

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


def test_every_public_function_is_documented():
    for name in common.__all__:
        obj = getattr(common, name)
        if callable(obj):
            assert obj.__doc__ and len(obj.__doc__.strip()) > 20, name


# ---------------------------------------------------------------------------------------------------------------
# checkpoint helpers


def test_atomic_save_replaces_whole_file_and_leaves_no_temp(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    common.atomic_save({"step": 1, "w": torch.zeros(4)}, path)
    size = common.atomic_save({"step": 2, "w": torch.arange(1000.0)}, path)
    assert os.listdir(tmp_path) == ["checkpoint.pt"]
    assert size == os.path.getsize(path)
    state = torch.load(path, weights_only=False)
    assert state["step"] == 2 and torch.equal(state["w"], torch.arange(1000.0))


def test_atomic_save_failure_keeps_previous_checkpoint(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    common.atomic_save({"step": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        common.atomic_save({"step": 2, "bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=False)["step"] == 1


def test_rng_state_round_trip_replays_every_stream():
    gen = np.random.default_rng(3)
    state = common.rng_state(gen)

    def draw():
        return (random.random(), np.random.rand(), torch.rand(2).tolist(), gen.integers(1 << 30))

    first = draw()
    common.set_rng_state(state, gen)
    assert draw() == first
    with pytest.raises(ValueError):
        common.set_rng_state(state)


def test_arg_conflicts_lists_changed_added_and_removed_names():
    saved = {"lr": 1e-4, "seed": 1, "checkpoint_every": 10, "gone": True}
    current = {"lr": 2e-4, "seed": 1, "checkpoint_every": 20, "new": 0}
    assert common.arg_conflicts(saved, current, may_differ=["checkpoint_every"]) == ["gone", "lr", "new"]
    assert common.arg_conflicts(saved, dict(saved), may_differ=[]) == []


# --------------------------------------------------------------------------------------------------------------
# GPU fast-path helpers (their CPU-checkable parts; the CUDA paths are measured by scripts/bench.py on a GPU)


def _failing_backend(gm, example_inputs):
    raise RuntimeError("no compiler here")


def test_compiled_falls_back_to_eager_with_one_warning(capsys):
    calls = []

    def f(x):
        calls.append(1)
        return x * 2 + 1

    torch._dynamo.reset()
    fast = common.compiled(f, True, backend=_failing_backend)
    x = torch.arange(4.0)
    assert torch.equal(fast(x), x * 2 + 1) and torch.equal(fast(x), x * 2 + 1)
    err = capsys.readouterr().err
    assert err.count("warning: torch.compile of f failed") == 1 and "running it eagerly" in err
    torch._dynamo.reset()
    with pytest.raises(Exception):
        common.compiled(f, True, strict=True, backend=_failing_backend)(x)
    assert common.compiled(f, False) is f


def test_compiled_really_compiles():
    torch._dynamo.reset()
    seen = []

    def recording_backend(gm, example_inputs):
        seen.append(gm)
        return gm.forward

    fast = common.compiled(lambda x: torch.tanh(x) * x, True, strict=True, backend=recording_backend)
    x = torch.randn(5)
    torch.testing.assert_close(fast(x), torch.tanh(x) * x)
    assert len(seen) == 1  # one FX graph went through the compiler: no graph break, no host sync inside


def test_cuda_graphed_rejects_cpu_tensors():
    step = common.cuda_graphed(lambda x: x + 1)
    with pytest.raises(ValueError, match="CUDA tensor"):
        step(torch.zeros(3))


def test_set_capturable_round_trip_keeps_lr_and_state():
    p = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.RAdam([p], lr=2.5e-4)
    p.grad = torch.ones(3)
    opt.step()
    before = {k: v.clone() for k, v in opt.state[p].items()}
    common.set_capturable_(opt, True)  # what a CUDA run does (the step itself only works on a GPU)
    group = opt.param_groups[0]
    assert group["capturable"] and torch.is_tensor(group["lr"]) and float(group["lr"]) == pytest.approx(2.5e-4)
    group["lr"].fill_(1e-4)
    common.set_capturable_(opt, False)  # e.g. that run's checkpoint resumed on a CPU
    assert group["lr"] == pytest.approx(1e-4) and isinstance(group["lr"], float) and not group["capturable"]
    for k, v in opt.state[p].items():
        assert torch.equal(v, before[k]) and v.device.type == "cpu"
    opt.step()  # the plain CPU path runs with the converted state
    assert float(opt.state[p]["step"]) == 2


def test_set_lr_fills_tensor_lr_in_place_and_assigns_float_lr():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.Adam([p], lr=1e-3)
    common.set_lr(opt, 5e-4)
    assert opt.param_groups[0]["lr"] == 5e-4
    lr = torch.tensor(1e-3)
    opt = torch.optim.Adam([p], lr=lr)
    common.set_lr(opt, 2e-4)
    assert opt.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(2e-4)


def test_staging_on_cpu_shares_memory_and_keeps_its_tensor():
    s = common.Staging((2, 3), torch.float32, "cpu")
    host = s.wait()
    host[0], host[1] = [1, 2, 3], np.array([True, False, True])
    up = s.upload()
    assert torch.equal(up, torch.tensor([[1.0, 2.0, 3.0], [1.0, 0.0, 1.0]]))
    s.wait()[1] = 0.0
    assert s.upload() is up and up[1].sum() == 0  # the same tensor each time, no copy on the CPU
