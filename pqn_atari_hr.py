"""PQN on Atari (envpool) with Hadamard representations (HR), the Hadamax encoder, CReLU and ReDo baselines.

The official PQN Atari recipe (Gallici et al. 2024, github.com/mttga/purejaxql pqn_atari.py) = Table 5 of the HR
papers: 128 envpool envs x 32 steps, 2 epochs x 32 minibatches, RAdam 2.5e-4 linearly decayed, grad-norm clip 10,
gamma 0.99, Peng's Q(lambda) targets (lambda 0.65), no target network, no replay, epsilon 1 -> 0.001 over the first
10% of updates, 0.5 * MSE, 10M agent steps (40M frames), 8 extra test envs acting greedily. Not CleanRL's 8-env port.
Network: Nature CNN with LayerNorm before every hidden activation (over channels at each conv position, as Flax);
`HiddenLayer` builds every variant: HR (act(LN(W1 x + b1)) * act(LN(W2 x + b2)), on every layer by default), Hadamax
(Kooi et al. 2025), CReLU (Abbas et al. 2023). ReDo (Sokar et al. 2023) recycles every 16 updates (= 1024 gradient
steps) on --metrics-batch samples of the rollout. Envpool auto-resets on the step after a done (that step ignores the
action; as in the official code, the transition stays in the batch); episode scores are full games (lives reach 0 or
the time limit), summed from envpool's unclipped info["reward"].

    python pqn_atari_hr.py --env-id Breakout-v5 [--activation tanh --hr | --encoder hadamax | --redo ...]

Checkpoints (~50 MB, kept after the run) and --resume: harness.py. A resumed run's environments start fresh episodes
(seeded with --seed + the resume step).
"""
import copy
import math
import os
from dataclasses import dataclass
from typing import Literal, NamedTuple, Optional

import envpool
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import harness

Activation = Literal["relu", "tanh", "sigmoid", "gelu", "selu", "crelu"]


@dataclass
class Args:
    # Run
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    run_name: Optional[str] = None
    """run directory runs/NAME (unset: {env_id}__{exp_name}__{seed}__{unix_time})"""
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

    # Environment
    env_id: str = "Breakout-v5"
    """the envpool Atari id"""
    total_timesteps: int = 10_000_000
    """total agent steps of the training envs (one step = 4 frames)"""
    num_envs: int = 128
    """parallel training environments"""
    num_test_envs: int = 8
    """extra environments acting greedily (epsilon 0), never trained on; logged as eval/*"""
    max_episode_steps: int = 27_000
    """agent steps after which a game is truncated (27k = 108k frames, envpool's and official PQN's default)"""

    # Algorithm (the official PQN Atari config = the HR papers' Table 5)
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

    # Network variant (CONVENTIONS.md; the same flags and meanings in the three Atari scripts; ReDo: Sokar et al. 2023)
    activation: Optional[Activation] = None
    """activation of the target layers (unset: relu; gelu with --encoder hadamax, as the Hadamax encoder)"""
    hr: bool = False
    """Hadamard representation: each target layer becomes act(W1 x + b1) * act(W2 x + b2)"""
    hr_branches: int = 2
    """number of multiplied branches of an HR layer (3 = the v1 paper's "2HR", a product of three)"""
    hr_layers: Literal["last", "all"] = "all"
    """target layers: `last` = the dense block after the conv trunk, `all` = also every conv layer (Nature encoder)"""
    hidden_layers: int = 1
    """dense hidden layers after the conv trunk: fc1..fc{N-1}, then latent (`--hr --hidden-layers 2` = the v2
    paper's stacked 2HR)"""
    hidden_dim: int = 512
    """width of the dense hidden layer(s) (1024 = the parameter-matched widen baseline of HR)"""
    layernorm: bool = True
    """LayerNorm (eps 1e-6) on the pre-activations of every hidden layer, convs included (official PQN)"""
    combine: Literal["product", "sum"] = "product"
    """how HR branches are combined (`sum` is the v1 ablation)"""
    conv_activation: Activation = "relu"
    """activation of the Nature conv layers that are not targets (--encoder hadamax convs always use GELU)"""
    encoder: Literal["nature", "hadamax"] = "nature"
    """conv trunk: the Nature CNN, or the Hadamax encoder (2-branch LayerNorm -> GELU conv blocks with
    max-pooling, then a LayerNorm -> GELU latent)"""
    redo: bool = False
    """recycle dormant neurons of every hidden layer (ReDo)"""
    redo_tau: float = 0.1
    """ReDo dormancy threshold on the activation score; also used by representation/*/dormant_score"""
    redo_interval: int = 16
    """updates between recyclings (16 updates = 1024 gradient steps, ReDo's 1000 gradient steps)"""
    redo_reset_optimizer: bool = True
    """zero the RAdam moments of recycled weights (ReDo)"""

    # Metrics
    metrics_every: int = 100_000
    """agent steps between representation-metric probes (0 = off)"""
    metrics_batch: int = 1024
    """samples in the fixed probe batch (taken from the rollout at the first probe)"""
    kde_noise_std: float = 1e-3
    """std of the jitter of the KDE dormancy test (not given in the papers)"""
    srank_delta: float = 0.01
    """effective rank: the fewest singular values holding 1 - delta of their sum (Kumar et al. 2021; HR papers)"""
    snapshot_every: int = 0
    """agent steps between network snapshots in runs/NAME/snapshots/ (0 = off; taken after the update that crosses
    each multiple, as the probe): weights only, for scripts/probe.py"""

    # Checkpointing
    checkpoint_every: int = 2_000_000
    """agent steps between checkpoints in runs/NAME/checkpoint.pt (0 = off); about 30 minutes on one GPU, ~50 MB each"""
    resume: bool = False
    """continue runs/NAME (needs --run-name) from its checkpoint; flags that change training must match args.json"""

    # Speed
    cuda: bool = True
    """if toggled, cuda will be enabled when available"""
    torch_deterministic: bool = True
    """if toggled, repeatable on CUDA: cuDNN deterministic, torch.use_deterministic_algorithms (warn-only), cuBLAS workspace :4096:8 (harness.deterministic)"""
    torch_threads: int = 0
    """torch intra-op CPU threads (0 = torch's default); 1 is much faster on a CPU shared with envpool/other jobs"""
    envpool_threads: int = 0
    """envpool worker threads (0 = the CPUs this process may use, at most one per env; envpool's own default is the
    host's CPU count)"""
    compile: Literal["auto", "on", "off"] = "auto"
    """torch.compile the acting step, the TD loss and the Q(lambda) targets (auto: on with CUDA)"""
    cudagraphs: Literal["auto", "on", "off"] = "auto"
    """replay the acting step and the whole gradient step as CUDA graphs (auto: on with CUDA; needs CUDA)"""


def resolve_defaults(args: Args) -> Args:
    """Defaults that depend on other flags (recorded in args.json, compared on --resume)."""
    args.activation = args.activation or ("gelu" if args.encoder == "hadamax" else "relu")
    return args


def validate(args: Args) -> None:
    """PQN's own checks (harness.Run does the generic ones): one line on stderr naming the flag, exit 1."""
    harness.at_most(args, {"update_epochs": harness.MAX_PASSES}, harness.PASSES)
    harness.at_most(args, {"envpool_threads": harness.MAX_THREADS, "torch_threads": harness.MAX_THREADS}, harness.THREADS)
    harness.at_most(args, {"num_test_envs": 4096}, "an envpool of more environments than this cannot be made")
    harness.at_most(args, {"max_episode_steps": 2**31 - 1}, "envpool holds it as a 32-bit int")
    harness.at_most(args, {"hidden_layers": harness.MAX_LAYERS, "hr_branches": harness.MAX_LAYERS}, harness.LAYER_COUNT)
    if args.env_id not in envpool.list_all_envs():
        harness.fail(f"--env-id {args.env_id!r} is not an envpool environment (e.g. Breakout-v5)")
    try:
        common.atari_game_name(args.env_id)
    except ValueError:
        harness.fail(f"--env-id {args.env_id!r} is not one of the 57 Atari games (e.g. Breakout-v5)")
    if args.capture_video:
        harness.fail("--capture-video is not supported by this envpool script")
    if args.hr and args.hr_branches < 2:
        harness.fail(f"--hr-branches must be >= 2 with --hr, got {args.hr_branches}")
    if args.combine != "product" and not args.hr:
        harness.fail("--combine sum only makes sense with --hr")
    if args.encoder == "hadamax" and args.conv_activation != "relu":
        harness.fail("--conv-activation applies to the Nature conv trunk; --encoder hadamax convs always use GELU")
    harness.at_least(args, {"num_envs": 1, "num_steps": 1, "num_minibatches": 1, "update_epochs": 1,
                            "num_test_envs": 0, "hidden_layers": 1, "hidden_dim": 1, "redo_interval": 1,
                            "envpool_threads": 0, "max_episode_steps": 1, "torch_threads": 0})
    batch = args.num_envs * args.num_steps
    if batch % args.num_minibatches:
        harness.fail(f"--num-minibatches ({args.num_minibatches}) must divide --num-envs x --num-steps ({batch})")
    if 1 <= args.total_timesteps < batch:
        harness.fail(f"--total-timesteps ({args.total_timesteps}) must be >= --num-envs x --num-steps ({batch})")
    if (args.metrics_every or args.redo) and args.metrics_batch > batch:  # probe and ReDo draw from the rollout
        harness.fail(f"--metrics-batch {args.metrics_batch} exceeds the rollout (--num-envs x --num-steps = {batch})")
    harness.unit_interval(args, ["gamma", "q_lambda", "start_e", "end_e"])
    if not 0.0 < args.exploration_fraction <= 1.0:
        harness.fail(f"--exploration-fraction must be in (0, 1], got {args.exploration_fraction}")
    harness.finite(args, ["learning_rate", "max_grad_norm"])
    harness.finite(args, ["redo_tau", "kde_noise_std"], positive=False)


# ------------------------------------------------------------------------------------------------------------------
# environment and rollout


def make_env(args: Args, num_envs: int, seed: int):
    """One envpool pool: the official PQN Atari settings (episodic life, reward clip, noop 30, no sticky actions).
    info["reward"] is the unclipped reward; a full game ends when info["terminated"] (lives reach 0) or truncation."""
    return envpool.make(args.env_id, env_type="gymnasium", num_envs=num_envs, seed=seed, episodic_life=True,
                        reward_clip=True, noop_max=30, frame_skip=4, repeat_action_probability=0.0,
                        num_threads=min(num_envs, args.envpool_threads or harness.available_cpus()),
                        max_episode_steps=args.max_episode_steps)


class EpisodeStats:
    """Full-game raw scores from envpool: sums info["reward"] (unclipped) until the game is over (lives reach 0,
    info["terminated"]) or the time limit truncates it; life losses (episodic_life dones) do not end a game."""

    def __init__(self, num_envs: int):
        self.ret, self.len = np.zeros(num_envs), np.zeros(num_envs, dtype=np.int64)

    def step(self, info, truncated):
        self.ret += info["reward"]
        self.len += 1
        ended = np.flatnonzero(info["terminated"].astype(bool) | truncated)
        finished = [(i, self.ret[i], self.len[i]) for i in ended]
        self.ret[ended], self.len[ended] = 0.0, 0
        return finished


class Batch(NamedTuple):
    """Samples of a rollout: what one gradient step reads."""
    obs: torch.Tensor  # (B, 4, 84, 84) uint8
    actions: torch.Tensor  # (B,) long
    targets: torch.Tensor  # (B,) Q(lambda) targets


class Rollout(NamedTuple):
    """One rollout of the training envs, (num_steps, num_envs, ...) per field, on the device, refilled in place."""
    obs: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    dones: torch.Tensor  # cuts the bootstrap after the step
    q_max: torch.Tensor  # max_a Q(s_t, a) computed when acting: the bootstrap of step t - 1
    targets: torch.Tensor


# ---------------------------------------------------------------------------------------------------------------
# network: the same text in dqn_atari_hr.py, ppo_atari_hr.py and pqn_atari_hr.py (`diff` between the scripts shows
# only their own classes). Every hidden layer is a HiddenLayer (plain, HR, sum, LayerNorm, CReLU; dense or conv);
# an Encoder is a conv trunk (Nature or Hadamax) and the dense block fc1..fc{N-1}, latent (CONVENTIONS layer names).


def activate(x: torch.Tensor, name: str, dim: int) -> torch.Tensor:
    """The activation `name` of x; crelu (concat(relu(x), relu(-x))) doubles the width along `dim`."""
    if name == "crelu":
        return torch.cat([F.relu(x), F.relu(-x)], dim=dim)
    if name == "gelu":
        return F.gelu(x, approximate="tanh")  # Flax's nn.gelu default, as the official Hadamax code
    return {"relu": F.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "selu": F.selu}[name](x)


def trunc_normal_(w: torch.Tensor, scale: float, fan: float) -> None:
    """Flax's variance_scaling(scale, fan, "truncated_normal"): he_normal = (2, fan_in), glorot_normal (= Flax's
    xavier_normal) = (1, fan_avg), lecun_normal = (1, fan_in)."""
    std = math.sqrt(scale / fan) / 0.87962566103423978  # std of a unit normal truncated to [-2, 2]
    nn.init.trunc_normal_(w, 0.0, std, -2 * std, 2 * std)


def init_(w: torch.Tensor, b, init: str, gain: float = math.sqrt(2), branches: int = 1) -> None:
    """(Re)initialise a layer as `branches` independent branches, each as a layer of its own would be: weight w
    (branches * out, in[, kh, kw]), bias b (branches * out,) or None.
    torch:       PyTorch's nn.Linear/nn.Conv2d default, per branch: kaiming-uniform(a=sqrt 5), then the bias
                 U(+-1/sqrt fan_in) (CleanRL DQN; the draws of constructing the branches one after the other)
    orthogonal:  orthogonal with `gain` per branch, zero bias (CleanRL PPO's layer_init)
    he, glorot, lecun: Flax's truncated normals, zero bias, all branches in one draw (they share their fans):
                 he_normal: official PQN and the Hadamax dense layer; glorot_normal: the Hadamax convs; lecun_normal:
                 Flax's Dense default (PQN's Q head)"""
    if init in ("torch", "orthogonal"):
        for wk, bk in zip(w.chunk(branches), b.chunk(branches) if b is not None else [None] * branches):
            fan_in = wk[0].numel()
            if init == "torch":
                nn.init.kaiming_uniform_(wk, a=math.sqrt(5))
                if bk is not None:
                    nn.init.uniform_(bk, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
            else:
                nn.init.orthogonal_(wk, gain)
                if bk is not None:
                    nn.init.zeros_(bk)
        return
    fan_in, fan_out = w[0].numel(), w.shape[0] // branches * w[0, 0].numel()  # per branch; convs count kh * kw
    scale, fan = {"he": (2.0, fan_in), "glorot": (1.0, (fan_in + fan_out) / 2), "lecun": (1.0, fan_in)}[init]
    trunc_normal_(w, scale, fan)
    if b is not None:
        nn.init.zeros_(b)


class HiddenLayer(nn.Module):
    """K independently parameterised branches of (Linear or Conv2d -> optional LayerNorm -> activation), combined by
    elementwise product (HR: act(W1 x + b1) * act(W2 x + b2)) or sum (the v1 ablation); K = 1 is a plain layer. The
    branches are one fused Linear/Conv2d with K*out outputs (branch-major), so a forward is one matmul/conv; each
    branch has its own weights, bias and LayerNorm affine, and is initialised as a separate layer would be: PyTorch's
    default draws for each (the random stream of constructing K layers), then `init` (see init_). LayerNorm
    (eps 1e-6, Flax's) normalises conv maps over channels at each position (Flax's NHWC convention); padding="same"
    pads as Flax's SAME (the extra row/column at the end). forward returns (output, pre-activation): the branches'
    pre-activations (after LayerNorm) stacked along the unit/channel dim, branch-major, as the fused weight's rows."""

    def __init__(self, kind: str, in_dim: int, out_dim: int, activation: str, layernorm: bool = False,
                 branches: int = 1, combine: str = "product", kernel: int = 1, stride: int = 1, padding=0,
                 init: str = "torch"):
        super().__init__()
        self.kind, self.out_dim, self.activation, self.branches = kind, out_dim, activation, branches
        self.combine, self.init, self.layernorm = combine, init, layernorm
        self.width = out_dim * (2 if activation == "crelu" else 1)  # output features/channels
        # "same" (stride 1) as Flax's SAME: (k - 1) // 2 before, k // 2 after (PyTorch's padding="same" pads alike but
        # warns for even kernels)
        self.pad = ((kernel - 1) // 2, kernel // 2) * 2 if padding == "same" else None
        if kind == "conv":
            self.fused = nn.utils.skip_init(nn.Conv2d, in_dim, branches * out_dim, kernel, stride,
                                            padding=0 if padding == "same" else padding)
        else:
            self.fused = nn.utils.skip_init(nn.Linear, in_dim, branches * out_dim)
        with torch.no_grad():  # PyTorch's default draws (constructing K layers), then `init` (re-initialising them)
            init_(self.fused.weight, self.fused.bias, "torch", branches=branches)
            if init != "torch":
                init_(self.fused.weight, self.fused.bias, init, branches=branches)
        if layernorm:
            self.ln_weight = nn.Parameter(torch.ones(branches * out_dim))
            self.ln_bias = nn.Parameter(torch.zeros(branches * out_dim))

    def init_weight_(self, w: torch.Tensor) -> None:
        """Fresh incoming weights of the fused shape, by `init` (ReDo's re-initialisation)."""
        init_(w, None, self.init, branches=self.branches)

    def forward(self, x: torch.Tensor):
        z = self.fused(x if self.pad is None else F.pad(x, self.pad))  # (N, K*out[, H, W]), branch-major
        pres = z.split(self.out_dim, dim=1)
        if self.layernorm:  # over each branch's units; for convs over the channels at each position (Flax's NHWC)
            pres = [F.layer_norm(p.movedim(1, -1), (self.out_dim,), w, b, eps=1e-6).movedim(-1, 1)  # Flax's eps
                    for p, w, b in zip(pres, self.ln_weight.split(self.out_dim), self.ln_bias.split(self.out_dim))]
            z = pres[0] if self.branches == 1 else torch.cat(pres, dim=1)
        out = activate(pres[0], self.activation, dim=1)
        for p in pres[1:]:
            a = activate(p, self.activation, dim=1)
            out = out * a if self.combine == "product" else out + a
        return out, z


def spatial_extremes(pre: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, 1, 2): each channel's max and min over space. A channel is <= 0 at every position iff
    its max is, > 0 everywhere iff its min is, so common.saturation_fractions gives the same answer on far less memory
    (Hadamax conv1 pre-activations are 84x84)."""
    return torch.stack([pre.amax(dim=(2, 3)), pre.amin(dim=(2, 3))], dim=-1).unsqueeze(2)


def nature_trunk(in_ch: int, **conv) -> tuple[dict, dict]:
    """The Nature CNN (32 8x8/4, 64 4x4/2, 64 3x3/1, VALID) as HiddenLayers conv1..conv3 with the HiddenLayer keyword
    arguments `conv` (activation, layernorm, branches, combine, init); no pools."""
    convs = {}
    for i, (out, k, s) in enumerate([(32, 8, 4), (64, 4, 2), (64, 3, 1)], start=1):
        convs[f"conv{i}"] = layer = HiddenLayer("conv", in_ch, out, kernel=k, stride=s, **conv)
        in_ch = layer.width
    return convs, {}


def hadamax_trunk(in_ch: int) -> tuple[dict, dict]:
    """The Hadamax encoder's conv blocks (Kooi et al. 2025, as the official Flax code): per block two stride-1 SAME
    conv branches, each LayerNorm -> tanh-GELU, multiplied, then max-pooled: 84 -> 21 (4/4), 21 -> 11 (2/2, ceil =
    Flax SAME), 11 -> 11 (3/1, pad 1 = Flax SAME). Kernels Flax's xavier_normal (truncated Glorot-normal), zero
    biases. Returns ({conv1..conv3: HiddenLayer}, {conv1..conv3: pool})."""
    convs, pools = {}, {}
    blocks = [(32, 8, nn.MaxPool2d(4, 4)), (64, 4, nn.MaxPool2d(2, 2, ceil_mode=True)),
              (64, 3, nn.MaxPool2d(3, 1, padding=1))]
    for i, (out, k, pool) in enumerate(blocks, start=1):
        convs[f"conv{i}"] = HiddenLayer("conv", in_ch, out, "gelu", True, 2, "product", k, 1, "same", init="glorot")
        pools[f"conv{i}"], in_ch = pool, out
    return convs, pools


class Encoder(nn.Module):
    """uint8 frame stacks -> the latent fed to the head(s): the conv trunk (conv1..conv3; `conv` are the HiddenLayer
    keyword arguments of the Nature convs, unused by Hadamax) then the dense block fc1..fc{N-1}, latent (`dense`).
    With --encoder hadamax the dense layers get the official Hadamax init (Flax's he_normal), whatever dense["init"].
    forward(obs, record): with a dict `record`, also stores per layer (output, pre-activation): the output after the
    Hadamax max-pool (what the next layer sees), conv pre-activations reduced by spatial_extremes."""

    def __init__(self, encoder: str, obs_shape, conv: dict, dense: dict, hidden_layers: int, hidden_dim: int):
        super().__init__()
        convs, pools = hadamax_trunk(obs_shape[0]) if encoder == "hadamax" else nature_trunk(obs_shape[0], **conv)
        self.hidden, self.pools = nn.ModuleDict(convs), nn.ModuleDict(pools)
        with torch.no_grad():  # only the convs exist yet: the trunk's output map
            x = self(torch.zeros(1, *obs_shape))
        self.conv_out_hw, width = x.shape[2] * x.shape[3], x[0].numel()  # H*W: ReDo's outgoing group of the trunk
        dense = dict(dense, init="he") if encoder == "hadamax" else dense
        for name in [f"fc{i}" for i in range(1, hidden_layers)] + ["latent"]:
            self.hidden[name] = layer = HiddenLayer("linear", width, hidden_dim, **dense)
            width = layer.width
        self.width = width

    def forward(self, obs: torch.Tensor, record=None) -> torch.Tensor:
        x = obs.float() / 255.0
        for name, layer in self.hidden.items():
            if layer.kind == "linear" and x.dim() == 4:
                x = x.flatten(1)
            x, pre = layer(x)
            if name in self.pools:
                x = self.pools[name](x)
            if record is not None:
                record[name] = (x, spatial_extremes(pre) if pre.dim() == 4 else pre)
        return x


class QNetwork(nn.Module):
    """Encoder (conv1..conv3, fc1..fc{N-1}, latent) -> linear Q head. Official PQN (Flax's defaults): LayerNorm on
    every hidden layer, convs included, truncated He-normal hidden layers, a LeCun-normal head, zero biases."""

    def __init__(self, args: Args, n_actions: int, obs_shape=(4, 84, 84)):
        super().__init__()
        target = dict(activation=args.activation or ("gelu" if args.encoder == "hadamax" else "relu"),
                      layernorm=args.layernorm, branches=args.hr_branches if args.hr else 1, combine=args.combine,
                      init="he")  # --hr-layers last: plain convs with --conv-activation (LayerNorm all the same)
        conv = target if args.hr_layers == "all" else dict(target, activation=args.conv_activation, branches=1)
        self.encoder = Encoder(args.encoder, obs_shape, conv, target, args.hidden_layers, args.hidden_dim)
        self.head = nn.Linear(self.encoder.width, n_actions)
        init_(self.head.weight, self.head.bias, "lecun")  # Flax's Dense default

    def hidden_layers(self):
        """[(name, layer)] in forward order: every layer metrics and ReDo act on."""
        return list(self.encoder.hidden.items())

    def forward(self, x: torch.Tensor, probe: bool = False):
        """Q-values of uint8 stacks (n, 4, 84, 84). probe=True also returns {layer: (output, pre-activation)}, conv
        pre-activations reduced by spatial_extremes."""
        layers = {} if probe else None
        q = self.head(self.encoder(x, layers))
        return (q, layers) if probe else q


# ------------------------------------------------------------------------------------------------------------------
# metric probe and ReDo


@torch.no_grad()
def probe_acts(net: QNetwork, obs: torch.Tensor, chunk: int = 256) -> dict:
    """{layer: (post, pre)} on `obs`, forwarded in chunks to bound memory (Hadamax conv1 maps are 84x84)."""
    parts = [net(obs[i:i + chunk], probe=True)[1] for i in range(0, len(obs), chunk)]
    return {name: (torch.cat([p[name][0] for p in parts]), torch.cat([p[name][1] for p in parts])) for name in parts[0]}


def probe_metrics(net: QNetwork, probe_obs: torch.Tensor, args: Args) -> dict:
    """Every representation/* scalar on the fixed probe batch: one extra forward. The KDE jitter comes from fresh
    generators seeded with --seed (common.probe_scalars): a probe depends only on the network and the batch."""
    return common.probe_scalars(probe_acts(net, probe_obs), net.head.weight, tau=args.redo_tau,
                                kde_noise_std=args.kde_noise_std, seed=args.seed, delta=args.srank_delta)


def probe_snapshot(args: Args, snapshot: dict, probe: dict, device) -> dict:
    """scripts/probe.py: probe_metrics of one snapshot (harness.Snapshots) in a QNetwork built as the run built it."""
    build = snapshot["build"]
    net = QNetwork(args, build["n_actions"], tuple(build["obs_shape"])).to(device)
    net.load_state_dict(snapshot["networks"]["network"])
    return probe_metrics(net, probe["obs"].to(device), args)


@torch.no_grad()
def redo_step(net: QNetwork, optimizer, obs: torch.Tensor, args: Args) -> dict:
    """ReDo (Sokar et al. 2023, Alg. 1) on every hidden layer: neurons with activation score <= tau on `obs` get
    fresh incoming weights in every branch (LayerNorm affine back to 1/0), zero outgoing weights, zeroed moments."""
    acts = probe_acts(net, obs)
    layers = net.hidden_layers()
    total, out, opt = 0, {}, optimizer if args.redo_reset_optimizer else None
    for i, (name, layer) in enumerate(layers):
        dormant = common.activation_scores(acts[name][0]) <= args.redo_tau
        # crelu: a unit is recycled when both of its halves are dormant; its two output halves go with it
        unit = dormant[: layer.out_dim] & dormant[layer.out_dim:] if layer.activation == "crelu" else dormant
        out_mask = unit.repeat(layer.width // layer.out_dim)
        incoming = [(layer.fused.weight, layer.fused.bias)]
        incoming += [(layer.ln_weight, layer.ln_bias)] if layer.layernorm else []  # LayerNorm affine back to 1/0
        common.redo_recycle_(unit.repeat(layer.branches), incoming, [], opt, init_fn=layer.init_weight_)
        nxt = layers[i + 1][1].fused.weight if i + 1 < len(layers) else net.head.weight
        group = net.encoder.conv_out_hw if layer.kind == "conv" and layers[i + 1][1].kind == "linear" else 1
        common.redo_recycle_(out_mask, [], [nxt], opt, outgoing_group=group)
        n = int(unit.sum().item())
        out[f"redo/{name}/recycled_fraction"] = n / layer.out_dim
        total += n
    out["redo/recycled_fraction"] = total / sum(layer.out_dim for _, layer in layers)
    return out


def training_state(net: QNetwork, optimizer: torch.optim.Optimizer) -> dict:
    """The learned state (live references): what the last-good copy holds, and the core of a checkpoint."""
    return {"network": net.state_dict(), "optimizer": optimizer.state_dict()}


# ------------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: acting, Q(lambda) targets, the update: functions of tensors the loop builds once (--compile, --cudagraphs)


def make_act(net: QNetwork, n_actions: int, eps_mask: torch.Tensor):
    """act(obs, epsilon) -> (actions, max Q): epsilon-greedy over all envs (eps_mask is 0 for the greedy test envs)."""
    @torch.no_grad()
    def act(obs: torch.Tensor, epsilon: torch.Tensor):
        q = net(obs)
        explore = torch.rand(eps_mask.shape, device=obs.device) < epsilon * eps_mask
        random_actions = torch.randint(0, n_actions, eps_mask.shape, device=obs.device)
        return torch.where(explore, random_actions, q.argmax(dim=1)), q.max(dim=1).values

    return act


def q_lambda_targets(rewards: torch.Tensor, dones: torch.Tensor, next_q_max: torch.Tensor, gamma: float,
                     lam: float) -> torch.Tensor:
    """Peng's Q(lambda) targets (PQN paper), backwards on the device; next_q_max[t] = max_a Q(s_{t+1}, a):
        G_{T-1} = r_{T-1} + gamma (1 - d_{T-1}) maxQ(s_T)
        G_t     = r_t + gamma (1 - d_t) [(1 - lam) maxQ(s_{t+1}) + lam G_{t+1}]"""
    targets = torch.empty_like(rewards)
    g = rewards[-1] + gamma * (1.0 - dones[-1]) * next_q_max[-1]
    targets[-1] = g
    for t in range(rewards.shape[0] - 2, -1, -1):
        g = rewards[t] + gamma * (1.0 - dones[t]) * ((1.0 - lam) * next_q_max[t] + lam * g)
        targets[t] = g
    return targets


def make_train_step(net: QNetwork, optimizer: torch.optim.Optimizer, data: Batch, max_grad_norm: float,
                    compile_loss: bool = False):
    """train_step(idx) -> (loss, mean Q taken): one RAdam step on the minibatch data[idx] of the rollout (persistent
    tensors, refilled in place every update). The loss (0.5 * MSE to the Q(lambda) targets) is what torch.compile
    sees; the whole step, backward and optimizer included, is what a CUDA graph captures."""
    def td_loss(idx: torch.Tensor):
        mb = Batch(data.obs[idx], data.actions[idx], data.targets[idx])
        q_taken = net(mb.obs).gather(1, mb.actions[:, None]).squeeze(1)
        return 0.5 * (q_taken - mb.targets).pow(2).mean(), q_taken.detach().mean()

    td_loss = harness.compiled(td_loss, compile_loss)

    def train_step(idx: torch.Tensor):
        loss, q_mean = td_loss(idx)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), max_grad_norm)
        optimizer.step()
        return loss.detach(), q_mean

    return train_step


if __name__ == "__main__":
    args = harness.cli(Args)
    validate(args)
    run = harness.Run(args, resolve=resolve_defaults, networks={
        f"--hidden-dim {args.hidden_dim} --hidden-layers {args.hidden_layers} --hr-branches {args.hr_branches}":
        lambda: [QNetwork(args, 18)]})  # 18: the most actions
    device = run.device
    torch.set_num_threads(args.torch_threads or torch.get_num_threads())
    n_train, n_total = args.num_envs, args.num_envs + args.num_test_envs  # one pool: train envs, then test envs
    envs = make_env(args, n_total, args.seed + run.start_step)  # a resumed run starts fresh episodes
    n_actions, obs_shape = envs.action_space.n, envs.observation_space.shape
    net = QNetwork(args, n_actions, obs_shape).to(device)
    run.describe(net)
    snapshots = harness.Snapshots(run, {"network": net}, build={"n_actions": int(n_actions),
                                                              "obs_shape": list(obs_shape)},
                                  probe_bytes=args.metrics_batch * math.prod(obs_shape))
    optimizer = torch.optim.RAdam(net.parameters(), lr=args.learning_rate)

    batch_size, n_mb = args.num_envs * args.num_steps, args.update_epochs * args.num_minibatches  # n_mb per update
    minibatch_size, num_updates = batch_size // args.num_minibatches, args.total_timesteps // batch_size
    shape = (args.num_steps, n_train)
    rollout = Rollout(torch.zeros(*shape, *obs_shape, dtype=torch.uint8, device=device),
                      torch.zeros(shape, dtype=torch.long, device=device), *torch.zeros(4, *shape, device=device))
    data = Batch(rollout.obs.flatten(0, 1), rollout.actions.flatten(), rollout.targets.flatten())  # views
    eps_mask = (torch.arange(n_total, device=device) < n_train).float()  # 1 for training envs, 0 for test envs
    stats = EpisodeStats(n_total)
    # `update` drives epsilon and ReDo, `grad_steps` the learning rate; the probe batch is fixed at the first probe
    first_update, grad_steps, probe_obs, lr = 0, 0, None, args.learning_rate
    if run.checkpoint is not None:
        state = run.checkpoint["state"]
        net.load_state_dict(state["network"])
        optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))  # own copies, not views of the mapped file
        first_update, grad_steps = state["update"], state["grad_steps"]
        probe_obs = None if state["probe_obs"] is None else state["probe_obs"].to(device, copy=True)
        harness.set_rng_state(state["rng"])
        run.log(run.start_step, state["logs"])  # the checkpointed update's scalars: their step is the purge step
        if snapshots.due(run.start_step, run.start_step - batch_size):  # and its snapshot, purged with them
            snapshots.save(run.start_step, None if probe_obs is None else {"obs": probe_obs})
        run.resumed(net)
        del state
    use_compile, use_graphs = run.fast_paths()
    harness.set_capturable_(optimizer, use_graphs)  # after load_state_dict, which brings the saved run's setting
    act = harness.compiled(make_act(net, n_actions, eps_mask), use_compile)
    train_step = make_train_step(net, optimizer, data, args.max_grad_norm, use_compile)
    compute_targets = harness.compiled(q_lambda_targets, use_compile)
    if use_graphs:
        act, train_step = harness.cuda_graphed(act), harness.cuda_graphed(train_step)
    obs_in = harness.Staging((n_total, *obs_shape), torch.uint8, device)
    step_in = harness.Staging((2, n_train), torch.float32, device)  # rewards and dones in one copy
    epsilon_t = torch.zeros((), device=device)
    last_good = harness.LastGood()  # what a divergence falls back to; refreshed after every update
    last_good.update(run.start_step, training_state(net, optimizer))

    obs_in.wait()[:] = envs.reset()[0]  # seeded in envpool.make
    next_obs = obs_in.upload()
    for update in range(first_update, num_updates):
        # ALGO LOGIC: a rollout of num_steps steps, epsilon-greedy on the training envs, greedy on the test envs
        frac = min(update / (args.exploration_fraction * num_updates), 1.0)  # epsilon: linear, then constant
        epsilon = args.start_e + frac * (args.end_e - args.start_e)
        epsilon_t.fill_(epsilon)
        train_eps, eval_eps = [], []
        for t in range(args.num_steps):
            action, q_best = act(next_obs, epsilon_t)
            rollout.obs[t], rollout.actions[t] = next_obs[:n_train], action[:n_train]
            rollout.q_max[t] = q_best[:n_train]
            o, r, term, trunc, info = envs.step(action.cpu().numpy())  # the one host sync per step
            obs_in.wait()[:] = o
            next_obs = obs_in.upload()
            rewards_dones = step_in.wait()
            rewards_dones[0], rewards_dones[1] = r[:n_train], (term | trunc)[:n_train]
            rollout.rewards[t], rollout.dones[t] = step_in.upload()
            for i, ret, length in stats.step(info, trunc):
                (train_eps if i < n_train else eval_eps).append((ret, length))
        global_step, prev_step = (update + 1) * batch_size, update * batch_size

        # ALGO LOGIC: Q(lambda) targets, bootstrapped from the rollout's own max Q and the final next observation
        with torch.no_grad():
            next_q = torch.cat([rollout.q_max[1:], net(next_obs[:n_train]).max(dim=1).values[None]])  # max Q(s_t+1)
            rollout.targets.copy_(compute_targets(rollout.rewards, rollout.dones, next_q, args.gamma, args.q_lambda))

        # ALGO LOGIC: update_epochs passes of num_minibatches RAdam steps over the shuffled rollout
        loss_sum, q_sum = torch.zeros((), device=device), torch.zeros((), device=device)
        for epoch in range(args.update_epochs):
            for idx in torch.randperm(batch_size, device=device).split(minibatch_size):
                if args.anneal_lr:
                    lr = args.learning_rate * (1.0 - grad_steps / (num_updates * n_mb))
                    harness.set_lr(optimizer, lr)
                loss, q_mean = train_step(idx)
                grad_steps += 1
                loss_sum += loss  # static outputs of a graph: consumed here, before the next replay
                q_sum += q_mean

        # the one host sync of the update: mean loss and Q, and whether every parameter is still finite
        loss_mean, q_mean, finite = torch.stack([loss_sum / n_mb, q_sum / n_mb,
                                                 harness.all_finite(net.parameters()).float()]).tolist()
        if not (math.isfinite(loss_mean) and math.isfinite(q_mean) and finite):
            envs.close()
            what = "loss" if not math.isfinite(loss_mean) else ("Q-values" if finite else "parameters")
            run.stop_nonfinite(global_step, what, last_good)
        logs = {"losses/td_loss": loss_mean, "losses/q_values": q_mean, "charts/learning_rate": lr,
                "charts/epsilon": epsilon}
        if args.redo and harness.due(update + 1, args.redo_interval):  # scored on random samples of the rollout
            idx = torch.randperm(batch_size, device=device)[: args.metrics_batch]
            logs.update(redo_step(net, optimizer, data.obs[idx], args))
        if harness.due(global_step, args.metrics_every, prev_step):
            with run.probing():
                if probe_obs is None:  # the fixed probe batch, drawn once from the rollout with its own generator
                    pick = torch.randperm(batch_size, device=device,
                                          generator=torch.Generator(device).manual_seed(args.seed))
                    probe_obs = data.obs[pick[: args.metrics_batch]].clone()
                logs.update(probe_metrics(net, probe_obs, args))
        if snapshots.due(global_step, prev_step):  # the network the probe above saw
            snapshots.save(global_step, None if probe_obs is None else {"obs": probe_obs})
        logs["charts/SPS"] = run.sps(global_step)
        for prefix, eps in (("charts", train_eps), ("eval", eval_eps)):
            if eps:  # the mean of the full games that ended in this rollout
                ret, length = np.mean(eps, axis=0).tolist()
                logs.update({f"{prefix}/episodic_return": ret, f"{prefix}/episodic_length": length,
                             f"{prefix}/human_normalized": common.human_normalized(args.env_id, ret)})
        run.log(global_step, logs)
        run.counters["last_return"] = logs.get("charts/episodic_return", run.counters["last_return"])
        # the checkpoint carries `logs`: a resumed run purges from its step and writes them again there
        if update + 1 < num_updates and run.checkpoint_due(global_step, prev_step):
            run.save(global_step, {**training_state(net, optimizer), "update": update + 1, "grad_steps": grad_steps,
                                   "rng": harness.rng_state(), "probe_obs": probe_obs, "logs": logs})
        last_good.update(global_step, training_state(net, optimizer))
        run.progress(global_step, epsilon=epsilon)

    if args.save_model:
        path = os.path.join(run.dir, f"{args.exp_name}.cleanrl_model")
        torch.save(net.state_dict(), path)
        print(f"model saved to {path}")
    envs.close()
    run.finish(num_updates * batch_size, keep_checkpoint=True)
