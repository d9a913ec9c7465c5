"""DQN on Atari with every network variant of the Hadamard-representation papers, a frame-deduplicated replay
buffer and inline representation metrics.

Recipe: CleanRL `dqn_atari.py` with the HR papers' Table 3 (final epsilon 0.1, learning starts 80k, 10M steps).
Papers: "Hadamard Representations: Augmenting Hyperbolic Tangents in RL" (v1, arXiv 2406.09079) and its v2
("scaffolding" version); "Hadamax Encoding" (arXiv 2505.15345) for `--encoder hadamax`; ReDo (Sokar et al. 2023)
for the activation score; Kumar et al. (2021) for the effective rank.

Variants (flags apply to the *target* layers: the dense block after the conv trunk, plus the convs with
`--hr-layers all`):
    python dqn_atari_hr.py --env-id BreakoutNoFrameskip-v4                          # ReLU (Nature DQN)
    python dqn_atari_hr.py --activation tanh [--layernorm]                          # tanh (+ LayerNorm)
    python dqn_atari_hr.py --activation tanh --hr                                   # HR(tanh)
    python dqn_atari_hr.py --hidden-dim 1024                                        # widen (parameter-matched)
    python dqn_atari_hr.py --activation tanh --hr --hidden-layers 2                 # 2HR (v2: two stacked HR blocks)
    python dqn_atari_hr.py --activation tanh --hr --hr-branches 3                   # 2HR (v1: product of three)
    python dqn_atari_hr.py --encoder hadamax                                        # Hadamax encoder (GELU+LN latent)

Replay: each 84x84 frame is stored once in a ring (7062 B per slot), stacks rebuilt by index when sampling: 7.1-7.3
KB per transition against CleanRL's 28-56 KB. Checkpoints and resume: harness.py; the ring goes to runs/NAME/replay/
in chunk files, and a checkpoint rewrites only the chunks changed since the previous one (~2 GB, not 7, at the
default cadence). A resumed run starts a fresh episode; the interrupted one is cut in the replay as a truncation.
GPU fast paths (auto = on with CUDA): --compile (acting step and TD loss), --cudagraphs (both as CUDA graphs, the
update with backward and a capturable Adam), pinned uploads. Per step the one host sync is the greedy action.
"""
from __future__ import annotations

import collections
import copy
import math
import os
from dataclasses import dataclass
from typing import Literal, NamedTuple, Optional

import ale_py
import cv2
import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import harness

gym.register_envs(ale_py)
cv2.ocl.setUseOpenCL(False)

Activation = Literal["relu", "tanh", "sigmoid", "gelu", "selu", "crelu"]
FRAME_SHAPE = (84, 84)
FRAME_STACK = 4
LOG_EVERY = 100  # steps between charts/* and losses/* scalars


@dataclass
class Args:
    # Run
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    run_name: Optional[str] = None
    """run directory runs/NAME; None means {env_id}__{exp_name}__{seed}__{unix_time}"""
    track: bool = False
    """track with Weights and Biases (wandb is not installed in this project's environment)"""
    wandb_project_name: str = "cleanRL"
    """the wandb's project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of wandb's project"""
    capture_video: bool = False
    """capture videos of the agent (needs moviepy)"""
    save_model: bool = False
    """save the model to runs/NAME/ at the end, then evaluate it for --eval-episodes episodes"""
    eval_episodes: int = 10
    """full games played by the saved model at the end (with --save-model)"""
    eval_epsilon: float = 0.05
    """epsilon of the evaluation policy"""

    # Environment
    env_id: str = "BreakoutNoFrameskip-v4"
    """the id of the Atari environment (NoFrameskip-v4 ids; ALE/*-v5 ids get frameskip=1 with their sticky actions)"""

    # Algorithm (the HR papers' Table 3 = CleanRL dqn_atari, final epsilon 0.1)
    total_timesteps: int = 10_000_000
    """total agent steps (one step = 4 frames)"""
    learning_rate: float = 1e-4
    """the learning rate of the Adam optimizer"""
    buffer_size: int = 1_000_000
    """replay capacity in frame slots (one per transition, plus one per episode end for its final frame)"""
    gamma: float = 0.99
    """the discount factor gamma"""
    tau: float = 1.0
    """the target network update rate (1.0 = hard copy)"""
    target_network_frequency: int = 1000
    """the timesteps it takes to update the target network"""
    batch_size: int = 32
    """the batch size of samples from the replay memory"""
    start_e: float = 1.0
    """the starting epsilon for exploration"""
    end_e: float = 0.1
    """the ending epsilon for exploration (Table 3; CleanRL's default is 0.01)"""
    exploration_fraction: float = 0.1
    """the fraction of `total-timesteps` it takes from start-e to go end-e"""
    learning_starts: int = 80_000
    """timestep to start learning"""
    train_frequency: int = 4
    """the frequency of training"""

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

    # Metrics (representation/*)
    metrics_every: int = 25_000
    """agent steps between representation-metric probes (0 = off)"""
    metrics_batch: int = 1024
    """replay observations in the fixed probe batch (drawn at the first probe with enough transitions stored)"""
    redo_tau: float = 0.1
    """ReDo threshold tau: a neuron with activation score <= tau is dormant (dormant_score)"""
    kde_threshold: float = 20.0
    """KDE dormancy test: dormant when the peak density of the neuron's activations exceeds this"""
    kde_noise_std: float = 1e-3
    """std of the Gaussian jitter added before the KDE test (not given in the papers)"""
    srank_delta: float = 0.01
    """effective rank: the fewest singular values holding 1 - delta of their sum (Kumar et al. 2021; HR papers)"""
    snapshot_every: int = 0
    """agent steps between network snapshots in runs/NAME/snapshots/ (0 = off): weights only, for scripts/probe.py"""

    # Checkpointing
    checkpoint_every: int = 250_000
    """agent steps between checkpoints (0 = off); each rewrites only the replay chunks that changed (~2 GB)"""
    resume: bool = False
    """continue runs/NAME (--run-name) from its checkpoint; training flags must match the ones it was made with"""

    # Speed
    cuda: bool = True
    """if toggled, cuda will be used when available"""
    torch_deterministic: bool = True
    """if toggled, repeatable on CUDA: cuDNN deterministic, torch.use_deterministic_algorithms (warn-only), cuBLAS workspace :4096:8 (harness.deterministic)"""
    compile: Literal["auto", "on", "off"] = "auto"
    """torch.compile the greedy acting step and the TD loss (auto: on with CUDA; on CPU compiling gains little)"""
    cudagraphs: Literal["auto", "on", "off"] = "auto"
    """replay acting and the whole gradient step (TD loss, backward, Adam) as CUDA graphs (auto: on with CUDA)"""

def resolve_defaults(args: Args) -> Args:
    """Fill the defaults that depend on other flags (recorded in args.json, compared on --resume)."""
    args.activation = args.activation or ("gelu" if args.encoder == "hadamax" else "relu")
    args.layernorm = args.layernorm or args.encoder == "hadamax"
    return args


def validate(args: Args) -> None:
    """DQN's own checks (harness.Run does the generic ones): one line on stderr naming the flag, exit 1."""
    harness.at_most(args, {"hidden_layers": harness.MAX_LAYERS, "hr_branches": harness.MAX_LAYERS}, harness.LAYER_COUNT)
    if args.capture_video:
        try:
            import moviepy  # noqa: F401
        except ImportError:
            harness.fail("--capture-video needs moviepy, which is not installed (pip install moviepy)")
    if args.env_id not in gym.registry:
        harness.fail(f"--env-id {args.env_id!r} is not a registered environment (Atari ids look like "
                     f"BreakoutNoFrameskip-v4)")
    if "ale_py" not in str(gym.spec(args.env_id).entry_point):
        harness.fail(f"--env-id {args.env_id!r} is not an ALE Atari environment")
    if args.hr and args.hr_branches < 2:
        harness.fail(f"--hr-branches must be >= 2 with --hr, got {args.hr_branches}")
    if not args.hr and args.hr_branches != 2:
        harness.fail(f"--hr-branches {args.hr_branches} has no effect without --hr")
    if args.combine == "sum" and not args.hr:
        harness.fail("--combine sum needs --hr (it is the sum-of-branches ablation of HR)")
    if args.encoder == "hadamax" and args.hr_layers == "all":
        harness.fail("--hr-layers all does not apply to --encoder hadamax (its conv blocks are always Hadamard)")
    if args.encoder == "hadamax" and args.conv_activation != "relu":
        harness.fail("--conv-activation applies to the Nature conv trunk; --encoder hadamax convs always use GELU")
    harness.at_least(args, {"hidden_layers": 1, "hidden_dim": 1, "batch_size": 1, "train_frequency": 1,
                            "learning_starts": 0, "target_network_frequency": 1, "eval_episodes": 0,
                            "buffer_size": 64})
    if args.batch_size > args.buffer_size:
        harness.fail(f"--batch-size {args.batch_size} exceeds --buffer-size {args.buffer_size}")
    if args.metrics_every and args.metrics_batch > args.buffer_size:
        harness.fail(f"--metrics-batch {args.metrics_batch} exceeds --buffer-size {args.buffer_size}")
    harness.unit_interval(args, ["start_e", "end_e", "eval_epsilon", "gamma", "tau"])
    if not 0.0 < args.exploration_fraction <= 1.0:
        harness.fail(f"--exploration-fraction must be in (0, 1], got {args.exploration_fraction}")
    harness.finite(args, ["learning_rate", "kde_threshold"])
    harness.finite(args, ["redo_tau", "kde_noise_std"], positive=False)


# ---------------------------------------------------------------------------------------------------------------
# Environment: the CleanRL / SB3 Atari wrapper chain, written for gymnasium 1.x. Observations are single 84x84
# grayscale frames; the agent and the replay buffer keep the 4-frame stacks.


class NoopResetEnv(gym.Wrapper):
    """Random number (1..noop_max) of no-ops on reset (Mnih et al. 2015)."""

    def __init__(self, env, noop_max=30):
        super().__init__(env)
        self.noop_max = noop_max
        assert env.unwrapped.get_action_meanings()[0] == "NOOP"

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        for _ in range(self.unwrapped.np_random.integers(1, self.noop_max + 1)):
            obs, _, terminated, truncated, info = self.env.step(0)
            if terminated or truncated:
                obs, info = self.env.reset()
        return obs, info


class MaxAndSkipEnv(gym.Wrapper):
    """Repeat the action `skip` times, sum rewards, return the max of the last two frames (Atari flicker)."""

    def __init__(self, env, skip=4):
        super().__init__(env)
        self._buffer = np.zeros((2, *env.observation_space.shape), dtype=env.observation_space.dtype)
        self._skip = skip

    def step(self, action):
        total_reward = 0.0
        for i in range(self._skip):
            obs, reward, terminated, truncated, info = self.env.step(action)
            if i >= self._skip - 2:
                self._buffer[i - (self._skip - 2)] = obs
            total_reward += float(reward)
            if terminated or truncated:
                break
        # an episode that ends before the last frame returns its real final frame (SB3 would max stale frames)
        frame = self._buffer.max(axis=0) if i == self._skip - 1 else obs
        return frame, total_reward, terminated, truncated, info


class EpisodicLifeEnv(gym.Wrapper):
    """A lost life ends the episode for learning (terminated=True); the game itself only resets on game over."""

    def __init__(self, env):
        super().__init__(env)
        self.lives = 0
        self.was_real_done = True

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.was_real_done = terminated or truncated
        lives = self.unwrapped.ale.lives()
        if 0 < lives < self.lives:
            terminated = True
        self.lives = lives
        return obs, reward, terminated, truncated, info

    def reset(self, **kwargs):
        if self.was_real_done:
            obs, info = self.env.reset(**kwargs)
        else:  # no-op step to continue the game from the lost-life state
            obs, _, terminated, truncated, info = self.env.step(0)
            if terminated or truncated:
                obs, info = self.env.reset(**kwargs)
        self.lives = self.unwrapped.ale.lives()
        return obs, info


class FireResetEnv(gym.Wrapper):
    """Press FIRE on reset for games that need it to start."""

    def reset(self, **kwargs):
        self.env.reset(**kwargs)
        for action in (1, 2):
            obs, _, terminated, truncated, info = self.env.step(action)
            if terminated or truncated:
                self.env.reset(**kwargs)
        return obs, info


def warp_frame(frame):
    """RGB 210x160 -> grayscale 84x84 uint8 (cv2, INTER_AREA as SB3/CleanRL)."""
    return cv2.resize(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY), FRAME_SHAPE[::-1], interpolation=cv2.INTER_AREA)


def make_env(env_id, seed, capture_video=False, run_name=""):
    kwargs = {} if gym.spec(env_id).kwargs.get("frameskip", 1) == 1 else {"frameskip": 1}
    if capture_video:
        env = gym.make(env_id, render_mode="rgb_array", **kwargs)
        env = gym.wrappers.RecordVideo(env, f"videos/{run_name}")
    else:
        env = gym.make(env_id, **kwargs)
    env = gym.wrappers.RecordEpisodeStatistics(env)  # innermost: raw, unclipped score of full games
    env = NoopResetEnv(env, noop_max=30)
    env = MaxAndSkipEnv(env, skip=4)
    env = EpisodicLifeEnv(env)
    if "FIRE" in env.unwrapped.get_action_meanings():
        env = FireResetEnv(env)
    env = gym.wrappers.TransformReward(env, lambda r: float(np.sign(r)))  # clipped for learning only
    env = gym.wrappers.TransformObservation(env, warp_frame, gym.spaces.Box(0, 255, FRAME_SHAPE, dtype=np.uint8))
    env.action_space.seed(seed)
    return env


class FrameStack:
    """The agent's own 4-frame stack; a new episode (or life) starts with its first frame repeated, which is
    exactly the stack FrameReplayBuffer rebuilds for that step."""

    def __init__(self, frame, k=FRAME_STACK):
        self.frames = np.repeat(frame[None], k, axis=0)

    def reset(self, frame):
        self.frames[:] = frame

    def push(self, frame):
        self.frames[:-1] = self.frames[1:]
        self.frames[-1] = frame


# ---------------------------------------------------------------------------------------------------------------
# Replay buffer that stores each frame once


class Batch(NamedTuple):
    obs: torch.Tensor  # (B, 4, 84, 84) uint8
    actions: torch.Tensor  # (B,) int64
    rewards: torch.Tensor  # (B,) float32, clipped
    next_obs: torch.Tensor  # (B, 4, 84, 84) uint8
    dones: torch.Tensor  # (B,) float32: 1 where the step terminated (a truncation bootstraps)


class FrameReplayBuffer:
    """Ring of single frames plus per-slot action, reward and flags; stacks are rebuilt by index when sampling.

    An episode of L steps occupies L + 1 consecutive slots: frames o_0..o_L, where slot t (t < L) also holds a_t,
    r_t and whether the step t -> t+1 terminated or was truncated, and slot L (flag FINAL) holds only the final
    frame, so next_obs is exact at termination and truncation. The stack of slot i is frames i-3..i, except that
    frames from before the episode's first slot (flag FIRST) are replaced by that first frame, which is what the
    acting agent saw (FrameStack). When the ring is full, the 3 oldest slots are not sampled (their stacks may
    reach overwritten frames) and the newest slot is not sampled until its action arrives. `store` saves the ring
    incrementally with the checkpoints: every write marks its slot's chunk changed.
    """

    FIRST, TERMINATED, TRUNCATED, FINAL = 1, 2, 4, 8

    def __init__(self, capacity: int, frame_shape=FRAME_SHAPE, stack: int = FRAME_STACK, device="cpu", seed=0,
                 chunk: int = 32_768):
        if capacity < stack + 2:
            raise ValueError(f"capacity must be >= {stack + 2}, got {capacity}")
        self.capacity, self.stack, self.device = capacity, stack, torch.device(device)
        self.frames = np.zeros((capacity, *frame_shape), dtype=np.uint8)
        self.actions = np.zeros(capacity, dtype=np.uint8)
        self.rewards = np.zeros(capacity, dtype=np.float32)
        self.flags = np.zeros(capacity, dtype=np.uint8)
        self.ptr, self.full = 0, False
        self.rng = np.random.default_rng(seed)
        self.store = harness.ChunkStore({"frames": self.frames, "actions": self.actions, "rewards": self.rewards,
                                         "flags": self.flags}, chunk)

    @staticmethod
    def bytes_needed(capacity: int, frame_shape=FRAME_SHAPE) -> int:
        return capacity * (int(np.prod(frame_shape)) + 1 + 4 + 1)  # frame, action (uint8), reward (f32), flags

    @property
    def filled(self) -> int:
        return self.capacity if self.full else self.ptr

    def _write(self, frame, flags):
        self.store.touch(self.ptr)
        self.frames[self.ptr] = frame
        self.flags[self.ptr] = flags
        self.ptr = (self.ptr + 1) % self.capacity
        self.full = self.full or self.ptr == 0

    def start_episode(self, frame):
        """First frame of an episode (after reset, or the next life with episodic life)."""
        self._write(frame, self.FIRST)

    def add(self, action, reward, next_frame, terminated, truncated):
        """The step from the newest slot: its action and reward, and the frame it led to."""
        last = (self.ptr - 1) % self.capacity
        assert not self.flags[last] & self.FINAL, "add() after an episode end needs start_episode() first"
        self.store.touch(last)
        self.actions[last] = action
        self.rewards[last] = reward
        self.flags[last] |= self.TERMINATED * bool(terminated) | self.TRUNCATED * bool(truncated)
        self._write(next_frame, self.FINAL if (terminated or truncated) else 0)

    def cut_episode(self):
        """End the newest episode where it stands (a resumed run restarts its environment): its newest frame becomes
        a final frame and the step into it a truncation, so that step bootstraps from it and no stack or transition
        reaches across into the next episode."""
        last = (self.ptr - 1) % self.capacity
        if self.filled == 0 or self.flags[last] & self.FINAL:
            return
        self.flags[last] |= self.FINAL
        self.store.touch(last)
        if not self.flags[last] & self.FIRST:  # the step last-1 -> last belongs to the same episode
            self.flags[(last - 1) % self.capacity] |= self.TRUNCATED
            self.store.touch((last - 1) % self.capacity)

    def _valid(self, idx):
        """Which slots idx start a complete, sampleable transition."""
        ok = (self.flags[idx] & self.FINAL) == 0
        ok &= idx != (self.ptr - 1) % self.capacity
        if self.full:
            ok &= (idx - self.ptr) % self.capacity >= self.stack - 1
        else:
            ok &= idx < self.ptr
        return ok

    def valid_indices(self):
        return np.flatnonzero(self._valid(np.arange(self.capacity)))

    def num_transitions(self) -> int:
        return int(self.valid_indices().size)

    def stack_indices(self, idx):
        """(n, stack) slot indices of the stacks ending at slots idx, oldest first."""
        cols = [idx]
        cur = idx
        for _ in range(self.stack - 1):
            cur = np.where(self.flags[cur] & self.FIRST, cur, (cur - 1) % self.capacity)
            cols.append(cur)
        return np.stack(cols[::-1], axis=1)

    def sample_indices(self, n):
        out = np.empty(0, dtype=np.int64)
        for _ in range(1000):
            cand = self.rng.integers(0, self.filled, size=2 * n + 8)
            out = np.concatenate([out, cand[self._valid(cand)]])
            if out.size >= n:
                return out[:n]
        raise RuntimeError("replay buffer has no complete transition to sample")

    def observations(self, idx):
        """uint8 tensor (n, stack, H, W) of the stacks ending at slots idx."""
        return torch.from_numpy(self.frames[self.stack_indices(idx)]).to(self.device)


class ReplaySampler:
    """Batches of `batch_size` transitions drawn uniformly from rb (its sampling RNG) into persistent tensors, with
    batched transfers: the obs and next_obs stacks are gathered straight into one uint8 host buffer (2B, 4, 84, 84)
    and action, reward, done into one float32 buffer (3, B); on CUDA both are pinned and go up in one non-blocking
    copy each. The returned Batch views the same device memory at every call (CUDA-graph inputs): use it before the
    next sample()."""

    def __init__(self, rb: FrameReplayBuffer, batch_size: int, device: torch.device):
        self.rb, self.batch_size = rb, batch_size
        self.frames = harness.Staging((2 * batch_size, rb.stack, *rb.frames.shape[1:]), torch.uint8, device)
        self.scalars = harness.Staging((3, batch_size), torch.float32, device)
        self.actions = torch.empty(batch_size, dtype=torch.int64, device=device)
        b, d = batch_size, self.scalars.device
        self.batch = Batch(self.frames.device[:b], self.actions, d[1], self.frames.device[b:], d[2])

    def sample(self) -> Batch:
        rb, b = self.rb, self.batch_size
        idx = rb.sample_indices(b)
        both = np.concatenate([idx, (idx + 1) % rb.capacity])  # obs at idx, next_obs at idx + 1
        np.take(rb.frames, rb.stack_indices(both), axis=0, out=self.frames.wait(), mode="clip")  # indices are valid
        scalars = self.scalars.wait()
        scalars[0] = rb.actions[idx]
        scalars[1] = rb.rewards[idx]
        scalars[2] = (rb.flags[idx] & rb.TERMINATED) != 0
        self.frames.upload()
        self.actions.copy_(self.scalars.upload()[0])  # small integers: exact in float32
        return self.batch


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
    """Encoder (conv1..conv3, fc1..fc{N-1}, latent) -> linear Q head; PyTorch's default init (CleanRL DQN)."""

    def __init__(self, args: Args, n_actions: int, obs_shape=(FRAME_STACK, *FRAME_SHAPE)):
        super().__init__()
        # --encoder hadamax is the whole official encoder: its dense latent is Dense -> LayerNorm -> GELU by default
        target = dict(activation=args.activation or ("gelu" if args.encoder == "hadamax" else "relu"),
                      layernorm=args.layernorm or args.encoder == "hadamax",
                      branches=args.hr_branches if args.hr else 1, combine=args.combine, init="torch")
        conv = target if args.hr_layers == "all" else dict(activation=args.conv_activation, init="torch")
        self.encoder = Encoder(args.encoder, obs_shape, conv, target, args.hidden_layers, args.hidden_dim)
        self.head = nn.Linear(self.encoder.width, n_actions)
        self.layer_names = list(self.encoder.hidden)

    def forward(self, x: torch.Tensor, probe: bool = False):
        """Q-values of uint8 stacks (n, 4, 84, 84). probe=True also returns {layer: (output, pre-activation)}, conv
        pre-activations reduced by spatial_extremes."""
        layers = {} if probe else None
        q = self.head(self.encoder(x, layers))
        return (q, layers) if probe else q


# ---------------------------------------------------------------------------------------------------------------
# Metrics, evaluation, checkpoint contents


@torch.no_grad()
def probe_metrics(q_network: QNetwork, probe_obs: torch.Tensor, args: Args, chunk: int = 256) -> dict:
    """All representation/* scalars on the fixed probe batch: one extra forward, in chunks to bound memory (conv
    pre-activations come reduced by spatial_extremes)."""
    posts, pres = collections.defaultdict(list), collections.defaultdict(list)
    for obs in probe_obs.split(chunk):
        for name, (post, pre) in q_network(obs, probe=True)[1].items():
            posts[name].append(post)
            pres[name].append(pre)
    layers = {name: (torch.cat(posts[name]), torch.cat(pres[name])) for name in q_network.layer_names}
    return common.probe_scalars(layers, q_network.head.weight, tau=args.redo_tau, kde_threshold=args.kde_threshold,
                                kde_noise_std=args.kde_noise_std, seed=args.seed, delta=args.srank_delta)


def probe_snapshot(args: Args, snapshot: dict, probe: dict, device) -> dict:
    """scripts/probe.py: probe_metrics of one snapshot (harness.Snapshots) in a QNetwork built as the run built it."""
    q_network = QNetwork(args, snapshot["build"]["n_actions"]).to(device)
    q_network.load_state_dict(snapshot["networks"]["q_network"])
    return probe_metrics(q_network, probe["obs"].to(device), args)


def evaluate(model_path, args: Args, device, n_actions, seed):
    """Play args.eval_episodes full games with an epsilon-greedy (args.eval_epsilon) policy; return raw scores."""
    env, rng, returns = make_env(args.env_id, seed), np.random.default_rng(seed), []
    model = QNetwork(args, n_actions).to(device)
    model.load_state_dict(torch.load(model_path, map_location=device))
    stack = FrameStack(env.reset(seed=seed)[0])
    while len(returns) < args.eval_episodes:
        if rng.random() < args.eval_epsilon:
            action = int(rng.integers(n_actions))
        else:
            with torch.no_grad():
                action = int(model(torch.from_numpy(stack.frames).unsqueeze(0).to(device)).argmax(1).item())
        frame, _, terminated, truncated, info = env.step(action)
        if "episode" in info:
            returns.append(float(info["episode"]["r"]))
        if terminated or truncated:
            stack.reset(env.reset()[0])
        else:
            stack.push(frame)
    env.close()
    return returns


def training_state(q_network, target_network, optimizer) -> dict:
    """The learned state (live references): what the last-good snapshot holds, and the core of a checkpoint."""
    return {"q_network": q_network.state_dict(), "target_network": target_network.state_dict(),
            "optimizer": optimizer.state_dict()}


def checkpoint_state(q_network, target_network, optimizer, rb: FrameReplayBuffer, probe_obs, *rngs) -> dict:
    """The checkpoint's "state": the learned state, the ring's pointer (its slots go to runs/NAME/replay/ through
    rb.store), every RNG (the replay's sampling RNG first, then `rngs`) and the fixed probe batch."""
    return {**training_state(q_network, target_network, optimizer), "replay": {"ptr": rb.ptr, "full": rb.full},
            "rng": harness.rng_state(rb.rng, *rngs), "probe_obs": None if probe_obs is None else probe_obs.cpu()}


def restore_state(state: dict, q_network, target_network, optimizer, rb: FrameReplayBuffer, *rngs):
    """Load what checkpoint_state returned into fresh objects (the ring's slots: run.restore_replay(rb.store));
    returns the probe batch on the network's device. Nothing restored views the memory-mapped checkpoint."""
    q_network.load_state_dict(state["q_network"])
    target_network.load_state_dict(state["target_network"])
    optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))  # own copies: on the CPU they would view the mmap
    rb.ptr, rb.full = int(state["replay"]["ptr"]), bool(state["replay"]["full"])
    harness.set_rng_state(state["rng"], rb.rng, *rngs)
    device = next(q_network.parameters()).device
    return None if state["probe_obs"] is None else state["probe_obs"].to(device, copy=True)


def linear_schedule(start_e: float, end_e: float, duration: float, t: int) -> float:
    slope = (end_e - start_e) / duration
    return max(slope * t + start_e, end_e)


# ---------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: acting and the update, as functions of tensors the loop builds once (compiled and/or replayed as CUDA
# graphs with --compile / --cudagraphs). None of them syncs with the host; what a graph reads stays in place.


def make_act(q_network: QNetwork):
    """act(obs) -> (1,) greedy action tensor: argmax of Q for one stacked uint8 observation (1, 4, 84, 84)."""
    @torch.no_grad()
    def act(obs: torch.Tensor) -> torch.Tensor:
        return q_network(obs).argmax(dim=1)

    return act


def make_train_step(q_network: QNetwork, target_network: QNetwork, optimizer: torch.optim.Optimizer, gamma: float,
                    compile_loss: bool = False):
    """train_step(obs, actions, rewards, next_obs, dones) -> (loss, mean Q taken): one Adam step of CleanRL's DQN
    update (target-network max, TD target, MSE). The loss is what torch.compile sees; the whole step, backward and
    optimizer included, is what a CUDA graph captures (its static outputs: read them before the next call)."""
    def td_loss(obs, actions, rewards, next_obs, dones):
        with torch.no_grad():
            target_max = target_network(next_obs).max(dim=1).values
            td_target = rewards + gamma * target_max * (1 - dones)
        old_val = q_network(obs).gather(1, actions.unsqueeze(1)).squeeze(1)
        return F.mse_loss(td_target, old_val), old_val.detach().mean()

    td_loss = harness.compiled(td_loss, compile_loss)

    def train_step(obs, actions, rewards, next_obs, dones):
        loss, q_mean = td_loss(obs, actions, rewards, next_obs, dones)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach(), q_mean

    return train_step


@torch.no_grad()
def update_target(target_network: QNetwork, q_network: QNetwork, tau: float) -> None:
    """target <- tau * online + (1 - tau) * target, in place (copy_): a CUDA graph of train_step reads the target's
    parameters at fixed addresses, so they are never replaced."""
    for tp, p in zip(target_network.parameters(), q_network.parameters()):
        tp.copy_(tau * p + (1.0 - tau) * tp)


if __name__ == "__main__":
    args = harness.cli(Args)
    validate(args)
    run = harness.Run(args, resolve=resolve_defaults,  # the first update: the first --train-frequency step after warm-up
                      learning_starts=(args.learning_starts // args.train_frequency + 1) * args.train_frequency,
                      update_cadence=f"--train-frequency {args.train_frequency}",
                      memory={f"--buffer-size {args.buffer_size}": FrameReplayBuffer.bytes_needed(args.buffer_size)},
                      networks={f"--hidden-dim {args.hidden_dim} --hidden-layers {args.hidden_layers} --hr-branches "
                                f"{args.hr_branches}": lambda: [QNetwork(args, 18)]})  # 18: the most actions
    device = run.device
    env_seed = args.seed + run.start_step  # a resumed run starts fresh episodes, seeded by where it resumes
    env = make_env(args.env_id, env_seed, args.capture_video, args.run_name)
    n_actions = int(env.action_space.n)
    q_network = QNetwork(args, n_actions).to(device)
    optimizer = torch.optim.Adam(q_network.parameters(), lr=args.learning_rate)
    target_network = QNetwork(args, n_actions).to(device)
    target_network.load_state_dict(q_network.state_dict())
    run.describe(q_network)
    snapshots = harness.Snapshots(run, {"q_network": q_network}, build={"n_actions": n_actions},
                                  probe_bytes=args.metrics_batch * FRAME_STACK * math.prod(FRAME_SHAPE))
    rb = FrameReplayBuffer(args.buffer_size, device=device, seed=args.seed)
    print(f"replay: {args.buffer_size:,} slots, {FrameReplayBuffer.bytes_needed(args.buffer_size) / 1e9:.2f} GB")
    rng = np.random.default_rng(args.seed)  # exploration: the epsilon coin and the random action
    probe_rng = np.random.default_rng([args.seed, 1])  # the probe batch's draw: never the exploration RNG
    probe_obs = None  # fixed at the first probe, reused so curves compare like with like
    if run.checkpoint is not None:
        run.restore_replay(rb.store)
        probe_obs = restore_state(run.checkpoint["state"], q_network, target_network, optimizer, rb, rng, probe_rng)
        rb.cut_episode()  # the environment restarts below: the interrupted episode ends here, as a truncation
        run.resumed(q_network)
    harness.set_capturable_(optimizer, run.fast_paths()[1])  # after load_state_dict, which brings the saved setting
    act = harness.compiled(make_act(q_network), run.use_compile)
    train_step = make_train_step(q_network, target_network, optimizer, args.gamma, run.use_compile)
    if run.use_graphs:
        act, train_step = harness.cuda_graphed(act), harness.cuda_graphed(train_step)
    sampler = ReplaySampler(rb, args.batch_size, device)
    obs_in = harness.Staging((1, FRAME_STACK, *FRAME_SHAPE), torch.uint8, device) if device.type == "cuda" else None

    frame, _ = env.reset(seed=env_seed)
    stack = FrameStack(frame)
    rb.start_episode(frame)
    last_good = harness.LastGood()  # what a divergence falls back to; refreshed at every logged update
    last_good.update(run.start_step, training_state(q_network, target_network, optimizer))
    loss = None

    def nonfinite(step):
        """Stop (exit 1) if training diverged, else refresh the last good state: before a probe or checkpoint."""
        if not harness.all_finite(q_network.parameters(), loss).item():
            run.stop_nonfinite(step, "parameters" if loss is None or torch.isfinite(loss) else "loss", last_good)
        last_good.update(step + 1, training_state(q_network, target_network, optimizer))

    for global_step in range(run.start_step, args.total_timesteps):
        # ALGO LOGIC: epsilon-greedy action; the coin and the random action come from the host RNG (no GPU work)
        epsilon = linear_schedule(args.start_e, args.end_e, args.exploration_fraction * args.total_timesteps,
                                  global_step)
        if rng.random() < epsilon:
            action = int(rng.integers(n_actions))
        elif obs_in is None:  # CPU: the stack itself, no copy
            action = act(torch.from_numpy(stack.frames).unsqueeze(0)).item()
        else:  # CUDA: through a pinned buffer, one non-blocking copy; .item() is the one host sync of a step
            obs_in.wait()[0] = stack.frames
            action = act(obs_in.upload()).item()

        frame, reward, terminated, truncated, info = env.step(action)
        if "episode" in info:  # a full game ended (all lives): raw score
            run.episode(global_step, float(info["episode"]["r"]), int(info["episode"]["l"]))
        rb.add(action, reward, frame, terminated, truncated)
        if terminated or truncated:  # a lost life also starts a new stack (episodic life)
            frame, _ = env.reset()
            stack.reset(frame)
            rb.start_episode(frame)
        else:
            stack.push(frame)

        # ALGO LOGIC: training
        if global_step > args.learning_starts:
            if global_step % args.train_frequency == 0:
                # with CUDA graphs, loss and q_mean are the graph's static outputs, overwritten by the next update:
                # read below (logged update) or by nonfinite() before then (probe, checkpoint)
                loss, q_mean = train_step(*sampler.sample())
                if global_step % LOG_EVERY == 0:  # the one host sync of logged updates: log, and stop on divergence
                    td_loss, q_value, finite = torch.stack(
                        [loss, q_mean, harness.all_finite(q_network.parameters(), loss).float()]).tolist()
                    if not finite:
                        run.stop_nonfinite(global_step, "parameters" if math.isfinite(td_loss) else "loss", last_good)
                    run.log(global_step, {"losses/td_loss": td_loss, "losses/q_values": q_value})
                    last_good.update(global_step + 1, training_state(q_network, target_network, optimizer))
            if global_step % args.target_network_frequency == 0:
                update_target(target_network, q_network, args.tau)

        if harness.due(global_step, args.metrics_every):
            if probe_obs is None and (stored := rb.num_transitions()) < args.metrics_batch:
                print(f"probe at step {global_step} skipped: the replay holds {stored} transitions, fewer than "
                      f"--metrics-batch {args.metrics_batch}", flush=True)
            else:
                nonfinite(global_step)  # the metrics of a diverged network would raise
                with run.probing():
                    if probe_obs is None:
                        valid = rb.valid_indices()
                        probe_obs = rb.observations(np.sort(probe_rng.choice(valid, args.metrics_batch, False)))
                    run.log(global_step, probe_metrics(q_network, probe_obs, args))
        if snapshots.due(global_step):  # the network the probe above saw
            snapshots.save(global_step, None if probe_obs is None else {"obs": probe_obs})
        if global_step % LOG_EVERY == 0:
            # the learning rate is constant: read from args (the capturable optimizer's is a device tensor)
            run.log(global_step, {"charts/SPS": run.sps(global_step), "charts/epsilon": epsilon,
                                  "charts/learning_rate": args.learning_rate})
        if run.checkpoint_due(global_step + 1):
            nonfinite(global_step)  # a diverged state never becomes the resume point
            run.save(global_step + 1, checkpoint_state(q_network, target_network, optimizer, rb, probe_obs, rng,
                                                       probe_rng), replay=rb.store, filled=rb.filled)
        run.progress(global_step + 1, epsilon=epsilon)

    if args.save_model:
        model_path = os.path.join(run.dir, f"{args.exp_name}.cleanrl_model")
        torch.save(q_network.state_dict(), model_path)
        print(f"model saved to {model_path}")
        returns = evaluate(model_path, args, device, n_actions, seed=args.seed + 100)
        for idx, episodic_return in enumerate(returns):
            run.log(idx, {"eval/episodic_return": episodic_return})
        print(f"eval: {len(returns)} episodes, epsilon {args.eval_epsilon}, returns {returns}, "
              f"mean {np.mean(returns) if returns else float('nan'):.2f}")
    env.close()
    run.finish(args.total_timesteps, replay_transitions=rb.num_transitions(), replay_slots=rb.filled,
               replay_bytes=FrameReplayBuffer.bytes_needed(rb.capacity))
