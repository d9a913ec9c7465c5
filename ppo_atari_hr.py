"""PPO on Atari (envpool) with Hadamard representations (HR) on the representation shared by actor and critic.

The recipe is CleanRL's `ppo_atari_envpool.py`, which is Table 4 of the HR papers: 8 envs x 128 steps, Adam
(lr 2.5e-4 linearly annealed, eps 1e-5), gamma 0.99, GAE lambda 0.95, 4 minibatches x 4 epochs, advantage
normalisation, clip 0.1 (policy and value), entropy 0.01, value 0.5, grad-norm 0.5, 10M agent steps (40M frames).
Episodic life and reward clipping are on for learning; charts/episodic_return is the raw score of full games.

Network variants (same flags and semantics as dqn_atari_hr.py / pqn_atari_hr.py):
- HR ("Hadamard Representations: Augmenting Hyperbolic Tangents in RL", arXiv 2406.09079, v1 and v2): a hidden
  layer becomes act(W1 x + b1) * act(W2 x + b2); in HR-PPO it is the last hidden layer (`latent`), which feeds both
  the actor and the critic head (v2, "PPO" paragraph of the Atari results).
- Hadamax (Kooi et al., "Hadamax Encoding: Elevating Performance in Model-Free Atari", arXiv 2505.15345): stride-1
  conv blocks of two LayerNorm+GELU branches, multiplied and max-pooled (`--encoder hadamax`, with its Dense-LayerNorm-GELU
  latent).

Representation metrics (dormant neurons by KDE and ReDo score, effective rank, neuron dominance, saturated/zombie
units, hidden bias of dormant latent neurons) are probed every --metrics-every steps on a fixed batch of
observations drawn from the first probed rollout.

Checkpoint and resume: every --checkpoint-every agent steps (at the end of the iteration that crosses the multiple,
after its update) the whole training state goes atomically to runs/NAME/checkpoint.pt; `--resume --run-name NAME`
continues from it (same step counter, learning-rate annealing, RNG states and probe batch; the environments start
fresh episodes). A non-finite loss or parameter stops the run after writing the last good state to
runs/NAME/checkpoint_last_good.pt.

GPU fast paths (`--compile`, `--cudagraphs`; auto = on with CUDA): the acting step, the PPO loss and GAE are
torch.compiled, and the acting step and the whole minibatch update (loss, backward, clipping, Adam with a tensor
learning rate) replay as CUDA graphs over persistent rollout tensors; observations, rewards and dones go to the GPU
as pinned non-blocking copies, and each update syncs with the host once, for its logged scalars and the non-finite
check. On CPU (the default there: both off) the training is the plain code, step for step.

Usage:
    python ppo_atari_hr.py --env-id Breakout-v5                                   # ReLU baseline
    python ppo_atari_hr.py --env-id Breakout-v5 --activation tanh --hr            # HR(tanh), the papers' method
    python ppo_atari_hr.py --env-id Breakout-v5 --encoder hadamax
    python ppo_atari_hr.py --env-id Breakout-v5 --run-name my-run --resume             # continue an interrupted run
"""
import contextlib
import difflib
import io
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import asdict, dataclass
from typing import Literal, Optional

import envpool
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim
import tyro
from torch.utils.tensorboard import SummaryWriter

import common

Activation = Literal["relu", "tanh", "sigmoid", "gelu", "selu", "crelu"]


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, cuda will be used when available"""
    compile: Literal["auto", "on", "off"] = "auto"
    """torch.compile the acting step, the PPO loss and GAE (auto: on with CUDA; off on CPU, where compiling takes
    about a minute and gains little)"""
    cudagraphs: Literal["auto", "on", "off"] = "auto"
    """replay the acting step and the whole minibatch update (loss, backward, clipping, Adam) as CUDA graphs, which
    removes the per-kernel launch cost of these small networks (auto: on with CUDA; needs CUDA)"""
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
    metrics_every: int = 102_400
    """agent steps between representation-metric probes (0 = off; default: every 100 updates of 8x128)"""
    metrics_batch: int = 1024
    """observations in the fixed probe batch (drawn from the first probed rollout; at most num_envs * num_steps)"""
    redo_tau: float = 0.1
    """ReDo threshold: a neuron is dormant when its activation score s_i <= tau"""
    kde_threshold: float = 20.0
    """KDE dormancy test: a neuron is dormant when its peak activation density exceeds this"""
    kde_noise_std: float = 1e-3
    """std of the Gaussian jitter added before the KDE test (not given in the papers)"""
    checkpoint_every: int = 1_000_000
    """agent steps between checkpoints to runs/NAME/checkpoint.pt (0 = off; default: about 30 minutes of training).
    A write is ~50 MB (network, Adam moments, the probe batch of 1024 frame stacks; ~80 MB with --encoder hadamax)
    and takes ~0.1 s"""
    resume: bool = False
    """continue runs/NAME (needs --run-name) from its checkpoint.pt; the other flags must match the run's args.json"""

    # Algorithm specific arguments (CleanRL ppo_atari_envpool = the HR papers' Table 4)
    env_id: str = "Breakout-v5"
    """the id of the envpool Atari environment (e.g. Breakout-v5)"""
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
    """the target KL divergence threshold (off by default, as in CleanRL); when set, checking it costs one host sync
    per epoch"""

    # Network variants (identical semantics across the Atari scripts)
    activation: Optional[Activation] = None
    """activation of the target layers (default relu; gelu with --encoder hadamax, as the Hadamax encoder)"""
    hr: bool = False
    """Hadamard representation: each target layer becomes act(W1 x + b1) * act(W2 x + b2)"""
    hr_branches: int = 2
    """number of multiplied branches of an HR layer (3 = the v1 paper's product of three)"""
    hr_layers: Literal["last", "all"] = "last"
    """target layers: `last` = the dense hidden block after the convs, `all` = also every conv layer"""
    hidden_layers: int = 1
    """dense hidden layers after the conv trunk (fc1..fc{N-1}, then latent)"""
    hidden_dim: int = 512
    """width of the dense hidden layer(s)"""
    layernorm: bool = False
    """LayerNorm on the pre-activations of the target layers (always on with --encoder hadamax, part of its latent)"""
    combine: Literal["product", "sum"] = "product"
    """how HR branches are combined (`sum` is the v1 ablation)"""
    conv_activation: Activation = "relu"
    """activation of conv layers that are not targets (nature encoder only)"""
    encoder: Literal["nature", "hadamax"] = "nature"
    """conv trunk: Nature CNN, or the Hadamax encoder (fixed 2-branch LayerNorm+GELU conv blocks with max-pooling)"""

    # filled in at runtime (saved in args.json, not command-line flags)
    batch_size: tyro.conf.Suppress[int] = 0
    minibatch_size: tyro.conf.Suppress[int] = 0
    num_iterations: tyro.conf.Suppress[int] = 0


def parse_args() -> Args:
    """tyro.cli, with tyro's boxed parse errors (unknown flag, invalid choice such as --activation swish, a value that
    is not a number) folded into one "error: ..." line and exit 1, like the rest of the bad input."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = tyro.cli(Args)
    except SystemExit as e:
        if e.code in (0, None):  # --help
            sys.stderr.write(err.getvalue())
            raise
        body = err.getvalue().split("\u2500\u2500\u2500 \u2502", 1)[0]  # the box's message, before its first rule
        words = " ".join(re.sub(r"[\u2500-\u257f]", " ", line) for line in body.splitlines()[1:]).split()
        sys.exit(f"error: {' '.join(words) or 'bad command line (see --help)'}")
    sys.stderr.write(err.getvalue())  # warnings, if any
    return args


def validate(args: Args) -> None:
    """Reject bad input before any environment, network or buffer exists: one line on stderr naming the flag."""
    specs = envpool.registration.registry.specs
    if args.env_id not in specs or specs[args.env_id][0] != "envpool.atari":
        atari = [name for name, spec in specs.items() if spec[0] == "envpool.atari"]
        close = difflib.get_close_matches(args.env_id.replace("NoFrameskip-v4", "-v5"), atari, n=1, cutoff=0.75)
        hint = f"did you mean {close[0]!r}?" if close else "expected e.g. 'Breakout-v5'"
        sys.exit(f"error: --env-id {args.env_id!r} is not an envpool Atari environment ({hint})")
    if args.resume and not args.run_name:
        sys.exit("error: --resume needs --run-name NAME (the run directory to continue)")
    for flag in ("total_timesteps", "num_envs", "num_steps", "num_minibatches", "update_epochs", "hidden_layers",
                 "hidden_dim", "metrics_batch", "eval_episodes"):
        if getattr(args, flag) <= 0:
            sys.exit(f"error: --{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.checkpoint_every < 0:
        sys.exit(f"error: --checkpoint-every must be >= 0 (0 = off), got {args.checkpoint_every}")
    if args.metrics_every < 0:
        sys.exit(f"error: --metrics-every must be >= 0 (0 = off), got {args.metrics_every}")
    for flag in ("learning_rate", "clip_coef", "max_grad_norm", "kde_threshold"):
        if not (getattr(args, flag) > 0 and math.isfinite(getattr(args, flag))):
            sys.exit(f"error: --{flag.replace('_', '-')} must be a finite number > 0, got {getattr(args, flag)}")
    if args.target_kl is not None and not (args.target_kl > 0 and math.isfinite(args.target_kl)):
        sys.exit(f"error: --target-kl must be a finite number > 0 (or omitted), got {args.target_kl}")
    for flag in ("gamma", "gae_lambda"):
        if not 0.0 <= getattr(args, flag) <= 1.0:
            sys.exit(f"error: --{flag.replace('_', '-')} must be in [0, 1], got {getattr(args, flag)}")
    for flag in ("ent_coef", "vf_coef", "redo_tau", "kde_noise_std"):
        if not (getattr(args, flag) >= 0 and math.isfinite(getattr(args, flag))):
            sys.exit(f"error: --{flag.replace('_', '-')} must be a finite number >= 0, got {getattr(args, flag)}")
    batch = args.num_envs * args.num_steps
    if batch % args.num_minibatches:
        sys.exit(f"error: --num-minibatches {args.num_minibatches} does not divide the rollout batch "
                 f"--num-envs x --num-steps = {batch}")
    if args.total_timesteps < batch:
        sys.exit(f"error: --total-timesteps {args.total_timesteps} is less than one rollout "
                 f"(--num-envs x --num-steps = {batch})")
    if args.hr and args.hr_branches < 2:
        sys.exit(f"error: --hr-branches must be >= 2 with --hr, got {args.hr_branches}")
    if args.combine != "product" and not args.hr:
        sys.exit(f"error: --combine {args.combine} only applies to HR layers; add --hr")
    if args.encoder == "hadamax" and args.hr_layers == "all":
        sys.exit("error: --hr-layers all targets the Nature conv trunk; --encoder hadamax has fixed Hadamard conv "
                 "blocks (use --hr-layers last)")
    if args.encoder == "hadamax" and args.conv_activation != "relu":
        sys.exit("error: --conv-activation applies to the Nature conv trunk; --encoder hadamax convs always use GELU")
    if args.capture_video:
        sys.exit("error: --capture-video is not supported: envpool does not render frames")
    if args.cudagraphs == "on" and not (args.cuda and torch.cuda.is_available()):
        sys.exit("error: --cudagraphs on needs a CUDA GPU (none is available, or --no-cuda); use --cudagraphs auto "
                 "or off")
    if args.track:
        try:
            import wandb  # noqa: F401
        except ImportError:
            sys.exit("error: --track needs wandb, which is not installed (pip install wandb)")


def resolve(args: Args) -> Args:
    """Fill in the defaults that depend on other flags, in place: the values args.json records and --resume compares."""
    args.activation = args.activation or ("gelu" if args.encoder == "hadamax" else "relu")
    args.layernorm = args.layernorm or args.encoder == "hadamax"
    args.batch_size = args.num_envs * args.num_steps
    args.minibatch_size = args.batch_size // args.num_minibatches
    args.num_iterations = args.total_timesteps // args.batch_size
    args.run_name = args.run_name or f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    return args


def check_rollout_memory(args: Args, device: torch.device) -> None:
    """Exit naming --num-envs/--num-steps when the rollout storage alone (frame stacks as uint8, int64 actions and five
    float32 per step) exceeds the free memory of the device it lives on."""
    need = args.batch_size * (4 * 84 * 84 + 8 + 5 * 4)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        try:
            with open("/proc/meminfo") as f:
                free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        except (OSError, StopIteration, ValueError):
            return  # no way to tell on this system
    if need > free:
        sys.exit(f"error: --num-envs {args.num_envs} x --num-steps {args.num_steps}: the rollout storage needs "
                 f"{need / 1e9:.1f} GB, more than the {free / 1e9:.1f} GB of free {device.type} memory")


CHECKPOINT_FORMAT = 1
# flags that do not change the training itself, so a resumed run may use other values (the rest must match)
RESUME_MAY_DIFFER = ("resume", "checkpoint_every", "cuda", "compile", "cudagraphs", "track", "wandb_project_name",
                     "wandb_entity", "capture_video", "save_model", "eval_episodes", "run_name")
DERIVED = ("batch_size", "minibatch_size", "num_iterations")  # functions of compared flags; not flags themselves


def refuse_other_flags(saved: dict, args: Args, run_dir: str) -> None:
    """Exit 1 with one line listing every flag whose value differs from the run's saved (resolved) arguments."""
    known = {k: v for k, v in saved.items() if k in Args.__dataclass_fields__}
    try:  # resolve the saved flags as this script does, so an unresolved default equals its resolved value
        saved = {**saved, **asdict(resolve(Args(**known)))}
    except (TypeError, ValueError, ZeroDivisionError):
        pass
    names = common.arg_conflicts(saved, asdict(args), RESUME_MAY_DIFFER + DERIVED)
    if names:
        diffs = ", ".join(f"--{k.replace('_', '-')} (saved {saved.get(k)}, now {getattr(args, k, None)})"
                          for k in names)
        sys.exit(f"error: --resume: {run_dir} was made with other flags: {diffs}")


def resume_point(args: Args, run_dir: str, device) -> dict:
    """--resume: check that runs/NAME can be continued with these flags and load its checkpoint, before any
    environment exists. Exits 0 if the run already finished, 1 (one line naming the flag) if it cannot continue."""
    finished = os.path.join(run_dir, "finished")
    if os.path.exists(finished):
        try:
            with open(finished) as f:
                detail = f"at step {json.load(f)['global_step']}"
        except (OSError, ValueError, KeyError, TypeError):
            detail = f"{finished} exists"
        print(f"run {args.run_name} already finished ({detail}); nothing to resume")
        sys.exit(0)
    path = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.isfile(path):
        sys.exit(f"error: --resume: no checkpoint in {run_dir}")

    args_path = os.path.join(run_dir, "args.json")
    if os.path.exists(args_path):
        try:
            with open(args_path) as f:
                refuse_other_flags(json.load(f), args, run_dir)
        except (OSError, ValueError) as e:
            sys.exit(f"error: --resume: cannot read {args_path} ({e})")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # noqa: BLE001 (any unreadable file: one line, not a traceback)
        reason = (str(e).splitlines() or [""])[0]
        sys.exit(f"error: --resume: cannot read {path} ({type(e).__name__}: {reason})")
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        sys.exit(f"error: --resume: {path} is not a checkpoint of this script (format {CHECKPOINT_FORMAT})")
    if not os.path.exists(args_path):
        refuse_other_flags(checkpoint["args"], args, run_dir)
    return checkpoint


def prepare_run_dir(args: Args, run_dir: str) -> None:
    """Make sure runs/NAME exists and is writable before anything is allocated (exit 1 naming --run-name if not)."""
    try:
        if os.path.exists(run_dir) and not os.path.isdir(run_dir):
            raise NotADirectoryError("it exists and is not a directory")
        os.makedirs(run_dir, exist_ok=True)
        probe = os.path.join(run_dir, f".write_test.{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        sys.exit(f"error: --run-name {args.run_name}: cannot write {run_dir} ({e.strerror or e})")


def make_env(env_id: str, num_envs: int, seed: int):
    """envpool Atari with the standard preprocessing (noop 30, frame skip 4 with max-pool, 84x84 gray, stack 4,
    fire reset), episodic life and reward clipping, as CleanRL's ppo_atari_envpool."""
    return envpool.make(env_id, env_type="gymnasium", num_envs=num_envs, episodic_life=True, reward_clip=True,
                        seed=seed)


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


# ---------------------------------------------------------------------------------------------------------------
# network


class CReLU(nn.Module):
    """concat(relu(x), relu(-x)) along the feature/channel dim: doubles the width."""

    def forward(self, x):
        return torch.cat([F.relu(x), F.relu(-x)], dim=1)


def make_activation(name: str) -> nn.Module:
    # GELU uses the tanh approximation, as Flax's default in the official Hadamax/PQN code.
    return {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "selu": nn.SELU, "crelu": CReLU,
            "gelu": lambda: nn.GELU(approximate="tanh")}[name]()


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm of a (N, C, H, W) map over channels at each position (the Flax NHWC convention of PQN/Hadamax)."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def orthogonal_init_(layer: nn.Module, gain: float = np.sqrt(2)) -> None:
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.zeros_(layer.bias)


def glorot_normal_init_(layer: nn.Module) -> None:
    """jax.nn.initializers.glorot_normal: truncated normal (+-2 std), variance 2 / (fan_in + fan_out)."""
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(layer.weight)
    std = np.sqrt(2.0 / (fan_in + fan_out)) / 0.87962566103423978  # std correction for truncation at +-2
    nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
    nn.init.zeros_(layer.bias)


class HiddenLayer(nn.Module):
    """K independently parameterised copies of (Linear|Conv2d -> optional LayerNorm -> activation), combined by
    elementwise product (HR, papers' eq. for the Hadamard representation) or sum (v1 ablation); K=1 is a plain layer."""

    def __init__(self, kind, in_dim, out_dim, activation, layernorm=False, branches=1, combine="product",
                 kernel_size=1, stride=1, padding=0, init=orthogonal_init_):
        super().__init__()
        # "same" (stride 1): pad once for all branches, extra row/column at the end as Flax's SAME does
        self.pad = (0, 0, 0, 0) if padding != "same" else ((kernel_size - 1) // 2, kernel_size // 2) * 2
        if kind == "linear":
            def make():
                return nn.Linear(in_dim, out_dim)
        else:
            def make():
                return nn.Conv2d(in_dim, out_dim, kernel_size, stride, 0 if padding == "same" else padding)
        self.branches = nn.ModuleList(make() for _ in range(branches))
        for branch in self.branches:
            init(branch)
        norm = nn.LayerNorm if kind == "linear" else ChannelLayerNorm
        # eps 1e-6 is Flax's default, used by the official PQN/Hadamax code
        self.norms = nn.ModuleList(norm(out_dim, eps=1e-6) for _ in range(branches)) if layernorm else None
        self.act = make_activation(activation)
        self.combine = combine
        self.kind = kind
        self.out_dim = out_dim * (2 if activation == "crelu" else 1)

    def forward(self, x, with_preacts=False):
        """The combined output; with_preacts: also the branches' pre-activations stacked along the neuron dim."""
        if any(self.pad):
            x = F.pad(x, self.pad)
        pre = [branch(x) for branch in self.branches]
        if self.norms is not None:
            pre = [norm(p) for norm, p in zip(self.norms, pre)]
        out = self.act(pre[0])
        for p in pre[1:]:
            out = out * self.act(p) if self.combine == "product" else out + self.act(p)
        if not with_preacts:
            return out
        return out, (pre[0] if len(pre) == 1 else torch.cat(pre, dim=1))


def spatial_extremes(pre):
    """(N, C, H, W) -> (N, C, 1, 2): each channel's max and min over space. A channel is <= 0 at every position iff
    its max is, > 0 everywhere iff its min is, so common.saturation_fractions gives the same answer on far less memory
    (Hadamax conv1 pre-activations are 84x84)."""
    return torch.stack([pre.amax(dim=(2, 3)), pre.amin(dim=(2, 3))], dim=-1).unsqueeze(2)


class Agent(nn.Module):
    """Conv trunk -> dense hidden block (fc1..fc{N-1}, latent) -> actor and critic heads on `latent`."""

    def __init__(self, args: Args, num_actions: int, obs_shape=(4, 84, 84)):
        super().__init__()
        hr_branches = args.hr_branches if args.hr else 1
        # --encoder hadamax is the whole official encoder: its dense latent is Dense -> LayerNorm -> GELU by default
        activation = args.activation or ("gelu" if args.encoder == "hadamax" else "relu")
        target = dict(activation=activation, layernorm=args.layernorm or args.encoder == "hadamax",
                      branches=hr_branches, combine=args.combine)
        self.hidden = nn.ModuleDict()
        self.pools = nn.ModuleDict()
        channels = obs_shape[0]
        if args.encoder == "nature":
            conv = target if args.hr_layers == "all" else dict(activation=args.conv_activation)
            for i, (out, k, s) in enumerate([(32, 8, 4), (64, 4, 2), (64, 3, 1)], start=1):
                layer = HiddenLayer("conv", channels, out, kernel_size=k, stride=s, **conv)
                self.hidden[f"conv{i}"], channels = layer, layer.out_dim
        else:  # Hadamax: stride-1 SAME convs, 2 LayerNorm+GELU branches multiplied, then max-pool
            blocks = [(32, 8, nn.MaxPool2d(4, 4)), (64, 4, nn.MaxPool2d(2, 2, ceil_mode=True)),
                      (64, 3, nn.MaxPool2d(3, 1, padding=1))]
            for i, (out, k, pool) in enumerate(blocks, start=1):
                layer = HiddenLayer("conv", channels, out, "gelu", layernorm=True, branches=2, kernel_size=k,
                                    padding="same", init=glorot_normal_init_)
                self.hidden[f"conv{i}"], self.pools[f"conv{i}"], channels = layer, pool, layer.out_dim
        with torch.no_grad():  # only the convs exist yet: this is the flattened conv output width
            width = self.latent(torch.zeros(1, *obs_shape)).flatten(1).shape[1]
        names = [f"fc{i}" for i in range(1, args.hidden_layers)] + ["latent"]
        for name in names:
            layer = HiddenLayer("linear", width, args.hidden_dim, **target)
            self.hidden[name], width = layer, layer.out_dim
        self.actor = nn.Linear(width, num_actions)
        self.critic = nn.Linear(width, 1)
        orthogonal_init_(self.actor, 0.01)
        orthogonal_init_(self.critic, 1.0)

    def latent(self, obs, record=None):
        """The representation fed to both heads. With a dict `record`, also store per layer (output, pre-activation):
        the output after the Hadamax max-pool (what the next layer sees), conv pre-activations as spatial_extremes."""
        x = obs.float() / 255.0
        for name, layer in self.hidden.items():
            if layer.kind == "linear" and x.dim() == 4:
                x = x.flatten(1)
            if record is None:
                x = layer(x)
            else:
                x, pre = layer(x, with_preacts=True)
            if name in self.pools:
                x = self.pools[name](x)
            if record is not None:
                record[name] = (x, spatial_extremes(pre) if pre.dim() == 4 else pre)
        return x

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
# helpers


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


def make_policy(agent: Agent):
    """act(obs) -> (action, logprob, value), the rollout's step (action -1 where the logits are not a distribution).
    Tensors in, tensors out, no host sync: it can be compiled and replayed as a CUDA graph."""
    @torch.no_grad()
    def act(obs: torch.Tensor):
        action, logprob, _, value = agent.get_action_and_value(obs)
        return action, logprob, value.flatten()

    return act


STATS = ("pg_loss", "v_loss", "entropy", "old_approx_kl", "approx_kl", "clipfrac", "loss_finite")  # train_step's


def make_train_step(agent: Agent, optimizer: optim.Optimizer, b_obs, b_logprobs, b_actions, b_advantages, b_returns,
                    b_values, args: Args, compile_loss: bool = False):
    """train_step(mb_inds) -> stats, a device tensor of the STATS of this minibatch: one Adam step on the minibatch
    b_*[mb_inds] of the rollout storage (persistent tensors, refilled in place every iteration, so a CUDA graph of the
    step stays valid). The loss (clipped surrogate, clipped value loss, entropy bonus) is what torch.compile sees;
    the whole step, backward and optimizer included, is what a CUDA graph captures."""
    clip_coef = args.clip_coef

    def ppo_loss(mb_inds: torch.Tensor):
        _, newlogprob, entropy, newvalue = agent.get_action_and_value(b_obs[mb_inds], b_actions[mb_inds])
        logratio = newlogprob - b_logprobs[mb_inds]
        ratio = logratio.exp()
        with torch.no_grad():
            # http://joschu.net/blog/kl-approx.html
            old_approx_kl = (-logratio).mean()
            approx_kl = ((ratio - 1) - logratio).mean()
            clipfrac = ((ratio - 1.0).abs() > clip_coef).float().mean()

        mb_advantages = b_advantages[mb_inds]
        if args.norm_adv:
            mb_advantages = (mb_advantages - mb_advantages.mean()) / (mb_advantages.std() + 1e-8)
        # clipped surrogate objective (PPO paper, eq. 7)
        pg_loss1 = -mb_advantages * ratio
        pg_loss2 = -mb_advantages * torch.clamp(ratio, 1 - clip_coef, 1 + clip_coef)
        pg_loss = torch.max(pg_loss1, pg_loss2).mean()

        newvalue = newvalue.view(-1)
        if args.clip_vloss:
            v_loss_unclipped = (newvalue - b_returns[mb_inds]) ** 2
            v_clipped = b_values[mb_inds] + torch.clamp(newvalue - b_values[mb_inds], -clip_coef, clip_coef)
            v_loss_clipped = (v_clipped - b_returns[mb_inds]) ** 2
            v_loss = 0.5 * torch.max(v_loss_unclipped, v_loss_clipped).mean()
        else:
            v_loss = 0.5 * ((newvalue - b_returns[mb_inds]) ** 2).mean()

        entropy_loss = entropy.mean()
        loss = pg_loss - args.ent_coef * entropy_loss + v_loss * args.vf_coef
        stats = torch.stack([pg_loss.detach(), v_loss.detach(), entropy_loss.detach(), old_approx_kl, approx_kl,
                             clipfrac, torch.isfinite(loss.detach()).float()])
        return loss, stats

    ppo_loss = common.compiled(ppo_loss, compile_loss)

    def train_step(mb_inds: torch.Tensor):
        loss, stats = ppo_loss(mb_inds)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
        optimizer.step()
        return stats

    return train_step


@torch.no_grad()
def probe_metrics(agent: Agent, probe_obs, args: Args, generator) -> dict:
    """One extra forward on the fixed probe batch (in chunks, to bound memory); every metric of CONVENTIONS.md."""
    parts = []
    for chunk in probe_obs.split(256):
        parts.append({})
        agent.latent(chunk, parts[-1])
    record = {name: tuple(torch.cat([part[name][i] for part in parts]) for i in (0, 1)) for name in parts[0]}
    out = {}
    for name, (acts, preacts) in record.items():
        metrics = common.layer_metrics(acts, preacts, tau=args.redo_tau, kde_threshold=args.kde_threshold,
                                       kde_noise_std=args.kde_noise_std, generator=generator)
        out.update({f"representation/{name}/{key}": value for key, value in metrics.items()})
    latent = record["latent"][0]
    mask = common.dormant_mask_kde(latent, args.kde_threshold, args.kde_noise_std, generator)
    out["representation/hidden_bias"], out["representation/live_contribution"] = common.head_contributions(
        latent, agent.head_weight(), mask)
    return out


def parameter_checksum(agent: nn.Module) -> float:
    """Sum over the state_dict's float tensors of t.double().sum(): printed on resume, recomputable from the file."""
    return sum(t.double().sum().item() for t in agent.state_dict().values() if t.is_floating_point())


def clone_tree(x):
    """Deep copy of a nested dict/list of tensors (tensors cloned on their device)."""
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: clone_tree(v) for k, v in x.items()}
    if isinstance(x, list):
        return [clone_tree(v) for v in x]
    return x


def copy_tree_(dst, src) -> None:
    """copy_ the tensors of `src` into those of `dst` (same structure, from clone_tree); other leaves are replaced."""
    for k in src.keys() if isinstance(src, dict) else range(len(src)):
        if isinstance(src[k], torch.Tensor):
            dst[k].copy_(src[k])
        elif isinstance(src[k], (dict, list)):
            copy_tree_(dst[k], src[k])
        else:
            dst[k] = src[k]


class LastGood:
    """The last training state that passed the non-finite check: network and optimiser state in preallocated clones
    on the device, refreshed with copy_ (no allocation, no host sync), written out only when the run diverges."""

    def __init__(self, args: Args, run_dir: str):
        self.args, self.path = args, os.path.join(run_dir, "checkpoint_last_good.pt")
        self.step, self.state = None, None

    def update(self, step: int, agent: nn.Module, optimizer: optim.Optimizer) -> None:
        live = {"agent": agent.state_dict(), "optimizer": optimizer.state_dict()}
        # (re)allocate the first time and once Adam has created its moments (after the first update)
        if self.state is None or len(self.state["optimizer"]["state"]) != len(live["optimizer"]["state"]):
            self.state = clone_tree(live)
        else:
            copy_tree_(self.state, live)
        self.step = step

    def stop(self, what: str, step: int, checkpoint_path: str, checkpoint_step: Optional[int], writer) -> None:
        """Write the last good state to runs/NAME/checkpoint_last_good.pt (checkpoint.pt, the resume point, is left
        alone) and exit 1 with one line."""
        common.atomic_save({"format": CHECKPOINT_FORMAT, "global_step": self.step, "args": asdict(self.args),
                            **self.state}, self.path)
        writer.close()
        resumable = "(none yet)" if checkpoint_step is None else f"{checkpoint_path} (step {checkpoint_step})"
        sys.exit(f"error: non-finite {what} at step {step}; last good state (step {self.step}) written to "
                 f"{self.path}; the resumable checkpoint is {resumable}")


@torch.no_grad()
def evaluate(agent: Agent, env_id: str, episodes: int, seed: int, device) -> list:
    """Raw scores of `episodes` full games, one per env (so short games are not over-represented), played with the
    stochastic policy as CleanRL's PPO evaluation does."""
    envs = make_env(env_id, episodes, seed)
    stats = EpisodeStats(episodes)
    scores = [None] * episodes
    obs, _ = envs.reset()
    while any(s is None for s in scores):
        action, _, _, _ = agent.get_action_and_value(torch.as_tensor(obs, device=device))
        action = action.cpu().numpy()
        if (action < 0).any():  # `categorical`'s mark for logits that are not a distribution
            sys.exit("error: non-finite policy logits in the evaluation of the saved agent")
        obs, _, terminated, truncated, info = envs.step(action)
        for i, episodic_return, _ in stats.update(terminated, truncated, info):
            if scores[i] is None:
                scores[i] = episodic_return
    envs.close()
    return scores


if __name__ == "__main__":
    args = parse_args()
    validate(args)
    resolve(args)
    run_dir = os.path.join("runs", args.run_name)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    check_rollout_memory(args, device)
    checkpoint = resume_point(args, run_dir, device) if args.resume else None  # None: a fresh run
    prepare_run_dir(args, run_dir)
    checkpoint_path = os.path.join(run_dir, "checkpoint.pt")
    if checkpoint is None:
        with open(os.path.join(run_dir, "args.json"), "w") as f:
            json.dump(asdict(args), f, indent=2)
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=vars(args), name=args.run_name, save_code=True)
    # Scalars are logged at global_step = agent steps done (CleanRL), so the checkpointed iteration's own scalars sit
    # at the checkpoint's global_step: a resumed run keeps those and purges what the killed process logged after it.
    writer = SummaryWriter(run_dir, purge_step=None if checkpoint is None else checkpoint["global_step"] + 1)
    if checkpoint is None:
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n%s" % "\n".join(
            f"|{key}|{value}|" for key, value in vars(args).items()))

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic

    # a resumed run starts fresh episodes, with its own env seed (seed + the step it resumes from)
    envs = make_env(args.env_id, args.num_envs, args.seed + (0 if checkpoint is None else checkpoint["global_step"]))
    obs_shape = envs.observation_space.shape
    agent = Agent(args, envs.action_space.n, obs_shape).to(device)
    optimizer = optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)
    num_params = sum(p.numel() for p in agent.parameters())
    print(agent)
    print(f"parameters: {num_params:,}  device: {device}")
    if checkpoint is None:
        writer.add_text("architecture", f"```\n{agent}\n```\nparameters: {num_params:,}")

    # rollout storage lives on the device; only actions go to the host (envpool needs them). Every tensor here is
    # persistent and refilled in place, so the CUDA graphs of act and train_step, which read them, stay valid.
    obs = torch.zeros((args.num_steps, args.num_envs) + obs_shape, dtype=torch.uint8, device=device)
    actions = torch.zeros((args.num_steps, args.num_envs), dtype=torch.long, device=device)
    logprobs = torch.zeros((args.num_steps, args.num_envs), device=device)
    rewards = torch.zeros((args.num_steps, args.num_envs), device=device)
    dones = torch.zeros((args.num_steps, args.num_envs), device=device)
    values = torch.zeros((args.num_steps, args.num_envs), device=device)
    advantages = torch.zeros((args.num_steps, args.num_envs), device=device)
    returns = torch.zeros((args.num_steps, args.num_envs), device=device)
    episode_stats = EpisodeStats(args.num_envs)
    probe_obs, next_probe, probe_time = None, 0, 0.0
    probe_generator = torch.Generator(device=device)
    last_return, print_every = float("nan"), max(1, 8192 // args.batch_size)
    global_step, done_iterations, wall_before, checkpoint_step = 0, 0, 0.0, None

    if checkpoint is not None:  # continue where the checkpoint left off
        agent.load_state_dict(checkpoint["agent"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        common.set_rng_state(checkpoint["rng"])
        global_step = checkpoint_step = checkpoint["global_step"]
        done_iterations, wall_before = checkpoint["iteration"], checkpoint["wall_seconds"]
        probe_obs, next_probe = checkpoint["probe_obs"], checkpoint["next_probe"]
        probe_time, last_return = checkpoint["probe_time"], checkpoint["last_return"]
        print(f"resumed {run_dir} from step {global_step} (parameter checksum {parameter_checksum(agent)!r})",
              flush=True)
        del checkpoint
    use_compile = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    use_graphs = device.type == "cuda" and args.cudagraphs != "off"
    common.set_capturable_(optimizer, use_graphs)  # after load_state_dict, which brings the saved run's setting
    last_good = LastGood(args, run_dir)  # for the non-finite stop
    last_good.update(global_step, agent, optimizer)

    # the hot functions, compiled and/or replayed as CUDA graphs
    b_obs = obs.reshape((-1,) + obs_shape)
    b_logprobs, b_actions, b_values = logprobs.reshape(-1), actions.reshape(-1), values.reshape(-1)
    b_advantages, b_returns = advantages.reshape(-1), returns.reshape(-1)
    act = common.compiled(make_policy(agent), use_compile)
    train_step = make_train_step(agent, optimizer, b_obs, b_logprobs, b_actions, b_advantages, b_returns, b_values,
                                 args, use_compile)
    gae = common.compiled(compute_gae, use_compile)
    if use_graphs:
        act, train_step = common.cuda_graphed(act), common.cuda_graphed(train_step)
    print(f"fast paths: torch.compile {'on' if use_compile else 'off'}, CUDA graphs {'on' if use_graphs else 'off'}, "
          f"pinned transfers {'on' if device.type == 'cuda' else 'off (CPU)'}", flush=True)
    obs_in = common.Staging((args.num_envs,) + obs_shape, torch.uint8, device)
    step_in = common.Staging((2, args.num_envs), torch.float32, device)  # rewards and dones in one copy
    lr = args.learning_rate
    last_stats = torch.zeros(len(STATS), device=device)  # the last minibatch's (CleanRL logs those losses)
    sum_stats = torch.zeros(len(STATS), device=device)  # over the update's minibatches (clipfrac mean, finite flags)

    start_step, start_time = global_step, time.time()
    obs_in.wait()[:] = envs.reset()[0]
    next_obs = obs_in.upload()
    next_done = torch.zeros(args.num_envs, device=device)

    for iteration in range(done_iterations + 1, args.num_iterations + 1):
        if args.anneal_lr:
            lr = (1.0 - (iteration - 1.0) / args.num_iterations) * args.learning_rate
            common.set_lr(optimizer, lr)

        for step in range(args.num_steps):
            global_step += args.num_envs
            obs[step] = next_obs
            dones[step] = next_done
            action, logprob, value = act(next_obs)
            values[step] = value
            actions[step] = action
            logprobs[step] = logprob
            action_np = action.cpu().numpy()  # the one host sync per step
            if (action_np < 0).any():  # make_policy's mark: the policy's logits are not finite
                last_good.stop("policy logits", global_step, checkpoint_path, checkpoint_step, writer)
            next_obs_np, reward, terminated, truncated, info = envs.step(action_np)
            obs_in.wait()[:] = next_obs_np
            next_obs = obs_in.upload()
            rewards_dones = step_in.wait()
            rewards_dones[0], rewards_dones[1] = reward, terminated | truncated
            rewards[step], next_done = step_in.upload()  # next_done: a view, copied into dones before the next upload
            for _, episodic_return, episodic_length in episode_stats.update(terminated, truncated, info):
                last_return = episodic_return
                writer.add_scalar("charts/episodic_return", episodic_return, global_step)
                writer.add_scalar("charts/episodic_length", episodic_length, global_step)

        # representation probe on the fixed batch, with the network that collected this rollout
        if args.metrics_every and global_step >= next_probe:
            probe_start = time.time()
            if probe_obs is None:
                n = min(args.metrics_batch, args.batch_size)
                if n < args.metrics_batch:
                    print(f"note: probe batch is {n} observations (--metrics-batch {args.metrics_batch} exceeds the "
                          f"rollout of {args.batch_size})")
                idx = torch.randperm(args.batch_size, generator=torch.Generator().manual_seed(args.seed))[:n]
                probe_obs = b_obs[idx.to(device)].clone()
            probe_generator.manual_seed(args.seed)  # same KDE jitter at every probe
            for tag, value in probe_metrics(agent, probe_obs, args, probe_generator).items():
                writer.add_scalar(tag, value, global_step)
            while next_probe <= global_step:
                next_probe += args.metrics_every
            probe_time += time.time() - probe_start

        with torch.no_grad():
            next_value = agent.get_value(next_obs).reshape(1, -1)
            gae_advantages, gae_returns = gae(rewards, values, dones, next_value, next_done, args.gamma,
                                              args.gae_lambda)
            advantages.copy_(gae_advantages)
            returns.copy_(gae_returns)

        sum_stats.zero_()
        minibatches = 0
        for epoch in range(args.update_epochs):
            b_inds = torch.randperm(args.batch_size, device=device)
            for start in range(0, args.batch_size, args.minibatch_size):
                stats = train_step(b_inds[start:start + args.minibatch_size])
                last_stats.copy_(stats)  # static outputs of a graph: consumed here, before the next replay
                sum_stats += stats
                minibatches += 1
            if args.target_kl is not None and last_stats[STATS.index("approx_kl")].item() > args.target_kl:
                break

        # the one host sync of the update: the logged scalars and the non-finite check (every loss, all parameters)
        params_finite = torch.isfinite(torch.cat([p.detach().flatten() for p in agent.parameters()])).all()
        var_y = b_returns.var(unbiased=False)
        explained_var = torch.where(var_y == 0, torch.nan, 1 - (b_returns - b_values).var(unbiased=False) / var_y)
        mean_stats = sum_stats / minibatches
        logged = torch.cat([last_stats[:5], mean_stats[5:], explained_var[None], params_finite.float()[None]]).tolist()
        (pg_loss, v_loss, entropy_loss, old_approx_kl, approx_kl, clipfrac, loss_finite, explained_var,
         params_ok) = logged
        loss_ok = loss_finite == 1.0
        if not (loss_ok and params_ok):
            last_good.stop("loss" if not loss_ok else "parameters", global_step, checkpoint_path, checkpoint_step,
                           writer)
        last_good.update(global_step, agent, optimizer)

        sps = int((global_step - start_step) / (time.time() - start_time))  # since this process started (or resumed)
        writer.add_scalar("charts/learning_rate", lr, global_step)
        writer.add_scalar("losses/value_loss", v_loss, global_step)
        writer.add_scalar("losses/policy_loss", pg_loss, global_step)
        writer.add_scalar("losses/entropy", entropy_loss, global_step)
        writer.add_scalar("losses/old_approx_kl", old_approx_kl, global_step)
        writer.add_scalar("losses/approx_kl", approx_kl, global_step)
        writer.add_scalar("losses/clipfrac", clipfrac, global_step)
        writer.add_scalar("losses/explained_variance", explained_var, global_step)
        writer.add_scalar("charts/SPS", sps, global_step)
        if iteration % print_every == 0 or iteration == args.num_iterations:
            print(f"global_step={global_step}, SPS={sps}, episodic_return={last_return}", flush=True)

        # checkpoint after the update of the iteration where global_step crosses a multiple of --checkpoint-every
        every = args.checkpoint_every
        if every and global_step // every > (global_step - args.batch_size) // every:
            write_start = time.time()
            size = common.atomic_save({
                "format": CHECKPOINT_FORMAT, "global_step": global_step, "iteration": iteration, "args": asdict(args),
                "agent": agent.state_dict(), "optimizer": optimizer.state_dict(), "rng": common.rng_state(),
                "probe_obs": probe_obs, "next_probe": next_probe, "probe_time": probe_time,
                "last_return": last_return, "wall_seconds": wall_before + time.time() - start_time,
            }, checkpoint_path)
            checkpoint_step = global_step
            print(f"checkpoint: step {global_step}, {size / 1e6:.1f} MB in {time.time() - write_start:.2f}s "
                  f"-> {checkpoint_path}", flush=True)

    elapsed = max(time.time() - start_time, 1e-9)
    wall_seconds = wall_before + elapsed
    print(f"done: {global_step} steps, {global_step - start_step} in {elapsed:.1f}s in this process "
          f"(SPS={int((global_step - start_step) / elapsed)}), metric probes {probe_time:.2f}s = "
          f"{100 * probe_time / wall_seconds:.2f}% of the run's time", flush=True)
    if device.type == "cuda":  # scripts/bench.py reads this line
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB allocated, "
              f"{torch.cuda.max_memory_reserved(device) / 2**20:.0f} MiB reserved")

    if args.save_model:
        model_path = os.path.join(run_dir, "ppo_atari_hr.pt")
        torch.save(agent.state_dict(), model_path)
        print(f"model saved to {model_path}")
        scores = evaluate(agent, args.env_id, args.eval_episodes, args.seed + 1, device)
        for idx, episodic_return in enumerate(scores):
            writer.add_scalar("eval/episodic_return", episodic_return, idx)
        print(f"eval: {args.eval_episodes} games, mean raw score {np.mean(scores):.1f}")

    envs.close()
    writer.close()
    with open(os.path.join(run_dir, "finished"), "w") as f:  # sweeps skip finished runs; analyze.py counts them
        json.dump({"global_step": global_step, "wall_seconds": wall_seconds}, f)
