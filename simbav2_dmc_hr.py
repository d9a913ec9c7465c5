"""SimbaV2 on state-based continuous control, with the Hadamard representation (HR) and its parameter-matched widen.

SimbaV2 (Lee et al. 2025, "Hyperspherical Normalization for Scalable Deep RL"; github.com/DAVIAN-Robotics/SimbaV2,
JAX) as its official code runs it, ported to PyTorch: SAC whose actor and critic keep every hidden vector on the unit
sphere. Each network: observation (+ action) -> append the constant --c-shift -> l2norm -> HyperDense -> Scaler ->
l2norm (the embedder) -> LERP residual blocks x <- l2norm(x + alpha (l2norm(W2 ReLU(Scaler(W1 x))) - x)) -> a head
HyperDense -> Scaler -> HyperDense + bias. A HyperDense is a bias-free linear layer whose weight rows are re-projected
onto the unit sphere after every optimizer step (the target critic's Polyak average is not); a Scaler is a learned
per-unit gain stored as param * (init / scale), param initialised to `scale`, so `scale` sets Adam's effective step.
The critic is categorical: 101 bins on [-5, 5], cross-entropy to the C51 projection of r + gamma (z - alpha log pi');
the actor a tanh-Gaussian with log_std = -10 + 6 (1 + tanh(x)). One update (official SAC order): actor against the
current critic, temperature (target entropy -|A|/2, alpha from 0.01), critic with the new actor and temperature,
Polyak tau 0.005. Clipped double Q only where episodes terminate (gymnasium MuJoCo; off on dm_control). Adam without
weight decay or clipping, every learning rate decayed linearly 1e-4 -> 5e-5 over the run's updates. Observations are
normalised by running mean/variance (updated on every environment step, random warm-up included) when a batch is
sampled or an action chosen; rewards are divided by max(sqrt(Var G), max|G| / 5) with G = gamma (1 - done) G + r the
running discounted return. Action repeat 2 (dm_control) or 1 (MuJoCo), time limit 1000 frames inside the repeat,
updates per agent step = action repeat, 5,000 random transitions first, batch 256, 1M frames, evaluation every 50k
agent steps (--eval-every 100000 frames) over 10 episodes of the deterministic policy -> eval/episodic_return.

HR (the HR v2 paper: "HR is applied on the first hidden layer of the SimbaV2 block"): the block's expansion layer
HyperDense(h -> 4h) -> Scaler -> ReLU becomes ReLU(Scaler_1(W_1 x)) * ReLU(Scaler_2(W_2 x)) (--hr-scaler shared: one
Scaler for both branches), in the blocks of both networks or of the critic only (--hr-networks). --widen is the
parameter-matched baseline: expansion 6 instead of 4 in the same blocks adds exactly the HyperDense weights HR adds
(4h^2 per block); the run prints the parameter counts of all three variants.

Environments: dm_control state tasks by --env-id domain-task (humanoid-run, dog-trot, ...: observations flattened in
dm_control's order), gymnasium MuJoCo ids (Humanoid-v5, ...) when gymnasium[mujoco] is installed. HumanoidBench (the
paper's benchmark) has no installable distribution; make_env is the one place to add it. Nothing is rendered: dm_control
is imported with MUJOCO_GL=disable (harness.dm_control_suite), so no EGL/OSMesa is needed; --capture-video is refused.

Step unit: environment frames, as DrQ and the DMC literature: --total-timesteps, --learning-starts, --eval-every,
--log-every, --metrics-every and --checkpoint-every count frames; --buffer-size counts transitions (agent steps).

Probes (every --metrics-every frames; a fixed batch of --metrics-batch replayed (state, action) pairs drawn at the first
probe, normalised with the statistics of the moment): representation/<layer>/{dormant_kde, dormant_score, srank,
max_score} for critic/embedder, critic/block<i>/hidden (also saturated, zombie: the ReLU's pre-activations, every
branch), critic/block<i>/output with the last block's output named `latent` (what the critic head reads: also
representation/hidden_bias), and the same for the actor (actor/embedder, actor/block<i>/hidden, actor/latent). The
critic probed is the first one.

Checkpoints and resume: harness.py. A checkpoint holds networks, optimisers, temperature, the observation normaliser and
reward scaler, the update count (the learning-rate schedule), the probe batch and the RNG states; the replay goes to
runs/NAME/replay/ in chunks, only those written since the previous checkpoint. A resumed run starts fresh episodes.
Fast paths: torch.compile of the actor and critic losses (--compile); CUDA graphs are not implemented here.

Usage:
  python simbav2_dmc_hr.py --env-id humanoid-run
  python simbav2_dmc_hr.py --env-id dog-trot --hr [--hr-networks critic] [--hr-scaler shared]
  python simbav2_dmc_hr.py --env-id dog-trot --widen
"""
import copy
import dataclasses
import functools
import math
import os
import time
from dataclasses import dataclass
from typing import Literal, NamedTuple, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import harness

suite = harness.dm_control_suite(pixels=False)  # state tasks never render: no renderer (MUJOCO_GL=disable) to fail

EXPANSION, WIDEN_EXPANSION = 4, 6  # the block's hidden width / h: official, and the widen that matches HR's weights
REPLAY_CHUNK = 65_536  # replay slots per checkpoint chunk file (~120 MB of dog transitions)
EPS = 1e-8


@dataclass
class Args:
    # Run
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, repeatable on CUDA: cuDNN deterministic, torch.use_deterministic_algorithms (warn-only), cuBLAS
    workspace :4096:8 (harness.deterministic); the C51 projection's scatter_add_ then sums in a fixed order"""
    cuda: bool = True
    """if toggled, cuda will be enabled when available"""
    track: bool = False
    """track with Weights and Biases (wandb must be installed)"""
    wandb_project_name: str = "cleanRL"
    """the wandb's project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of wandb's project"""
    capture_video: bool = False
    """not supported: state tasks run without a renderer (gives an error)"""
    save_model: bool = False
    """save actor, critic and temperature to runs/{run_name}/ at the end"""
    run_name: Optional[str] = None
    """run directory runs/NAME (default {env_id}__{exp_name}__{seed}__{unix_time})"""

    # Environment
    env_id: str = "humanoid-run"
    """dm_control state task domain-task (humanoid-run, dog-trot, ...) or a gymnasium MuJoCo id (Humanoid-v5, ...)"""
    total_timesteps: int = 1_000_000
    """total environment frames (action-repeated physics steps)"""
    action_repeat: Optional[int] = None
    """action repeat (default: 2 for dm_control, 1 for gymnasium MuJoCo, as the official configs)"""
    max_episode_steps: int = 1000
    """time limit in frames, counted inside the action repeat"""

    # Algorithm (SAC with SimbaV2's networks; official defaults)
    buffer_size: int = 1_000_000
    """replay capacity in transitions (agent steps)"""
    batch_size: int = 256
    """batch size of each update"""
    learning_starts: Optional[int] = None
    """frames of uniformly random actions before updates start (default: 5,000 transitions = 5000 x action repeat)"""
    updates_per_step: Optional[int] = None
    """gradient updates per agent step (default: the action repeat)"""
    gamma: Optional[float] = None
    """discount (default: TD-MPC2's rule on the episode length L in agent steps, clip((L/5 - 1)/(L/5), 0.95, 0.995):
    0.99 on dm_control, 0.995 on MuJoCo)"""
    tau: float = 0.005
    """target critic smoothing coefficient (every update)"""
    learning_rate: float = 1e-4
    """initial learning rate of actor, critic and temperature (Adam)"""
    learning_rate_end: float = 5e-5
    """learning rate reached linearly at the run's last update"""
    init_temperature: float = 0.01
    """initial SAC temperature"""
    target_entropy_coef: float = -0.5
    """target entropy = coef * |A|"""
    cdq: Literal["auto", "on", "off"] = "auto"
    """clipped double Q (two critics; the target of the one with the lower mean Q): auto = on where episodes
    terminate (gymnasium MuJoCo), off on dm_control"""
    num_bins: int = 101
    """bins of the categorical critic"""
    g_max: float = 5.0
    """return bound: the critic's support is [-g_max, g_max] and reward scaling divides by at least max|G| / g_max"""
    normalize_observation: bool = True
    """running mean/variance observation normalisation"""
    normalize_reward: bool = True
    """return-based reward scaling"""

    # Network (official SimbaV2 sizes)
    critic_hidden_dim: int = 512
    """width h of the critic's embedder and blocks (block hidden layer 4h)"""
    critic_num_blocks: int = 2
    """residual blocks of the critic"""
    actor_hidden_dim: int = 128
    """width h of the actor's embedder and blocks"""
    actor_num_blocks: int = 1
    """residual blocks of the actor"""
    c_shift: float = 3.0
    """constant appended to the (normalised) input before the embedder's l2 normalisation"""

    # Network variant
    hr: bool = False
    """Hadamard representation on each block's expansion layer: ReLU(Scaler(W1 x)) * ReLU(Scaler(W2 x))"""
    hr_branches: int = 2
    """number of multiplied branches with --hr"""
    hr_networks: Literal["both", "critic"] = "both"
    """networks whose blocks --hr (and --widen) change: actor and critic, or the critic only"""
    hr_scaler: Literal["own", "shared"] = "own"
    """each HR branch has its own Scaler (a full copy of the layer), or the branches share one"""
    widen: bool = False
    """parameter-matched baseline of --hr: expansion 6 instead of 4 in the blocks --hr-networks names"""

    # Evaluation and logging
    eval_every: int = 100_000
    """frames between evaluations of the deterministic policy (0 = off; also evaluates at the end)"""
    eval_episodes: int = 10
    """episodes per evaluation"""
    log_every: int = 10_000
    """frames between loss/statistics scalars (charts/SPS included)"""

    # Metrics
    metrics_every: int = 50_000
    """frames between representation probes (0 = off)"""
    metrics_batch: int = 2048
    """replayed (state, action) pairs in the (fixed) probe batch, drawn at the first probe with enough stored"""
    redo_tau: float = 0.1
    """ReDo dormancy threshold on the activation score (dormant_score)"""
    kde_threshold: float = 20.0
    """KDE-peak density above which a neuron counts as dormant (dormant_kde)"""
    kde_noise_std: float = 1e-3
    """std of the Gaussian noise added before the KDE dormancy test"""
    kde_scale: Literal["rms", "raw"] = "rms"
    """what the KDE dormancy test sees: each layer's activations divided by their RMS over the probe batch (SimbaV2's
    unit vectors have coordinates of order 1/sqrt(h), which the absolute test would call dormant), or raw"""
    srank_delta: float = 0.01
    """effective rank: the fewest singular values holding 1 - delta of their sum (Kumar et al. 2021; HR papers)"""
    snapshot_every: int = 0
    """frames between actor and critic snapshots in runs/NAME/snapshots/ (0 = off): weights and the observation
    statistics of the moment, for scripts/probe.py"""

    # Checkpointing
    checkpoint_every: int = 100_000
    """frames between checkpoints (0 = off); each rewrites only the replay chunks written since the previous one"""
    resume: bool = False
    """continue runs/NAME (needs --run-name) from runs/NAME/checkpoint.pt; the other flags must match its args.json"""

    # Speed
    compile: Literal["auto", "on", "off"] = "auto"
    """torch.compile the actor and critic losses (auto: on with CUDA)"""
    cudagraphs: Literal["auto", "on", "off"] = "auto"
    """CUDA graphs are not implemented in this script: auto runs without them, on is refused"""


def parse_env_id(env_id: str):
    """('dmc', (domain, task)) for a dm_control suite task, ('gym', id) for a gymnasium MuJoCo id, else None."""
    domain, _, task = env_id.partition("-")
    if (domain, task) in suite.ALL_TASKS:
        return "dmc", (domain, task)
    import gymnasium

    spec = gymnasium.registry.get(env_id)
    if spec is not None and "gymnasium.envs.mujoco" in str(spec.entry_point):
        return "gym", env_id
    return None


def validate(args: Args) -> None:
    """SimbaV2's own checks (harness.Run does the generic ones): one line on stderr naming the flag, exit 1."""
    if args.updates_per_step is not None:
        harness.at_most(args, {"updates_per_step": harness.MAX_PASSES}, harness.PASSES)
    elif args.action_repeat is not None:  # the default --updates-per-step is the action repeat
        harness.at_most(args, {"action_repeat": harness.MAX_PASSES}, "it is also the default --updates-per-step; "
                        + harness.PASSES)
    harness.at_most(args, {"critic_num_blocks": harness.MAX_LAYERS, "actor_num_blocks": harness.MAX_LAYERS,
                           "hr_branches": harness.MAX_LAYERS}, harness.LAYER_COUNT)
    kind = parse_env_id(args.env_id)
    if kind is None:
        harness.fail(f"--env-id {args.env_id!r} is not a dm_control task (domain-task, e.g. humanoid-run) nor a "
                     f"gymnasium MuJoCo id (e.g. Humanoid-v5)")
    if kind[0] == "gym":
        try:
            import gymnasium.envs.mujoco  # noqa: F401
        except ImportError as e:
            harness.fail(f"--env-id {args.env_id} needs gymnasium[mujoco], which is not fully installed ({e}); "
                         f"pip install 'gymnasium[mujoco]'")
    if args.capture_video:
        harness.fail("--capture-video is not supported by simbav2_dmc_hr.py: state tasks run without a renderer "
                     "(MUJOCO_GL=disable)")
    if args.cudagraphs == "on":
        harness.fail("--cudagraphs on: CUDA graphs are not implemented in simbav2_dmc_hr.py; use --cudagraphs auto "
                     "or off")
    harness.at_least(args, {"buffer_size": 1, "batch_size": 1, "max_episode_steps": 1, "critic_hidden_dim": 1,
                            "critic_num_blocks": 1, "actor_hidden_dim": 1, "actor_num_blocks": 1, "num_bins": 2,
                            "hr_branches": 1, "eval_every": 0, "eval_episodes": 1, "log_every": 1})
    for name in ("action_repeat", "updates_per_step", "learning_starts"):
        if getattr(args, name) is not None:
            harness.at_least(args, {name: 0 if name == "learning_starts" else 1})
    harness.finite(args, ["learning_rate", "init_temperature", "g_max"])
    harness.finite(args, ["learning_rate_end", "redo_tau"], positive=False)
    for name in ("c_shift", "target_entropy_coef"):
        if not math.isfinite(getattr(args, name)):
            harness.fail(f"--{name.replace('_', '-')} must be a finite number, got {getattr(args, name)}")
    if args.gamma is not None:
        harness.unit_interval(args, ["gamma"])
    if not 0.0 < args.tau <= 1.0:
        harness.fail(f"--tau must be in (0, 1], got {args.tau}")
    if args.hr and args.widen:
        harness.fail("--hr and --widen are alternatives (--widen is the parameter-matched baseline of --hr)")
    if args.hr and args.hr_branches < 2:
        harness.fail(f"--hr-branches must be >= 2 with --hr, got {args.hr_branches}")
    if args.batch_size > args.buffer_size:
        harness.fail(f"--batch-size {args.batch_size} exceeds --buffer-size {args.buffer_size}")
    if args.metrics_every and args.metrics_batch > args.buffer_size:
        harness.fail(f"--metrics-batch {args.metrics_batch} exceeds --buffer-size {args.buffer_size}")


def resolve_defaults(args: Args) -> Args:
    """Defaults that depend on the environment (recorded in args.json; a resume compares them resolved)."""
    dmc = parse_env_id(args.env_id)[0] == "dmc"
    if args.action_repeat is None:
        args.action_repeat = 2 if dmc else 1
    if args.learning_starts is None:
        args.learning_starts = 5000 * args.action_repeat
    if args.updates_per_step is None:
        args.updates_per_step = args.action_repeat
    if args.gamma is None:
        horizon = args.max_episode_steps / args.action_repeat / 5
        args.gamma = max(min((horizon - 1) / horizon, 0.995), 0.95)
    if args.cdq == "auto":  # episodes terminate in gymnasium MuJoCo, never in the dm_control suite
        args.cdq = "off" if dmc else "on"
    if args.cudagraphs == "auto":  # not implemented here: the harness would turn them on with CUDA
        args.cudagraphs = "off"
    return args


# ---------------------------------------------------------------------------------------------------------------
# Environment


class StateEnv:
    """A state-based task: reset() -> obs; step(action in [-1, 1]^A) -> (obs, reward, terminated, truncated, frames).
    The action is rescaled to the task's bounds and repeated (rewards summed) until the repeat ends, the episode
    terminates, or the time limit (in frames, counted inside the repeat) is reached. Observations are float32 vectors:
    a dm_control observation dict flattened in its own order."""

    def __init__(self, env_id: str, seed: int, action_repeat: int, max_frames: int):
        self.kind, name = parse_env_id(env_id)
        self.action_repeat, self.max_frames, self.seed = action_repeat, max_frames, seed
        if self.kind == "dmc":
            self.env = suite.load(*name, task_kwargs={"random": seed})
            spec = self.env.action_spec()
            low, high = spec.minimum, spec.maximum
        else:  # HumanoidBench would go here too (gymnasium API)
            import gymnasium

            self.env = gymnasium.make(name, max_episode_steps=max_frames)
            low, high = self.env.action_space.low, self.env.action_space.high
        self.action_low, self.action_high = np.asarray(low, np.float32), np.asarray(high, np.float32)
        self.action_dim = self.action_low.shape[0]
        self.time_physics = 0.0  # seconds, for the speed report
        self.obs_dim = self.reset().shape[0]

    def reset(self) -> np.ndarray:
        t = time.perf_counter()
        self.frames = 0
        if self.kind == "dmc":
            obs = self._flat(self.env.reset().observation)
        else:
            obs, _ = self.env.reset(seed=self.seed)
            self.seed = None  # seeded once, as gymnasium wants
        self.time_physics += time.perf_counter() - t
        return np.asarray(obs, np.float32)

    @staticmethod
    def _flat(observation: dict) -> np.ndarray:
        return np.concatenate([np.asarray(v, np.float32).ravel() for v in observation.values()])

    def step(self, action):
        action = self.action_low + (np.asarray(action, np.float32) + 1.0) * 0.5 * (self.action_high - self.action_low)
        reward, frames, terminated, last = 0.0, 0, False, False
        t = time.perf_counter()
        for _ in range(self.action_repeat):
            if self.kind == "dmc":
                ts = self.env.step(action)
                obs, r, last = ts.observation, ts.reward or 0.0, ts.last()
                terminated = bool(last and ts.discount == 0.0)
            else:
                obs, r, terminated, truncated, _ = self.env.step(action)
                last = terminated or truncated
            reward += float(r)
            frames += 1
            self.frames += 1
            if last or self.frames >= self.max_frames:
                break
        self.time_physics += time.perf_counter() - t
        obs = self._flat(obs) if self.kind == "dmc" else np.asarray(obs, np.float32)
        truncated = not terminated and (last or self.frames >= self.max_frames)
        return obs, reward, terminated, truncated, frames


def make_env(args: Args, seed: int) -> StateEnv:
    return StateEnv(args.env_id, seed, args.action_repeat, args.max_episode_steps)



def evaluate(env: StateEnv, policy, episodes: int) -> float:
    """Mean return of `episodes` episodes of policy(obs) -> action (the deterministic policy)."""
    returns = []
    for _ in range(episodes):
        obs, done, ret = env.reset(), False, 0.0
        while not done:
            obs, r, term, trunc, _ = env.step(policy(obs))
            ret += r
            done = term or trunc
        returns.append(ret)
    return float(np.mean(returns))


class RunningMeanStd:
    """Running mean and population variance of a stream, merged batch by batch (Chan et al.'s parallel formula, as
    gymnasium's and the official code's), starting from mean 0, variance 1 with the weight of 1e-4 samples."""

    def __init__(self, shape=()):
        self.mean, self.var, self.count = np.zeros(shape), np.ones(shape), 1e-4

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float64)
        n, delta = x.shape[0], x.mean(0) - self.mean
        total = self.count + n
        m2 = self.var * self.count + x.var(0) * n + delta ** 2 * self.count * n / total
        self.mean, self.var, self.count = self.mean + delta * n / total, m2 / total, total

    def state_dict(self) -> dict:
        return {"mean": self.mean.copy(), "var": self.var.copy(), "count": self.count}

    def load_state_dict(self, d: dict) -> None:
        self.mean, self.var, self.count = np.array(d["mean"]), np.array(d["var"]), float(d["count"])


class ObsNormalizer(RunningMeanStd):
    """(x - mean) / sqrt(var + 1e-8) over the observations acted on so far."""

    def normalize(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / np.sqrt(self.var + EPS)).astype(np.float32)

    def affine(self) -> np.ndarray:
        """(2, obs_dim) float32: mean and 1 / sqrt(var + 1e-8), what the update applies on the device."""
        return np.stack([self.mean, 1.0 / np.sqrt(self.var + EPS)]).astype(np.float32)


class RewardScaler:
    """Return-based reward scaling (official RewardNormalizer): G <- gamma (1 - done) G + r on every transition, done
    being that transition's own (terminated or truncated); rewards are divided by max(sqrt(Var G + 1e-8), max|G| /
    g_max), Var G the running variance of G, which keeps scaled returns within about [-g_max, g_max]."""

    def __init__(self, gamma: float, g_max: float):
        self.gamma, self.g_max, self.G, self.G_abs_max, self.rms = gamma, g_max, 0.0, 0.0, RunningMeanStd()

    def update(self, reward: float, done: bool) -> None:
        self.G = self.gamma * (1.0 - float(done)) * self.G + reward
        self.rms.update(np.array([self.G]))
        self.G_abs_max = max(self.G_abs_max, abs(self.G))

    def scale(self) -> float:
        return 1.0 / max(math.sqrt(float(self.rms.var) + EPS), self.G_abs_max / self.g_max)

    def state_dict(self) -> dict:
        return {"G": self.G, "G_abs_max": self.G_abs_max, "rms": self.rms.state_dict()}

    def load_state_dict(self, d: dict) -> None:
        self.G, self.G_abs_max = float(d["G"]), float(d["G_abs_max"])
        self.rms.load_state_dict(d["rms"])


# ---------------------------------------------------------------------------------------------------------------
# Replay: raw (unnormalised) transitions; normalisation happens when a batch is used


class Batch(NamedTuple):
    """A batch of transitions: numpy from Replay.sample, device tensors (views of persistent buffers) from
    BatchSampler.sample. Observations and rewards are raw; terminated is 0./1. (tensors) or bool (numpy)."""
    obs: object  # (B, obs_dim) float32
    actions: object  # (B, A) float32 in [-1, 1]
    rewards: object  # (B,) float32, summed over the action repeat
    terminated: object  # (B,)
    next_obs: object  # (B, obs_dim) float32


class Replay:
    """Uniform ring of transitions. `store` checkpoints it incrementally (harness.ChunkStore)."""

    def __init__(self, capacity: int, obs_dim: int, action_dim: int, chunk: int = REPLAY_CHUNK):
        self.capacity, self.pos = capacity, 0
        self.obs = np.zeros((capacity, obs_dim), np.float32)
        self.next_obs = np.zeros((capacity, obs_dim), np.float32)
        self.actions = np.zeros((capacity, action_dim), np.float32)
        self.rewards = np.zeros(capacity, np.float32)
        self.terminated = np.zeros(capacity, np.bool_)
        self.store = harness.ChunkStore({k: getattr(self, k) for k in Batch._fields}, chunk)

    @staticmethod
    def bytes_needed(capacity: int, obs_dim: int, action_dim: int) -> int:
        return capacity * (8 * obs_dim + 4 * action_dim + 5)

    @property
    def filled(self) -> int:
        return min(self.pos, self.capacity)

    def add(self, obs, action, reward, terminated, next_obs) -> None:
        i = self.pos % self.capacity
        self.store.touch(i)
        self.obs[i], self.actions[i], self.rewards[i], self.terminated[i], self.next_obs[i] = (
            obs, action, reward, terminated, next_obs)
        self.pos += 1

    def sample(self, batch_size: int, rng: np.random.Generator) -> Batch:
        i = rng.integers(0, self.filled, batch_size)
        return Batch(self.obs[i], self.actions[i], self.rewards[i], self.terminated[i], self.next_obs[i])


class BatchSampler:
    """Replay.sample(batch_size, rng) into persistent tensors with batched transfers (pinned, non-blocking on CUDA):
    obs and next_obs in one float32 buffer (2B, obs_dim), actions/reward/terminated in another (A + 2, B). sample()
    returns views of the same device memory every call. Same RNG draws and values as Replay.sample."""

    def __init__(self, rb: Replay, batch_size: int, device: torch.device):
        self.rb, self.batch_size, self.a = rb, batch_size, rb.actions.shape[1]
        self.states = harness.Staging((2, batch_size, rb.obs.shape[1]), torch.float32, device)
        self.scalars = harness.Staging((self.a + 2, batch_size), torch.float32, device)
        s, x = self.states.device, self.scalars.device
        self.batch = Batch(s[0], x[:self.a].t(), x[self.a], x[self.a + 1], s[1])

    def sample(self, rng: np.random.Generator) -> Batch:
        rb, a = self.rb, self.a
        i = rng.integers(0, rb.filled, self.batch_size)
        states = self.states.wait()
        np.take(rb.obs, i, axis=0, out=states[0])
        np.take(rb.next_obs, i, axis=0, out=states[1])
        scalars = self.scalars.wait()
        scalars[:a] = rb.actions[i].T
        scalars[a] = rb.rewards[i]
        scalars[a + 1] = rb.terminated[i]
        self.states.upload()
        self.scalars.upload()
        return self.batch


# ---------------------------------------------------------------------------------------------------------------
# Networks (SimbaV2: every hidden vector on the unit sphere)


def l2normalize(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return x / x.norm(dim=dim, keepdim=True).clamp_min(EPS)


class HyperDense(nn.Linear):
    """Bias-free linear layer whose weight rows (one per output unit) lie on the unit sphere: orthogonal init, then
    each row l2-normalised; normalize_rows_ re-projects them after every optimizer step."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__(in_dim, out_dim, bias=False)
        nn.init.orthogonal_(self.weight)
        normalize_rows_([self.weight])


@torch.no_grad()
def normalize_rows_(weights) -> None:
    for w in weights:
        w.div_(w.norm(dim=1, keepdim=True).clamp_min(EPS))


class Scaler(nn.Module):
    """x * s * (init / scale), s a learned vector initialised to `scale`: the gain starts at `init`, and since Adam
    moves s by about lr, `scale` sets the gain's effective step size (lr * init / scale)."""

    def __init__(self, dim: int, init: float, scale: float):
        super().__init__()
        self.scaler = nn.Parameter(torch.full((dim,), float(scale)))
        self.forward_scale = init / scale

    def forward(self, x):
        return x * (self.scaler * self.forward_scale)

    def gain(self) -> torch.Tensor:
        return self.scaler.detach() * self.forward_scale


class Embedder(nn.Module):
    """Append the constant c_shift (keeps the input's norm, lost by l2norm, in the direction), l2norm, HyperDense(h),
    Scaler, l2norm."""

    def __init__(self, in_dim: int, hidden_dim: int, scaler_init: float, c_shift: float):
        super().__init__()
        self.c_shift = c_shift
        self.w = HyperDense(in_dim + 1, hidden_dim)
        self.scaler = Scaler(hidden_dim, scaler_init, scaler_init)

    def forward(self, x):
        x = torch.cat([x, x.new_full((*x.shape[:-1], 1), self.c_shift)], dim=-1)
        return l2normalize(self.scaler(self.w(l2normalize(x))))


class HiddenLayer(nn.Module):
    """The block's first hidden layer, HyperDense(h -> e h) -> Scaler -> ReLU; with K >= 2 branches (HR) the product
    of ReLU(Scaler_k(W_k x)) over k, each branch with its own Scaler or one shared. Plus 1e-8 (official: keeps the
    block's output off the zero vector)."""

    def __init__(self, in_dim: int, out_dim: int, scaler_init: float, branches: int = 1, shared_scaler: bool = False):
        super().__init__()
        self.linears = nn.ModuleList([HyperDense(in_dim, out_dim) for _ in range(branches)])
        self.scalers = nn.ModuleList([Scaler(out_dim, scaler_init, scaler_init)
                                      for _ in range(1 if shared_scaler else branches)])

    def forward(self, x, probe=False):
        pres = [self.scalers[min(k, len(self.scalers) - 1)](lin(x)) for k, lin in enumerate(self.linears)]
        y = F.relu(pres[0])
        for p in pres[1:]:
            y = y * F.relu(p)
        y = y + EPS
        return (y, torch.cat(pres, dim=1)) if probe else y


class Block(nn.Module):
    """LERP residual block: x <- l2norm(x + alpha * (l2norm(HyperDense(e h -> h)(hidden(x))) - x)), alpha a Scaler
    (init 1 / (blocks + 1), scale 1 / sqrt(h)); the hidden layer's Scaler starts at sqrt(2 / h) / sqrt(e)."""

    def __init__(self, h: int, expansion: int, num_blocks: int, branches: int, shared_scaler: bool):
        super().__init__()
        self.hidden = HiddenLayer(h, expansion * h, math.sqrt(2 / h) / math.sqrt(expansion), branches, shared_scaler)
        self.out = HyperDense(expansion * h, h)
        self.alpha = Scaler(h, 1.0 / (num_blocks + 1), 1.0 / math.sqrt(h))

    def forward(self, x, probe=False):
        hidden = self.hidden(x, probe)
        if probe:
            hidden, pre = hidden
        y = l2normalize(x + self.alpha(l2normalize(self.out(hidden)) - x))
        return (y, hidden, pre) if probe else y


class Trunk(nn.Module):
    """Embedder and blocks; forward(x, probe=True) also returns {layer: (post, pre or None)}: embedder,
    block<i>/hidden, block<i>/output."""

    def __init__(self, in_dim: int, h: int, num_blocks: int, c_shift: float, expansion: int, branches: int,
                 shared_scaler: bool):
        super().__init__()
        self.embedder = Embedder(in_dim, h, math.sqrt(2 / h), c_shift)
        self.blocks = nn.ModuleList([Block(h, expansion, num_blocks, branches, shared_scaler)
                                     for _ in range(num_blocks)])

    def forward(self, x, probe=False):
        x = self.embedder(x)
        if not probe:
            for block in self.blocks:
                x = block(x)
            return x
        layers = {"embedder": (x, None)}
        for i, block in enumerate(self.blocks):
            x, hidden, pre = block(x, probe=True)
            layers[f"block{i + 1}/hidden"] = (hidden, pre)
            layers[f"block{i + 1}/output"] = (x, None)
        return x, layers


class Head(nn.Module):
    """HyperDense(h -> h) -> Scaler(init 1, scale 1) -> HyperDense(h -> out) + bias (no activation, as official)."""

    def __init__(self, h: int, out_dim: int):
        super().__init__()
        self.w1, self.scaler, self.w2 = HyperDense(h, h), Scaler(h, 1.0, 1.0), HyperDense(h, out_dim)
        self.bias = nn.Parameter(torch.zeros(out_dim))

    def forward(self, z):
        return self.w2(self.scaler(self.w1(z))) + self.bias


def block_variant(args: Args, network: str) -> dict:
    """Trunk options of `network` ('actor' or 'critic'): HR or widen where --hr-networks puts them."""
    changed = network == "critic" or args.hr_networks == "both"
    return {"expansion": WIDEN_EXPANSION if changed and args.widen else EXPANSION,
            "branches": args.hr_branches if changed and args.hr else 1, "shared_scaler": args.hr_scaler == "shared"}


class QNet(nn.Module):
    """One categorical critic: trunk on [obs, action] -> num_bins logits."""

    def __init__(self, obs_dim: int, action_dim: int, args: Args):
        super().__init__()
        self.trunk = Trunk(obs_dim + action_dim, args.critic_hidden_dim, args.critic_num_blocks, args.c_shift,
                           **block_variant(args, "critic"))
        self.head = Head(args.critic_hidden_dim, args.num_bins)

    def forward(self, obs, action):
        return self.head(self.trunk(torch.cat([obs, action], dim=1)))


class Critic(nn.Module):
    """One critic, or two with clipped double Q; forward -> logits (critics, B, bins) over `support`."""

    def __init__(self, obs_dim: int, action_dim: int, args: Args):
        super().__init__()
        self.qs = nn.ModuleList([QNet(obs_dim, action_dim, args) for _ in range(2 if args.cdq == "on" else 1)])
        self.register_buffer("support", torch.linspace(-args.g_max, args.g_max, args.num_bins))

    def forward(self, obs, action):
        return torch.stack([q(obs, action) for q in self.qs])

    def q_values(self, logits):
        return torch.softmax(logits, dim=-1) @ self.support


class Actor(nn.Module):
    """Tanh-Gaussian policy: trunk -> mean head and log-std head, log_std = -10 + 6 (1 + tanh(x)) in [-10, 2]."""

    LOG_STD_MIN, LOG_STD_MAX = -10.0, 2.0

    def __init__(self, obs_dim: int, action_dim: int, args: Args):
        super().__init__()
        self.trunk = Trunk(obs_dim, args.actor_hidden_dim, args.actor_num_blocks, args.c_shift,
                           **block_variant(args, "actor"))
        self.mean = Head(args.actor_hidden_dim, action_dim)
        self.log_std = Head(args.actor_hidden_dim, action_dim)

    def forward(self, obs):
        z = self.trunk(obs)
        span = self.LOG_STD_MAX - self.LOG_STD_MIN
        return self.mean(z), self.LOG_STD_MIN + span * 0.5 * (1.0 + torch.tanh(self.log_std(z)))

    def sample(self, obs):
        """(tanh(u), log pi) with u ~ N(mean, std): the log-density of u minus log|d tanh/du|, from u itself."""
        mean, log_std = self(obs)
        u = mean + log_std.exp() * torch.randn_like(mean)
        log_prob = (-0.5 * ((u - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(1)
        # log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)), numerically stable
        log_prob = log_prob - (2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))).sum(1)
        return torch.tanh(u), log_prob

    def act_deterministic(self, obs):
        return torch.tanh(self(obs)[0])


def hyper_weights(module: nn.Module) -> list:
    return [m.weight for m in module.modules() if isinstance(m, HyperDense)]


def parameter_counts(obs_dim: int, action_dim: int, args: Args) -> dict:
    """{variant: (all parameters, HyperDense weights)} of actor + critic for baseline, hr and widen, built on the meta
    device (no memory, no RNG draws)."""
    out = {}
    for name, flags in (("baseline", {"hr": False, "widen": False}), ("hr", {"hr": True, "widen": False}),
                        ("widen", {"hr": False, "widen": True})):
        variant = dataclasses.replace(args, **flags, hr_branches=max(args.hr_branches, 2))
        with torch.device("meta"):
            nets = (Actor(obs_dim, action_dim, variant), Critic(obs_dim, action_dim, variant))
        out[name] = (sum(p.numel() for n in nets for p in n.parameters()),
                     sum(w.numel() for n in nets for w in hyper_weights(n)))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Probe


@torch.no_grad()
def probe_metrics(actor: Actor, critic: Critic, obs: torch.Tensor, actions: torch.Tensor, args: Args) -> dict:
    """Every representation/* scalar of one probe (normalised states and their replayed actions): common.probe_scalars
    on the first critic's and the actor's layers; the critic's last block output is `latent` (its head's input), and
    hidden_bias uses the head's first linear map (HyperDense weight times its Scaler's gain). srank, the ReDo scores
    and saturated/zombie do not change when a layer is multiplied by a positive constant; the KDE test does, so with
    --kde-scale rms it sees each layer divided by its RMS (a neuron is dormant when its outputs stay within about
    1/20 of the layer's typical magnitude)."""
    _, critic_layers = critic.qs[0].trunk(torch.cat([obs, actions], dim=1), probe=True)
    _, actor_layers = actor.trunk(obs, probe=True)
    last = f"block{args.critic_num_blocks}/output"
    layers = {("latent" if k == last else f"critic/{k}"): v for k, v in critic_layers.items()}
    last = f"block{args.actor_num_blocks}/output"
    layers.update({("actor/latent" if k == last else f"actor/{k}"): v for k, v in actor_layers.items()})
    head = critic.qs[0].head
    head_weight = head.w1.weight * head.scaler.gain()[:, None]
    if args.kde_scale == "rms":  # a layer-wide positive factor: only dormant_kde changes (and hidden_bias, undone)
        rms = {k: post.pow(2).mean().sqrt().clamp_min(EPS) for k, (post, _) in layers.items()}
        layers = {k: (post / rms[k], pre) for k, (post, pre) in layers.items()}
        head_weight = head_weight * rms["latent"]
    return common.probe_scalars(layers, head_weight, tau=args.redo_tau, kde_threshold=args.kde_threshold,
                                kde_noise_std=args.kde_noise_std, seed=args.seed, delta=args.srank_delta)


def probe_snapshot(args: Args, snapshot: dict, probe: dict, device) -> dict:
    """scripts/probe.py: probe_metrics of one snapshot (harness.Snapshots) in an actor and critic built as the run
    built them; the probe batch's raw states normalised as the loop normalises them, with the statistics (mean and
    1/std, float32) of the snapshot's moment."""
    build = snapshot["build"]
    actor = Actor(build["obs_dim"], build["action_dim"], args).to(device)
    critic = Critic(build["obs_dim"], build["action_dim"], args).to(device)
    actor.load_state_dict(snapshot["networks"]["actor"])
    critic.load_state_dict(snapshot["networks"]["critic"])
    obs_affine = snapshot["extra"]["obs_affine"].to(device)
    obs = (probe["obs"].to(device) - obs_affine[0]) * obs_affine[1]
    return probe_metrics(actor, critic, obs, probe["actions"].to(device), args)


# ---------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: acting and the update, as functions of tensors (the losses compiled with --compile)

STAT_NAMES = ("losses/qf_loss", "losses/qf1_values", "losses/actor_loss", "losses/alpha_loss", "losses/alpha",
              "losses/entropy")  # the rows of train_step's stats tensor


def make_act(actor: Actor, deterministic: bool = False):
    """act(obs) -> (1, A) action in [-1, 1]: a policy sample (or tanh of its mean) on one normalised observation."""
    @torch.no_grad()
    def act(obs: torch.Tensor) -> torch.Tensor:
        return actor.act_deterministic(obs) if deterministic else actor.sample(obs)[0]

    return act


def linear_lr(update: int, total_updates: int, start: float, end: float) -> float:
    """optax.linear_schedule: start -> end over total_updates optimizer steps, then end."""
    return start + (end - start) * min(update / max(total_updates, 1), 1.0)


def c51_project(probs: torch.Tensor, atoms: torch.Tensor, vmin: float, vmax: float) -> torch.Tensor:
    """C51 projection (Bellemare et al. 2017): the distribution with masses probs (B, N) at atoms (B, N), already
    clipped to [vmin, vmax], onto the fixed support linspace(vmin, vmax, N): each mass is split between the two nearest
    support points in proportion to closeness (all to one point when it lands on it)."""
    n = probs.shape[1]
    # NaN atoms (a diverged actor) must not index out of range; the loop's finiteness checks stop such a run
    b = ((atoms - vmin) / ((vmax - vmin) / (n - 1))).nan_to_num(0.0).clamp(0, n - 1)
    lo, hi = b.floor(), b.ceil()
    out = torch.zeros_like(probs)
    out.scatter_add_(1, lo.long(), probs * (hi + (lo == hi).float() - b))
    out.scatter_add_(1, hi.long(), probs * (b - lo))
    return out


def actor_loss(critic: Critic, actor: Actor, obs, alpha):
    """SAC's actor loss against the current critic (the lower Q of the two with clipped double Q). Returns (loss,
    entropy estimate)."""
    pi, logp = actor.sample(obs)
    q = critic.q_values(critic(obs, pi)).min(dim=0).values
    return (alpha * logp - q).mean(), -logp.detach().mean()


def critic_loss(critic: Critic, target_critic: Critic, actor: Actor, args: Args, obs, actions, rewards, terminated,
                next_obs, alpha):
    """Cross-entropy of each critic's bins to the C51 projection of r + gamma (1 - terminated) (z - alpha log pi(a'|s'))
    on the target critic's distribution (with clipped double Q: the critic whose mean is lower, per sample), atoms
    clipped to the support; the losses of the critics are summed. Returns (loss, mean Q of the first critic)."""
    with torch.no_grad():
        next_a, next_logp = actor.sample(next_obs)
        target_logits = target_critic(next_obs, next_a)
        lower = target_critic.q_values(target_logits).argmin(dim=0)
        probs = torch.softmax(target_logits, dim=-1)[lower, torch.arange(lower.shape[0], device=lower.device)]
        support = target_critic.support
        atoms = rewards[:, None] + args.gamma * (1.0 - terminated[:, None]) * (support - alpha * next_logp[:, None])
        target = c51_project(probs, atoms.clamp(-args.g_max, args.g_max), -args.g_max, args.g_max)
    logits = critic(obs, actions)
    loss = -(target * F.log_softmax(logits, dim=-1)).sum(-1).mean(-1).sum()
    return loss, critic.q_values(logits[0].detach()).mean()


def make_train_step(actor: Actor, critic: Critic, target_critic: Critic, log_alpha: torch.Tensor,
                    actor_opt: torch.optim.Optimizer, critic_opt: torch.optim.Optimizer,
                    alpha_opt: torch.optim.Optimizer, args: Args, target_entropy: float, compile_loss: bool = False):
    """train_step(obs, actions, rewards, terminated, next_obs, obs_affine, reward_scale) -> stats (STAT_NAMES): one
    SimbaV2 update on raw replayed data, normalised here (obs_affine: (2, obs_dim) mean and 1/std; reward_scale 0-d)."""
    actor_params, critic_params = list(actor.parameters()), list(critic.parameters())
    target_params = list(target_critic.parameters())
    actor_w, critic_w = hyper_weights(actor), hyper_weights(critic)
    actor_loss_fn = harness.compiled(functools.partial(actor_loss, critic, actor), compile_loss)
    critic_loss_fn = harness.compiled(functools.partial(critic_loss, critic, target_critic, actor, args), compile_loss)

    def train_step(obs, actions, rewards, terminated, next_obs, obs_affine, reward_scale):
        obs, next_obs = (obs - obs_affine[0]) * obs_affine[1], (next_obs - obs_affine[0]) * obs_affine[1]
        rewards = rewards * reward_scale
        alpha = log_alpha.detach().exp()
        # 1. actor against the current critic (gradients for the actor only, as jax.grad of its loss)
        pi_loss, entropy = actor_loss_fn(obs, alpha)
        for p, g in zip(actor_params, torch.autograd.grad(pi_loss, actor_params)):
            p.grad = g
        actor_opt.step()
        normalize_rows_(actor_w)
        # 2. temperature, on the entropy of the actor's sample
        alpha_loss = log_alpha.exp() * (entropy - target_entropy)
        alpha_opt.zero_grad(set_to_none=True)
        alpha_loss.backward()
        alpha_opt.step()
        # 3. critic, with the new actor and temperature in its target
        new_alpha = log_alpha.detach().exp()
        qf_loss, q1 = critic_loss_fn(obs, actions, rewards, terminated, next_obs, new_alpha)
        critic_opt.zero_grad(set_to_none=True)
        qf_loss.backward()
        critic_opt.step()
        normalize_rows_(critic_w)
        # 4. Polyak average of the (re-normalised) critic; the target itself is not re-normalised
        with torch.no_grad():
            torch._foreach_lerp_(target_params, critic_params, args.tau)
        return torch.stack([qf_loss.detach(), q1, pi_loss.detach(), alpha_loss.detach(), new_alpha, entropy])

    return train_step


if __name__ == "__main__":
    args = harness.cli(Args)
    validate(args)
    resolve_defaults(args)  # before the harness's generic checks, which compare --learning-starts
    harness.checks(args)  # before the probe environment, which takes --seed
    probe_env = make_env(args, args.seed)  # the sizes, for the memory check
    obs_dim, action_dim = probe_env.obs_dim, probe_env.action_dim
    del probe_env
    run = harness.Run(args, resolve=resolve_defaults, memory={f"--buffer-size {args.buffer_size}": Replay.bytes_needed(
        args.buffer_size, obs_dim, action_dim)}, log_at_steps_done=True,  # events at S belong to the checkpoint at S
        probes_need_updates=True,
        networks={f"--critic-hidden-dim {args.critic_hidden_dim} --actor-hidden-dim {args.actor_hidden_dim} "
                  f"--critic-num-blocks {args.critic_num_blocks} --hr-branches {args.hr_branches}":
                  lambda: [Actor(obs_dim, action_dim, args), Critic(obs_dim, action_dim, args)]})
    device = run.device
    rng = np.random.default_rng(args.seed)  # random actions before learning starts, replay sampling
    probe_rng = np.random.default_rng([args.seed, 1])  # the probe batch's draw: never an RNG that drives the agent
    train_seed, eval_seed = run.env_seeds()
    env = make_env(args, train_seed)
    eval_env = make_env(args, eval_seed) if args.eval_every > 0 else None
    actor = Actor(obs_dim, action_dim, args).to(device)
    critic = Critic(obs_dim, action_dim, args).to(device)
    target_critic = copy.deepcopy(critic).requires_grad_(False)
    log_alpha = torch.tensor(math.log(args.init_temperature), device=device, requires_grad=True)
    target_entropy = args.target_entropy_coef * action_dim
    actor_opt = torch.optim.Adam(actor.parameters(), lr=args.learning_rate)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=args.learning_rate)
    alpha_opt = torch.optim.Adam([log_alpha], lr=args.learning_rate)
    optimizers = {"actor_opt": actor_opt, "critic_opt": critic_opt, "alpha_opt": alpha_opt}
    networks = {"actor": actor, "critic": critic, "target_critic": target_critic}
    obs_norm, reward_scaler = ObsNormalizer(obs_dim), RewardScaler(args.gamma, args.g_max)
    rb = Replay(args.buffer_size, obs_dim, action_dim)
    run.describe(actor, critic)
    snapshots = harness.Snapshots(run, {"actor": actor, "critic": critic},
                                  build={"obs_dim": obs_dim, "action_dim": action_dim},
                                  probe_bytes=args.metrics_batch * 4 * (obs_dim + action_dim))
    counts = parameter_counts(obs_dim, action_dim, args)
    base = counts["baseline"]
    print("parameter matching (actor + critic; HyperDense weights / all parameters): " + ", ".join(
        f"{k} {w:,} / {n:,} (+{w - base[1]:,} / +{n - base[0]:,})" for k, (n, w) in counts.items()) +
        f"; blocks changed: {args.hr_networks}" + ("" if counts["hr"][1] == counts["widen"][1] else
                                                   " (--hr-branches > 2: the widen does not match)"))
    print(f"{args.env_id}: obs {obs_dim}, actions {action_dim}, action repeat {args.action_repeat}, gamma "
          f"{args.gamma:.4g}, clipped double Q {args.cdq}, {args.updates_per_step} updates per agent step, replay "
          f"{Replay.bytes_needed(rb.capacity, obs_dim, action_dim) / 1e9:.2f} GB")
    total_updates = args.total_timesteps // args.action_repeat * args.updates_per_step  # official decay horizon

    def training_state() -> dict:
        """Networks, temperature and optimisers (live references): the last good state, and a checkpoint's core."""
        return {**{k: m.state_dict() for k, m in networks.items()}, "log_alpha": log_alpha.detach(),
                **{k: opt.state_dict() for k, opt in optimizers.items()}}

    probe_batch, last_eval_step, n_updates = None, -1, 0  # probe batch: fixed at the first probe, raw states
    if run.checkpoint is not None:
        state = run.checkpoint["state"]
        for key, module in networks.items():
            module.load_state_dict(state[key])
        for key, opt in optimizers.items():  # own copies: on the CPU they would view the memory-mapped file
            opt.load_state_dict(copy.deepcopy(state[key]))
        with torch.no_grad():
            log_alpha.copy_(state["log_alpha"])
        obs_norm.load_state_dict(state["obs_norm"])
        reward_scaler.load_state_dict(state["reward_scaler"])
        run.restore_replay(rb.store)
        rb.pos, n_updates, last_eval_step = int(state["replay_pos"]), int(state["n_updates"]), state["last_eval_step"]
        if state["probe_batch"] is not None:
            probe_batch = tuple(t.to(device, copy=True) for t in state["probe_batch"])
        harness.set_rng_state(state["rng"], rng, probe_rng)
        run.resumed(actor, critic, target_critic)
    use_compile, _ = run.fast_paths()
    train_step = make_train_step(actor, critic, target_critic, log_alpha, actor_opt, critic_opt, alpha_opt, args,
                                 target_entropy, use_compile)
    act, act_eval = make_act(actor), make_act(actor, deterministic=True)
    sampler = BatchSampler(rb, args.batch_size, device)
    # per-step uploads through pinned buffers (non-blocking on CUDA): the acting observation, and the observation
    # statistics (mean, 1/std) the updates read from one fixed device tensor; reading the action back is the step's sync
    act_obs = harness.Staging((1, obs_dim), torch.float32, device)
    affine = harness.Staging((2, obs_dim), torch.float32, device)
    affine.wait()[:] = np.stack([np.zeros(obs_dim), np.ones(obs_dim)])
    obs_affine = affine.upload()
    reward_scale_t = torch.ones((), device=device)  # fill_ with a Python number: a kernel argument, no copy
    last_good = harness.LastGood()
    last_good.update(run.start_step, training_state())
    timed, timers = run.timed, run.timers  # wall seconds per phase (on CUDA, update time is launch time only)

    def policy_action(fn, obs: np.ndarray) -> np.ndarray:
        """fn (act or act_eval) on one observation, normalised with the current statistics."""
        x = act_obs.wait()
        x[0] = obs_norm.normalize(obs) if args.normalize_observation else obs
        return fn(act_obs.upload())[0].cpu().numpy()

    def keep_if_finite(step: int, stats_t: torch.Tensor) -> dict:
        """Where the host syncs anyway (logging, probing, checkpointing): the update's stats and whether every
        parameter is finite, read back in one transfer; stop on a non-finite loss or parameter, else the current state
        becomes the last good one. Returns the stats by name."""
        finite = harness.all_finite([*actor.parameters(), *critic.parameters(), *target_critic.parameters(), log_alpha])
        *values, params_finite = torch.cat([stats_t, finite.to(stats_t.dtype)[None]]).tolist()
        stats = dict(zip(STAT_NAMES, values))
        bad = [k for k, v in stats.items() if not math.isfinite(v)]
        if bad:
            run.stop_nonfinite(step, f"loss ({', '.join(bad)})", last_good)
        if not params_finite:
            run.stop_nonfinite(step, "parameters", last_good)
        last_good.update(step, training_state())
        return stats

    global_step = run.start_step
    obs = env.reset()  # a resumed run starts a fresh episode
    episode_return, episode_frames, stats = 0.0, 0, None
    while global_step < args.total_timesteps:
        prev_step = global_step
        # ALGO LOGIC: statistics see every observation acted on and every reward, random warm-up included
        with timed("act"):
            if args.normalize_observation:
                obs_norm.update(obs[None])
            if global_step < args.learning_starts:
                action = rng.uniform(-1.0, 1.0, action_dim).astype(np.float32)
            else:
                action = policy_action(act, obs)
                if not np.isfinite(action).all():  # the host has the action anyway; MuJoCo would raise on it
                    run.stop_nonfinite(global_step, "action", last_good)
        next_obs, reward, terminated, truncated, frames = env.step(action)
        global_step += frames
        episode_return += reward
        episode_frames += frames
        if args.normalize_reward:
            reward_scaler.update(reward, terminated or truncated)
        rb.add(obs, action, reward, terminated, next_obs)
        obs = next_obs
        if terminated or truncated:
            run.episode(global_step, episode_return, episode_frames)
            episode_return, episode_frames, obs = 0.0, 0, env.reset()

        log_now = harness.due(global_step, args.log_every, prev_step)
        checkpoint_now = run.checkpoint_due(global_step, prev_step)
        if global_step >= args.learning_starts:
            # ALGO LOGIC: updates per agent step (= action repeat), batches normalised with the current statistics
            if args.normalize_observation:
                affine.wait()[:] = obs_norm.affine()
                affine.upload()  # into obs_affine, after the updates already queued
            reward_scale = reward_scaler.scale() if args.normalize_reward else 1.0
            reward_scale_t.fill_(reward_scale)
            for _ in range(args.updates_per_step):
                with timed("replay"):
                    batch = sampler.sample(rng)
                with timed("update"):
                    lr = linear_lr(n_updates, total_updates, args.learning_rate, args.learning_rate_end)
                    for opt in optimizers.values():
                        harness.set_lr(opt, lr)
                    stats_t = train_step(*batch, obs_affine, reward_scale_t)
                n_updates += 1

            probe_now = harness.due(global_step, args.metrics_every, prev_step)
            if probe_now and probe_batch is None and rb.filled < args.metrics_batch:
                print(f"probe at step {global_step} skipped: the replay holds {rb.filled} transitions, fewer than "
                      f"--metrics-batch {args.metrics_batch}", flush=True)
                probe_now = False
            if probe_now or log_now or checkpoint_now:
                # the host sync of this step; what is about to be probed, logged or saved is finite
                stats = keep_if_finite(global_step, stats_t)
                stats.update({"charts/learning_rate": lr, "charts/reward_scale": reward_scale})
            if probe_now:
                with timed("metrics"), run.probing():
                    if probe_batch is None:
                        p = rb.sample(args.metrics_batch, probe_rng)
                        probe_batch = (torch.as_tensor(p.obs, device=device), torch.as_tensor(p.actions, device=device))
                    probe_obs = (probe_batch[0] - obs_affine[0]) * obs_affine[1]
                    run.log(global_step, probe_metrics(actor, critic, probe_obs, probe_batch[1], args))
        if snapshots.due(global_step, prev_step):  # the networks and the statistics (mean, 1/std) the probe above
            # saw: the device tensor the updates read (the identity until learning starts)
            snapshots.save(global_step, None if probe_batch is None else dict(zip(("obs", "actions"), probe_batch)),
                           extra={"obs_affine": obs_affine.cpu().clone()})

        if stats is not None and log_now:
            run.log(global_step, {**stats, "charts/SPS": run.sps(global_step)})
        if eval_env is not None and harness.due(global_step, args.eval_every, prev_step):
            with timed("eval"):
                run.log(global_step, {"eval/episodic_return": evaluate(
                    eval_env, lambda o: policy_action(act_eval, o), args.eval_episodes)})
            last_eval_step = global_step
        if checkpoint_now:
            run.save(global_step, {**training_state(), "obs_norm": obs_norm.state_dict(),
                                   "reward_scaler": reward_scaler.state_dict(), "n_updates": n_updates,
                                   "replay_pos": rb.pos, "last_eval_step": last_eval_step, "probe_batch": probe_batch,
                                   "rng": harness.rng_state(rng, probe_rng)}, replay=rb.store, filled=rb.filled)
        run.progress(global_step, physics=round(env.time_physics, 1), **{k: round(v, 1) for k, v in timers.items()})

    if eval_env is not None and last_eval_step != global_step:  # end-of-run evaluation
        with timed("eval"):
            ret = evaluate(eval_env, lambda o: policy_action(act_eval, o), args.eval_episodes)
        run.log(global_step, {"eval/episodic_return": ret})
        print(f"final eval/episodic_return={ret:.1f} ({args.eval_episodes} episodes)")
    if args.save_model:
        path = os.path.join(run.dir, f"{args.exp_name}.cleanrl_model")
        torch.save({"actor": actor.state_dict(), "critic": critic.state_dict(), "log_alpha": log_alpha.detach(),
                    "obs_norm": obs_norm.state_dict()}, path)
        print(f"model saved to {path}")
    phases = {"physics": env.time_physics, **timers, "eval_physics": getattr(eval_env, "time_physics", 0.0)}
    print("seconds: " + " ".join(f"{k}={v:.1f}" for k, v in phases.items()))
    run.finish(global_step, seconds=phases)
