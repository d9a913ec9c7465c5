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

    # Environment and algorithm (the official PQN Atari config = the HR papers' Table 5)
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

    # Network variant (CONVENTIONS.md; ReDo: Sokar et al. 2023)
    encoder: Literal["nature", "hadamax"] = "nature"
    """conv trunk: Nature CNN or the Hadamax encoder"""
    activation: Optional[Literal["relu", "tanh", "sigmoid", "gelu", "selu", "crelu"]] = None
    """activation of the target hidden layers (unset: relu; gelu with --encoder hadamax, as Hadamax)"""
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

    # Checkpointing
    checkpoint_every: int = 2_000_000
    """agent steps between checkpoints in runs/NAME/checkpoint.pt (0 = off); about 30 minutes on one GPU, ~50 MB each"""
    resume: bool = False
    """continue runs/NAME (needs --run-name) from its checkpoint; flags that change training must match args.json"""

    # Speed
    cuda: bool = True
    """if toggled, cuda will be enabled when available"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    torch_threads: int = 0
    """torch intra-op CPU threads (0 = torch's default); 1 is much faster on a CPU shared with envpool/other jobs"""
    envpool_threads: int = 0
    """envpool worker threads (0 = envpool's default)"""
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
                        num_threads=args.envpool_threads, max_episode_steps=args.max_episode_steps)


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
                                kde_noise_std=args.kde_noise_std, seed=args.seed)


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
    run = harness.Run(args, resolve=resolve_defaults)
    device = run.device
    torch.set_num_threads(args.torch_threads or torch.get_num_threads())
    n_train, n_total = args.num_envs, args.num_envs + args.num_test_envs  # one pool: train envs, then test envs
    envs = make_env(args, n_total, args.seed + run.start_step)  # a resumed run starts fresh episodes
    n_actions, obs_shape = envs.action_space.n, envs.observation_space.shape
    net = QNetwork(args, n_actions, obs_shape).to(device)
    run.describe(net)
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
