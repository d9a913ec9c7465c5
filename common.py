"""Representation metrics, Atari score tables and aggregation shared by the training scripts.

Every function is a pure function of its arguments (torch tensors on any device, or numpy arrays); nothing here
keeps global state. Activations are laid out as (samples, neurons); conv activations (samples, C, H, W) are reduced
per channel as each function's docstring says.

Metrics and the papers they implement:
- effective_rank: srank of Kumar et al. (2021), eq. in HR papers App. C.2.
- dormant_mask_kde / dormant_fraction_kde: the HR papers' KDE-peak dormancy test (App. B/C).
- activation_scores / dormant_fraction_score: ReDo score, Sokar et al. (2023) eq. 1.
- max_activation_score: the neuron-dominance paper's largest ReDo score in a layer.
- saturation_fractions: saturated (pre-activation <= 0 on every sample) and zombie (> 0 on every sample) units.
- head_contributions: output contribution of dormant vs live latent neurons (HR v2 Theorem 4.1, "weights become biases").
- redo_recycle_: ReDo neuron recycling (Sokar et al. 2023, Alg. 1).
- ATARI_RANDOM_HUMAN, human_normalized, baseline_normalized (HR papers eq. 5), iqm, bootstrap_ci (Agarwal et al. 2021).

- probe_scalars: every representation/* tag of one probe, with the one KDE-jitter rule for all scripts.

The run's plumbing (checkpoints, RNG state, fast paths) lives in harness.py; its old names here are aliases.
"""
from __future__ import annotations

import math
import re
from typing import Callable, Sequence

import numpy as np
import torch

__all__ = [
    "effective_rank", "dormant_mask_kde", "dormant_fraction_kde", "activation_scores", "dormant_fraction_score",
    "max_activation_score", "saturation_fractions", "layer_metrics", "head_contributions", "probe_scalars",
    "redo_recycle_",
    "ATARI_RANDOM_HUMAN", "ATARI_57", "ATARI_HARD_EXPLORATION", "ATARI_51", "atari_game_name", "human_normalized",
    "baseline_normalized", "iqm", "bootstrap_ci", "atomic_save", "rng_state", "set_rng_state", "arg_conflicts",
    "compiled", "cuda_graphed", "set_capturable_", "set_lr", "Staging",
]

# --------------------------------------------------------------------------------------------------------------
# input checks


def _as_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray) or isinstance(x, (list, tuple)):
        x = torch.as_tensor(np.asarray(x))
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch tensor or numpy array, got {type(x).__name__}")
    if not (x.is_floating_point() or x.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
        raise ValueError(f"{name}: expected a real-valued array, got dtype {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name}: empty array of shape {tuple(x.shape)}; expected (samples, neurons) with both > 0")
    x = x.detach()
    if x.is_floating_point() and not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).sum().item()
        raise ValueError(f"{name}: {bad} non-finite values (NaN/inf) in activations; the network has diverged")
    return x


def _neurons(acts, name: str = "acts", conv: str = "mean") -> torch.Tensor:
    """(samples, neurons) float tensor. Conv maps (N, C, H, W) become (N, C): `conv='mean'` averages the activation
    over space, `conv='absmean'` averages |a| over space (ReDo's reduction)."""
    x = _as_tensor(acts, name)
    if not x.is_floating_point():
        x = x.float()
    if x.dim() == 4:
        x = x.abs().mean(dim=(2, 3)) if conv == "absmean" else x.mean(dim=(2, 3))
    elif x.dim() != 2:
        raise ValueError(f"{name}: expected shape (samples, neurons) or (samples, C, H, W), got {tuple(x.shape)}")
    return x


# --------------------------------------------------------------------------------------------------------------
# effective rank


def effective_rank(features, delta: float = 0.01) -> int:
    """srank_delta (Kumar et al. 2021; HR papers App. C.2): the smallest k with
    sum_{i<=k} sigma_i >= (1 - delta) * sum_i sigma_i, sigma the singular values of the (samples, features) matrix.
    Conv maps (N, C, H, W) are reduced to (N, C) by a spatial mean. Returns 0 for an all-zero matrix."""
    if not 0.0 <= delta < 1.0:
        raise ValueError(f"delta must be in [0, 1), got {delta}")
    x = _neurons(features, "features").double()
    # descending; on the host: the answer is read there anyway, and torch's cumsum on CUDA floats is nondeterministic
    sigma = torch.linalg.svdvals(x).cpu()
    total = sigma.sum()
    if total <= 0:
        return 0
    cum = torch.cumsum(sigma, 0)
    # tiny relative slack so a spectrum that meets the bound exactly is not pushed one step further by rounding
    k = int(torch.searchsorted(cum, (1.0 - delta) * total * (1 - 1e-9)).item()) + 1
    return min(k, sigma.numel())


# --------------------------------------------------------------------------------------------------------------
# KDE dormancy test (HR papers, App. B/C)

_KDE_GRID_STEP = 0.25  # grid spacing in bandwidth units; peak error from the grid is below 1%
_KDE_TAPS = 6.0  # kernel truncated at 6 bandwidths (mass beyond is < 2e-9)
_KDE_MAX_BINS = 1 << 15


def _kde_peak(x: torch.Tensor, noise_std: float, generator: torch.Generator | None) -> torch.Tensor:
    """Peak density of a Gaussian KDE (Scott's bandwidth h = std * n^(-1/5)) per column of x (n, d).

    Vectorised by linear binning onto a per-neuron grid of step h/4 followed by a convolution with the sampled
    Gaussian kernel: O(d * (n + bins * taps)) instead of the naive O(d * n^2)."""
    n, d = x.shape
    if noise_std > 0:
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float64,
                            device="cpu" if generator is None else generator.device)
        x = x.double() + noise.to(x.device) * noise_std
    else:
        x = x.double()
    std = x.std(dim=0, unbiased=True) if n > 1 else torch.zeros(d, dtype=x.dtype, device=x.device)
    h = std * n ** (-0.2)
    out = torch.full((d,), math.inf, dtype=torch.float64, device=x.device)
    ok = h > 0
    if not ok.any():
        return out  # every neuron constant (no jitter): infinitely peaked
    x, h = x[:, ok], h[ok]
    lo = x.min(dim=0).values
    u = (x - lo) / (h * _KDE_GRID_STEP)  # positions in grid steps, >= 0
    pad = int(math.ceil(_KDE_TAPS / _KDE_GRID_STEP))
    span = int(torch.ceil(u.max()).item()) + 2
    bins = span + 2 * pad
    if bins > _KDE_MAX_BINS:
        raise ValueError(f"KDE grid would need {bins} bins: activations have extreme outliers relative to their spread")
    left = torch.floor(u)
    frac = u - left
    idx = left.long() + pad
    dd = x.shape[1]
    hist = torch.zeros(dd, bins, dtype=torch.float64, device=x.device)
    hist.scatter_add_(1, idx.T, (1 - frac).T)
    hist.scatter_add_(1, (idx + 1).T, frac.T)
    t = torch.arange(-pad, pad + 1, dtype=torch.float64, device=x.device) * _KDE_GRID_STEP
    kernel = torch.exp(-0.5 * t * t)
    dens = torch.nn.functional.conv1d(hist.unsqueeze(1), kernel.view(1, 1, -1), padding=pad).squeeze(1)
    peak = dens.max(dim=1).values / (n * h * math.sqrt(2 * math.pi))
    out[ok] = peak
    return out


def dormant_mask_kde(acts, threshold: float = 20.0, noise_std: float = 1e-3,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """KDE dormancy test (HR papers, App. B/C): jitter each neuron's activations with N(0, noise_std^2), fit a
    Gaussian KDE with Scott's bandwidth h = std * n^(-1/5), and call the neuron dormant when the peak density exceeds
    `threshold` (20), i.e. its outputs sit in a band narrower than about 1/20 whatever the input.

    noise_std (default 1e-3, not given in the papers) only keeps constant neurons from a zero bandwidth: a constant
    neuron then has peak density ~1/(2.5 * noise_std) = 400 > 20, while any neuron whose outputs spread over more
    than ~0.05 is live. It must stay well below 1/(2.5 * threshold) = 0.02 or constant neurons would pass as live.
    Conv maps (N, C, H, W) are tested per channel on the spatial mean. Returns a bool tensor (neurons,)."""
    if threshold <= 0 or noise_std < 0:
        raise ValueError(f"threshold must be > 0 and noise_std >= 0, got {threshold}, {noise_std}")
    x = _neurons(acts)
    if x.shape[0] < 2:
        raise ValueError(f"acts: the KDE test needs at least 2 samples, got shape {tuple(x.shape)}")
    return _kde_peak(x, noise_std, generator) > threshold


def dormant_fraction_kde(acts, threshold: float = 20.0, noise_std: float = 1e-3,
                         generator: torch.Generator | None = None) -> float:
    """Fraction of neurons dormant by the KDE-peak test (see dormant_mask_kde)."""
    return dormant_mask_kde(acts, threshold, noise_std, generator).double().mean().item()


# --------------------------------------------------------------------------------------------------------------
# ReDo scores, dominance, saturation


def activation_scores(acts) -> torch.Tensor:
    """ReDo activation score (Sokar et al. 2023, eq. 1): s_i = E|a_i| / ((1/N) sum_k E|a_k|) over the batch.
    Conv maps (N, C, H, W): |a| is averaged over samples and space per channel. A layer whose outputs are all zero
    gives all-zero scores (every neuron dormant)."""
    x = _neurons(acts, conv="absmean").abs()
    per_neuron = x.double().mean(dim=0)
    layer_mean = per_neuron.mean()
    if layer_mean <= 0:
        return torch.zeros_like(per_neuron)
    return per_neuron / layer_mean


def dormant_fraction_score(acts, tau: float = 0.1) -> float:
    """Fraction of tau-dormant neurons, s_i <= tau (ReDo, Sokar et al. 2023, Def. 3.1)."""
    if tau < 0:
        raise ValueError(f"tau must be >= 0, got {tau}")
    return (activation_scores(acts) <= tau).double().mean().item()


def max_activation_score(acts) -> float:
    """Largest ReDo score in the layer (neuron-dominance paper); a neuron is dominant when it exceeds N/2."""
    return activation_scores(acts).max().item()


def saturation_fractions(preacts) -> tuple[float, float]:
    """(saturated, zombie) fractions of units (neuron-dominance paper): pre-activation <= 0 on every sample
    (a dead ReLU unit) and > 0 on every sample (a unit that never switches off, i.e. acts linearly).
    Conv maps (N, C, H, W) count a channel saturated/zombie when the condition holds at every sample and position."""
    x = _as_tensor(preacts, "preacts")
    if x.dim() == 4:
        x = x.transpose(0, 1).reshape(x.shape[1], -1).T
    elif x.dim() != 2:
        raise ValueError(f"preacts: expected shape (samples, neurons) or (samples, C, H, W), got {tuple(x.shape)}")
    saturated = (x <= 0).all(dim=0).double().mean().item()
    zombie = (x > 0).all(dim=0).double().mean().item()
    return saturated, zombie


def layer_metrics(acts, preacts=None, tau: float = 0.1, kde_threshold: float = 20.0, kde_noise_std: float = 1e-3,
                  generator: torch.Generator | None = None, delta: float = 0.01) -> dict[str, float]:
    """All representation metrics of one layer as python floats, keyed as the TensorBoard tags
    representation/<layer>/<key>: dormant_kde, dormant_score, srank, max_score, and with preacts saturated, zombie."""
    out = {
        "dormant_kde": dormant_fraction_kde(acts, kde_threshold, kde_noise_std, generator),
        "dormant_score": dormant_fraction_score(acts, tau),
        "srank": float(effective_rank(acts, delta)),
        "max_score": max_activation_score(acts),
    }
    if preacts is not None:
        out["saturated"], out["zombie"] = saturation_fractions(preacts)
    return out


def head_contributions(latent_acts, head_weight, dormant_mask) -> tuple[float, float]:
    """Output contribution of dormant vs live latent neurons (HR v2, Theorem 4.1 / Fig. 4): with latent a (n, d),
    head weight W (outputs, d) and dormant mask m, returns the batch mean of ||a[:, m] W[:, m]^T||_2 (the "hidden
    bias": a dormant neuron's near-constant output turns its outgoing weights into a bias) and the same for ~m."""
    a = _neurons(latent_acts, "latent_acts").float()
    w = _as_tensor(head_weight, "head_weight").float().to(a.device)
    m = torch.as_tensor(dormant_mask, device=a.device).bool()
    if w.dim() != 2 or w.shape[1] != a.shape[1] or m.shape != (a.shape[1],):
        raise ValueError(f"head_contributions: expected latent (n, d), head_weight (outputs, d), mask (d,); got "
                         f"{tuple(a.shape)}, {tuple(w.shape)}, {tuple(m.shape)}")
    dead = (a * m) @ w.T
    live = (a * ~m) @ w.T
    return dead.norm(dim=1).mean().item(), live.norm(dim=1).mean().item()


def probe_scalars(layers: dict, head_weight=None, tau: float = 0.1, kde_threshold: float = 20.0,
                  kde_noise_std: float = 1e-3, seed: int = 0, delta: float = 0.01) -> dict[str, float]:
    """Every representation/* tag of one probe. `layers` maps CONVENTIONS layer names to (post, pre) activations on
    the probe batch (pre may be None); with `head_weight`, the `latent` layer's hidden_bias / live_contribution too.
    The KDE jitter of every layer, and of the latent mask, comes from a fresh generator seeded with `seed`: a probe's
    result depends only on the network and the batch (not on how many probes ran before, nor on the layer order),
    its latent/dormant_kde and the hidden_bias mask agree, and no RNG that drives the agent is touched. delta: the
    effective rank's threshold (srank)."""
    out = {}
    for name, (post, pre) in layers.items():
        generator = torch.Generator(device=torch.as_tensor(post).device).manual_seed(seed)
        metrics = layer_metrics(post, pre, tau=tau, kde_threshold=kde_threshold, kde_noise_std=kde_noise_std,
                                delta=delta, generator=generator)
        out.update({f"representation/{name}/{k}": v for k, v in metrics.items()})
    if head_weight is not None:
        latent = layers["latent"][0]
        mask = dormant_mask_kde(latent, kde_threshold, kde_noise_std,
                                generator=torch.Generator(device=torch.as_tensor(latent).device).manual_seed(seed))
        out["representation/hidden_bias"], out["representation/live_contribution"] = head_contributions(
            latent, head_weight, mask)
    return out


# --------------------------------------------------------------------------------------------------------------
# ReDo recycling (Sokar et al. 2023, Alg. 1)


def _default_init_(w: torch.Tensor) -> None:
    torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5))  # torch's default for Linear and Conv2d weights


@torch.no_grad()
def redo_recycle_(mask, incoming: Sequence[tuple[torch.Tensor, torch.Tensor | None]],
                  outgoing: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer | None = None,
                  init_fn: Callable[[torch.Tensor], None] | None = None, outgoing_group: int = 1) -> int:
    """Recycle the neurons in `mask` (bool (N,)) in place, as ReDo does: fresh incoming weights (`init_fn` applied to
    a new tensor of each weight's shape; default torch's kaiming-uniform), zero incoming biases, zero outgoing
    weights, and zero the optimiser moments (Adam/AdamW/RAdam `exp_avg`, `exp_avg_sq`, ...) of exactly those slices.

    incoming: (weight, bias) pairs whose dim 0 indexes the N neurons (Linear (N, in), Conv2d (N, C, kh, kw); several
    pairs for the branches of an HR layer; LayerNorm affine params may be passed as (weight, bias) too: they are reset
    to 1 and 0 when the weight is 1-D). outgoing: weights whose dim 1 indexes the neurons; for a conv map flattened
    into a Linear, pass outgoing_group = H*W (torch.flatten keeps channel c's columns at c*H*W:(c+1)*H*W).
    Returns the number of recycled neurons."""
    mask = torch.as_tensor(mask).bool().flatten()
    n = mask.numel()
    if outgoing_group < 1:
        raise ValueError(f"outgoing_group must be >= 1, got {outgoing_group}")
    count = int(mask.sum().item())
    if count == 0:
        return 0
    init_fn = init_fn or _default_init_
    touched: list[tuple[torch.Tensor, torch.Tensor, int]] = []  # (param, slice mask along dim, dim)
    for weight, bias in incoming:
        if weight.shape[0] != n:
            raise ValueError(f"incoming weight of shape {tuple(weight.shape)}: dim 0 must be {n} (the mask length)")
        m = mask.to(weight.device)
        if weight.dim() == 1:  # LayerNorm affine
            weight[m] = 1.0
        else:
            fresh = torch.empty_like(weight)
            init_fn(fresh)
            weight[m] = fresh[m]
        touched.append((weight, m, 0))
        if bias is not None:
            if bias.shape[0] != n:
                raise ValueError(f"incoming bias of shape {tuple(bias.shape)}: dim 0 must be {n}")
            bias[m] = 0.0
            touched.append((bias, m, 0))
    for weight in outgoing:
        if weight.dim() < 2 or weight.shape[1] != n * outgoing_group:
            raise ValueError(f"outgoing weight of shape {tuple(weight.shape)}: dim 1 must be {n} x {outgoing_group}")
        m = mask.to(weight.device).repeat_interleave(outgoing_group)
        weight[:, m] = 0.0
        touched.append((weight, m, 1))
    if optimizer is not None:
        for param, m, dim in touched:
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape == param.shape and key != "step":
                    if dim == 0:
                        value[m] = 0.0
                    else:
                        value[:, m] = 0.0
    return count


# --------------------------------------------------------------------------------------------------------------
# Atari scores

# (random, human) per game: the DQN Zoo table (also used by PQN and Hadamax), keyed by ALE names.
ATARI_RANDOM_HUMAN: dict[str, tuple[float, float]] = {
    "Alien": (227.8, 7127.7), "Amidar": (5.8, 1719.5), "Assault": (222.4, 742.0), "Asterix": (210.0, 8503.3),
    "Asteroids": (719.1, 47388.7), "Atlantis": (12850.0, 29028.1), "BankHeist": (14.2, 753.1),
    "BattleZone": (2360.0, 37187.5), "BeamRider": (363.9, 16926.5), "Berzerk": (123.7, 2630.4),
    "Bowling": (23.1, 160.7), "Boxing": (0.1, 12.1), "Breakout": (1.7, 30.5), "Centipede": (2090.9, 12017.0),
    "ChopperCommand": (811.0, 7387.8), "CrazyClimber": (10780.5, 35829.4), "Defender": (2874.5, 18688.9),
    "DemonAttack": (152.1, 1971.0), "DoubleDunk": (-18.6, -16.4), "Enduro": (0.0, 860.5),
    "FishingDerby": (-91.7, -38.7), "Freeway": (0.0, 29.6), "Frostbite": (65.2, 4334.7), "Gopher": (257.6, 2412.5),
    "Gravitar": (173.0, 3351.4), "Hero": (1027.0, 30826.4), "IceHockey": (-11.2, 0.9), "Jamesbond": (29.0, 302.8),
    "Kangaroo": (52.0, 3035.0), "Krull": (1598.0, 2665.5), "KungFuMaster": (258.5, 22736.3),
    "MontezumaRevenge": (0.0, 4753.3), "MsPacman": (307.3, 6951.6), "NameThisGame": (2292.3, 8049.0),
    "Phoenix": (761.4, 7242.6), "Pitfall": (-229.4, 6463.7), "Pong": (-20.7, 14.6), "PrivateEye": (24.9, 69571.3),
    "Qbert": (163.9, 13455.0), "Riverraid": (1338.5, 17118.0), "RoadRunner": (11.5, 7845.0),
    "Robotank": (2.2, 11.9), "Seaquest": (68.4, 42054.7), "Skiing": (-17098.1, -4336.9),
    "Solaris": (1236.3, 12326.7), "SpaceInvaders": (148.0, 1668.7), "StarGunner": (664.0, 10250.0),
    "Surround": (-10.0, 6.5), "Tennis": (-23.8, -8.3), "TimePilot": (3568.0, 5229.2), "Tutankham": (11.4, 167.6),
    "UpNDown": (533.4, 11693.2), "Venture": (0.0, 1187.5), "VideoPinball": (16256.9, 17667.9),
    "WizardOfWor": (563.5, 4756.5), "YarsRevenge": (3092.9, 54576.9), "Zaxxon": (32.5, 9173.3),
}
ATARI_57: tuple[str, ...] = tuple(sorted(ATARI_RANDOM_HUMAN))
ATARI_HARD_EXPLORATION: tuple[str, ...] = ("Gravitar", "MontezumaRevenge", "Pitfall", "PrivateEye", "Solaris",
                                           "Venture")
ATARI_51: tuple[str, ...] = tuple(g for g in ATARI_57 if g not in ATARI_HARD_EXPLORATION)

_GAME_KEYS = {re.sub(r"[^a-z0-9]", "", g.lower()): g for g in ATARI_RANDOM_HUMAN}


def atari_game_name(env_id: str) -> str:
    """Canonical game name for an env id: 'Breakout', 'Breakout-v5', 'BreakoutNoFrameskip-v4', 'ALE/Breakout-v5',
    'breakout' and 'video_pinball' style names all resolve. Raises ValueError for an unknown game."""
    name = env_id.split("/")[-1]
    name = re.sub(r"-v\d+$", "", name)
    name = re.sub(r"(NoFrameskip|Deterministic)$", "", name)
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    if key not in _GAME_KEYS:
        raise ValueError(f"unknown Atari game {env_id!r}: expected one of the 57 games, e.g. 'Breakout-v5'")
    return _GAME_KEYS[key]


def human_normalized(game: str, score):
    """Human-normalised score (score - random) / (human - random), DQN Zoo random/human table.
    `game` may be an env id; `score` a number or array."""
    random, human = ATARI_RANDOM_HUMAN[atari_game_name(game)]
    return (np.asarray(score, dtype=np.float64) - random) / (human - random) if not np.isscalar(score) \
        else (float(score) - random) / (human - random)


def baseline_normalized(score, lo, hi):
    """Baseline-normalised score (HR papers eq. 5): (score - lo) / (hi - lo), lo/hi the min/max of the ReLU
    baseline's runs for that game."""
    lo, hi = float(lo), float(hi)
    if not hi > lo:
        raise ValueError(f"baseline_normalized: need hi > lo, got lo={lo}, hi={hi}")
    return (np.asarray(score, dtype=np.float64) - lo) / (hi - lo) if not np.isscalar(score) \
        else (float(score) - lo) / (hi - lo)


# --------------------------------------------------------------------------------------------------------------
# aggregation (Agarwal et al. 2021, "Deep RL at the edge of the statistical precipice")


def _flat_scores(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if isinstance(x, (list, tuple)) and x and not np.isscalar(x[0]):
        x = np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in x])
    a = np.asarray(x, dtype=np.float64).ravel()
    if a.size == 0:
        raise ValueError("expected a non-empty array of scores")
    if np.isnan(a).any():
        raise ValueError(f"{int(np.isnan(a).sum())} NaN scores")
    return a


def iqm(x) -> float:
    """Interquartile mean: mean of the middle 50% of all scores (runs x tasks flattened), trimming 25% at each end
    as scipy.stats.trim_mean(x, 0.25) does. Accepts an array or a list of per-task arrays. scripts/analyze.py uses
    rliable; this and bootstrap_ci stay as a dependency-free equivalent (tests compare the two)."""
    a = np.sort(_flat_scores(x))
    cut = int(0.25 * a.size)
    return float(a[cut:a.size - cut].mean())


def bootstrap_ci(scores, statistic: Callable = iqm, reps: int = 2000, alpha: float = 0.05,
                 seed: int = 0) -> tuple[float, float, float]:
    """Stratified bootstrap confidence interval (rliable's method): resample runs with replacement independently
    within each task, apply `statistic` to each resampled set, and take the percentile interval.

    scores: (runs, tasks) array, or a list of per-task 1-D arrays (tasks may have different numbers of runs).
    statistic: receives the (runs, tasks) array (or the list of per-task arrays when ragged).
    Returns (point estimate, lower, upper) at confidence 1 - alpha."""
    if reps < 1 or not 0 < alpha < 1:
        raise ValueError(f"need reps >= 1 and 0 < alpha < 1, got reps={reps}, alpha={alpha}")
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu().numpy()
    ragged = isinstance(scores, (list, tuple))
    tasks = [np.asarray(t, dtype=np.float64).ravel() for t in scores] if ragged \
        else list(np.asarray(scores, dtype=np.float64).reshape(len(scores), -1).T)
    if not tasks or any(t.size == 0 for t in tasks):
        raise ValueError("bootstrap_ci: every task needs at least one run")
    if any(np.isnan(t).any() for t in tasks):
        raise ValueError("bootstrap_ci: NaN scores")
    rng = np.random.default_rng(seed)

    def pack(cols):
        return cols if ragged else np.stack(cols, axis=1)

    point = float(statistic(pack(tasks)))
    stats = np.empty(reps)
    for r in range(reps):
        stats[r] = statistic(pack([t[rng.integers(0, t.size, t.size)] for t in tasks]))
    lo, hi = np.percentile(stats, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return point, float(lo), float(hi)


# --------------------------------------------------------------------------------------------------------------
# run plumbing moved to harness.py; the old names keep working

from harness import (Staging, arg_conflicts, atomic_save, compiled, cuda_graphed, rng_state,  # noqa: E402,F401
                     set_capturable_, set_lr, set_rng_state)
