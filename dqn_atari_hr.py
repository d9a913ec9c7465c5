"""DQN on Atari with every network variant of the Hadamard-representation papers, a frame-deduplicated replay
buffer and inline representation metrics.

Recipe: CleanRL `dqn_atari.py` with the HR papers' Table 3 (final epsilon 0.1, learning starts 80k, 10M steps).
Papers: "Hadamard Representations: Augmenting Hyperbolic Tangents in RL" (v1, arXiv 2406.09079) and its v2
("scaffolding" version); "Hadamax Encoding" (arXiv 2505.15345) for `--encoder hadamax`; ReDo (Sokar et al. 2023)
for the activation score; Kumar et al. (2021) for the effective rank.

Variants (flags are applied to the *target* layers: the dense block after the conv trunk, plus the convs with
`--hr-layers all`):
    python dqn_atari_hr.py --env-id BreakoutNoFrameskip-v4                          # ReLU (Nature DQN)
    python dqn_atari_hr.py --activation tanh                                        # tanh
    python dqn_atari_hr.py --activation tanh --layernorm                            # tanh + LayerNorm
    python dqn_atari_hr.py --activation tanh --hr                                   # HR(tanh)
    python dqn_atari_hr.py --hr                                                     # HR(ReLU)
    python dqn_atari_hr.py --hidden-dim 1024                                        # widen (parameter-matched)
    python dqn_atari_hr.py --activation tanh --hr --hidden-layers 2                 # 2HR (v2: two stacked HR blocks)
    python dqn_atari_hr.py --activation tanh --hr --hr-branches 3                   # 2HR (v1: product of three)
    python dqn_atari_hr.py --encoder hadamax                                        # Hadamax encoder (GELU+LN latent)

Replay: each 84x84 frame is stored once in a ring (7062 B per slot: frame, action, reward, flags); 4-frame stacks
for obs and next_obs are rebuilt by index at sampling time. An episode end (a lost life, with episodic life) takes one
extra slot for its final frame, so a transition costs 7062 * (L + 1) / L bytes for lives of L steps (7.1-7.3 KB),
against 28-56 KB in CleanRL's buffer. `--buffer-size` counts slots.

Checkpoints: every `--checkpoint-every` steps runs/NAME/checkpoint.pt is written atomically (temp file, fsync,
rename): networks, target network, Adam state, RNG states, metric probe batch, log counters and the manifest of the
replay ring, which lives beside it in runs/NAME/replay/ as chunk files of 32,768 slots (raw bytes, no copy in memory;
7.1 GB in all for a full 1M-slot buffer). Only the chunks written since the previous checkpoint are rewritten (new
files, named before the checkpoint that names them replaces the old one), so a checkpoint at the default cadence
writes about 2 GB, not 7.
`--resume --run-name NAME` continues from it: same step counter, schedules and replay; environments restart fresh
episodes (the interrupted episode is cut in the replay as a truncation). A non-finite loss or parameter stops the run
after writing the last good networks + optimiser state to runs/NAME/checkpoint_last_good.pt.

GPU fast paths (README "GPU fast paths"; auto = on with CUDA): `--compile` (torch.compile of the greedy acting step and
the TD loss), `--cudagraphs` (both replayed as CUDA graphs, the update with backward and a capturable Adam), and
pinned-memory uploads (the acting stack; each replay batch in two copies). Per step the only host sync is the greedy
action the environment needs (none when the agent explores); per logged update, one read of loss, Q and finiteness.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import io
import json
import math
import os
import random
import re
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Literal, Optional

import ale_py
import cv2
import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

import common

gym.register_envs(ale_py)
cv2.ocl.setUseOpenCL(False)

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
    """torch.compile the greedy acting step and the TD loss (auto: on with CUDA; off on CPU, where compiling takes
    about a minute and gains little)"""
    cudagraphs: Literal["auto", "on", "off"] = "auto"
    """replay the greedy acting step and the whole gradient step (target max, TD loss, backward, Adam) as CUDA graphs,
    which removes the per-kernel launch cost of these batch-1 and batch-32 networks (auto: on with CUDA; needs CUDA)"""
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
    run_name: Optional[str] = None
    """run directory runs/NAME; None means {env_id}__{exp_name}__{seed}__{unix_time}"""
    checkpoint_every: int = 250_000
    """agent steps between checkpoints to runs/NAME/checkpoint.pt (0 = off). The replay goes to runs/NAME/replay/ in
    chunks, each rewritten only when it changed: about 2 GB per checkpoint at this cadence (8-9 chunks of 231 MB),
    whatever the buffer size; scripts/bench_checkpoint_dqn.py measures it on your machine"""
    resume: bool = False
    """continue runs/NAME (--run-name) from its checkpoint; training flags must match the ones it was made with"""

    # Algorithm (the HR papers' Table 3 = CleanRL dqn_atari, final epsilon 0.1)
    env_id: str = "BreakoutNoFrameskip-v4"
    """the id of the Atari environment (NoFrameskip-v4 ids; ALE/*-v5 ids get frameskip=1 with their sticky actions)"""
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
    eval_episodes: int = 10
    """full games played by the saved model at the end (with --save-model)"""
    eval_epsilon: float = 0.05
    """epsilon of the evaluation policy"""

    # Network variants (CONVENTIONS.md)
    activation: Optional[Activation] = None
    """activation of the target layers (default relu; gelu with --encoder hadamax, as the Hadamax encoder)"""
    hr: bool = False
    """Hadamard representation: each target layer becomes act(W1 x + b1) * act(W2 x + b2)"""
    hr_branches: int = 2
    """number of multiplied branches (3 = the v1 paper's "2HR")"""
    hr_layers: Literal["last", "all"] = "last"
    """target layers: `last` = the dense block after the conv trunk, `all` = also every conv layer"""
    hidden_layers: int = 1
    """dense hidden layers after the conv trunk (`--hr --hidden-layers 2` = the v2 paper's stacked 2HR)"""
    hidden_dim: int = 512
    """width of the dense hidden layer(s) (1024 = the parameter-matched widen baseline of HR)"""
    layernorm: bool = False
    """LayerNorm on the pre-activations of the target layers (always on with --encoder hadamax, part of its latent)"""
    combine: Literal["product", "sum"] = "product"
    """how HR branches are combined (`sum` is the v1 ablation)"""
    conv_activation: Activation = "relu"
    """activation of conv layers that are not targets (Nature encoder)"""
    encoder: Literal["nature", "hadamax"] = "nature"
    """conv trunk: Nature CNN, or the Hadamax encoder (Hadamard conv blocks with max-pooling)"""

    # Representation metrics
    metrics_every: int = 25_000
    """agent steps between representation-metric probes (0 = off)"""
    metrics_batch: int = 1024
    """replay observations in the fixed probe batch"""
    redo_tau: float = 0.1
    """ReDo threshold tau: a neuron with activation score <= tau is dormant (dormant_score)"""
    kde_threshold: float = 20.0
    """KDE dormancy test: dormant when the peak density of the neuron's activations exceeds this"""
    kde_noise_std: float = 1e-3
    """std of the Gaussian jitter added before the KDE test (not given in the papers)"""


FRAME_SHAPE = (84, 84)
FRAME_STACK = 4
PRINT_EVERY = 5000
LOG_EVERY = 100


def mem_available_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), in bytes."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable not found in /proc/meminfo")


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
    """Reject bad flags before anything else happens: one line on stderr naming the flag, exit 1. (Then the main
    block checks --resume, free memory for the buffer and the run directory, still before any environment exists.)"""
    def fail(msg):
        sys.exit(f"error: {msg}")

    if args.track:
        try:
            import wandb  # noqa: F401
        except ImportError:
            fail("--track needs wandb, which is not installed (pip install wandb)")
    if args.capture_video:
        try:
            import moviepy  # noqa: F401
        except ImportError:
            fail("--capture-video needs moviepy, which is not installed (pip install moviepy)")
    if args.env_id not in gym.registry:
        fail(f"--env-id {args.env_id!r} is not a registered environment (Atari ids look like BreakoutNoFrameskip-v4)")
    if "ale_py" not in str(gym.spec(args.env_id).entry_point):
        fail(f"--env-id {args.env_id!r} is not an ALE Atari environment")
    if args.hr and args.hr_branches < 2:
        fail(f"--hr-branches must be >= 2 with --hr, got {args.hr_branches}")
    if not args.hr and args.hr_branches != 2:
        fail(f"--hr-branches {args.hr_branches} has no effect without --hr")
    if args.combine == "sum" and not args.hr:
        fail("--combine sum needs --hr (it is the sum-of-branches ablation of HR)")
    if args.encoder == "hadamax" and args.hr_layers == "all":
        fail("--hr-layers all does not apply to --encoder hadamax (its conv blocks are always Hadamard)")
    for flag, value, lo in [("--hidden-layers", args.hidden_layers, 1), ("--hidden-dim", args.hidden_dim, 1),
                            ("--total-timesteps", args.total_timesteps, 1), ("--batch-size", args.batch_size, 1),
                            ("--train-frequency", args.train_frequency, 1),
                            ("--learning-starts", args.learning_starts, 0),
                            ("--target-network-frequency", args.target_network_frequency, 1),
                            ("--metrics-every", args.metrics_every, 0), ("--metrics-batch", args.metrics_batch, 2),
                            ("--eval-episodes", args.eval_episodes, 0), ("--buffer-size", args.buffer_size, 64),
                            ("--checkpoint-every", args.checkpoint_every, 0)]:
        if value < lo:
            fail(f"{flag} must be >= {lo}, got {value}")
    if args.batch_size > args.buffer_size:
        fail(f"--batch-size {args.batch_size} exceeds --buffer-size {args.buffer_size}")
    if args.metrics_every and args.metrics_batch > args.buffer_size:
        fail(f"--metrics-batch {args.metrics_batch} exceeds --buffer-size {args.buffer_size}")
    for flag, value in [("--start-e", args.start_e), ("--end-e", args.end_e), ("--eval-epsilon", args.eval_epsilon),
                        ("--gamma", args.gamma), ("--tau", args.tau)]:
        if not 0.0 <= value <= 1.0:
            fail(f"{flag} must be in [0, 1], got {value}")
    if not 0.0 < args.exploration_fraction <= 1.0:
        fail(f"--exploration-fraction must be in (0, 1], got {args.exploration_fraction}")
    for flag, value, positive in [("--learning-rate", args.learning_rate, True),
                                  ("--kde-threshold", args.kde_threshold, True),
                                  ("--redo-tau", args.redo_tau, False), ("--kde-noise-std", args.kde_noise_std, False)]:
        if not (math.isfinite(value) and (value > 0 if positive else value >= 0)):
            fail(f"{flag} must be a finite number {'> 0' if positive else '>= 0'}, got {value}")
    if args.resume and args.run_name is None:
        fail("--resume needs --run-name NAME (the run directory to continue)")
    if args.run_name is not None and (not args.run_name.strip() or os.path.normpath(args.run_name) in (".", "..")):
        fail(f"--run-name {args.run_name!r} is not a directory name under runs/")
    if args.cudagraphs == "on" and not (args.cuda and torch.cuda.is_available()):
        fail("--cudagraphs on needs a CUDA GPU (none is available, or --no-cuda); use --cudagraphs auto or off")


def check_memory(args: Args) -> None:
    """The replay buffer must fit in free memory (checked right before anything is allocated, resumed runs too)."""
    need = FrameReplayBuffer.bytes_needed(args.buffer_size, FRAME_SHAPE)
    avail = mem_available_bytes()
    if need > avail:
        sys.exit(f"error: --buffer-size {args.buffer_size} needs {need / 1e9:.2f} GB of replay memory but only "
                 f"{avail / 1e9:.2f} GB is available (MemAvailable); lower --buffer-size")


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


class ClipRewardEnv(gym.RewardWrapper):
    """Reward -> sign(reward) for learning; the raw score is recorded by RecordEpisodeStatistics below it."""

    def reward(self, reward):
        return float(np.sign(reward))


class WarpFrame(gym.ObservationWrapper):
    """RGB 210x160 -> grayscale 84x84 uint8 (cv2, INTER_AREA as SB3/CleanRL)."""

    def __init__(self, env):
        super().__init__(env)
        self.observation_space = gym.spaces.Box(0, 255, FRAME_SHAPE, dtype=np.uint8)

    def observation(self, frame):
        frame = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
        return cv2.resize(frame, FRAME_SHAPE[::-1], interpolation=cv2.INTER_AREA)


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
    env = ClipRewardEnv(env)
    env = WarpFrame(env)
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


class FrameReplayBuffer:
    """Ring of single frames plus per-slot action, reward and flags; stacks are rebuilt by index when sampling.

    An episode of L steps occupies L + 1 consecutive slots: frames o_0..o_L, where slot t (t < L) also holds a_t,
    r_t and whether the step t -> t+1 terminated or was truncated, and slot L (flag FINAL) holds only the final
    frame, so next_obs is exact at termination and truncation. The stack of slot i is frames i-3..i, except that
    frames from before the episode's first slot (flag FIRST) are replaced by that first frame, which is what the
    acting agent saw (FrameStack). When the ring is full, the 3 oldest slots are not sampled (their stacks may
    reach overwritten frames) and the newest slot is not sampled until its action arrives.
    """

    FIRST, TERMINATED, TRUNCATED, FINAL = 1, 2, 4, 8
    ARRAYS = ("frames", "actions", "rewards", "flags")
    CHUNK = 32_768  # slots per checkpoint file (231 MB of frames): a checkpoint rewrites only the chunks that changed

    def __init__(self, capacity: int, frame_shape=FRAME_SHAPE, stack: int = FRAME_STACK, device="cpu", seed=0,
                 chunk: int = CHUNK):
        if capacity < stack + 2:
            raise ValueError(f"capacity must be >= {stack + 2}, got {capacity}")
        self.capacity, self.stack, self.device = capacity, stack, torch.device(device)
        self.frames = np.zeros((capacity, *frame_shape), dtype=np.uint8)
        self.actions = np.zeros(capacity, dtype=np.uint8)
        self.rewards = np.zeros(capacity, dtype=np.float32)
        self.flags = np.zeros(capacity, dtype=np.uint8)
        self.ptr, self.full = 0, False
        self.rng = np.random.default_rng(seed)
        self.chunk = chunk
        self.dirty = np.ones(-(-capacity // chunk), dtype=bool)  # chunks changed since their last saved copy
        self.saved: dict = {}  # chunk index -> file name of its newest saved copy

    @staticmethod
    def bytes_needed(capacity: int, frame_shape=FRAME_SHAPE) -> int:
        per_slot = int(np.prod(frame_shape)) + np.dtype(np.uint8).itemsize + np.dtype(np.float32).itemsize + 1
        return capacity * per_slot

    @property
    def nbytes(self) -> int:
        return self.frames.nbytes + self.actions.nbytes + self.rewards.nbytes + self.flags.nbytes

    def _write(self, frame, flags):
        self.dirty[self.ptr // self.chunk] = True
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
        self.dirty[last // self.chunk] = True
        self.actions[last] = action
        self.rewards[last] = reward
        self.flags[last] |= self.TERMINATED * bool(terminated) | self.TRUNCATED * bool(truncated)
        self._write(next_frame, self.FINAL if (terminated or truncated) else 0)

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
        filled = self.capacity if self.full else self.ptr
        out = np.empty(0, dtype=np.int64)
        for _ in range(1000):
            cand = self.rng.integers(0, filled, size=2 * n + 8)
            out = np.concatenate([out, cand[self._valid(cand)]])
            if out.size >= n:
                return out[:n]
        raise RuntimeError("replay buffer has no complete transition to sample")

    def observations(self, idx):
        """uint8 tensor (n, stack, H, W) of the stacks ending at slots idx."""
        return torch.from_numpy(self.frames[self.stack_indices(idx)]).to(self.device)

    def sample(self, batch_size):
        idx = self.sample_indices(batch_size)
        nxt = (idx + 1) % self.capacity
        return (self.observations(idx),
                torch.from_numpy(self.actions[idx].astype(np.int64)).to(self.device),
                torch.from_numpy(self.rewards[idx]).to(self.device),
                self.observations(nxt),
                torch.from_numpy((self.flags[idx] & self.TERMINATED) != 0).float().to(self.device))

    def state_dict(self) -> dict:
        """The filled part of the ring as tensors that share memory with it (torch.from_numpy: torch.save writes the
        raw bytes, nothing is copied in memory), plus the write pointer and the sampling RNG."""
        n = self.capacity if self.full else self.ptr
        return {"capacity": self.capacity, "frame_shape": tuple(self.frames.shape[1:]), "stack": self.stack,
                "ptr": self.ptr, "full": self.full, "rng": self.rng.bit_generator.state,
                **{k: torch.from_numpy(getattr(self, k)[:n]) for k in ("frames", "actions", "rewards", "flags")}}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict returned into this (fresh, same-sized) buffer."""
        if (state["capacity"], tuple(state["frame_shape"]), state["stack"]) != \
                (self.capacity, self.frames.shape[1:], self.stack):
            raise ValueError(f"replay state of capacity {state['capacity']}, frames {tuple(state['frame_shape'])}, "
                             f"stack {state['stack']} does not fit a buffer of capacity {self.capacity}, frames "
                             f"{self.frames.shape[1:]}, stack {self.stack}")
        n = state["frames"].shape[0]
        for k in self.ARRAYS:
            getattr(self, k)[:n] = state[k].numpy()
        self.ptr, self.full = int(state["ptr"]), bool(state["full"])
        self.rng.bit_generator.state = state["rng"]
        self.dirty[:], self.saved = True, {}

    def save_chunks(self, directory: str, tag: str) -> tuple[dict, int]:
        """Incremental checkpoint of the ring: each chunk changed since its last save is written (atomically) to a
        new file `directory/chunkNNNNN_<tag>.pt`; returns (manifest, bytes written). The manifest names the newest
        file of every filled chunk plus the pointer and the sampling RNG; the checkpoint stores it. Files of the
        previous manifest are left alone, so until the new checkpoint replaces the old one, the old one stays
        complete; prune_chunks(manifest) deletes them afterwards. At the default 250k-step cadence a full 1M ring
        rewrites 8-9 of its 31 chunks (about 2 GB) instead of 7 GB."""
        os.makedirs(directory, exist_ok=True)
        n = self.capacity if self.full else self.ptr
        written = 0
        for i in range(-(-n // self.chunk)):
            if self.dirty[i] or i not in self.saved:
                lo, hi = i * self.chunk, min((i + 1) * self.chunk, n)
                name = f"chunk{i:05d}_{tag}.pt"
                written += common.atomic_save({k: torch.from_numpy(getattr(self, k)[lo:hi]) for k in self.ARRAYS},
                                              os.path.join(directory, name))  # views: torch.save copies nothing
                self.saved[i], self.dirty[i] = name, False
        manifest = {"capacity": self.capacity, "frame_shape": tuple(self.frames.shape[1:]), "stack": self.stack,
                    "chunk": self.chunk, "ptr": self.ptr, "full": self.full, "rng": self.rng.bit_generator.state,
                    "files": {i: self.saved[i] for i in range(-(-n // self.chunk))}}
        return manifest, written

    @staticmethod
    def prune_chunks(directory: str, manifest: dict) -> None:
        """Delete the chunk files (and stray temp files) of `directory` that `manifest` does not name."""
        keep = set(manifest["files"].values())
        for name in os.listdir(directory):
            if name.startswith("chunk") and name not in keep:
                os.remove(os.path.join(directory, name))

    @staticmethod
    def missing_chunks(directory: str, manifest: dict) -> list:
        return [n for n in manifest["files"].values() if not os.path.isfile(os.path.join(directory, n))]

    def load_chunks(self, directory: str, manifest: dict) -> None:
        """Restore what save_chunks wrote into this (fresh, same-sized) buffer; every chunk is then clean."""
        got = (manifest["capacity"], tuple(manifest["frame_shape"]), manifest["stack"], manifest["chunk"])
        if got != (self.capacity, self.frames.shape[1:], self.stack, self.chunk):
            raise ValueError(f"replay of capacity {got[0]}, frames {got[1]}, stack {got[2]}, chunk {got[3]} does not "
                             f"fit a buffer of capacity {self.capacity}, frames {self.frames.shape[1:]}, stack "
                             f"{self.stack}, chunk {self.chunk}")
        for i, name in manifest["files"].items():
            part = torch.load(os.path.join(directory, name), map_location="cpu", weights_only=True, mmap=True)
            lo = i * self.chunk
            for k in self.ARRAYS:
                getattr(self, k)[lo:lo + part[k].shape[0]] = part[k].numpy()
            del part  # the mapping goes with it
        self.ptr, self.full = int(manifest["ptr"]), bool(manifest["full"])
        self.rng.bit_generator.state = manifest["rng"]
        self.saved, self.dirty[:] = dict(manifest["files"]), False

    def cut_episode(self):
        """End the newest episode where it stands (a resumed run restarts its environment): its newest frame becomes
        a final frame and the step into it a truncation, so that step bootstraps from it and no stack or transition
        reaches across into the next episode."""
        if self.ptr == 0 and not self.full:
            return
        last = (self.ptr - 1) % self.capacity
        if self.flags[last] & self.FINAL:
            return
        self.flags[last] |= self.FINAL
        self.dirty[last // self.chunk] = True
        if not self.flags[last] & self.FIRST:  # the step last-1 -> last belongs to the same episode
            self.flags[(last - 1) % self.capacity] |= self.TRUNCATED
            self.dirty[((last - 1) % self.capacity) // self.chunk] = True


# ---------------------------------------------------------------------------------------------------------------
# Network: one factory for every hidden layer (plain, HR, LayerNorm, CReLU, conv or dense)

ACTIVATIONS = {
    "relu": F.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "gelu": lambda x: F.gelu(x, approximate="tanh"),  # the tanh approximation, as Flax (PQN/Hadamax) uses
    "selu": F.selu,
    "crelu": lambda x: torch.cat([F.relu(x), F.relu(-x)], dim=1),  # doubles the width
}


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over channels at each spatial position of an (N, C, H, W) map (the Flax NHWC convention)."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class HiddenLayer(nn.Module):
    """K independently parameterised copies of (Linear or Conv2d -> optional LayerNorm -> activation), combined by
    elementwise product (HR, v2 eq. 1: act(W1 x + b1) * act(W2 x + b2)) or sum; K = 1 is a plain layer. An optional
    pool follows (Hadamax). With probe=True also returns the branches' pre-activations stacked along dim 1."""

    def __init__(self, kind, in_dim, out_dim, activation, layernorm=False, branches=1, combine="product",
                 kernel=1, stride=1, padding=0, pool=None, ln_eps=1e-5):
        super().__init__()
        if kind == "linear":
            make, norm = (lambda: nn.Linear(in_dim, out_dim)), (lambda: nn.LayerNorm(out_dim, eps=ln_eps))
        else:
            make = lambda: nn.Conv2d(in_dim, out_dim, kernel, stride, padding)  # noqa: E731
            norm = lambda: ChannelLayerNorm(out_dim, eps=ln_eps)  # noqa: E731
        self.branches = nn.ModuleList(make() for _ in range(branches))
        self.norms = nn.ModuleList(norm() for _ in range(branches)) if layernorm else None
        self.act = ACTIVATIONS[activation]
        self.combine = combine
        self.pool = pool if pool is not None else nn.Identity()
        self.out_dim = out_dim * (2 if activation == "crelu" else 1)

    def forward(self, x, probe=False):
        out, pres = None, []
        for i, branch in enumerate(self.branches):
            z = branch(x)
            if self.norms is not None:
                z = self.norms[i](z)
            pres.append(z)
            a = self.act(z)
            out = a if out is None else (out * a if self.combine == "product" else out + a)
        out = self.pool(out)
        return (out, torch.cat(pres, dim=1)) if probe else out


class QNetwork(nn.Module):
    """Conv trunk (conv1..conv3) -> dense block (fc1..fc{N-1}, latent) -> linear Q head."""

    def __init__(self, args: Args, n_actions: int):
        super().__init__()
        hr_branches = args.hr_branches if args.hr else 1
        # --encoder hadamax is the whole official encoder: its dense latent is Dense -> LayerNorm -> GELU by default
        activation = args.activation or ("gelu" if args.encoder == "hadamax" else "relu")
        target = dict(activation=activation, layernorm=args.layernorm or args.encoder == "hadamax",
                      branches=hr_branches, combine=args.combine)
        plain_conv = dict(activation=args.conv_activation, layernorm=False, branches=1)
        convs, c = [], FRAME_STACK
        if args.encoder == "nature":
            for out, k, s in [(32, 8, 4), (64, 4, 2), (64, 3, 1)]:
                kw = target if args.hr_layers == "all" else plain_conv
                convs.append(HiddenLayer("conv", c, out, kernel=k, stride=s, **kw))
                c = convs[-1].out_dim
        else:  # Hadamax: stride-1 SAME convs, 2 branches x (LayerNorm -> GELU), product, max-pool downsampling
            for out, k, pool in [(32, 8, nn.MaxPool2d(4, 4)), (64, 4, nn.MaxPool2d(2, 2, ceil_mode=True)),
                                 (64, 3, nn.MaxPool2d(3, 1, padding=1))]:
                convs.append(HiddenLayer("conv", c, out, "gelu", layernorm=True, branches=2, kernel=k,
                                         padding="same", pool=pool, ln_eps=1e-6))
                c = out
            for m in self.modules_of(convs, nn.Conv2d):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)
        self.convs = nn.ModuleList(convs)
        with torch.no_grad():
            width = self.trunk(torch.zeros(1, FRAME_STACK, *FRAME_SHAPE)).shape[1]
        dense = []
        for _ in range(args.hidden_layers):
            dense.append(HiddenLayer("linear", width, args.hidden_dim, **target))
            width = dense[-1].out_dim
        if args.encoder == "hadamax":  # He-normal dense layer, as the Hadamax code
            for m in self.modules_of(dense, nn.Linear):
                nn.init.kaiming_normal_(m.weight)
                nn.init.zeros_(m.bias)
        self.dense = nn.ModuleList(dense)
        self.head = nn.Linear(width, n_actions)
        self.layer_names = [f"conv{i + 1}" for i in range(len(convs))] + \
            [f"fc{i + 1}" for i in range(len(dense) - 1)] + ["latent"]

    @staticmethod
    def modules_of(layers, cls):
        return [m for layer in layers for m in layer.modules() if isinstance(m, cls)]

    def trunk(self, x):
        for conv in self.convs:
            x = conv(x)
        return x.flatten(1)

    def forward(self, x, probe=False):
        """Q-values of uint8 stacks (n, 4, 84, 84). probe=True also returns {layer: (output, pre-activation)}."""
        x = x.float() / 255.0
        if not probe:
            x = self.trunk(x)
            for layer in self.dense:
                x = layer(x)
            return self.head(x)
        layers = {}
        for i, layer in enumerate([*self.convs, *self.dense]):
            if i == len(self.convs):
                x = x.flatten(1)
            x, pre = layer(x, probe=True)
            layers[self.layer_names[i]] = (x, pre)
        return self.head(x), layers


# ---------------------------------------------------------------------------------------------------------------
# Hot path: acting, replay sampling and the update, as functions of tensors (README "GPU fast paths"). The loop
# builds them once; with --compile / --cudagraphs they are compiled and/or replayed as CUDA graphs. None of them
# syncs with the host, and everything a graph reads (parameters, Adam state, the batch tensors) stays in place.


def make_greedy_action(q_network: QNetwork):
    """greedy_action(obs) -> (1,) action tensor: argmax of Q for one stacked uint8 observation (1, 4, 84, 84)."""
    @torch.no_grad()
    def greedy_action(obs: torch.Tensor) -> torch.Tensor:
        return q_network(obs).argmax(dim=1)

    return greedy_action


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

    td_loss = common.compiled(td_loss, compile_loss)

    def train_step(obs, actions, rewards, next_obs, dones):
        loss, q_mean = td_loss(obs, actions, rewards, next_obs, dones)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach(), q_mean

    return train_step


@torch.no_grad()
def update_target(target_network: QNetwork, q_network: QNetwork, tau: float) -> None:
    """target <- tau * online + (1 - tau) * target, written in place (copy_) into the target's own parameters: a CUDA
    graph of train_step reads them at fixed addresses, so they are never replaced."""
    for tp, p in zip(target_network.parameters(), q_network.parameters()):
        tp.copy_(tau * p + (1.0 - tau) * tp)


class ReplaySampler:
    """rb.sample(batch_size) into persistent tensors, with batched transfers: the obs and next_obs stacks are
    gathered straight into one uint8 host buffer (2B, 4, 84, 84) and action, reward, done into one float32 buffer
    (3, B); on CUDA both are pinned and go up in one non-blocking copy each (2 copies instead of rb.sample's 5
    pageable ones). The returned tensors are views of the same device memory at every call (CUDA-graph inputs): use
    them before the next sample(). Same indices, same RNG draws and same values as rb.sample."""

    def __init__(self, rb: FrameReplayBuffer, batch_size: int, device: torch.device):
        self.rb, self.batch_size = rb, batch_size
        self.frames = common.Staging((2 * batch_size, rb.stack, *rb.frames.shape[1:]), torch.uint8, device)
        self.scalars = common.Staging((3, batch_size), torch.float32, device)
        self.actions = torch.empty(batch_size, dtype=torch.int64, device=device)
        b, d = batch_size, self.scalars.device
        self.batch = (self.frames.device[:b], self.actions, d[1], self.frames.device[b:], d[2])

    def sample(self):
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
# Helpers


def linear_schedule(start_e: float, end_e: float, duration: float, t: int) -> float:
    slope = (end_e - start_e) / duration
    return max(slope * t + start_e, end_e)


def resolve_defaults(args: Args) -> Args:
    """Fill the defaults that depend on other flags (recorded in args.json, compared on --resume)."""
    args.activation = args.activation or ("gelu" if args.encoder == "hadamax" else "relu")
    args.layernorm = args.layernorm or args.encoder == "hadamax"
    return args


def all_finite(params, loss=None) -> torch.Tensor:
    """One device-side bool: the loss (if given) and every parameter are finite. No host sync until it is read."""
    ok = torch.stack([torch.isfinite(p).all() for p in params]).all()
    return ok if loss is None else ok & torch.isfinite(loss).all()


class LastGoodState:
    """Device-side copy of the latest networks + optimiser state that passed the finiteness check: clones made once
    and refreshed in place with copy_ (no host sync), written to checkpoint_last_good.pt if training diverges.
    `global_step` has the checkpoint's meaning: every step before it is done."""

    def __init__(self):
        self.state, self.global_step, self._mine = None, None, []

    @staticmethod
    def _tensors(obj) -> list:
        if isinstance(obj, torch.Tensor):
            return [obj]
        items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else []
        return [t for v in items for t in LastGoodState._tensors(v)]

    @staticmethod
    def _clone(obj):
        if isinstance(obj, torch.Tensor):
            return obj.detach().clone()
        if isinstance(obj, dict):
            return {k: LastGoodState._clone(v) for k, v in obj.items()}
        return [LastGoodState._clone(v) for v in obj] if isinstance(obj, (list, tuple)) else obj

    def update(self, global_step: int, state: dict) -> None:
        live = self._tensors(state)
        if self.state is None or len(live) != len(self._mine):  # first call, or Adam's state appeared
            self.state = self._clone(state)
            self._mine = self._tensors(self.state)
        else:
            for mine, t in zip(self._mine, live):
                mine.copy_(t, non_blocking=True)
        self.global_step = global_step


CHECKPOINT_VERSION = 2  # 2: the replay in chunk files beside checkpoint.pt; version 1 files (replay inside) still load
# flags that do not change what is trained: they may differ between a run and its --resume
MAY_DIFFER_ON_RESUME = ("resume", "checkpoint_every", "run_name", "cuda", "torch_deterministic", "compile",
                        "cudagraphs", "track", "wandb_project_name", "wandb_entity", "capture_video", "save_model",
                        "eval_episodes", "eval_epsilon")
COUNTERS = ("probe_seconds", "n_probes", "last_return", "wall_seconds")  # running values that feed the logs


def training_state(q_network, target_network, optimizer) -> dict:
    """The learned state (live references, not copies): what checkpoints and the last-good snapshot hold."""
    return {"q_network": q_network.state_dict(), "target_network": target_network.state_dict(),
            "optimizer": optimizer.state_dict()}


def checkpoint_state(global_step, args, q_network, target_network, optimizer, replay, rng, probe_obs,
                     counters) -> dict:
    """Everything a resumed run needs. `global_step` is the next step to execute (every step before it is done);
    epsilon, the target-network and training cadences and the learning rate are functions of it. `replay` is the
    manifest of rb.save_chunks (the ring's chunk files in runs/NAME/replay/), or rb.state_dict() (the ring itself)."""
    return {"version": CHECKPOINT_VERSION, "global_step": global_step, "args": dataclasses.asdict(args),
            **training_state(q_network, target_network, optimizer), "rng": common.rng_state(rng),
            "probe_obs": None if probe_obs is None else probe_obs.cpu(), "counters": dict(counters),
            "replay": replay}


def load_checkpoint(path) -> dict:
    """Memory-mapped load on the CPU: the replay ring is copied once, from the page cache into the fresh buffer, and
    never sits in memory twice (nor on the GPU); network and optimiser tensors move to the device on restore."""
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)


def restore_checkpoint(ckpt, q_network, target_network, optimizer, rb, rng, device, replay_dir=None):
    """Load a checkpoint_state into fresh objects (the replay from its chunk files in `replay_dir` when the checkpoint
    holds a manifest); returns (global_step, probe_obs, counters)."""
    q_network.load_state_dict(ckpt["q_network"])
    target_network.load_state_dict(ckpt["target_network"])
    optimizer.load_state_dict(copy.deepcopy(ckpt["optimizer"]))  # own copies: on the CPU they would view the mmap
    if "files" in ckpt["replay"]:
        rb.load_chunks(replay_dir, ckpt["replay"])
    else:
        rb.load_state_dict(ckpt["replay"])
    common.set_rng_state(ckpt["rng"], rng)
    probe_obs = None if ckpt["probe_obs"] is None else ckpt["probe_obs"].to(device, copy=True)
    return ckpt["global_step"], probe_obs, dict(ckpt["counters"])


def param_checksum(module: nn.Module) -> float:
    """Sum of every float tensor of the state_dict, in float64: printed on resume so tests can compare."""
    return sum(t.double().sum().item() for t in module.state_dict().values() if t.is_floating_point())


def stop_nonfinite(step, loss, run_dir, args, last_good: LastGoodState, ckpt_step, writer):
    """Write the last good networks + optimiser state next to the resumable checkpoint, say where both are, exit 1."""
    what = "loss" if loss is not None and not torch.isfinite(loss).all() else "parameters"
    path = os.path.join(run_dir, "checkpoint_last_good.pt")
    common.atomic_save({"version": CHECKPOINT_VERSION, "global_step": last_good.global_step,
                        "args": dataclasses.asdict(args), **last_good.state}, path)
    writer.close()
    resumable = os.path.join(run_dir, "checkpoint.pt") + (f" (step {ckpt_step})" if ckpt_step else " (none yet)")
    sys.exit(f"error: non-finite {what} at step {step}; last good state (step {last_good.global_step}) written to "
             f"{path}; the resumable checkpoint is {resumable}")


def check_resume(args: Args, run_dir: str) -> dict:
    """--resume, before any environment or buffer exists: exit 0 if the run already finished; exit 1 with one line
    unless runs/NAME holds a readable checkpoint made with the same training flags. Returns the checkpoint."""
    finished = os.path.join(run_dir, "finished")
    if os.path.isfile(finished):
        try:
            with open(finished) as f:
                detail = f"at step {json.load(f)['global_step']}"
        except (OSError, ValueError, KeyError):
            detail = f"{finished} exists"
        print(f"run {args.run_name} already finished ({detail}); nothing to resume")
        sys.exit(0)
    path = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.isfile(path):
        sys.exit(f"error: --resume: no checkpoint in {run_dir}")
    try:
        with open(os.path.join(run_dir, "args.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        sys.exit(f"error: --resume: cannot read {run_dir}/args.json ({e})")
    known = {f.name for f in dataclasses.fields(Args)}  # resolve the saved flags as this script resolves its own
    saved = {**saved, **dataclasses.asdict(resolve_defaults(Args(**{k: v for k, v in saved.items() if k in known})))}
    current = dataclasses.asdict(args)
    conflicts = common.arg_conflicts(saved, current, MAY_DIFFER_ON_RESUME)
    if conflicts:
        sys.exit(f"error: --resume: {run_dir} was made with other flags: " + ", ".join(
            f"--{k.replace('_', '-')} (saved {saved.get(k)}, now {current.get(k)})" for k in conflicts))
    try:
        ckpt = load_checkpoint(path)
        if ckpt.get("version") not in (1, CHECKPOINT_VERSION):
            raise ValueError(f"format version {ckpt.get('version')}, this script reads 1 and {CHECKPOINT_VERSION}")
        missing = FrameReplayBuffer.missing_chunks(os.path.join(run_dir, "replay"), ckpt["replay"]) \
            if "files" in ckpt["replay"] else []
        if missing:
            raise FileNotFoundError(f"replay chunk {missing[0]} is missing from {run_dir}/replay"
                                    + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    except Exception as e:  # noqa: BLE001 -- any unreadable file gets the same one-line answer
        reason = (str(e).splitlines() or [""])[0]
        sys.exit(f"error: --resume: cannot read {path} ({type(e).__name__}: {reason})")
    return ckpt


def ensure_writable(args: Args, run_dir: str) -> None:
    """Create runs/NAME and write a file in it, or exit with one line naming --run-name."""
    try:
        if os.path.exists(run_dir) and not os.path.isdir(run_dir):
            raise OSError("it exists and is not a directory")
        os.makedirs(run_dir, exist_ok=True)
        probe = os.path.join(run_dir, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        sys.exit(f"error: --run-name {args.run_name}: cannot write {run_dir} ({e.strerror or e})")


@torch.no_grad()
def representation_metrics(q_network: QNetwork, probe_obs: torch.Tensor, args: Args, chunk: int = 256) -> dict:
    """All representation/* scalars on the fixed probe batch: one extra forward, in chunks to bound memory.
    Conv pre-activations are reduced to their spatial max and min per channel, which leaves saturation_fractions
    (channel <= 0 / > 0 at every sample and position) unchanged."""
    posts, pres = collections.defaultdict(list), collections.defaultdict(list)
    for obs in probe_obs.split(chunk):
        _, layers = q_network(obs, probe=True)
        for name, (post, pre) in layers.items():
            if pre.dim() == 4:
                pre = torch.stack([pre.amax(dim=(2, 3)), pre.amin(dim=(2, 3))], dim=-1).unsqueeze(2)
            posts[name].append(post)
            pres[name].append(pre)
    out = {}
    seed = args.seed  # same jitter for layer_metrics and the latent mask below, so they agree
    for name in q_network.layer_names:
        post, pre = torch.cat(posts[name]), torch.cat(pres[name])
        metrics = common.layer_metrics(post, pre, tau=args.redo_tau, kde_threshold=args.kde_threshold,
                                       kde_noise_std=args.kde_noise_std, generator=torch.Generator().manual_seed(seed))
        out.update({f"representation/{name}/{k}": v for k, v in metrics.items()})
    latent = torch.cat(posts["latent"])
    mask = common.dormant_mask_kde(latent, args.kde_threshold, args.kde_noise_std,
                                   generator=torch.Generator().manual_seed(seed))
    dead, live = common.head_contributions(latent, q_network.head.weight, mask)
    out["representation/hidden_bias"] = dead
    out["representation/live_contribution"] = live
    return out


def evaluate(model_path, args: Args, device, n_actions, seed):
    """Play args.eval_episodes full games with an epsilon-greedy (args.eval_epsilon) policy; return raw scores."""
    env = make_env(args.env_id, seed)
    model = QNetwork(args, n_actions).to(device)
    model.load_state_dict(torch.load(model_path, map_location=device))
    model.eval()
    rng = np.random.default_rng(seed)
    frame, _ = env.reset(seed=seed)
    stack = FrameStack(frame)
    returns = []
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
            frame, _ = env.reset()
            stack.reset(frame)
        else:
            stack.push(frame)
    env.close()
    return returns


if __name__ == "__main__":
    args = parse_args()
    validate(args)
    resolve_defaults(args)  # recorded in args.json
    warnings.filterwarnings("ignore", message="Using padding='same' with even kernel")  # Hadamax 8x8/4x4 convs
    if args.run_name is None:
        args.run_name = f"{args.env_id.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.join("runs", args.run_name)
    ckpt_path = os.path.join(run_dir, "checkpoint.pt")
    replay_dir = os.path.join(run_dir, "replay")  # the replay's chunk files, named by checkpoint.pt
    ckpt = check_resume(args, run_dir) if args.resume else None  # exits if finished, missing or made with other flags
    if ckpt is None and os.path.exists(ckpt_path):  # a fresh start would overwrite the run's logs and resume point
        sys.exit(f"error: --run-name {args.run_name}: {run_dir} already holds a checkpoint; add --resume to continue "
                 f"it, or choose another --run-name")
    check_memory(args)
    ensure_writable(args, run_dir)
    if ckpt is None:  # a resumed run keeps the args.json it was made with (identical up to MAY_DIFFER_ON_RESUME)
        with open(os.path.join(run_dir, "args.json"), "w") as f:
            json.dump(dataclasses.asdict(args), f, indent=2)

    from torch.utils.tensorboard import SummaryWriter

    # on resume, TensorBoard drops the events the interrupted process logged at or after the checkpoint's step
    writer = SummaryWriter(run_dir, purge_step=None if ckpt is None else ckpt["global_step"])
    if ckpt is None:
        writer.add_text("hyperparameters",
                        "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    rng = np.random.default_rng(args.seed)

    start_step = 0 if ckpt is None else ckpt["global_step"]
    env_seed = args.seed + start_step  # a resumed run starts fresh episodes, seeded by where it resumes
    env = make_env(args.env_id, env_seed, args.capture_video, args.run_name)
    n_actions = int(env.action_space.n)
    q_network = QNetwork(args, n_actions).to(device)
    optimizer = torch.optim.Adam(q_network.parameters(), lr=args.learning_rate)
    use_compile = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    use_graphs = device.type == "cuda" and args.cudagraphs != "off"
    target_network = QNetwork(args, n_actions).to(device)
    target_network.load_state_dict(q_network.state_dict())
    n_params = sum(p.numel() for p in q_network.parameters())
    print(q_network)
    print(f"parameters: {n_params:,}")
    if ckpt is None:
        writer.add_text("architecture", f"```\n{q_network}\n```\n\nparameters: {n_params:,}")

    rb = FrameReplayBuffer(args.buffer_size, device=device, seed=args.seed)
    print(f"replay: {args.buffer_size:,} slots x {rb.nbytes // args.buffer_size} B = {rb.nbytes / 1e9:.2f} GB")
    probe_obs, probe_seconds, n_probes, wall_before = None, 0.0, 0, 0.0
    last_return = float("nan")
    ckpt_step = None  # step of the newest resumable runs/NAME/checkpoint.pt
    if ckpt is not None:
        t0 = time.perf_counter()
        start_step, probe_obs, counters = restore_checkpoint(ckpt, q_network, target_network, optimizer, rb, rng,
                                                             device, replay_dir)
        probe_seconds, n_probes, last_return, wall_before = (counters[k] for k in COUNTERS)
        del ckpt  # the last reference to the memory-mapped file
        rb.cut_episode()  # the environment restarts below: the interrupted episode ends here, as a truncation
        ckpt_step = start_step
        print(f"resumed {run_dir} from step {start_step} (parameter checksum {param_checksum(q_network)!r}); "
              f"restored in {time.perf_counter() - t0:.1f}s")

    common.set_capturable_(optimizer, use_graphs)  # after load_state_dict, which brings the saved run's setting

    # the hot functions, built once: compiled and/or replayed as CUDA graphs (README "GPU fast paths")
    greedy_action = common.compiled(make_greedy_action(q_network), use_compile)
    train_step = make_train_step(q_network, target_network, optimizer, args.gamma, use_compile)
    if use_graphs:
        greedy_action, train_step = common.cuda_graphed(greedy_action), common.cuda_graphed(train_step)
    print(f"fast paths: torch.compile {'on' if use_compile else 'off'}, CUDA graphs {'on' if use_graphs else 'off'}, "
          f"pinned transfers {'on' if device.type == 'cuda' else 'off (CPU)'}", flush=True)
    sampler = ReplaySampler(rb, args.batch_size, device)
    obs_in = common.Staging((1, FRAME_STACK, *FRAME_SHAPE), torch.uint8, device) if device.type == "cuda" else None

    frame, _ = env.reset(seed=env_seed)
    stack = FrameStack(frame)
    rb.start_episode(frame)
    last_good = LastGoodState()  # what a divergence falls back to; refreshed at every logged update
    last_good.update(start_step, training_state(q_network, target_network, optimizer))
    loss = None
    start_time = time.time()
    for global_step in range(start_step, args.total_timesteps):
        epsilon = linear_schedule(args.start_e, args.end_e, args.exploration_fraction * args.total_timesteps,
                                  global_step)
        if rng.random() < epsilon:  # the coin and the random action come from the host RNG: no GPU work
            action = int(rng.integers(n_actions))
        else:
            if obs_in is None:  # CPU: the stack itself, no copy
                obs = torch.from_numpy(stack.frames).unsqueeze(0)
            else:  # CUDA: through a pinned buffer, one non-blocking copy
                obs_in.wait()[0] = stack.frames
                obs = obs_in.upload()
            action = greedy_action(obs).item()  # the one host sync of a step: the environment needs the action

        frame, reward, terminated, truncated, info = env.step(action)
        if "episode" in info:  # a full game ended (all lives): raw score
            last_return = float(info["episode"]["r"])
            writer.add_scalar("charts/episodic_return", last_return, global_step)
            writer.add_scalar("charts/episodic_length", int(info["episode"]["l"]), global_step)
        rb.add(action, reward, frame, terminated, truncated)
        if terminated or truncated:  # a lost life also starts a new stack (episodic life)
            frame, _ = env.reset()
            stack.reset(frame)
            rb.start_episode(frame)
        else:
            stack.push(frame)

        if global_step > args.learning_starts:
            if global_step % args.train_frequency == 0:
                # with CUDA graphs, loss and q_mean are the graph's static outputs, overwritten by the next update:
                # they are read below (logged update) or by all_finite before then (probe, checkpoint)
                loss, q_mean = train_step(*sampler.sample())
                if global_step % LOG_EVERY == 0:  # the one host sync of logged updates: log, and stop on divergence
                    td_loss, q_value, finite = torch.stack([loss, q_mean,
                                                            all_finite(q_network.parameters(), loss).float()]).tolist()
                    if not finite:
                        stop_nonfinite(global_step, loss, run_dir, args, last_good, ckpt_step, writer)
                    writer.add_scalar("losses/td_loss", td_loss, global_step)
                    writer.add_scalar("losses/q_values", q_value, global_step)
                    last_good.update(global_step + 1, training_state(q_network, target_network, optimizer))
            if global_step % args.target_network_frequency == 0:
                update_target(target_network, q_network, args.tau)

        if args.metrics_every and global_step > 0 and global_step % args.metrics_every == 0:
            t0 = time.perf_counter()
            if not all_finite(q_network.parameters(), loss).item():  # metrics of a diverged network would raise
                stop_nonfinite(global_step, loss, run_dir, args, last_good, ckpt_step, writer)
            last_good.update(global_step + 1, training_state(q_network, target_network, optimizer))
            if probe_obs is None:  # fixed at the first probe, reused so curves compare like with like
                valid = rb.valid_indices()
                idx = np.sort(rng.choice(valid, size=min(args.metrics_batch, valid.size), replace=False))
                probe_obs = rb.observations(idx)
            for tag, value in representation_metrics(q_network, probe_obs, args).items():
                writer.add_scalar(tag, value, global_step)
            probe_seconds += time.perf_counter() - t0
            n_probes += 1

        if global_step % LOG_EVERY == 0:
            sps = int((global_step - start_step) / max(time.time() - start_time, 1e-9))  # since this process started
            writer.add_scalar("charts/SPS", sps, global_step)
            writer.add_scalar("charts/epsilon", epsilon, global_step)
            # constant; read from args: the capturable optimizer's lr is a device tensor, reading it would sync
            writer.add_scalar("charts/learning_rate", args.learning_rate, global_step)
        if global_step % PRINT_EVERY == 0 and global_step > 0:
            print(f"global_step={global_step} SPS={int((global_step - start_step) / (time.time() - start_time))} "
                  f"episodic_return={last_return} epsilon={epsilon:.3f} "
                  f"probe_overhead={100 * probe_seconds / (wall_before + time.time() - start_time):.2f}%")

        if args.checkpoint_every and (global_step + 1) % args.checkpoint_every == 0 \
                and global_step + 1 < args.total_timesteps:
            if not all_finite(q_network.parameters(), loss).item():  # a diverged state never becomes the resume point
                stop_nonfinite(global_step, loss, run_dir, args, last_good, ckpt_step, writer)
            last_good.update(global_step + 1, training_state(q_network, target_network, optimizer))
            t0 = time.perf_counter()
            writer.flush()  # every event logged so far (all at steps <= global_step) is on disk before the checkpoint
            counters = dict(zip(COUNTERS, (probe_seconds, n_probes, last_return,
                                           wall_before + time.time() - start_time)))
            # replay chunks first (new files), then the checkpoint naming them replaces the old one atomically, then
            # the superseded chunk files go: a kill at any point leaves one complete resumable checkpoint
            manifest, replay_bytes = rb.save_chunks(replay_dir, str(global_step + 1))
            size = common.atomic_save(checkpoint_state(global_step + 1, args, q_network, target_network, optimizer,
                                                       manifest, rng, probe_obs, counters), ckpt_path)
            rb.prune_chunks(replay_dir, manifest)
            ckpt_step = global_step + 1
            print(f"checkpoint: step {ckpt_step}, {size / 1e6:.1f} MB + {replay_bytes / 1e6:.1f} MB of changed replay "
                  f"chunks, {time.perf_counter() - t0:.1f}s -> {ckpt_path}")

    wall = time.time() - start_time
    steps = args.total_timesteps - start_step
    print(f"done: {args.total_timesteps} steps ({steps} in this process) in {wall:.1f}s, SPS={int(steps / wall)}")
    total_wall = wall_before + wall
    print(f"metrics: {n_probes} probes took {probe_seconds:.2f}s = {100 * probe_seconds / total_wall:.2f}% of "
          "wall time")
    if device.type == "cuda":  # scripts/bench.py reads this line
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB allocated, "
              f"{torch.cuda.max_memory_reserved(device) / 2**20:.0f} MiB reserved")
    slot_bytes, n_trans = rb.nbytes // rb.capacity, rb.num_transitions()
    used = rb.capacity if rb.full else rb.ptr
    print(f"replay: {slot_bytes} B per slot; {slot_bytes * used / max(n_trans, 1):.0f} B per stored transition "
          f"({n_trans} transitions in {used} slots; final frames of episode ends take the rest)")

    if args.save_model:
        model_path = os.path.join(run_dir, f"{args.exp_name}.cleanrl_model")
        torch.save(q_network.state_dict(), model_path)
        print(f"model saved to {model_path}")
        returns = evaluate(model_path, args, device, n_actions, seed=args.seed + 100)
        for idx, episodic_return in enumerate(returns):
            writer.add_scalar("eval/episodic_return", episodic_return, idx)
        print(f"eval: {len(returns)} episodes, epsilon {args.eval_epsilon}, returns {returns}, "
              f"mean {np.mean(returns) if returns else float('nan'):.2f}")

    env.close()
    writer.close()
    with open(os.path.join(run_dir, "finished"), "w") as f:  # sweeps skip finished runs; analyze.py counts them
        json.dump({"global_step": args.total_timesteps, "wall_seconds": total_wall}, f)
    if os.path.exists(ckpt_path):  # a finished run is never resumed, and its checkpoint holds gigabytes of replay
        os.remove(ckpt_path)
    shutil.rmtree(replay_dir, ignore_errors=True)
