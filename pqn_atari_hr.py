"""PQN on Atari (envpool) with Hadamard representations (HR), the Hadamax encoder, CReLU and ReDo baselines.

Recipe: the official PQN Atari recipe (Gallici et al. 2024, "Simplifying Deep Temporal Difference Learning";
github.com/mttga/purejaxql pqn_atari.py), reproduced as Table 5 of the HR papers: 128 envpool envs x 32 steps,
2 epochs x 32 minibatches, RAdam 2.5e-4 linearly decayed, grad-norm clip 10, gamma 0.99, Peng's Q(lambda) targets
with lambda 0.65, no target network and no replay buffer, epsilon 1 -> 0.001 over the first 10% of updates,
0.5 * MSE loss, 10M agent steps (40M frames), 8 extra test envs acting greedily. Not CleanRL's 8-env port.

Network: Nature CNN with LayerNorm before every hidden activation (conv maps normalised over channels at each
position, as the official Flax code does). Variants (one layer factory, `HiddenLayer`):
- HR (HR papers v1/v2): a layer becomes act(LN(W1 x + b1)) * act(LN(W2 x + b2)); PQN default `--hr-layers all`.
- Hadamax (Kooi et al. 2025): stride-1 SAME conv branches, LN, tanh-GELU, Hadamard product, max-pooling.
- CReLU (Abbas et al. 2023): concat(relu(x), relu(-x)). ReDo (Sokar et al. 2023): dormant-neuron recycling,
  every 16 updates (= 1024 gradient steps, the paper's "every 1000 gradient steps"), scores on --metrics-batch
  samples of the current rollout.
Envpool auto-resets on the step after a done (that step ignores the action, returns the first observation and
reward 0); like the official code, that transition stays in the batch. Episode scores are full games (lives reach 0
or the time limit), summed from envpool's unclipped info["reward"].

Usage:
    python pqn_atari_hr.py --env-id Breakout-v5                          # ReLU PQN (official recipe)
    python pqn_atari_hr.py --env-id Breakout-v5 --activation tanh --hr   # HR(tanh) on every hidden layer
    python pqn_atari_hr.py --env-id Breakout-v5 --encoder hadamax        # Hadamax-PQN
    python pqn_atari_hr.py --env-id Breakout-v5 --activation crelu       # CReLU baseline
    python pqn_atari_hr.py --env-id Breakout-v5 --redo                   # ReDo baseline
    python pqn_atari_hr.py --run-name b1 --resume                        # continue runs/b1 from its checkpoint

Checkpoints: every --checkpoint-every agent steps (at the end of the update that crosses a multiple),
runs/NAME/checkpoint.pt holds everything needed to continue (network, RAdam state, update/gradient-step counters
that drive the epsilon and learning-rate schedules, RNG states, the metric probe batch); about 50 MB with the
default network and probe batch, written atomically. --resume continues from it; the environments start fresh
episodes (seeded with --seed + the resume step). A non-finite loss or parameter stops the run and writes the last
finite state to runs/NAME/checkpoint_last_good.pt.
"""
import contextlib
import copy
import dataclasses
import io
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass
from typing import Literal, Optional

import envpool
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter

import common


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, cuda will be enabled when available"""
    torch_threads: int = 0
    """torch intra-op CPU threads (0 = torch's default); 1 is much faster on a CPU shared with envpool/other jobs"""
    compile: Literal["auto", "on", "off"] = "auto"
    """torch.compile the acting step, the TD loss and the Q(lambda) targets (auto: on with CUDA; off on CPU, where
    compiling takes about a minute and gains little)"""
    cudagraphs: Literal["auto", "on", "off"] = "auto"
    """replay the acting step and the whole gradient step (loss, backward, clipping, RAdam) as CUDA graphs, which
    removes the per-kernel launch cost of these small networks (auto: on with CUDA; needs CUDA)"""
    track: bool = False
    """track with Weights and Biases (wandb must be installed)"""
    wandb_project_name: str = "cleanRL"
    """the wandb project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of wandb's project"""
    capture_video: bool = False
    """not supported by this envpool script (exits with an error)"""
    save_model: bool = False
    """save the final Q-network to runs/NAME/"""
    run_name: Optional[str] = None
    """run directory runs/NAME (default {env_id}__{exp_name}__{seed}__{unix_time})"""
    checkpoint_every: int = 2_000_000
    """agent steps between checkpoints in runs/NAME/checkpoint.pt (0 = off); the default is about 30 minutes of
    training on one GPU; each costs one ~50 MB write (network, RAdam moments, the probe batch), well under a second"""
    resume: bool = False
    """continue runs/NAME (needs --run-name) from its checkpoint; flags that change training must match args.json"""

    # environment (official PQN Atari config)
    env_id: str = "Breakout-v5"
    """the envpool Atari id"""
    total_timesteps: int = 10_000_000
    """total agent steps of the training envs (one step = 4 frames)"""
    num_envs: int = 128
    """parallel training environments"""
    num_test_envs: int = 8
    """extra environments acting greedily (epsilon 0), never trained on; logged as eval/*"""
    envpool_threads: int = 0
    """envpool worker threads (0 = envpool's default)"""
    max_episode_steps: int = 27_000
    """agent steps after which a game is truncated (27k = 108k frames, envpool's and official PQN's default)"""

    # algorithm (papers' Table 5)
    num_steps: int = 32
    """steps per environment per update"""
    update_epochs: int = 2
    """epochs over each rollout"""
    num_minibatches: int = 32
    """minibatches per epoch"""
    learning_rate: float = 2.5e-4
    """RAdam learning rate"""
    anneal_lr: bool = True
    """linearly decay the learning rate to 0 over all gradient steps"""
    max_grad_norm: float = 10.0
    """global gradient-norm clip"""
    gamma: float = 0.99
    """discount factor"""
    q_lambda: float = 0.65
    """lambda of the Q(lambda) targets"""
    start_e: float = 1.0
    """starting epsilon"""
    end_e: float = 0.001
    """final epsilon"""
    exploration_fraction: float = 0.1
    """fraction of the updates over which epsilon decays linearly"""

    # network variants (CONVENTIONS.md)
    encoder: Literal["nature", "hadamax"] = "nature"
    """conv trunk: Nature CNN or the Hadamax encoder"""
    activation: Optional[Literal["relu", "tanh", "sigmoid", "gelu", "selu", "crelu"]] = None
    """activation of the target hidden layers (default relu; gelu with --encoder hadamax, as Hadamax)"""
    conv_activation: Literal["relu", "tanh", "sigmoid", "gelu", "selu", "crelu"] = "relu"
    """activation of conv layers that are not targets (only with --hr-layers last)"""
    hr: bool = False
    """Hadamard representation on the target layers"""
    hr_branches: int = 2
    """number of multiplied branches of an HR layer"""
    hr_layers: Literal["last", "all"] = "all"
    """target layers: the dense block only (last) or also every conv layer (all)"""
    hidden_layers: int = 1
    """dense hidden layers after the conv trunk"""
    hidden_dim: int = 512
    """width of the dense hidden layers"""
    layernorm: bool = True
    """LayerNorm on the pre-activations of every hidden layer (official PQN)"""
    combine: Literal["product", "sum"] = "product"
    """how HR branches are combined (sum: v1 ablation)"""

    # ReDo (Sokar et al. 2023)
    redo: bool = False
    """recycle dormant neurons of every hidden layer (ReDo)"""
    redo_tau: float = 0.1
    """ReDo dormancy threshold on the activation score; also used by representation/*/dormant_score"""
    redo_interval: int = 16
    """updates between recyclings (16 updates = 1024 gradient steps, ReDo's 1000 gradient steps)"""
    redo_reset_optimizer: bool = True
    """zero the RAdam moments of recycled weights (ReDo)"""

    # representation metrics
    metrics_every: int = 100_000
    """agent steps between representation-metric probes (0 = off)"""
    metrics_batch: int = 1024
    """samples in the fixed probe batch (taken from the rollout at the first probe)"""
    kde_noise_std: float = 1e-3
    """std of the jitter of the KDE dormancy test (not given in the papers)"""


ACTIVATIONS = ("relu", "tanh", "sigmoid", "gelu", "selu", "crelu")


def parse_args() -> Args:
    """tyro.cli, with tyro's boxed parse errors (unknown flag, invalid choice such as --activation foo, a value that
    is not a number) folded into one "error: ..." line, like the rest of the bad input."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return tyro.cli(Args)
    except SystemExit as e:
        if e.code in (0, None):
            raise
        body = err.getvalue().split("\u2500\u2500\u2500 \u2502", 1)[0]  # the box's text before its first rule
        text = " ".join(re.sub(r"[\u2500-\u257f]+", " ", line).strip() for line in body.splitlines()[1:])
        sys.exit(f"error: {' '.join(text.split()) or 'bad command line (see --help)'}")


def validate(args: Args) -> None:
    """Reject bad input before any environment or tensor is allocated: one line on stderr, non-zero exit."""
    def fail(msg):
        sys.exit(f"error: {msg}")

    if args.resume and args.run_name is None:
        fail("--resume needs --run-name NAME (the run directory to continue)")
    if args.env_id not in envpool.list_all_envs():
        fail(f"--env-id {args.env_id!r} is not an envpool environment (e.g. Breakout-v5)")
    try:
        common.atari_game_name(args.env_id)
    except ValueError:
        fail(f"--env-id {args.env_id!r} is not one of the 57 Atari games (e.g. Breakout-v5)")
    if args.hr and args.hr_branches < 2:
        fail(f"--hr-branches must be >= 2 with --hr, got {args.hr_branches}")
    if args.combine != "product" and not args.hr:
        fail("--combine sum only makes sense with --hr")
    for flag, v, lo in [("--num-envs", args.num_envs, 1), ("--num-steps", args.num_steps, 1),
                        ("--num-minibatches", args.num_minibatches, 1), ("--update-epochs", args.update_epochs, 1),
                        ("--num-test-envs", args.num_test_envs, 0), ("--hidden-layers", args.hidden_layers, 1),
                        ("--hidden-dim", args.hidden_dim, 1), ("--redo-interval", args.redo_interval, 1),
                        ("--metrics-every", args.metrics_every, 0), ("--metrics-batch", args.metrics_batch, 2),
                        ("--envpool-threads", args.envpool_threads, 0),
                        ("--max-episode-steps", args.max_episode_steps, 1),
                        ("--torch-threads", args.torch_threads, 0), ("--total-timesteps", args.total_timesteps, 1),
                        ("--checkpoint-every", args.checkpoint_every, 0)]:
        if v < lo:
            fail(f"{flag} must be >= {lo}, got {v}")
    batch = args.num_envs * args.num_steps
    if batch % args.num_minibatches:
        fail(f"--num-minibatches ({args.num_minibatches}) must divide --num-envs x --num-steps ({batch})")
    if args.total_timesteps < batch:
        fail(f"--total-timesteps ({args.total_timesteps}) must be >= --num-envs x --num-steps ({batch})")
    if args.metrics_every and args.metrics_batch > batch:
        fail(f"--metrics-batch ({args.metrics_batch}) must be <= --num-envs x --num-steps ({batch}), "
             "the rollout it is drawn from")
    if not 0.0 <= args.q_lambda <= 1.0 or not 0.0 <= args.gamma <= 1.0:
        fail(f"--q-lambda and --gamma must be in [0, 1], got {args.q_lambda}, {args.gamma}")
    if not 0.0 < args.exploration_fraction <= 1.0:
        fail(f"--exploration-fraction must be in (0, 1], got {args.exploration_fraction}")
    if not 0.0 <= args.start_e <= 1.0 or not 0.0 <= args.end_e <= 1.0:
        fail(f"--start-e and --end-e must be in [0, 1], got {args.start_e}, {args.end_e}")
    for flag, v in [("--learning-rate", args.learning_rate), ("--max-grad-norm", args.max_grad_norm)]:
        if not (math.isfinite(v) and v > 0):
            fail(f"{flag} must be a positive number, got {v}")
    if args.redo_tau < 0 or args.kde_noise_std < 0:
        fail(f"--redo-tau and --kde-noise-std must be >= 0, got {args.redo_tau}, {args.kde_noise_std}")
    if args.capture_video:
        fail("--capture-video is not supported by this envpool script")
    if args.cudagraphs == "on" and not (args.cuda and torch.cuda.is_available()):
        fail("--cudagraphs on needs a CUDA GPU (none is available, or --no-cuda); use --cudagraphs auto or off")
    if args.track:
        try:
            import wandb  # noqa: F401
        except ImportError:
            fail("--track needs wandb, which is not installed (pip install wandb)")


# flags that do not change the training itself: a resumed run may set them differently
RESUME_MAY_DIFFER = ("resume", "checkpoint_every", "run_name", "cuda", "torch_deterministic", "torch_threads",
                     "compile", "cudagraphs",
                     "envpool_threads", "track", "wandb_project_name", "wandb_entity", "capture_video", "save_model")
CHECKPOINT_FORMAT = 1


def check_run_dir(args: Args, run_dir: str) -> None:
    """Before any environment exists: the --resume rules (finished run, missing checkpoint, other flags than the
    run's args.json), then that runs/NAME can be created and written."""
    def fail(msg):
        sys.exit(f"error: {msg}")

    if args.resume:
        finished = os.path.join(run_dir, "finished")
        if os.path.exists(finished):
            try:
                with open(finished) as f:
                    detail = f"step {json.load(f)['global_step']}"
            except (OSError, ValueError, KeyError, TypeError):
                detail = finished
            print(f"run {args.run_name} already finished ({detail}); nothing to resume")
            sys.exit(0)
        if not os.path.isfile(os.path.join(run_dir, "checkpoint.pt")):
            fail(f"--resume: no checkpoint in {run_dir}")
        try:
            with open(os.path.join(run_dir, "args.json")) as f:
                saved = json.load(f)
        except (OSError, ValueError) as e:
            fail(f"--resume: cannot read {run_dir}/args.json ({' '.join(str(e).split())})")
        current = dataclasses.asdict(args)
        differ = common.arg_conflicts(saved, current, RESUME_MAY_DIFFER)
        if differ:
            fail(f"--resume: {run_dir} was made with other flags: " + ", ".join(
                f"--{k.replace('_', '-')} (saved {saved.get(k)}, now {current.get(k)})" for k in differ))
    try:
        os.makedirs(run_dir, exist_ok=True)
        probe = os.path.join(run_dir, f".write_test.{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        fail(f"--run-name {args.run_name}: cannot write {run_dir} ({e.strerror or e})")


def load_checkpoint(path: str, device: torch.device) -> dict:
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # empty, truncated by hand, not a torch file...
        sys.exit(f"error: --resume: cannot read {path} ({' '.join(str(e).split())[:200]})")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        sys.exit(f"error: --resume: {path} is not a format-{CHECKPOINT_FORMAT} checkpoint of this script")
    return ckpt


def make_env(args: Args, num_envs: int, seed: int):
    """One envpool pool: the official PQN Atari settings (episodic life, reward clip, noop 30, no sticky actions).
    info["reward"] is the unclipped reward; a full game ends when info["terminated"] (lives reach 0) or truncation."""
    return envpool.make(args.env_id, env_type="gymnasium", num_envs=num_envs, seed=seed,
                        episodic_life=True, reward_clip=True, noop_max=30, frame_skip=4,
                        repeat_action_probability=0.0, num_threads=args.envpool_threads,
                        max_episode_steps=args.max_episode_steps)


# ------------------------------------------------------------------------------------------------------------------
# network


def _trunc_normal_(w: torch.Tensor, scale: float, fan: float) -> None:
    """Flax's variance_scaling(scale, fan, "truncated_normal"): he_normal = (2, fan_in), glorot = (1, fan_avg),
    lecun = (1, fan_in)."""
    std = math.sqrt(scale / fan) / 0.87962566103423978  # std of a unit normal truncated to [-2, 2]
    nn.init.trunc_normal_(w, 0.0, std, -2 * std, 2 * std)


def activate(x: torch.Tensor, name: str, dim: int) -> torch.Tensor:
    if name == "crelu":  # concatenated ReLU doubles the width along `dim`
        return torch.cat([F.relu(x), F.relu(-x)], dim=dim)
    if name == "gelu":
        return F.gelu(x, approximate="tanh")  # Flax's nn.gelu default, as the official Hadamax code
    return {"relu": F.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "selu": F.selu}[name](x)


class HiddenLayer(nn.Module):
    """K independently parameterised branches of (Linear or Conv2d -> optional LayerNorm -> activation), combined
    by elementwise product (HR) or sum; K=1 is a plain layer. The K branches are stored as one fused Linear/Conv2d
    with K*out outputs (branch-major) so a forward is one matmul/conv; each branch has its own weights, bias and
    LayerNorm affine. LayerNorm on conv maps normalises over channels at each position (Flax NHWC convention)."""

    def __init__(self, kind: str, in_dim: int, out_dim: int, activation: str, layernorm: bool, branches: int = 1,
                 combine: str = "product", kernel: int = 1, stride: int = 1, padding="valid", init: str = "he"):
        super().__init__()
        self.kind, self.out_dim, self.activation, self.branches, self.combine = kind, out_dim, activation, branches, combine
        self.width = out_dim * (2 if activation == "crelu" else 1)  # output features/channels
        if kind == "conv":
            self.fused = nn.Conv2d(in_dim, branches * out_dim, kernel, stride, padding=padding)
            fan_in, fan_out = in_dim * kernel * kernel, out_dim * kernel * kernel
        else:
            self.fused = nn.Linear(in_dim, branches * out_dim)
            fan_in, fan_out = in_dim, out_dim
        self.init_scale, self.init_fan = (1.0, (fan_in + fan_out) / 2) if init == "glorot" else (2.0, fan_in)
        self.init_weight_(self.fused.weight)
        nn.init.zeros_(self.fused.bias)
        self.layernorm = layernorm
        if layernorm:
            self.ln_weight = nn.Parameter(torch.ones(branches * out_dim))
            self.ln_bias = nn.Parameter(torch.zeros(branches * out_dim))

    def init_weight_(self, w: torch.Tensor) -> None:
        """Fresh incoming weights (also ReDo's re-initialisation): truncated He-normal (official PQN) or
        Glorot-normal (Hadamax convs), computed per branch fan."""
        _trunc_normal_(w, self.init_scale, self.init_fan)

    def forward(self, x: torch.Tensor):
        """Returns (output, pre-activation); pre-activation has the branches stacked along the neuron dim."""
        z = self.fused(x)
        if self.kind == "conv":
            z = z.permute(0, 2, 3, 1)  # NHWC: LayerNorm over channels at each position, as Flax
        z = z.reshape(*z.shape[:-1], self.branches, self.out_dim)
        if self.layernorm:
            z = F.layer_norm(z, (self.out_dim,), eps=1e-6)  # Flax's LayerNorm epsilon
            z = torch.addcmul(self.ln_bias.view(self.branches, -1), z, self.ln_weight.view(self.branches, -1))
        a = activate(z, self.activation, dim=-1)
        if self.branches == 1:
            out = a.squeeze(-2)
        elif self.combine == "product":
            out = a.prod(dim=-2)
        else:
            out = a.sum(dim=-2)
        pre = z.flatten(-2)
        if self.kind == "conv":
            out, pre = out.permute(0, 3, 1, 2), pre.permute(0, 3, 1, 2)
        return out, pre


class QNetwork(nn.Module):
    """Conv trunk (conv1..conv3) -> dense hidden layers (fc1..fc{N-1}, latent) -> linear Q head.
    forward(x, probe=True) also returns {layer: (post-activation output, pre-activation)} for the metrics;
    conv pre-activations are reduced to per-(sample, channel) [max, min] over space, which keeps
    saturated/zombie counts exact (a unit is always <= 0 iff its max is) at a fraction of the memory."""

    def __init__(self, args: Args, n_actions: int, obs_shape=(4, 84, 84)):
        super().__init__()
        act = args.activation or ("gelu" if args.encoder == "hadamax" else "relu")
        self.pools = nn.ModuleDict()
        layers = {}
        if args.encoder == "nature":
            conv_target = args.hr_layers == "all"
            conv_act = act if conv_target else args.conv_activation
            k = args.hr_branches if (args.hr and conv_target) else 1
            in_ch = obs_shape[0]
            for i, (ch, ks, st) in enumerate([(32, 8, 4), (64, 4, 2), (64, 3, 1)], 1):
                layers[f"conv{i}"] = HiddenLayer("conv", in_ch, ch, conv_act, args.layernorm, k, args.combine, ks, st)
                in_ch = layers[f"conv{i}"].width
        else:  # Hadamax: fixed, as the official code (2 branches, LN, tanh-GELU, product, max-pool)
            in_ch = obs_shape[0]
            for i, (ch, ks, pool) in enumerate([(32, 8, nn.MaxPool2d(4, 4)), (64, 4, nn.MaxPool2d(2, 2, ceil_mode=True)),
                                                (64, 3, nn.MaxPool2d(3, 1, padding=1))], 1):
                layers[f"conv{i}"] = HiddenLayer("conv", in_ch, ch, "gelu", True, 2, "product", ks, 1, "same", "glorot")
                self.pools[f"conv{i}"] = pool  # 84 -> 21 (4/4), 21 -> 11 (2/2 SAME), 11 -> 11 (3/1 SAME)
                in_ch = ch
        self.conv_names = list(layers)
        self.convs = nn.ModuleList(layers.values())
        with torch.no_grad():
            x = torch.zeros(1, *obs_shape)
            for name, layer in zip(self.conv_names, self.convs):
                x = self._pool(name, layer(x)[0])
        self.conv_out_hw = x.shape[2] * x.shape[3]  # for ReDo's outgoing_group of the first dense layer
        in_dim = x.numel()
        k = args.hr_branches if args.hr else 1
        dense_names = [f"fc{i}" for i in range(1, args.hidden_layers)] + ["latent"]
        dense = []
        for name in dense_names:
            dense.append(HiddenLayer("linear", in_dim, args.hidden_dim, act, args.layernorm, k, args.combine))
            in_dim = dense[-1].width
        self.dense_names = dense_names
        self.dense = nn.ModuleList(dense)
        self.head = nn.Linear(in_dim, n_actions)
        _trunc_normal_(self.head.weight, 1.0, in_dim)  # Flax Dense default (lecun_normal), zero bias
        nn.init.zeros_(self.head.bias)

    def _pool(self, name, x):
        return self.pools[name](x) if name in self.pools else x

    def hidden_layers(self):
        """[(name, layer)] in forward order: every layer metrics and ReDo act on."""
        return list(zip(self.conv_names, self.convs)) + list(zip(self.dense_names, self.dense))

    def forward(self, x: torch.Tensor, probe: bool = False):
        x = x.float() / 255.0
        acts = {}
        for name, layer in zip(self.conv_names, self.convs):
            out, pre = layer(x)
            x = self._pool(name, out)
            if probe:
                acts[name] = (x, torch.stack([pre.amax(dim=(2, 3)), pre.amin(dim=(2, 3))], -1).unsqueeze(2))
        x = torch.flatten(x, 1)
        for name, layer in zip(self.dense_names, self.dense):
            x, pre = layer(x)
            if probe:
                acts[name] = (x, pre)
        q = self.head(x)
        return (q, acts) if probe else q


# ------------------------------------------------------------------------------------------------------------------
# helpers


def q_lambda_targets(rewards: torch.Tensor, dones: torch.Tensor, next_q_max: torch.Tensor, gamma: float,
                     lam: float) -> torch.Tensor:
    """Peng's Q(lambda) targets (PQN paper, eq. for the lambda-return with max bootstraps), computed backwards on
    the device. rewards, dones: (T, N); next_q_max[t] = max_a Q(s_{t+1}, a) (for t < T-1 the Q-values stored in the
    rollout, for T-1 those of the final next observation). dones[t] cuts the bootstrap after step t:
        G_{T-1} = r_{T-1} + gamma (1 - d_{T-1}) maxQ(s_T)
        G_t     = r_t + gamma (1 - d_t) [(1 - lam) maxQ(s_{t+1}) + lam G_{t+1}]"""
    targets = torch.empty_like(rewards)
    g = rewards[-1] + gamma * (1.0 - dones[-1]) * next_q_max[-1]
    targets[-1] = g
    for t in range(rewards.shape[0] - 2, -1, -1):
        g = rewards[t] + gamma * (1.0 - dones[t]) * ((1.0 - lam) * next_q_max[t] + lam * g)
        targets[t] = g
    return targets


def linear_schedule(start: float, end: float, duration: float, t: float) -> float:
    return start + min(t / duration, 1.0) * (end - start)


def make_policy(net: QNetwork, n_actions: int, eps_mask: torch.Tensor):
    """act(obs, epsilon) -> (actions, max Q): epsilon-greedy over all envs (eps_mask is 0 for the greedy test envs).
    Tensors in, tensors out, no host sync: it can be compiled and replayed as a CUDA graph."""
    @torch.no_grad()
    def act(obs: torch.Tensor, epsilon: torch.Tensor):
        q = net(obs)
        explore = torch.rand(eps_mask.shape, device=obs.device) < epsilon * eps_mask
        random_actions = torch.randint(0, n_actions, eps_mask.shape, device=obs.device)
        return torch.where(explore, random_actions, q.argmax(dim=1)), q.max(dim=1).values

    return act


def make_train_step(net: QNetwork, optimizer: torch.optim.Optimizer, b_obs: torch.Tensor, b_actions: torch.Tensor,
                    b_targets: torch.Tensor, max_grad_norm: float, compile_loss: bool = False):
    """train_step(idx) -> (loss, mean Q taken): one RAdam step on the minibatch b_*[idx] of the rollout storage
    (persistent tensors, refilled in place every update). The loss (0.5 * MSE to the Q(lambda) targets) is what
    torch.compile sees; the whole step, backward and optimizer included, is what a CUDA graph captures."""
    def td_loss(idx: torch.Tensor):
        q_taken = net(b_obs[idx]).gather(1, b_actions[idx, None]).squeeze(1)
        return 0.5 * (q_taken - b_targets[idx]).pow(2).mean(), q_taken.detach().mean()

    td_loss = common.compiled(td_loss, compile_loss)

    def train_step(idx: torch.Tensor):
        loss, q_mean = td_loss(idx)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), max_grad_norm)
        optimizer.step()
        return loss.detach(), q_mean

    return train_step


@torch.no_grad()
def probe_acts(net: QNetwork, obs: torch.Tensor, chunk: int = 256) -> dict:
    """{layer: (post, pre)} on `obs`, forwarded in chunks to bound memory (Hadamax conv1 maps are 84x84)."""
    parts = [net(obs[i:i + chunk], probe=True)[1] for i in range(0, len(obs), chunk)]
    return {name: (torch.cat([p[name][0] for p in parts]), torch.cat([p[name][1] for p in parts])) for name in parts[0]}


@torch.no_grad()
def probe_metrics(net: QNetwork, probe_obs: torch.Tensor, args: Args, generator: torch.Generator,
                  chunk: int = 256) -> dict:
    """One extra forward on the fixed probe batch -> {tag: value} of every hidden layer, plus hidden_bias."""
    acts = probe_acts(net, probe_obs, chunk)
    scalars = {}
    for name, (post, pre) in acts.items():
        m = common.layer_metrics(post, pre, tau=args.redo_tau, kde_noise_std=args.kde_noise_std, generator=generator)
        scalars.update({f"representation/{name}/{k}": v for k, v in m.items()})
    latent = acts["latent"][0]
    dormant = common.dormant_mask_kde(latent, noise_std=args.kde_noise_std, generator=generator)
    scalars["representation/hidden_bias"], scalars["representation/live_contribution"] = \
        common.head_contributions(latent, net.head.weight, dormant)
    return scalars


@torch.no_grad()
def redo_step(net: QNetwork, optimizer, obs: torch.Tensor, args: Args) -> dict:
    """ReDo (Sokar et al. 2023, Alg. 1) on every hidden layer: neurons with activation score <= tau on `obs` get
    fresh incoming weights in every branch (LayerNorm affine back to 1/0), zero outgoing weights, zeroed moments."""
    acts = probe_acts(net, obs)
    layers = net.hidden_layers()
    total, out = 0, {}
    for i, (name, layer) in enumerate(layers):
        dormant = common.activation_scores(acts[name][0]) <= args.redo_tau
        if layer.activation == "crelu":  # a unit is recycled when both of its halves are dormant
            unit = dormant[: layer.out_dim] & dormant[layer.out_dim:]
            out_mask = torch.cat([unit, unit])
        else:
            unit = out_mask = dormant
        opt = optimizer if args.redo_reset_optimizer else None
        incoming = [(layer.fused.weight, layer.fused.bias)]
        if layer.layernorm:
            incoming.append((layer.ln_weight, layer.ln_bias))
        common.redo_recycle_(unit.repeat(layer.branches), incoming, [], opt, init_fn=layer.init_weight_)
        nxt = layers[i + 1][1].fused.weight if i + 1 < len(layers) else net.head.weight
        group = net.conv_out_hw if name == net.conv_names[-1] and layer.kind == "conv" else 1
        common.redo_recycle_(out_mask, [], [nxt], opt, outgoing_group=group)
        n = int(unit.sum().item())
        out[f"redo/{name}/recycled_fraction"] = n / layer.out_dim
        total += n
    out["redo/recycled_fraction"] = total / sum(layer.out_dim for _, layer in layers)
    return out


class EpisodeStats:
    """Full-game raw scores from envpool: sums info["reward"] (unclipped) until the game is over (lives reach 0,
    info["terminated"]) or the time limit truncates it; life losses (episodic_life dones) do not end a game."""

    def __init__(self, num_envs: int):
        self.ret = np.zeros(num_envs)
        self.len = np.zeros(num_envs, dtype=np.int64)

    def step(self, info, truncated):
        self.ret += info["reward"]
        self.len += 1
        ended = np.flatnonzero(info["terminated"].astype(bool) | truncated)
        finished = [(i, self.ret[i], self.len[i]) for i in ended]
        self.ret[ended], self.len[ended] = 0.0, 0
        return finished


def _copy_into(dst, src):
    """`src` (a nested state dict) with its tensors copied into the matching preallocated tensors of `dst`."""
    if torch.is_tensor(src):
        return dst.copy_(src)
    if isinstance(src, dict):
        return {k: _copy_into(dst[k], v) for k, v in src.items()}
    if isinstance(src, list):
        return [_copy_into(d, v) for d, v in zip(dst, src)]
    return copy.deepcopy(src)


class LastGood:
    """The last state whose loss and parameters were finite (network, RAdam state, step), kept in preallocated
    clones on the device and refreshed with copy_ (no host sync); written out only if training goes non-finite."""

    def __init__(self, net: nn.Module, optimizer: torch.optim.Optimizer, step: int):
        self.net, self.optimizer, self.saved = net, optimizer, None
        self.refresh(step)

    def refresh(self, step: int) -> None:
        src = {"network": self.net.state_dict(), "optimizer": self.optimizer.state_dict()}
        if self.saved is None or len(src["optimizer"]["state"]) != len(self.saved["optimizer"]["state"]):
            self.saved = copy.deepcopy(src)  # first call, or RAdam made its moments at the first step
        else:
            self.saved = _copy_into(self.saved, src)
        self.step = step


def param_checksum(net: nn.Module) -> float:
    """Sum of every float tensor of the state dict, in float64: printed on resume so a test can compare it with the
    checkpoint file."""
    return sum(t.double().sum().item() for t in net.state_dict().values() if t.is_floating_point())


if __name__ == "__main__":
    args = parse_args()
    validate(args)
    if args.activation is None:
        args.activation = "gelu" if args.encoder == "hadamax" else "relu"
    if args.run_name is None:
        args.run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.join("runs", args.run_name)
    ckpt_path = os.path.join(run_dir, "checkpoint.pt")
    check_run_dir(args, run_dir)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    ckpt = load_checkpoint(ckpt_path, device) if args.resume else None
    if ckpt is None:
        with open(os.path.join(run_dir, "args.json"), "w") as f:
            json.dump(dataclasses.asdict(args), f, indent=2)
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=vars(args), name=args.run_name, save_code=True)
    # on resume, TensorBoard drops what the killed process logged at or after the checkpoint's step
    writer = SummaryWriter(run_dir, purge_step=ckpt["global_step"] if ckpt else None)
    if ckpt is None:
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" +
                        "\n".join(f"|{k}|{v}|" for k, v in dataclasses.asdict(args).items()))

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    game = common.atari_game_name(args.env_id)

    # one pool: training envs first, then the greedy test envs (as the official code); a resumed run starts fresh
    # episodes, seeded differently so they do not replay the run's first ones
    n_train, n_total = args.num_envs, args.num_envs + args.num_test_envs
    envs = make_env(args, n_total, args.seed + (ckpt["global_step"] if ckpt else 0))
    n_actions = envs.action_space.n
    net = QNetwork(args, n_actions, envs.observation_space.shape).to(device)
    n_params = sum(p.numel() for p in net.parameters())
    print(net, f"\nparameters: {n_params:,}")
    if ckpt is None:
        writer.add_text("architecture", f"```\n{net}\n```\nparameters: {n_params:,}")
    optimizer = torch.optim.RAdam(net.parameters(), lr=args.learning_rate)
    use_compile = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    use_graphs = device.type == "cuda" and args.cudagraphs != "off"

    batch_size = args.num_envs * args.num_steps
    minibatch_size = batch_size // args.num_minibatches
    num_updates = args.total_timesteps // batch_size
    n_mb = args.update_epochs * args.num_minibatches
    total_grad_steps = num_updates * n_mb
    # rollout storage, on the device
    obs = torch.zeros((args.num_steps, n_train) + envs.observation_space.shape, dtype=torch.uint8, device=device)
    actions = torch.zeros((args.num_steps, n_train), dtype=torch.long, device=device)
    rewards = torch.zeros((args.num_steps, n_train), device=device)
    dones = torch.zeros((args.num_steps, n_train), device=device)
    q_max = torch.zeros((args.num_steps, n_train), device=device)
    targets = torch.zeros((args.num_steps, n_train), device=device)
    eps_mask = torch.zeros(n_total, device=device)  # 1 for training envs, 0 (greedy) for test envs
    eps_mask[:n_train] = 1.0
    stats = EpisodeStats(n_total)
    probe_obs, probe_gen, next_probe = None, torch.Generator(device=device).manual_seed(args.seed), args.metrics_every

    # counters: `update` drives epsilon and ReDo, `grad_steps` the learning rate; all restored on resume
    global_step, grad_steps, first_update, last_return, wall_before = 0, 0, 0, float("nan"), 0.0
    lr = args.learning_rate
    next_checkpoint, checkpoint_step = args.checkpoint_every, None
    if ckpt is not None:
        net.load_state_dict(ckpt["network"])
        optimizer.load_state_dict(ckpt["optimizer"])
        global_step, grad_steps, first_update = ckpt["global_step"], ckpt["grad_steps"], ckpt["update"]
        probe_obs, next_probe, last_return = ckpt["probe_obs"], ckpt["next_probe"], ckpt["last_return"]
        wall_before, checkpoint_step = ckpt["wall_seconds"], ckpt["global_step"]
        if args.checkpoint_every:
            next_checkpoint = (global_step // args.checkpoint_every + 1) * args.checkpoint_every
        common.set_rng_state(ckpt["rng"])
        if ckpt["probe_generator"][0] == device.type:  # a probe generator's state is tied to its device type
            probe_gen.set_state(ckpt["probe_generator"][1].cpu())
        print(f"resumed {run_dir} from step {global_step} (parameter checksum {param_checksum(net)!r})", flush=True)
        for k, v in ckpt["logs"].items():  # the checkpointed update's scalars, logged at its step (see below)
            writer.add_scalar(k, v, global_step)
    common.set_capturable_(optimizer, use_graphs)  # after load_state_dict, which brings the saved run's setting
    last_good = LastGood(net, optimizer, global_step)
    del ckpt

    # the hot functions, compiled and/or replayed as CUDA graphs (README "GPU fast paths")
    b_obs = obs.reshape((batch_size,) + obs.shape[2:])
    b_actions, b_targets = actions.reshape(-1), targets.reshape(-1)
    act = common.compiled(make_policy(net, n_actions, eps_mask), use_compile)
    train_step = make_train_step(net, optimizer, b_obs, b_actions, b_targets, args.max_grad_norm, use_compile)
    compute_targets = common.compiled(q_lambda_targets, use_compile)
    if use_graphs:
        act, train_step = common.cuda_graphed(act), common.cuda_graphed(train_step)
    print(f"fast paths: torch.compile {'on' if use_compile else 'off'}, CUDA graphs {'on' if use_graphs else 'off'}, "
          f"pinned transfers {'on' if device.type == 'cuda' else 'off (CPU)'}", flush=True)
    obs_in = common.Staging((n_total,) + envs.observation_space.shape, torch.uint8, device)
    step_in = common.Staging((2, n_train), torch.float32, device)  # rewards and dones in one copy
    epsilon_t = torch.zeros((), device=device)

    start_step, start_time, probe_time = global_step, time.time(), 0.0
    print_every = max(1, 20_000 // batch_size)
    obs_in.wait()[:] = envs.reset()[0]  # seeded in envpool.make
    next_obs = obs_in.upload()
    for update in range(first_update, num_updates):
        epsilon = linear_schedule(args.start_e, args.end_e, args.exploration_fraction * num_updates, update)
        epsilon_t.fill_(epsilon)
        train_eps, eval_eps = [], []
        for step in range(args.num_steps):
            action, q_best = act(next_obs, epsilon_t)
            obs[step] = next_obs[:n_train]
            actions[step] = action[:n_train]
            q_max[step] = q_best[:n_train]
            o, r, term, trunc, info = envs.step(action.cpu().numpy())  # the one host sync per step
            obs_in.wait()[:] = o
            next_obs = obs_in.upload()
            rewards_dones = step_in.wait()
            rewards_dones[0], rewards_dones[1] = r[:n_train], (term | trunc)[:n_train]
            rewards[step], dones[step] = step_in.upload()
            for i, ret, length in stats.step(info, trunc):
                (train_eps if i < n_train else eval_eps).append((ret, length))
        global_step += batch_size

        # Q(lambda) targets: bootstrap from the rollout's own max Q of s_{t+1}, and the final next observation
        with torch.no_grad():
            last_q = net(next_obs[:n_train]).max(dim=1).values
            next_q_max = torch.cat([q_max[1:], last_q[None]])
            targets.copy_(compute_targets(rewards, dones, next_q_max, args.gamma, args.q_lambda))

        loss_sum = torch.zeros((), device=device)
        q_sum = torch.zeros((), device=device)
        for epoch in range(args.update_epochs):
            perm = torch.randperm(batch_size, device=device)
            for start in range(0, batch_size, minibatch_size):
                idx = perm[start:start + minibatch_size]
                if args.anneal_lr:
                    lr = args.learning_rate * (1.0 - grad_steps / total_grad_steps)
                    common.set_lr(optimizer, lr)
                loss, q_mean = train_step(idx)
                grad_steps += 1
                loss_sum += loss  # static outputs of a graph: consumed here, before the next replay
                q_sum += q_mean

        # the one host sync of the update: mean loss and Q, and whether every parameter is still finite
        params_finite = torch.stack([p.isfinite().all() for p in net.parameters()]).all()
        loss_mean, q_mean, finite = torch.stack([loss_sum / n_mb, q_sum / n_mb, params_finite.float()]).tolist()
        if not (math.isfinite(loss_mean) and math.isfinite(q_mean) and finite):
            good_path = os.path.join(run_dir, "checkpoint_last_good.pt")
            common.atomic_save({"format": CHECKPOINT_FORMAT, "global_step": last_good.step,
                                "args": dataclasses.asdict(args), **last_good.saved}, good_path)
            what = "loss" if not math.isfinite(loss_mean) else ("Q-values" if finite else "parameters")
            resumable = f"(step {checkpoint_step})" if checkpoint_step is not None else "(none yet)"
            writer.close()
            envs.close()
            sys.exit(f"error: non-finite {what} at step {global_step}; last good state (step {last_good.step}) "
                     f"written to {good_path}; the resumable checkpoint is {ckpt_path} {resumable}")

        logs = {"losses/td_loss": loss_mean, "losses/q_values": q_mean,
                "charts/learning_rate": lr, "charts/epsilon": epsilon}
        if args.redo and (update + 1) % args.redo_interval == 0:
            idx = torch.randperm(batch_size, device=device)[: min(args.metrics_batch, batch_size)]
            logs.update(redo_step(net, optimizer, b_obs[idx], args))

        if args.metrics_every and global_step >= next_probe:
            next_probe += args.metrics_every * ((global_step - next_probe) // args.metrics_every + 1)
            if probe_obs is None:  # fixed probe batch, chosen once from the rollout
                pick = torch.randperm(batch_size, generator=probe_gen, device=device)[: args.metrics_batch]
                probe_obs = b_obs[pick].clone()
            t0 = time.time()
            logs.update(probe_metrics(net, probe_obs, args, probe_gen))
            probe_time += time.time() - t0

        sps = int((global_step - start_step) / (time.time() - start_time))  # since this process (re)started
        logs["charts/SPS"] = sps
        for prefix, eps in (("charts", train_eps), ("eval", eval_eps)):
            if eps:
                ret = float(np.mean([e[0] for e in eps]))
                logs[f"{prefix}/episodic_return"] = ret
                logs[f"{prefix}/episodic_length"] = float(np.mean([e[1] for e in eps]))
                logs[f"{prefix}/human_normalized"] = common.human_normalized(game, ret)
                if prefix == "charts":
                    last_return = ret

        # Checkpoint before this update's scalars are written: every event already logged has a step below
        # global_step, and the checkpoint carries `logs`, which a resumed run writes at global_step itself (its
        # purge_step), so per-update tags have neither a gap nor a duplicate at the resume point. None after the
        # last update: the run is about to write its `finished` marker.
        if args.checkpoint_every and global_step >= next_checkpoint and update + 1 < num_updates:
            next_checkpoint = (global_step // args.checkpoint_every + 1) * args.checkpoint_every
            t0 = time.time()
            writer.flush()
            size = common.atomic_save({
                "format": CHECKPOINT_FORMAT, "global_step": global_step, "update": update + 1,
                "grad_steps": grad_steps, "args": dataclasses.asdict(args), "network": net.state_dict(),
                "optimizer": optimizer.state_dict(), "rng": common.rng_state(),
                "probe_generator": (device.type, probe_gen.get_state()), "probe_obs": probe_obs,
                "next_probe": next_probe, "last_return": last_return, "logs": logs,
                "wall_seconds": wall_before + time.time() - start_time}, ckpt_path)
            checkpoint_step = global_step
            print(f"checkpoint: step {global_step}, {size / 1e6:.1f} MB, {time.time() - t0:.2f} s -> {ckpt_path}",
                  flush=True)

        for k, v in logs.items():
            writer.add_scalar(k, v, global_step)
        last_good.refresh(global_step)
        if update % print_every == 0 or update == num_updates - 1:
            print(f"global_step={global_step}, SPS={sps}, episodic_return={last_return:.1f}, epsilon={epsilon:.3f}",
                  flush=True)

    elapsed = max(time.time() - start_time, 1e-9)
    print(f"done: {global_step} steps, {global_step - start_step} in {elapsed:.1f}s in this process "
          f"(SPS={int((global_step - start_step) / elapsed)}), metric probes {probe_time:.2f}s = "
          f"{100 * probe_time / elapsed:.2f}% of this process's time", flush=True)
    if device.type == "cuda":  # scripts/bench.py reads this line
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB allocated, "
              f"{torch.cuda.max_memory_reserved(device) / 2**20:.0f} MiB reserved")
    if args.save_model:
        path = os.path.join(run_dir, f"{args.exp_name}.cleanrl_model")
        torch.save(net.state_dict(), path)
        print(f"model saved to {path}")
    envs.close()
    writer.close()
    with open(os.path.join(run_dir, "finished"), "w") as f:  # sweeps skip finished runs; analyze.py counts them
        json.dump({"global_step": global_step, "wall_seconds": wall_before + time.time() - start_time}, f)
