"""PPO on Atari (envpool) with Hadamard representations (HR) on the representation shared by actor and critic.

Recipe: CleanRL's `ppo_atari_envpool.py` = Table 4 of the HR papers: 8 envs x 128 steps, Adam (lr 2.5e-4 annealed
linearly, eps 1e-5), gamma 0.99, GAE lambda 0.95, 4 minibatches x 4 epochs, normalised advantages, clip 0.1 (policy
and value), entropy 0.01, value 0.5, grad-norm 0.5, 10M agent steps. Episodic life and reward clipping for learning;
charts/episodic_return is the raw score of full games. HR ("Hadamard Representations", arXiv 2406.09079, v1 and v2):
a layer becomes act(W1 x + b1) * act(W2 x + b2); in HR-PPO it is `latent`, which feeds actor and critic.
`--encoder hadamax`: the Hadamax encoder ("Hadamax Encoding", arXiv 2505.15345).

Representation metrics are probed after the first rollout, then every --metrics-every steps, on a fixed batch drawn
from that rollout. Checkpoints and resume: harness.py; a checkpoint (~50 MB) follows the update of the iteration that
crosses a multiple of --checkpoint-every and stays when the run ends; a resumed run starts fresh episodes.
GPU fast paths (auto = on with CUDA): --compile (acting step, PPO loss, GAE), --cudagraphs (the acting step and the
whole minibatch update with a capturable Adam), pinned uploads; each update syncs with the host once.

    python ppo_atari_hr.py --env-id Breakout-v5                                   # ReLU baseline
    python ppo_atari_hr.py --env-id Breakout-v5 --activation tanh --hr            # HR(tanh), the papers' method
    python ppo_atari_hr.py --env-id Breakout-v5 --encoder hadamax
    python ppo_atari_hr.py --env-id Breakout-v5 --run-name my-run --resume        # continue an interrupted run
"""
import difflib
import math
import os
from dataclasses import dataclass
from typing import Literal, NamedTuple, Optional

import envpool
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

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
    torch_deterministic: bool = True
    """if toggled, repeatable on CUDA: cuDNN deterministic, torch.use_deterministic_algorithms (warn-only), cuBLAS workspace :4096:8 (harness.deterministic)"""
    cuda: bool = True
    """if toggled, cuda will be used when available"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases (needs wandb installed)"""
    wandb_project_name: str = "cleanRL"
    """the wandb's project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of wandb's project"""
    capture_video: bool = False
    """not supported: envpool does not render frames (the flag exists for CleanRL compatibility)"""
    save_model: bool = False
    """save the agent to runs/NAME/ppo_atari_hr.pt at the end and evaluate it for --eval-episodes full games"""
    eval_episodes: int = 10
    """full-game episodes played by the saved agent (with --save-model), logged as eval/episodic_return"""
    run_name: Optional[str] = None
    """run directory runs/NAME; default {env_id}__{exp_name}__{seed}__{unix_time}"""

    # Environment
    env_id: str = "Breakout-v5"
    """the id of the envpool Atari environment (e.g. Breakout-v5)"""

    # Algorithm (CleanRL ppo_atari_envpool = the HR papers' Table 4)
    total_timesteps: int = 10_000_000
    """total agent steps (one step = 4 frames) of the experiment"""
    learning_rate: float = 2.5e-4
    """the learning rate of the optimizer"""
    num_envs: int = 8
    """the number of parallel game environments"""
    num_steps: int = 128
    """the number of steps to run in each environment per policy rollout"""
    anneal_lr: bool = True
    """toggle learning rate annealing (linear to 0)"""
    gamma: float = 0.99
    """the discount factor gamma"""
    gae_lambda: float = 0.95
    """the lambda for the general advantage estimation"""
    num_minibatches: int = 4
    """the number of mini-batches"""
    update_epochs: int = 4
    """the K epochs to update the policy"""
    norm_adv: bool = True
    """toggles advantages normalization"""
    clip_coef: float = 0.1
    """the surrogate clipping coefficient"""
    clip_vloss: bool = True
    """toggles whether or not to use a clipped loss for the value function, as per the paper"""
    ent_coef: float = 0.01
    """coefficient of the entropy"""
    vf_coef: float = 0.5
    """coefficient of the value function"""
    max_grad_norm: float = 0.5
    """the maximum norm for the gradient clipping"""
    target_kl: Optional[float] = None
    """the target KL divergence threshold (off by default, as in CleanRL; when set, one host sync per epoch)"""

    # Network variant (CONVENTIONS.md; the same flags and meanings in the three Atari scripts)
    activation: Optional[Activation] = None
    """activation of the target layers (unset: relu; gelu with --encoder hadamax, as the Hadamax encoder)"""
    hr: bool = False
    """Hadamard representation: each target layer becomes act(W1 x + b1) * act(W2 x + b2)"""
    hr_branches: int = 2
    """number of multiplied branches of an HR layer (3 = the v1 paper's "2HR", a product of three)"""
    hr_layers: Literal["last", "all"] = "last"
    """target layers: `last` = the dense block after the conv trunk, `all` = also every conv layer (Nature encoder)"""
    hidden_layers: int = 1
    """dense hidden layers after the conv trunk: fc1..fc{N-1}, then latent (`--hr --hidden-layers 2` = the v2
    paper's stacked 2HR)"""
    hidden_dim: int = 512
    """width of the dense hidden layer(s) (1024 = the parameter-matched widen baseline of HR)"""
    layernorm: bool = False
    """LayerNorm (eps 1e-6) on the pre-activations of the target layers (always on with --encoder hadamax, part of
    its latent)"""
    combine: Literal["product", "sum"] = "product"
    """how HR branches are combined (`sum` is the v1 ablation)"""
    conv_activation: Activation = "relu"
    """activation of the Nature conv layers that are not targets (--encoder hadamax convs always use GELU)"""
    encoder: Literal["nature", "hadamax"] = "nature"
    """conv trunk: the Nature CNN, or the Hadamax encoder (2-branch LayerNorm -> GELU conv blocks with
    max-pooling, then a LayerNorm -> GELU latent)"""

    # Metrics
    metrics_every: int = 102_400
    """agent steps between representation-metric probes (0 = off; default: every 100 updates of 8x128)"""
    metrics_batch: int = 1024
    """observations in the fixed probe batch (drawn from the first probed rollout: at most num_envs * num_steps)"""
    redo_tau: float = 0.1
    """ReDo threshold: a neuron is dormant when its activation score s_i <= tau"""
    kde_threshold: float = 20.0
    """KDE dormancy test: a neuron is dormant when its peak activation density exceeds this"""
    kde_noise_std: float = 1e-3
    """std of the Gaussian jitter added before the KDE test (not given in the papers)"""
    srank_delta: float = 0.01
    """effective rank: the fewest singular values holding 1 - delta of their sum (Kumar et al. 2021; HR papers)"""
    snapshot_every: int = 0
    """agent steps between network snapshots in runs/NAME/snapshots/ (0 = off; taken with the network of the rollout
    that crosses each multiple, as the probe): weights only, for scripts/probe.py"""

    # Checkpointing
    checkpoint_every: int = 1_000_000
    """agent steps between checkpoints to runs/NAME/checkpoint.pt (0 = off); ~50 MB each (80 with hadamax)"""
    resume: bool = False
    """continue runs/NAME (needs --run-name) from its checkpoint.pt; the other flags must match the run's args.json"""

    # Speed
    compile: Literal["auto", "on", "off"] = "auto"
    """torch.compile the acting step, the PPO loss and GAE (auto: on with CUDA; on CPU compiling gains little)"""
    cudagraphs: Literal["auto", "on", "off"] = "auto"
    """replay the acting step and the whole minibatch update as CUDA graphs (auto: on with CUDA)"""
    envpool_threads: int = 0
    """envpool worker threads (0 = the CPUs this process may use, at most one per env; envpool's own default is the
    host's CPU count)"""

    # filled in by resolve_defaults (in args.json, compared on --resume; not flags)
    batch_size: tyro.conf.Suppress[int] = 0
    minibatch_size: tyro.conf.Suppress[int] = 0
    num_iterations: tyro.conf.Suppress[int] = 0


def resolve_defaults(args: Args) -> Args:
    """Fill in the values that depend on other flags, in place: what args.json records and --resume compares."""
    args.activation = args.activation or ("gelu" if args.encoder == "hadamax" else "relu")
    args.layernorm = args.layernorm or args.encoder == "hadamax"
    args.batch_size = args.num_envs * args.num_steps
    args.minibatch_size = args.batch_size // args.num_minibatches
    args.num_iterations = args.total_timesteps // args.batch_size
    return args


def rollout_bytes(args: Args) -> int:  # the rollout storage: uint8 frame stacks, int64 actions, six float32
    return args.num_envs * args.num_steps * (4 * 84 * 84 + 8 + 6 * 4)


def validate(args: Args) -> None:
    """PPO's own checks (harness.Run does the generic ones): one line on stderr naming the flag, exit 1."""
    harness.at_most(args, {"update_epochs": harness.MAX_PASSES}, harness.PASSES)
    harness.at_most(args, {"envpool_threads": harness.MAX_THREADS}, harness.THREADS)
    harness.at_most(args, {"hidden_layers": harness.MAX_LAYERS, "hr_branches": harness.MAX_LAYERS}, harness.LAYER_COUNT)
    specs = envpool.registration.registry.specs
    if args.env_id not in specs or specs[args.env_id][0] != "envpool.atari":
        atari = [name for name, spec in specs.items() if spec[0] == "envpool.atari"]
        close = difflib.get_close_matches(args.env_id.replace("NoFrameskip-v4", "-v5"), atari, n=1, cutoff=0.75)
        hint = f"did you mean {close[0]!r}?" if close else "expected e.g. 'Breakout-v5'"
        harness.fail(f"--env-id {args.env_id!r} is not an envpool Atari environment ({hint})")
    if args.capture_video:
        harness.fail("--capture-video is not supported: envpool does not render frames")
    harness.at_least(args, {"num_envs": 1, "num_steps": 1, "num_minibatches": 1, "update_epochs": 1,
                            "hidden_layers": 1, "hidden_dim": 1, "eval_episodes": 1, "envpool_threads": 0})
    harness.finite(args, ["learning_rate", "clip_coef", "max_grad_norm", "kde_threshold"])
    harness.finite(args, ["ent_coef", "vf_coef", "redo_tau", "kde_noise_std"], positive=False)
    if args.target_kl is not None:
        harness.finite(args, ["target_kl"])
    harness.unit_interval(args, ["gamma", "gae_lambda"])
    batch = args.num_envs * args.num_steps
    if batch % args.num_minibatches:
        harness.fail(f"--num-minibatches {args.num_minibatches} does not divide the rollout batch "
                     f"--num-envs x --num-steps = {batch}")
    if 0 < args.total_timesteps < batch:  # 0 is the harness's "must be >= 1"
        harness.fail(f"--total-timesteps {args.total_timesteps} is less than one rollout "
                     f"(--num-envs x --num-steps = {batch})")
    if args.metrics_every and args.metrics_batch > batch:
        harness.fail(f"--metrics-batch {args.metrics_batch} exceeds the rollout (--num-envs x --num-steps = {batch})")
    if args.hr and args.hr_branches < 2:
        harness.fail(f"--hr-branches must be >= 2 with --hr, got {args.hr_branches}")
    if args.combine != "product" and not args.hr:
        harness.fail(f"--combine {args.combine} only applies to HR layers; add --hr")
    if args.encoder == "hadamax" and args.hr_layers == "all":
        harness.fail("--hr-layers all targets the Nature conv trunk; --encoder hadamax has fixed Hadamard blocks")
    if args.encoder == "hadamax" and args.conv_activation != "relu":
        harness.fail("--conv-activation applies to the Nature conv trunk; --encoder hadamax convs always use GELU")
    if args.cuda and torch.cuda.is_available() and rollout_bytes(args) > (free := torch.cuda.mem_get_info()[0]):
        harness.fail(f"--num-envs {args.num_envs} x --num-steps {args.num_steps}: the rollout storage needs "
                     f"{rollout_bytes(args) / 1e9:.1f} GB, more than the {free / 1e9:.1f} GB of free GPU memory")


# ---------------------------------------------------------------------------------------------------------------
# environment and rollout storage


def make_env(env_id: str, num_envs: int, seed: int, threads: int = 0):
    """envpool Atari with the standard preprocessing (noop 30, frame skip 4 with max-pool, 84x84 gray, stack 4,
    fire reset), episodic life and reward clipping, as CleanRL's ppo_atari_envpool. threads 0: the CPUs this
    process may use (envpool's own default is the host's count, over a hundred on a large node's slice)."""
    return envpool.make(env_id, env_type="gymnasium", num_envs=num_envs, episodic_life=True, reward_clip=True,
                        seed=seed, num_threads=min(num_envs, threads or harness.available_cpus()))


class EpisodeStats:
    """Raw score and length of full games from envpool's info (the RecordEpisodeStatistics CleanRL uses with
    envpool): info["reward"] is the unclipped reward; a game ends when the life-loss termination comes with
    lives == 0, or at the time limit (truncation, which CleanRL's version misses)."""

    def __init__(self, num_envs: int):
        self.returns = np.zeros(num_envs, dtype=np.float64)
        self.lengths = np.zeros(num_envs, dtype=np.int64)

    def update(self, terminated, truncated, info):
        """Add one step; return [(env index, return, length)] of the games that ended on it."""
        self.returns += info["reward"]
        self.lengths += 1
        ended = (terminated & (info["lives"] == 0)) | truncated
        finished = [(i, float(self.returns[i]), int(self.lengths[i])) for i in np.flatnonzero(ended)]
        self.returns[ended] = 0.0
        self.lengths[ended] = 0
        return finished


class Batch(NamedTuple):
    """Rollout rows the update reads: the storage as (num_steps, num_envs, ...) tensors, its flat views, a minibatch."""
    obs: torch.Tensor
    actions: torch.Tensor
    logprobs: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


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


class Agent(nn.Module):
    """Encoder (conv trunk, fc1..fc{N-1}, latent) -> actor and critic heads on `latent`; orthogonal init with zero
    biases (CleanRL PPO: sqrt 2 for hidden layers, every HR branch alike; 0.01 actor, 1 critic)."""

    def __init__(self, args: Args, num_actions: int, obs_shape=(4, 84, 84)):
        super().__init__()
        # --encoder hadamax is the whole official encoder: its dense latent is Dense -> LayerNorm -> GELU by default
        target = dict(activation=args.activation or ("gelu" if args.encoder == "hadamax" else "relu"),
                      layernorm=args.layernorm or args.encoder == "hadamax",
                      branches=args.hr_branches if args.hr else 1, combine=args.combine, init="orthogonal")
        conv = target if args.hr_layers == "all" else dict(activation=args.conv_activation, init="orthogonal")
        self.encoder = Encoder(args.encoder, obs_shape, conv, target, args.hidden_layers, args.hidden_dim)
        # CleanRL's order: each head built and initialised before the next, so a seed gives CleanRL's weights
        self.actor = nn.Linear(self.encoder.width, num_actions)
        init_(self.actor.weight, self.actor.bias, "orthogonal", 0.01)
        self.critic = nn.Linear(self.encoder.width, 1)
        init_(self.critic.weight, self.critic.bias, "orthogonal", 1.0)

    def latent(self, obs, record=None):
        """The representation fed to both heads. With a dict `record`, also store per layer (output, pre-activation):
        the output after the Hadamax max-pool (what the next layer sees), conv pre-activations as spatial_extremes."""
        return self.encoder(obs, record)

    def head_weight(self):
        """Actor and critic head weights stacked (outputs, latent), so the hidden-bias metric counts both heads."""
        return torch.cat([self.actor.weight, self.critic.weight], dim=0)

    def get_value(self, obs):
        return self.critic(self.latent(obs))

    def get_action_and_value(self, obs, action=None):
        """(action, its log-probability, the policy's entropy, value (N, 1)); samples the action when none is given
        (-1 where the logits are not a distribution, see `categorical`)."""
        hidden = self.latent(obs)
        action, logprob, entropy = categorical(self.actor(hidden), action)
        return action, logprob, entropy, self.critic(hidden)


def categorical(logits: torch.Tensor, action: Optional[torch.Tensor] = None):
    """(action, log-probability, entropy) of the categorical policy with these logits, computed as
    torch.distributions.Categorical computes them but without its argument check, a host sync on every call (tensors
    in, tensors out: it can be compiled and captured in a CUDA graph).

    Without `action`, one is sampled by the exponential race argmax(p / E), E ~ Exp(1) i.i.d. (the Gumbel-max trick:
    -log E is Gumbel), which is exactly what torch.multinomial does for one sample: with the same random numbers it
    gives Categorical(logits).sample()'s actions. A row whose normalised logits contain NaN (overflowed weights: where
    Categorical's check raises) gets the action -1, which the rollout sees on the host with the actions it fetches
    anyway, and stops the run."""
    logp = logits - logits.logsumexp(dim=-1, keepdim=True)
    if action is None:
        probs = logp.softmax(dim=-1)
        taken = (probs / torch.empty_like(probs).exponential_(1)).argmax(dim=-1)
        action = torch.where(logp.isnan().any(dim=-1), -1, taken)
    else:
        taken, probs = action.long(), None
    logprob = logp.gather(-1, taken.unsqueeze(-1)).squeeze(-1)
    # the order of Categorical's log_prob and entropy, so that backward sums the gradients in the same order
    clamped = logp.clamp(min=torch.finfo(logp.dtype).min)
    probs = logp.softmax(dim=-1) if probs is None else probs
    return action, logprob, -(clamped * probs).sum(dim=-1)


# ---------------------------------------------------------------------------------------------------------------
# metrics, evaluation, GAE, acting


@torch.no_grad()
def probe_metrics(agent: Agent, probe_obs: torch.Tensor, args: Args, chunk: int = 256) -> dict:
    """One extra forward on the fixed probe batch (in chunks, to bound memory); every metric of CONVENTIONS.md, the
    hidden bias over both heads (actor and critic weights stacked)."""
    parts = []
    for obs in probe_obs.split(chunk):
        parts.append({})
        agent.latent(obs, parts[-1])
    layers = {name: tuple(torch.cat([part[name][i] for part in parts]) for i in (0, 1)) for name in parts[0]}
    return common.probe_scalars(layers, agent.head_weight(), tau=args.redo_tau, kde_threshold=args.kde_threshold,
                                kde_noise_std=args.kde_noise_std, seed=args.seed, delta=args.srank_delta)


def probe_snapshot(args: Args, snapshot: dict, probe: dict, device) -> dict:
    """scripts/probe.py: probe_metrics of one snapshot (harness.Snapshots) in an Agent built as the run built it."""
    build = snapshot["build"]
    agent = Agent(args, build["n_actions"], tuple(build["obs_shape"])).to(device)
    agent.load_state_dict(snapshot["networks"]["agent"])
    return probe_metrics(agent, probe["obs"].to(device), args)


@torch.no_grad()
def evaluate(agent: Agent, env_id: str, episodes: int, seed: int, device) -> list:
    """Raw scores of `episodes` full games, one per env (so short games are not over-represented), played with the
    stochastic policy as CleanRL's PPO evaluation does."""
    envs, stats, scores = make_env(env_id, episodes, seed), EpisodeStats(episodes), [None] * episodes
    obs, _ = envs.reset()
    while any(score is None for score in scores):
        action = agent.get_action_and_value(torch.as_tensor(obs, device=device))[0].cpu().numpy()
        if (action < 0).any():  # `categorical`'s mark for logits that are not a distribution
            harness.fail("non-finite policy logits in the evaluation of the saved agent")
        obs, _, terminated, truncated, info = envs.step(action)
        for i, episodic_return, _ in stats.update(terminated, truncated, info):
            scores[i] = episodic_return if scores[i] is None else scores[i]
    envs.close()
    return scores


def compute_gae(rewards, values, dones, next_value, next_done, gamma, gae_lambda):
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) over a (T, N) rollout, CleanRL's convention:
    dones[t] = 1 when obs[t] starts a new episode (the transition into it ended one), so no value is bootstrapped
    across it; the last step bootstraps from next_value unless next_done. Returns (advantages, returns)."""
    num_steps = rewards.shape[0]
    advantages = torch.zeros_like(rewards)
    lastgaelam = torch.zeros_like(rewards[0])
    for t in reversed(range(num_steps)):
        if t == num_steps - 1:
            nextnonterminal, nextvalues = 1.0 - next_done, next_value
        else:
            nextnonterminal, nextvalues = 1.0 - dones[t + 1], values[t + 1]
        delta = rewards[t] + gamma * nextvalues * nextnonterminal - values[t]
        advantages[t] = lastgaelam = delta + gamma * gae_lambda * nextnonterminal * lastgaelam
    return advantages, advantages + values


def make_act(agent: Agent):
    """act(obs) -> (action, logprob, value), the rollout's step (action -1 where the logits are not a distribution).
    Tensors in, tensors out, no host sync: it can be compiled and replayed as a CUDA graph."""
    @torch.no_grad()
    def act(obs: torch.Tensor):
        action, logprob, _, value = agent.get_action_and_value(obs)
        return action, logprob, value.flatten()

    return act


# ---------------------------------------------------------------------------------------------------------------
# the PPO update

# train_step's output: the TensorBoard tags of its losses, then 1.0 if its loss was finite
STATS = ("losses/policy_loss", "losses/value_loss", "losses/entropy", "losses/old_approx_kl", "losses/approx_kl",
         "losses/clipfrac", "loss_finite")


def make_train_step(agent: Agent, optimizer: torch.optim.Optimizer, batch: Batch, args: Args,
                    compile_loss: bool = False):
    """train_step(mb_inds) -> the STATS of the minibatch batch[mb_inds] as one device tensor, after one Adam step on
    it. `batch` holds views of the persistent rollout storage, refilled in place every iteration, so a CUDA graph of
    the step stays valid. torch.compile sees the loss; a CUDA graph captures the whole step, backward and Adam too."""
    clip = args.clip_coef

    def ppo_loss(mb_inds: torch.Tensor):
        mb = Batch(*[rows[mb_inds] for rows in batch])
        _, newlogprob, entropy, newvalue = agent.get_action_and_value(mb.obs, mb.actions)
        logratio = newlogprob - mb.logprobs
        ratio = logratio.exp()
        with torch.no_grad():  # http://joschu.net/blog/kl-approx.html
            old_approx_kl, approx_kl = (-logratio).mean(), ((ratio - 1) - logratio).mean()
            clipfrac = ((ratio - 1.0).abs() > clip).float().mean()
        advantages = mb.advantages
        if args.norm_adv:
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        # clipped surrogate objective (PPO paper, eq. 7)
        pg_loss = torch.max(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)).mean()
        newvalue = newvalue.view(-1)
        v_loss_unclipped = (newvalue - mb.returns) ** 2
        if args.clip_vloss:
            v_clipped = mb.values + torch.clamp(newvalue - mb.values, -clip, clip)
            v_loss = 0.5 * torch.max(v_loss_unclipped, (v_clipped - mb.returns) ** 2).mean()
        else:
            v_loss = 0.5 * v_loss_unclipped.mean()
        entropy_loss = entropy.mean()
        loss = pg_loss - args.ent_coef * entropy_loss + v_loss * args.vf_coef
        stats = [pg_loss, v_loss, entropy_loss, old_approx_kl, approx_kl, clipfrac, torch.isfinite(loss).float()]
        return loss, torch.stack(stats).detach()

    ppo_loss = harness.compiled(ppo_loss, compile_loss)

    def train_step(mb_inds: torch.Tensor):
        loss, stats = ppo_loss(mb_inds)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
        optimizer.step()
        return stats

    return train_step


if __name__ == "__main__":
    args = harness.cli(Args)
    validate(args)
    on_gpu = args.cuda and torch.cuda.is_available()  # the rollout lives on the GPU there (validate checked it)
    run = harness.Run(args, resolve=resolve_defaults, log_at_steps_done=True, memory={} if on_gpu else {
        f"--num-envs {args.num_envs} x --num-steps {args.num_steps}": rollout_bytes(args)},
        networks={f"--hidden-dim {args.hidden_dim} --hidden-layers {args.hidden_layers} --hr-branches "
                  f"{args.hr_branches}": lambda: [Agent(args, 18)]})  # 18: the most actions
    device = run.device
    # a resumed run starts fresh episodes
    envs = make_env(args.env_id, args.num_envs, args.seed + run.start_step, args.envpool_threads)
    obs_shape = envs.observation_space.shape
    agent = Agent(args, envs.action_space.n, obs_shape).to(device)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)
    run.describe(agent)
    snapshots = harness.Snapshots(run, {"agent": agent}, build={"n_actions": int(envs.action_space.n),
                                                                "obs_shape": list(obs_shape)},
                                  probe_bytes=args.metrics_batch * math.prod(obs_shape))
    probe_obs = None  # the fixed probe batch, drawn from the first probed rollout

    def training_state() -> dict:
        return {"agent": agent.state_dict(), "optimizer": optimizer.state_dict()}

    if run.checkpoint is not None:  # continue where the checkpoint left off
        state = run.checkpoint["state"]
        agent.load_state_dict(state["agent"])
        optimizer.load_state_dict(state["optimizer"])
        harness.set_rng_state(state["rng"])
        probe_obs = None if state["probe_obs"] is None else state["probe_obs"].clone().to(device)
        run.resumed(agent)
    use_compile, use_graphs = run.fast_paths()
    harness.set_capturable_(optimizer, use_graphs)  # after load_state_dict, which brings the saved run's setting
    last_good = harness.LastGood()  # what a divergence falls back to; refreshed after every update
    last_good.update(run.start_step, training_state())

    # the rollout storage lives on the device, refilled in place every iteration (the CUDA graphs read it there)
    shape = (args.num_steps, args.num_envs)
    rollout = Batch(torch.zeros((*shape, *obs_shape), dtype=torch.uint8, device=device),
                    torch.zeros(shape, dtype=torch.long, device=device), *torch.zeros((4, *shape), device=device))
    rewards, dones = torch.zeros((2, *shape), device=device)  # dones[t] = 1: obs[t] starts a new episode
    batch = Batch(*(rows.flatten(0, 1) for rows in rollout))  # views: one row per agent step
    act = harness.compiled(make_act(agent), use_compile)
    train_step = make_train_step(agent, optimizer, batch, args, use_compile)
    gae = harness.compiled(compute_gae, use_compile)
    if use_graphs:
        act, train_step = harness.cuda_graphed(act), harness.cuda_graphed(train_step)
    obs_in = harness.Staging((args.num_envs, *obs_shape), torch.uint8, device)
    step_in = harness.Staging((2, args.num_envs), torch.float32, device)  # rewards and dones in one copy
    # STATS of the last minibatch (CleanRL logs those losses) and their sum over the update (clipfrac, finite flags)
    last_stats, sum_stats = torch.zeros((2, len(STATS)), device=device)
    episode_stats = EpisodeStats(args.num_envs)
    obs_in.wait()[:] = envs.reset()[0]
    next_obs, next_done = obs_in.upload(), torch.zeros(args.num_envs, device=device)
    global_step, lr = run.start_step, args.learning_rate

    for iteration in range(run.start_step // args.batch_size + 1, args.num_iterations + 1):
        if args.anneal_lr:
            lr = (1.0 - (iteration - 1.0) / args.num_iterations) * args.learning_rate
            harness.set_lr(optimizer, lr)

        # ALGO LOGIC: collect num_steps x num_envs transitions with the current policy
        for step in range(args.num_steps):
            global_step += args.num_envs
            rollout.obs[step], dones[step] = next_obs, next_done
            action, logprob, value = act(next_obs)
            rollout.actions[step], rollout.logprobs[step], rollout.values[step] = action, logprob, value
            action_np = action.cpu().numpy()  # the one host sync per step
            if (action_np < 0).any():  # make_act's mark: the policy's logits are not finite
                run.stop_nonfinite(global_step, "policy logits", last_good)
            next_obs_np, reward, terminated, truncated, info = envs.step(action_np)
            obs_in.wait()[:] = next_obs_np
            next_obs = obs_in.upload()
            step_in.wait()[:] = reward, terminated | truncated
            rewards[step], next_done = step_in.upload()  # next_done: a view, copied into dones before reuse
            for _, episodic_return, episodic_length in episode_stats.update(terminated, truncated, info):
                run.episode(global_step, episodic_return, episodic_length)

        # representation probe on the fixed batch, with the network that collected this rollout
        if args.metrics_every and (probe_obs is None or harness.due(global_step, args.metrics_every,
                                                                    global_step - args.batch_size)):
            with run.probing():
                if probe_obs is None:
                    idx = torch.randperm(args.batch_size, generator=torch.Generator().manual_seed(args.seed))
                    probe_obs = batch.obs[idx[:args.metrics_batch].to(device)].clone()
                run.log(global_step, probe_metrics(agent, probe_obs, args))
        if snapshots.due(global_step, global_step - args.batch_size):  # the network the probe above saw
            snapshots.save(global_step, None if probe_obs is None else {"obs": probe_obs})

        # ALGO LOGIC: advantages, then update_epochs passes over shuffled minibatches
        with torch.no_grad():
            next_value = agent.get_value(next_obs).reshape(1, -1)
            rollout.advantages[:], rollout.returns[:] = gae(rewards, rollout.values, dones, next_value, next_done,
                                                            args.gamma, args.gae_lambda)
        sum_stats.zero_()
        for epoch in range(args.update_epochs):
            b_inds = torch.randperm(args.batch_size, device=device)
            for start in range(0, args.batch_size, args.minibatch_size):
                stats = train_step(b_inds[start:start + args.minibatch_size])
                last_stats.copy_(stats)  # static outputs of a graph: consumed here, before the next replay
                sum_stats += stats
            if args.target_kl is not None and last_stats[STATS.index("losses/approx_kl")].item() > args.target_kl:
                break
        minibatches = (epoch + 1) * args.num_minibatches

        # the one host sync of the update: the logged scalars and the non-finite check (every loss, all parameters)
        var_y = batch.returns.var(unbiased=False)
        explained_var = torch.where(var_y == 0, torch.nan,
                                    1 - (batch.returns - batch.values).var(unbiased=False) / var_y)
        params_ok = harness.all_finite(agent.parameters()).float()
        logged = torch.cat([last_stats[:5], (sum_stats / minibatches)[5:], explained_var[None], params_ok[None]])
        *losses, loss_ok, explained_var, params_ok = logged.tolist()
        if loss_ok != 1.0 or params_ok != 1.0:
            run.stop_nonfinite(global_step, "loss" if loss_ok != 1.0 else "parameters", last_good)
        last_good.update(global_step, training_state())
        run.log(global_step, {"charts/learning_rate": lr, **dict(zip(STATS, losses)),
                              "losses/explained_variance": explained_var, "charts/SPS": run.sps(global_step)})
        if run.checkpoint_due(global_step, global_step - args.batch_size):  # after the update that crosses a multiple
            run.save(global_step, {**training_state(), "rng": harness.rng_state(), "probe_obs": probe_obs})
        run.progress(global_step)

    if args.save_model:
        model_path = os.path.join(run.dir, "ppo_atari_hr.pt")
        torch.save(agent.state_dict(), model_path)
        print(f"model saved to {model_path}")
        scores = evaluate(agent, args.env_id, args.eval_episodes, args.seed + 1, device)
        for idx, episodic_return in enumerate(scores):
            run.log(idx, {"eval/episodic_return": episodic_return})
        print(f"eval: {args.eval_episodes} games, mean raw score {np.mean(scores):.1f}")
    envs.close()
    run.finish(global_step, keep_checkpoint=True)
