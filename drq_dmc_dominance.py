"""DrQ on pixel DeepMind Control with the neuron-dominance paper's tasks, metrics and mitigations.

Reproduces "Understanding the Effects of Neuron Dominance in Deep RL" (Wu et al.; papers/neuron_dominance_drq.md):
DrQ (Kostrikov, Yarats & Fergus 2021) with jaxrl's settings, the paper's sparse-reward task variants, its
critic-dominance probes (largest ReDo score, next-layer saturation, srank, gradients reaching each layer) and the
mitigations it compares. `--hr` (Hadamard representation on the critic's hidden layers) is our extension.

Environment: dm_control suite tasks rendered from pixels (MUJOCO_GL=egl unless set), 84x84 RGB, camera 0
(quadruped: 2), PlaNet action repeat (cartpole 8; reacher, cheetah, ball_in_cup 4; others 2), frame stack 3. Only
the last physics step of each action repeat is rendered. Step unit: environment frames (physics control steps), as
jaxrl and the DMC literature count them; --total-timesteps, --learning-starts, --eval-every, --metrics-every and the
mitigation intervals all use it. One gradient update per agent step (action-repeated step).

Sparse tasks (paper App. B.1): native `cartpole-swingup_sparse` and `cartpole-balance_sparse`; modified, with ids of
their own:
  cartpole-balance_sparse_narrow  task._CART_RANGE=(-1e-4, 1e-4), task._ANGLE_COSINE_RANGE=(0.9999, 1)
  finger-spin_fast                dm_control.suite.finger._SPIN_VELOCITY = 30 (a MODULE-GLOBAL constant read at reward
                                  time: every finger-spin env in the process sees it; making a plain finger env
                                  restores dm_control's 15. Use one finger variant per process.) The paper also
                                  lists _INITIAL_SPIN_VELOCITY/_STOP_VELOCITY, which dm_control 1.0.50 never reads.
  reacher-easy_masked             the critic's reward is masked to 0 for the first half of training (episode returns
                                  in charts/ stay the true ones)

Mitigations (--mitigation; paper Sec. 4 / App. B):
  none     DrQ
  ln       LayerNorm before the ReLU of every critic hidden layer (fc1, fc2 of both Q networks)
  lnwd     ln + AdamW (decoupled weight decay --weight-decay 1e-4) on the critic
  hlgauss  HL-Gauss (Farebrother et al. 2024): 101 bins on [0, 100], sigma 0.75, cross-entropy; Q = softmax expectation
           over bin centres; TD targets clipped to the support
  reset    every --reset-every frames re-initialise the critic's non-conv layers (latent projection + both Q MLPs),
           their optimiser state and their target copies; the conv encoder is kept (Nikishin et al. 2022)
  redo     every --redo-every frames recycle tau-dormant neurons (score <= --redo-tau) of the critic's conv layers and Q
           hidden layers with common.redo_recycle_ (Sokar et al. 2023)
  prune    gradual magnitude pruning (Zhu & Gupta 2017; Obando-Ceron et al. 2024) of the critic's conv and dense
           weights (not biases/LayerNorm/output heads), per layer, cubic schedule s_t = s_f (1 - (1 - p)^3), s_f 0.95,
           from 20% to 80% of training, masks updated every --prune-every frames and re-applied after every critic
           optimiser step

Probes (every --metrics-every frames, fixed batch of --metrics-batch un-augmented replay samples, critic Q1):
representation/{latent,fc1,fc2}/{max_score,dormant_score,dormant_kde,srank,saturated,zombie,dominant} and
representation/dominant (1 when any probed layer has a neuron with ReDo score > N/2, paper Def. 1), plus grad/{latent,
fc1,fc2}: mean |dL/dW| of that layer's weights in the critic update at the probe step (paper App. C.2). Here `latent`
is the 50-d LayerNorm+tanh encoder output that feeds the Q MLPs; fc2 is the penultimate layer (the one the paper sees
saturate) and fc1 the layer where dominant neurons appear.

Cost: rendering is ~25-40 frames/s per CPU core and physics is negligible, but one batch-512 update (critic fwd+bwd,
three no-grad encoder passes, augmentation) is ~10 CPU-seconds on this project's CPU box, so the 500k-frame recipe
needs a GPU; the progress line and the final summary split wall time into physics/render/replay/update/eval.

Checkpoints (--checkpoint-every N frames, default 50k): runs/NAME/checkpoint.pt, one file replaced atomically, holds
everything the run needs to continue: actor, critic, target critic, log-alpha and the three optimisers, the pruning
masks, the replay's filled part (frames stored once, as in memory: ~21 KB per agent step at 84x84, so up to ~2.1 GB at
the default --buffer-size), the evaluation schedule, the probe batch and the RNG states. `--resume --run-name NAME`
continues from it with the same flags (the environments start fresh episodes); the TensorBoard log continues with no
gap and no duplicate. Cost: 50k frames are ~4-14 minutes of a GPU run (one env rendering ~30 steps/s, action repeat
8-2); a write took 1.1 s for 0.6 GB (25k stored frames) and 3-13 s for 2.2 GB (full buffer) on the CPU box's disk.
A finished run deletes its checkpoint.pt (keep the model with --save-model). A non-finite loss, parameter or action
stops the run (exit 1) after writing the last good networks and optimisers to runs/NAME/checkpoint_last_good.pt
(losses and parameters are checked where the host syncs anyway: every --log-every frames, before probes and
checkpoints).

GPU fast paths (README "GPU fast paths"; auto = on with CUDA): `--compile` (torch.compile of the critic loss with its
augmentation and target, of the actor loss and of the acting step), `--cudagraphs` (the whole update -- critic, target
lerp, actor and temperature steps with capturable Adam -- and the acting step replayed as CUDA graphs) and pinned
uploads (each batch in two non-blocking copies: the obs/next_obs stacks, then actions/rewards/terminated). Per agent
step the only host sync is the action MuJoCo needs; losses and gradient magnitudes are read only where the loop logs,
probes or checkpoints.

Usage:
  python drq_dmc_dominance.py --env-id cartpole-swingup_sparse --mitigation lnwd
  python drq_dmc_dominance.py --env-id reacher-easy_masked --mitigation hlgauss --seed 2
  python drq_dmc_dominance.py --env-id finger-spin_fast --mitigation none --hr
  python drq_dmc_dominance.py --env-id finger-spin_fast --run-name fs1 --resume   # continue a killed run
"""
import os

os.environ.setdefault("MUJOCO_GL", "egl")  # must precede the dm_control import: headless rendering

import collections
import copy
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from dm_control import suite
from dm_control.suite import finger as dmc_finger
from torch.utils.tensorboard import SummaryWriter

import common

MITIGATIONS = ("none", "ln", "lnwd", "hlgauss", "reset", "redo", "prune")
# modified sparse tasks: id -> (dm_control domain, task)
MODIFIED_TASKS = {
    "cartpole-balance_sparse_narrow": ("cartpole", "balance_sparse"),
    "finger-spin_fast": ("finger", "spin"),
    "reacher-easy_masked": ("reacher", "easy"),
}
PLANET_ACTION_REPEAT = {"cartpole": 8, "reacher": 4, "cheetah": 4, "ball_in_cup": 4, "finger": 2, "walker": 2}
CHECKPOINT_FORMAT = 1
# flags that may change on --resume: they do not change the training itself
RESUME_MAY_DIFFER = ("resume", "checkpoint_every", "cuda", "compile", "cudagraphs", "track", "wandb_project_name",
                     "wandb_entity", "capture_video", "save_model", "eval_episodes", "run_name")
DEFAULT_SPIN_VELOCITY = dmc_finger._SPIN_VELOCITY  # dm_control's value (15), restored for plain finger envs
FAST_SPIN_VELOCITY = 30.0


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
    compile: Literal["auto", "on", "off"] = "auto"
    """torch.compile the critic loss (augmentation and TD target included), the actor loss and the acting step
    (auto: on with CUDA; off on CPU, where compiling takes about a minute and gains little)"""
    cudagraphs: Literal["auto", "on", "off"] = "auto"
    """replay the acting step and the whole update (critic, target lerp, actor and temperature steps, pruning masks)
    as CUDA graphs, which removes the per-kernel launch cost of these small networks (auto: on with CUDA; needs CUDA)"""
    track: bool = False
    """track with Weights and Biases (wandb is not installed in this project: gives an error)"""
    wandb_project_name: str = "cleanRL"
    """the wandb's project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of wandb's project"""
    capture_video: bool = False
    """video capture is not supported by this script (gives an error)"""
    save_model: bool = False
    """save actor, critic and temperature to runs/{run_name}/ at the end"""
    run_name: Optional[str] = None
    """run directory runs/NAME (default {env_id}__{exp_name}__{seed}__{unix_time})"""
    checkpoint_every: int = 50_000
    """frames between checkpoints to runs/NAME/checkpoint.pt (0 = off); the file holds the replay, so it grows to
    ~2.1 GB at the default --buffer-size and takes seconds to write (minutes of rendering pass between two)"""
    resume: bool = False
    """continue runs/NAME (needs --run-name) from runs/NAME/checkpoint.pt; the other flags must match its args.json"""

    # environment
    env_id: str = "cartpole-swingup"
    """dm_control domain-task, or cartpole-balance_sparse_narrow, finger-spin_fast, reacher-easy_masked"""
    total_timesteps: int = 500_000
    """total environment frames (action-repeated physics steps)"""
    action_repeat: Optional[int] = None
    """action repeat (default: PlaNet table: cartpole 8, reacher/cheetah/ball_in_cup 4, others 2)"""
    frame_stack: int = 3
    """number of stacked RGB frames"""
    image_size: int = 84
    """rendered frame height and width"""
    camera_id: Optional[int] = None
    """camera to render (default 0; quadruped 2)"""

    # DrQ / SAC (jaxrl defaults)
    buffer_size: int = 100_000
    """replay capacity in agent steps (one uint8 frame stored per step)"""
    batch_size: int = 512
    """batch size of each update"""
    learning_starts: int = 1000
    """frames of uniformly random actions before learning starts"""
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.005
    """target critic smoothing coefficient (every update)"""
    policy_lr: float = 3e-4
    """actor learning rate (Adam)"""
    q_lr: float = 3e-4
    """critic learning rate (Adam; AdamW with --mitigation lnwd)"""
    alpha_lr: float = 3e-4
    """temperature learning rate (Adam)"""
    init_temperature: float = 0.1
    """initial SAC temperature"""
    target_entropy: Optional[float] = None
    """SAC target entropy (default -|A|/2, as jaxrl)"""
    image_pad: int = 4
    """random-shift augmentation: replicate-pad by this many pixels, then random crop back"""
    hidden_dim: int = 256
    """width of the actor and critic MLP hidden layers"""
    latent_dim: int = 50
    """width of the LayerNorm+tanh projection of the conv features"""

    # evaluation and logging
    eval_every: int = 10_000
    """frames between evaluations of the deterministic policy (0 = off; also evaluates at the end)"""
    eval_episodes: int = 10
    """episodes per evaluation"""
    log_every: int = 1000
    """frames between loss/statistics scalars and stdout progress lines"""
    metrics_every: int = 10_000
    """frames between critic representation probes (0 = off)"""
    metrics_batch: int = 256
    """un-augmented replay samples in the (fixed) probe batch"""
    kde_threshold: float = 20.0
    """KDE-peak density above which a neuron counts as dormant (dormant_kde)"""
    kde_noise_std: float = 1e-3
    """std of the Gaussian noise added before the KDE dormancy test"""

    # mitigations
    mitigation: str = "none"
    """one of none, ln, lnwd, hlgauss, reset, redo, prune"""
    hr: bool = False
    """Hadamard representation on the critic's hidden layers: act(W1 x + b1) * act(W2 x + b2) (our extension)"""
    hr_branches: int = 2
    """number of multiplied branches with --hr"""
    weight_decay: float = 1e-4
    """AdamW decoupled weight decay on the critic (lnwd)"""
    hl_bins: int = 101
    """HL-Gauss number of bins"""
    hl_min: float = 0.0
    """HL-Gauss support minimum"""
    hl_max: float = 100.0
    """HL-Gauss support maximum"""
    hl_sigma: float = 0.75
    """HL-Gauss Gaussian smoothing std (value units)"""
    reset_every: int = 100_000
    """frames between critic resets (reset)"""
    redo_every: int = 1000
    """frames between ReDo recycling (redo)"""
    redo_tau: float = 0.1
    """ReDo dormancy threshold on the activation score (redo, and the dormant_score metric)"""
    prune_target: float = 0.95
    """final sparsity of gradual magnitude pruning (prune)"""
    prune_start: float = 0.2
    """fraction of training at which pruning starts (prune)"""
    prune_end: float = 0.8
    """fraction of training at which the final sparsity is reached (prune)"""
    prune_every: int = 1000
    """frames between pruning-mask updates (prune)"""


def parse_env_id(env_id: str):
    """'domain-task' -> (domain, task) of the dm_control suite; modified sparse tasks map to their base task."""
    if env_id in MODIFIED_TASKS:
        return MODIFIED_TASKS[env_id]
    domain, _, task = env_id.partition("-")
    if (domain, task) not in suite.ALL_TASKS:
        return None
    return domain, task


def validate(args: Args) -> None:
    """Reject bad input with one line on stderr before any environment or buffer exists."""
    def fail(msg):
        sys.exit(f"error: {msg}")

    if parse_env_id(args.env_id) is None:
        fail(f"--env-id {args.env_id!r} is not a dm_control task (expected domain-task, e.g. cartpole-swingup, or one "
             f"of {', '.join(MODIFIED_TASKS)})")
    if args.mitigation not in MITIGATIONS:
        fail(f"--mitigation must be one of {', '.join(MITIGATIONS)}, got {args.mitigation!r}")
    if args.track:
        try:
            import wandb  # noqa: F401
        except ImportError:
            fail("--track needs wandb, which is not installed (pip install wandb)")
    if args.capture_video:
        fail("--capture-video is not supported by drq_dmc_dominance.py")
    if args.cudagraphs == "on" and not (args.cuda and torch.cuda.is_available()):
        fail("--cudagraphs on needs a CUDA GPU (none is available, or --no-cuda); use --cudagraphs auto or off")
    positive = ["total_timesteps", "frame_stack", "image_size", "buffer_size", "batch_size", "hidden_dim", "latent_dim",
                "log_every", "metrics_batch", "eval_episodes", "hr_branches", "hl_bins"]
    for name in positive:
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ["learning_starts", "eval_every", "metrics_every", "image_pad", "checkpoint_every"]:
        if getattr(args, name) < 0:
            fail(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.action_repeat is not None and args.action_repeat < 1:
        fail(f"--action-repeat must be >= 1, got {args.action_repeat}")
    for name in ["policy_lr", "q_lr", "alpha_lr", "init_temperature"]:
        if not (math.isfinite(getattr(args, name)) and getattr(args, name) > 0):
            fail(f"--{name.replace('_', '-')} must be a positive finite number, got {getattr(args, name)}")
    if args.hr and args.hr_branches < 2:
        fail(f"--hr-branches must be >= 2 with --hr, got {args.hr_branches}")
    if args.batch_size > args.buffer_size:
        fail(f"--batch-size ({args.batch_size}) must not exceed --buffer-size ({args.buffer_size})")
    if args.metrics_every and args.metrics_batch > args.buffer_size:
        fail(f"--metrics-batch ({args.metrics_batch}) must not exceed --buffer-size ({args.buffer_size})")
    if not 0.0 <= args.gamma <= 1.0 or not 0.0 < args.tau <= 1.0:
        fail(f"--gamma must be in [0, 1] and --tau in (0, 1], got {args.gamma}, {args.tau}")
    if args.mitigation == "hlgauss" and (args.hl_bins < 2 or args.hl_max <= args.hl_min or args.hl_sigma <= 0):
        fail(f"--hl-bins >= 2, --hl-max > --hl-min and --hl-sigma > 0 needed, got {args.hl_bins}, "
             f"[{args.hl_min}, {args.hl_max}], {args.hl_sigma}")
    if args.mitigation == "reset" and args.reset_every < 1:
        fail(f"--reset-every must be >= 1, got {args.reset_every}")
    if args.mitigation == "redo" and (args.redo_every < 1 or args.redo_tau < 0):
        fail(f"--redo-every must be >= 1 and --redo-tau >= 0, got {args.redo_every}, {args.redo_tau}")
    if args.mitigation == "prune":
        if not (0.0 <= args.prune_target < 1.0 and 0.0 <= args.prune_start < args.prune_end <= 1.0):
            fail(f"--prune-target must be in [0, 1) and 0 <= --prune-start < --prune-end <= 1, got "
                 f"{args.prune_target}, {args.prune_start}, {args.prune_end}")
        if args.prune_every < 1:
            fail(f"--prune-every must be >= 1, got {args.prune_every}")
    frame_bytes = 3 * args.image_size ** 2
    need = args.buffer_size * (frame_bytes + 64)
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    except (OSError, StopIteration):
        avail = None
    if avail is not None and need > avail:
        fail(f"--buffer-size {args.buffer_size} needs {need / 2**30:.1f} GiB of replay but only "
             f"{avail / 2**30:.1f} GiB is free")


# ---------------------------------------------------------------------------------------------------------------
# Environment


class DMCPixels:
    """A dm_control task seen through pixels: reset() -> (obs, frame), step(a) -> (obs, frame, reward, terminated,
    truncated, frames). obs is the (frame_stack*3, H, W) uint8 stack, oldest frame first; at reset the stack is filled
    with the first frame. Reward is summed over the action repeat; only its last physics step is rendered."""

    def __init__(self, env_id, seed, image_size=84, frame_stack=3, action_repeat=None, camera_id=None):
        domain, task = parse_env_id(env_id)
        if domain == "finger":  # module-global constant read by Spin.get_reward
            dmc_finger._SPIN_VELOCITY = FAST_SPIN_VELOCITY if env_id == "finger-spin_fast" else DEFAULT_SPIN_VELOCITY
        self.env = suite.load(domain, task, task_kwargs={"random": seed})
        if env_id == "cartpole-balance_sparse_narrow":  # instance attributes shadow the class constants
            self.env.task._CART_RANGE = (-1e-4, 1e-4)
            self.env.task._ANGLE_COSINE_RANGE = (0.9999, 1.0)
        self.action_repeat = action_repeat or PLANET_ACTION_REPEAT.get(domain, 2)
        self.camera_id = camera_id if camera_id is not None else (2 if domain == "quadruped" else 0)
        self.image_size = image_size
        spec = self.env.action_spec()
        self.action_low, self.action_high = spec.minimum.astype(np.float32), spec.maximum.astype(np.float32)
        self.action_dim = spec.shape[0]
        self.frames = collections.deque(maxlen=frame_stack)
        self.obs_shape = (3 * frame_stack, image_size, image_size)
        self.time_physics = self.time_render = 0.0  # seconds, for the speed report

    def render(self):
        t = time.perf_counter()
        frame = self.env.physics.render(self.image_size, self.image_size, camera_id=self.camera_id)
        self.time_render += time.perf_counter() - t
        return np.ascontiguousarray(frame.transpose(2, 0, 1))

    def reset(self):
        t = time.perf_counter()
        self.env.reset()
        self.time_physics += time.perf_counter() - t
        frame = self.render()
        for _ in range(self.frames.maxlen):
            self.frames.append(frame)
        return np.concatenate(self.frames), frame

    def step(self, action):
        """action in [-1, 1]^A (tanh policy), rescaled to the task's bounds."""
        action = self.action_low + (np.asarray(action, np.float32) + 1.0) * 0.5 * (self.action_high - self.action_low)
        reward, frames = 0.0, 0
        t = time.perf_counter()
        for _ in range(self.action_repeat):
            ts = self.env.step(action)
            reward += ts.reward or 0.0
            frames += 1
            if ts.last():
                break
        self.time_physics += time.perf_counter() - t
        frame = self.render()
        self.frames.append(frame)
        terminated = bool(ts.last() and ts.discount == 0.0)
        truncated = bool(ts.last() and not terminated)
        return np.concatenate(self.frames), frame, reward, terminated, truncated, frames


def make_env(args: Args, seed: int) -> DMCPixels:
    return DMCPixels(args.env_id, seed, args.image_size, args.frame_stack, args.action_repeat, args.camera_id)


def critic_reward_scale(env_id: str, global_step: int, total_timesteps: int) -> float:
    """reacher-easy_masked hides the reward from the critic for the first half of training (paper App. B.1)."""
    if env_id == "reacher-easy_masked" and global_step < total_timesteps // 2:
        return 0.0
    return 1.0


# ---------------------------------------------------------------------------------------------------------------
# Replay: one uint8 frame per time step, stacks rebuilt at sampling


class FrameReplay:
    """Ring of single frames. Slot k holds frame f_k and the (action, reward, terminated) that led to it from f_{k-1};
    an episode's reset frame is a slot of its own marked `first`. A transition is any non-first slot p: obs = stack
    ending at p-1, next_obs = stack ending at p, where frames before the episode start are replaced by the episode's
    first frame (as the env's reset fills its stack). Positions are absolute counters; slot = position % capacity."""

    def __init__(self, capacity, frame_shape, action_dim, frame_stack):
        self.capacity, self.stack = capacity, frame_stack
        self.frames = np.zeros((capacity, *frame_shape), np.uint8)
        self.actions = np.zeros((capacity, action_dim), np.float32)
        self.rewards = np.zeros(capacity, np.float32)
        self.terminated = np.zeros(capacity, np.bool_)
        self.first = np.zeros(capacity, np.bool_)
        self.start = np.zeros(capacity, np.int64)  # absolute position of the slot's episode start
        self.pos = 0
        self.episode_start = 0

    def add_first(self, frame):
        self.episode_start = self.pos
        self._write(frame, 0.0, 0.0, False, True)

    def add(self, frame, action, reward, terminated):
        self._write(frame, action, reward, terminated, False)

    def _write(self, frame, action, reward, terminated, first):
        i = self.pos % self.capacity
        self.frames[i] = frame
        self.actions[i] = action
        self.rewards[i] = reward
        self.terminated[i] = terminated
        self.first[i] = first
        self.start[i] = self.episode_start
        self.pos += 1

    ARRAYS = ("frames", "actions", "rewards", "terminated", "first", "start")

    def state_dict(self):
        """The filled part only, as tensors sharing the arrays' memory (torch.save writes them without a copy)."""
        n = min(self.pos, self.capacity)
        return {"pos": self.pos, "episode_start": self.episode_start,
                **{k: torch.from_numpy(getattr(self, k)[:n]) for k in self.ARRAYS}}

    def load_state_dict(self, state):
        n = min(state["pos"], self.capacity)
        for k in self.ARRAYS:
            getattr(self, k)[:n] = state[k].numpy()
        self.pos, self.episode_start = state["pos"], state["episode_start"]

    def num_transitions(self):
        lo = max(0, self.pos - self.capacity)
        return int((~self.first[np.arange(lo + 1, self.pos) % self.capacity]).sum()) if self.pos > lo + 1 else 0

    def sample_positions(self, batch_size, rng: np.random.Generator) -> np.ndarray:
        """Absolute positions of `batch_size` transitions drawn uniformly over the valid ones (rejection sampling of
        episode-start slots and of stacks reaching overwritten frames); all of sample's RNG draws happen here."""
        oldest = max(0, self.pos - self.capacity)
        if self.pos - oldest < 2:
            raise ValueError("replay holds no transition yet")
        p = np.empty(batch_size, np.int64)
        todo = np.arange(batch_size)
        for _ in range(1000):
            cand = rng.integers(oldest + 1, self.pos, size=todo.size)
            slot = cand % self.capacity
            ok = ~self.first[slot] & (np.maximum(cand - self.stack, self.start[slot]) >= oldest)
            p[todo[ok]] = cand[ok]
            todo = todo[~ok]
            if todo.size == 0:
                break
        else:
            raise ValueError("replay holds no valid transition")
        return p

    def stack_slots(self, p: np.ndarray) -> np.ndarray:
        """(B, stack + 1) slots of the frames p-stack .. p (oldest first), frames before an episode's start replaced
        by its first frame: columns :-1 make obs, columns 1: make next_obs."""
        offsets = np.arange(self.stack, -1, -1)
        return np.maximum(p[:, None] - offsets[None, :], self.start[p % self.capacity][:, None]) % self.capacity

    def sample(self, batch_size, rng: np.random.Generator):
        """Uniform over valid transitions: (obs, actions, rewards, terminated, next_obs), numpy; obs uint8."""
        p = self.sample_positions(batch_size, rng)
        slot = p % self.capacity
        f = self.frames[self.stack_slots(p)]  # (B, stack+1, C, H, W)
        b, _, c, h, w = f.shape
        obs = f[:, :-1].reshape(b, self.stack * c, h, w)
        next_obs = f[:, 1:].reshape(b, self.stack * c, h, w)
        return obs, self.actions[slot], self.rewards[slot], self.terminated[slot], next_obs


class BatchSampler:
    """FrameReplay.sample(batch_size, rng) into persistent tensors, with batched transfers: the obs and next_obs
    stacks are gathered straight into one uint8 host buffer (2B, stack*C, H, W) (np.take with out=, no intermediate
    copy) and actions, rewards, terminated into one float32 buffer (A + 2, B); on CUDA both are pinned and go up in
    one non-blocking copy each. sample() returns (obs, actions, rewards, terminated, next_obs) as views of the same
    device memory at every call (CUDA-graph inputs: use them before the next sample()); terminated is 0./1. float.
    Same RNG draws and same values as FrameReplay.sample."""

    def __init__(self, rb: FrameReplay, batch_size: int, device: torch.device):
        self.rb, self.batch_size = rb, batch_size
        c, h, w = rb.frames.shape[1:]
        self.a = a = rb.actions.shape[1]
        self.frames = common.Staging((2 * batch_size, rb.stack * c, h, w), torch.uint8, device)
        self.frames_np = self.frames.np.reshape(2, batch_size, rb.stack, c, h, w)  # a view: [0] obs, [1] next_obs
        # rows: actions (transposed), reward, terminated. Every view is dense, so the clones cuda_graphed captures on
        # keep its strides (a column of a (B, A + 2) buffer would come back contiguous and make dynamo recompile)
        self.scalars = common.Staging((a + 2, batch_size), torch.float32, device)
        f, x = self.frames.device, self.scalars.device
        self.batch = (f[:batch_size], x[:a].t(), x[a], x[a + 1], f[batch_size:])

    def sample(self, rng: np.random.Generator):
        rb, a = self.rb, self.a
        p = rb.sample_positions(self.batch_size, rng)
        q = rb.stack_slots(p)
        self.frames.wait()
        np.take(rb.frames, np.stack([q[:, :-1], q[:, 1:]]), axis=0, out=self.frames_np, mode="clip")  # valid slots
        slot = p % rb.capacity
        scalars = self.scalars.wait()
        scalars[:a] = rb.actions[slot].T
        scalars[a] = rb.rewards[slot]
        scalars[a + 1] = rb.terminated[slot]
        self.frames.upload()
        self.scalars.upload()
        return self.batch


def random_shift(x: torch.Tensor, pad: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """DrQ augmentation: replicate-pad by `pad`, then crop back at an independent random offset per sample. Done as
    one gather with clamped indices (the same values as padding then cropping, no padded copy), so it works on the
    uint8 stacks too."""
    if pad == 0:
        return x
    n, c, h, w = x.shape
    oy = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=generator)
    rows = (oy[:, None] + torch.arange(-pad, h - pad, device=x.device)).clamp(0, h - 1)[:, None, :, None]  # (n,1,h,1)
    cols = (ox[:, None] + torch.arange(-pad, w - pad, device=x.device)).clamp(0, w - 1)[:, None, None, :]  # (n,1,1,w)
    idx_n = torch.arange(n, device=x.device)[:, None, None, None]
    idx_c = torch.arange(c, device=x.device)[None, :, None, None]
    return x[idx_n, idx_c, rows, cols]


# ---------------------------------------------------------------------------------------------------------------
# Networks (jaxrl DrQ: orthogonal sqrt(2) init for convs and MLP layers)


def ortho_(layer: nn.Module, gain: float = math.sqrt(2)) -> nn.Module:
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.zeros_(layer.bias)
    return layer


class Encoder(nn.Module):
    """4 convs 32@3x3, strides 2,1,1,1, VALID, ReLU (jaxrl DrQ). uint8 input scaled to [0, 1]."""

    def __init__(self, in_channels, image_size):
        super().__init__()
        strides = (2, 1, 1, 1)
        self.convs = nn.ModuleList()
        size = image_size
        for i, s in enumerate(strides):
            self.convs.append(ortho_(nn.Conv2d(in_channels if i == 0 else 32, 32, 3, stride=s)))
            size = (size - 3) // s + 1
        self.out_hw = size * size
        self.out_dim = 32 * self.out_hw

    def forward(self, obs, probe=False):
        x = obs.float() / 255.0
        acts = {}
        for i, conv in enumerate(self.convs):
            x = F.relu(conv(x))
            acts[f"conv{i + 1}"] = x
        x = x.flatten(1)
        return (x, acts) if probe else x


class HiddenLayer(nn.Module):
    """K = branches copies of Linear -> optional LayerNorm -> ReLU, multiplied (HR when K >= 2; K = 1 plain)."""

    def __init__(self, in_dim, out_dim, layernorm=False, branches=1):
        super().__init__()
        self.linears = nn.ModuleList([ortho_(nn.Linear(in_dim, out_dim)) for _ in range(branches)])
        self.norms = nn.ModuleList([nn.LayerNorm(out_dim) for _ in range(branches)]) if layernorm else None

    def forward(self, x, probe=False):
        pres = [lin(x) for lin in self.linears]
        if self.norms is not None:
            pres = [norm(p) for norm, p in zip(self.norms, pres)]
        y = F.relu(pres[0])
        for p in pres[1:]:
            y = y * F.relu(p)
        return (y, torch.cat(pres, dim=1)) if probe else y

    def incoming(self):
        """(weight, bias) pairs whose dim 0 indexes this layer's neurons (for ReDo)."""
        pairs = [(lin.weight, lin.bias) for lin in self.linears]
        return pairs + ([(n.weight, n.bias) for n in self.norms] if self.norms is not None else [])


class QNet(nn.Module):
    def __init__(self, in_dim, hidden_dim, out_dim, layernorm, branches):
        super().__init__()
        self.fc1 = HiddenLayer(in_dim, hidden_dim, layernorm, branches)
        self.fc2 = HiddenLayer(hidden_dim, hidden_dim, layernorm, branches)
        self.head = ortho_(nn.Linear(hidden_dim, out_dim))

    def forward(self, x, probe=False):
        if not probe:
            return self.head(self.fc2(self.fc1(x)))
        h1, p1 = self.fc1(x, probe=True)
        h2, p2 = self.fc2(h1, probe=True)
        return self.head(h2), {"fc1": (h1, p1), "fc2": (h2, p2)}


class Critic(nn.Module):
    """Conv encoder -> Dense(latent) -> LayerNorm -> tanh (`latent`) -> double Q on [latent, action].
    Each Q outputs 1 value, or hl_bins logits with HL-Gauss."""

    def __init__(self, obs_shape, action_dim, args: Args):
        super().__init__()
        self.encoder = Encoder(obs_shape[0], obs_shape[1])
        self.proj = nn.Linear(self.encoder.out_dim, args.latent_dim)
        self.proj_norm = nn.LayerNorm(args.latent_dim)
        layernorm = args.mitigation in ("ln", "lnwd")
        branches = args.hr_branches if args.hr else 1
        out_dim = args.hl_bins if args.mitigation == "hlgauss" else 1
        self.q1 = QNet(args.latent_dim + action_dim, args.hidden_dim, out_dim, layernorm, branches)
        self.q2 = QNet(args.latent_dim + action_dim, args.hidden_dim, out_dim, layernorm, branches)

    def head_modules(self):
        """Everything but the conv encoder: what --mitigation reset re-initialises."""
        return [self.proj, self.proj_norm, self.q1, self.q2]

    def forward(self, feats, action):
        z = torch.tanh(self.proj_norm(self.proj(feats)))
        za = torch.cat([z, action], dim=1)
        return self.q1(za), self.q2(za)

    def probe(self, feats, action):
        """{layer: (post-activation, pre-activation)} of Q1's path: latent, fc1, fc2."""
        pre = self.proj_norm(self.proj(feats))
        z = torch.tanh(pre)
        _, acts = self.q1(torch.cat([z, action], dim=1), probe=True)
        return {"latent": (z, pre), **acts}


class Actor(nn.Module):
    """Tanh-Gaussian policy on the critic's conv features (gradients stopped by the caller), with its own
    Dense(latent) -> LayerNorm -> tanh projection and a 256x256 ReLU MLP (jaxrl DrQPolicy / NormalTanhPolicy)."""

    LOG_STD_MIN, LOG_STD_MAX = -10.0, 2.0

    def __init__(self, feat_dim, action_dim, args: Args):
        super().__init__()
        self.proj = nn.Linear(feat_dim, args.latent_dim)
        self.proj_norm = nn.LayerNorm(args.latent_dim)
        self.trunk = nn.Sequential(ortho_(nn.Linear(args.latent_dim, args.hidden_dim)), nn.ReLU(),
                                   ortho_(nn.Linear(args.hidden_dim, args.hidden_dim)), nn.ReLU())
        self.mean = ortho_(nn.Linear(args.hidden_dim, action_dim), 1.0)
        self.log_std = ortho_(nn.Linear(args.hidden_dim, action_dim), 1.0)

    def forward(self, feats):
        h = self.trunk(torch.tanh(self.proj_norm(self.proj(feats))))
        return self.mean(h), self.log_std(h).clamp(self.LOG_STD_MIN, self.LOG_STD_MAX)

    def sample(self, feats):
        mean, log_std = self(feats)
        u = mean + log_std.exp() * torch.randn_like(mean)
        log_prob = (-0.5 * ((u - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(1)
        # log det of tanh: log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)), numerically stable
        log_prob = log_prob - (2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))).sum(1)
        return torch.tanh(u), log_prob

    def act_deterministic(self, feats):
        return torch.tanh(self(feats)[0])


# ---------------------------------------------------------------------------------------------------------------
# Mitigation helpers


class HLGauss:
    """HL-Gauss (Imani & White 2018; Farebrother et al. 2024): a scalar y becomes the histogram of N(y, sigma^2)
    over `bins` equal bins of [vmin, vmax] (mass outside renormalised away; y clipped to the support); the value of
    logits is the softmax expectation over bin centres; the loss is the cross-entropy to the target histogram."""

    def __init__(self, vmin, vmax, bins, sigma, device="cpu"):
        self.vmin, self.vmax, self.sigma = vmin, vmax, sigma
        self.edges = torch.linspace(vmin, vmax, bins + 1, device=device)
        self.centers = (self.edges[:-1] + self.edges[1:]) / 2

    def target_probs(self, y):
        y = y.clamp(self.vmin, self.vmax)
        cdf = torch.special.erf((self.edges[None, :] - y[:, None]) / (math.sqrt(2.0) * self.sigma))
        mass = cdf[:, 1:] - cdf[:, :-1]
        return mass / (cdf[:, -1] - cdf[:, 0]).clamp_min(1e-12)[:, None]

    def value(self, logits):
        return torch.softmax(logits, dim=-1) @ self.centers

    def loss(self, logits, y):
        return -(self.target_probs(y) * F.log_softmax(logits, dim=-1)).sum(-1).mean()


def cubic_sparsity(step, total, target, start_frac, end_frac):
    """Gradual magnitude pruning schedule (Zhu & Gupta 2017): s_t = s_f (1 - (1 - p)^3), p the fraction of the
    [start, end] window elapsed, clipped to [0, 1]."""
    start, end = start_frac * total, end_frac * total
    p = min(max((step - start) / max(end - start, 1e-12), 0.0), 1.0)
    return target * (1.0 - (1.0 - p) ** 3)


class MagnitudePruner:
    """Per-layer magnitude pruning masks over the given weights; `update(sparsity)` zeroes the smallest-|w| fraction
    of every weight (already-pruned weights are zero, so they stay pruned), `apply()` re-applies the masks."""

    def __init__(self, weights):
        self.weights = list(weights)
        self.masks = [torch.ones_like(w, dtype=torch.bool) for w in self.weights]

    @torch.no_grad()
    def update(self, sparsity):
        for w, m in zip(self.weights, self.masks):
            k = int(round(sparsity * w.numel()))
            m.fill_(True)
            if k > 0:
                idx = torch.topk(w.abs().flatten(), k, largest=False).indices
                m.view(-1)[idx] = False
            w.mul_(m)

    @torch.no_grad()
    def apply(self):
        for w, m in zip(self.weights, self.masks):
            w.mul_(m)

    def sparsity(self):
        pruned = sum(int((~m).sum()) for m in self.masks)
        return pruned / max(sum(m.numel() for m in self.masks), 1)


def prunable_weights(critic: Critic):
    """Conv kernels and dense weights of the critic, excluding biases, LayerNorm and the Q output heads."""
    ws = [c.weight for c in critic.encoder.convs] + [critic.proj.weight]
    for q in (critic.q1, critic.q2):
        ws += [lin.weight for layer in (q.fc1, q.fc2) for lin in layer.linears]
    return ws


@torch.no_grad()
def reset_critic_heads_(critic: Critic, target: Critic, fresh: Critic, optimizer: torch.optim.Optimizer):
    """Reset mitigation: copy a freshly initialised critic's non-conv layers into critic and target; restart their
    optimiser state (Adam moments and step). Everything is written in place (load_state_dict copies into the
    parameters; the moments and step counters are zeroed, not dropped), so a CUDA graph of the update, which reads
    them at fixed addresses, stays valid. Adam with zeroed state is Adam with fresh state: the bias correction
    restarts from step 0."""
    for mod, tmod, fmod in zip(critic.head_modules(), target.head_modules(), fresh.head_modules()):
        mod.load_state_dict(fmod.state_dict())
        tmod.load_state_dict(fmod.state_dict())
        for p in mod.parameters():
            for value in optimizer.state.get(p, {}).values():
                if torch.is_tensor(value):  # step, exp_avg, exp_avg_sq (and max_exp_avg_sq with amsgrad)
                    value.zero_()


@torch.no_grad()
def redo_critic_(critic: Critic, actor: Actor, obs, actions, tau, critic_opt, actor_opt) -> int:
    """ReDo (Sokar et al. 2023) on the critic: neurons with activation score <= tau in conv1..conv4 and in fc1/fc2 of
    both Q networks get fresh incoming weights and zero outgoing weights (and zero Adam moments). conv4 feeds both the
    critic's and the actor's latent projection, so both lose those columns. The LayerNorm+tanh latent is left alone
    (its outgoing weights share fc1's input with the action)."""
    feats, conv_acts = critic.encoder(obs, probe=True)
    z = torch.tanh(critic.proj_norm(critic.proj(feats)))
    za = torch.cat([z, actions], dim=1)
    init = lambda w: nn.init.orthogonal_(w, math.sqrt(2))  # noqa: E731  (the layers' own init)
    masks = {name: common.activation_scores(a) <= tau for name, a in conv_acts.items()}
    q_masks = [(q, {k: common.activation_scores(v[0]) <= tau for k, v in q(za, probe=True)[1].items()})
               for q in (critic.q1, critic.q2)]
    recycled = 0
    convs = critic.encoder.convs
    for i, conv in enumerate(convs):
        mask = masks[f"conv{i + 1}"]
        if i + 1 < len(convs):
            recycled += common.redo_recycle_(mask, [(conv.weight, conv.bias)], [convs[i + 1].weight], critic_opt, init)
        else:
            group = critic.encoder.out_hw
            recycled += common.redo_recycle_(mask, [(conv.weight, conv.bias)], [critic.proj.weight], critic_opt, init,
                                             outgoing_group=group)
            common.redo_recycle_(mask, [], [actor.proj.weight], actor_opt, init, outgoing_group=group)
    for q, m in q_masks:
        recycled += common.redo_recycle_(m["fc1"], q.fc1.incoming(), [lin.weight for lin in q.fc2.linears],
                                         critic_opt, init)
        recycled += common.redo_recycle_(m["fc2"], q.fc2.incoming(), [q.head.weight], critic_opt, init)
    return recycled


def mean_abs_grad(params) -> torch.Tensor:
    """Mean |dL/dW| over the given parameters' gradients, as a 0-d tensor (no host sync)."""
    return torch.cat([p.grad.abs().flatten() for p in params]).mean()


def crossed(prev_step, step, every):
    """True when a multiple of `every` lies in (prev_step, step]."""
    return every > 0 and step // every > prev_step // every


# ---------------------------------------------------------------------------------------------------------------
# Hot path: acting and the update, as functions of tensors (README "GPU fast paths"). The loop builds them once; with
# --compile / --cudagraphs they are compiled and/or replayed as CUDA graphs. None of them syncs with the host, and
# everything a graph reads (parameters, optimiser state, pruning masks, log_alpha, the batch tensors) stays in place.

STAT_NAMES = ("losses/qf_loss", "losses/qf1_values", "losses/actor_loss", "losses/alpha_loss", "losses/alpha",
              "losses/entropy")  # the rows of update()'s stats tensor
GRAD_LAYERS = ("latent", "fc1", "fc2")  # the rows of update()'s grads tensor: grad/<layer>


def make_act(critic: Critic, actor: Actor, deterministic: bool = False):
    """act(obs) -> (1, A) action in [-1, 1]: the policy's sample (or its mean with `deterministic`, for evaluation)
    on the critic's conv features of one uint8 stack (1, stack*3, H, W)."""
    @torch.no_grad()
    def act(obs_u8: torch.Tensor) -> torch.Tensor:
        feats = critic.encoder(obs_u8)
        return actor.act_deterministic(feats) if deterministic else actor.sample(feats)[0]

    return act


def make_update(critic: Critic, target_critic: Critic, actor: Actor, log_alpha: torch.Tensor,
                critic_opt: torch.optim.Optimizer, actor_opt: torch.optim.Optimizer, alpha_opt: torch.optim.Optimizer,
                args: Args, target_entropy: float, hl: Optional[HLGauss] = None,
                pruner: Optional[MagnitudePruner] = None, compile_loss: bool = False):
    """update(obs_u8, actions, rewards, terminated, next_u8, reward_scale) -> (stats, grads): one DrQ update --
    random shift of both stacks, soft TD target from the target critic, critic step (MSE or HL-Gauss), pruning masks
    re-applied, target lerp, actor step on the updated critic's features (gradients stopped at the encoder), and
    temperature step. Inputs are tensors (terminated 0./1. float, reward_scale a 0-d tensor); stats holds STAT_NAMES
    and grads the mean |dL/dW| of the critic loss at GRAD_LAYERS (Q1's path), both device tensors read only where
    the loop syncs. The two losses are what torch.compile sees; the whole update is what a CUDA graph captures."""
    gamma, tau, pad = args.gamma, args.tau, args.image_pad
    critic_params, target_params = list(critic.parameters()), list(target_critic.parameters())
    grad_groups = ([critic.proj.weight], [lin.weight for lin in critic.q1.fc1.linears],
                   [lin.weight for lin in critic.q1.fc2.linears])

    def q_value(out):
        return hl.value(out) if hl is not None else out.squeeze(-1)

    def critic_loss_fn(obs_u8, actions, rewards, terminated, next_u8, reward_scale, alpha):
        obs = random_shift(obs_u8, pad)  # uint8 stays uint8: the encoder scales it
        next_obs = random_shift(next_u8, pad)
        rewards = rewards * reward_scale
        not_done = 1.0 - terminated
        with torch.no_grad():
            next_a, next_logp = actor.sample(critic.encoder(next_obs))
            tq1, tq2 = target_critic(target_critic.encoder(next_obs), next_a)
            next_v = torch.min(q_value(tq1), q_value(tq2)) - alpha * next_logp  # soft backup (jaxrl backup_entropy)
            target = rewards + gamma * not_done * next_v
        q1, q2 = critic(critic.encoder(obs), actions)
        if hl is not None:
            loss = hl.loss(q1, target) + hl.loss(q2, target)
        else:
            loss = F.mse_loss(q1.squeeze(-1), target) + F.mse_loss(q2.squeeze(-1), target)
        return loss, q_value(q1).detach().mean(), obs

    def actor_loss_fn(obs, alpha):
        # on the updated critic's conv features, gradients stopped (jaxrl copies the encoder into the actor)
        with torch.no_grad():
            feats = critic.encoder(obs)
        pi, logp = actor.sample(feats)
        pq1, pq2 = critic(feats, pi)
        return (alpha * logp - torch.min(q_value(pq1), q_value(pq2))).mean(), -logp.detach().mean()

    critic_loss_fn = common.compiled(critic_loss_fn, compile_loss)
    actor_loss_fn = common.compiled(actor_loss_fn, compile_loss)

    def update(obs_u8, actions, rewards, terminated, next_u8, reward_scale):
        alpha = log_alpha.detach().exp()
        critic_loss, q1_mean, obs = critic_loss_fn(obs_u8, actions, rewards, terminated, next_u8, reward_scale, alpha)
        critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        grads = torch.stack([mean_abs_grad(ps) for ps in grad_groups])  # cheap: always computed, read when probing
        critic_opt.step()
        if pruner is not None:
            pruner.apply()
        with torch.no_grad():
            torch._foreach_lerp_(target_params, critic_params, tau)
        actor_loss, entropy = actor_loss_fn(obs, alpha)
        actor_opt.zero_grad(set_to_none=True)
        actor_loss.backward()
        actor_opt.step()
        alpha_loss = log_alpha.exp() * (entropy - target_entropy)
        alpha_opt.zero_grad(set_to_none=True)
        alpha_loss.backward()
        alpha_opt.step()
        stats = torch.stack([critic_loss.detach(), q1_mean, actor_loss.detach(), alpha_loss.detach(), alpha, entropy])
        return stats, grads

    return update


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints and resume


def check_resume(args: Args, run_dir: str, run_args: dict) -> None:
    """The --resume rules, checked before any environment or buffer exists: exit 0 when the run already finished,
    exit 1 with one line when there is nothing to resume or the flags differ from the run's args.json."""
    if args.run_name is None:
        sys.exit("error: --resume needs --run-name NAME (the run directory to continue)")
    finished = os.path.join(run_dir, "finished")
    if os.path.exists(finished):
        print(f"run {args.run_name} already finished ({finished} exists); nothing to resume")
        sys.exit(0)
    if not os.path.isfile(os.path.join(run_dir, "checkpoint.pt")):
        sys.exit(f"error: --resume: no checkpoint in {run_dir}")
    try:
        with open(os.path.join(run_dir, "args.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        sys.exit(f"error: --resume: cannot read {run_dir}/args.json ({e})")
    conflicts = common.arg_conflicts(saved, run_args, RESUME_MAY_DIFFER)
    if conflicts:
        diffs = ", ".join(f"--{k.replace('_', '-')} (saved {saved.get(k)}, now {run_args.get(k)})" for k in conflicts)
        sys.exit(f"error: --resume: {run_dir} was made with other flags: {diffs}")


def ensure_writable(run_dir: str) -> None:
    """Create runs/NAME and write a file in it, or exit with one line naming --run-name."""
    try:
        os.makedirs(run_dir, exist_ok=True)
        probe = os.path.join(run_dir, ".write_test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        reason = "a file of that name is in the way" if os.path.isfile(run_dir) else (e.strerror or str(e))
        sys.exit(f"error: --run-name {os.path.basename(run_dir)}: cannot write {run_dir} ({reason})")


def env_seeds(seed: int, start_step: int) -> tuple:
    """(training env, evaluation env) seeds. A resumed run starts fresh episodes from seeds of its own, so it does
    not replay the initial states the run began with."""
    if start_step == 0:
        return seed, seed + 10_000
    train, evaluation = np.random.SeedSequence([seed, start_step]).generate_state(2)
    return int(train), int(evaluation)


def param_checksum(*state_dicts) -> float:
    """Sum in float64 of every float tensor of the state_dicts: printed on resume, so the restored networks can be
    compared with the checkpoint file."""
    return sum(float(t.double().sum()) for sd in state_dicts for t in sd.values() if t.is_floating_point())


def snapshot_(dst, src):
    """Detached copy of the nested dicts/lists of tensors `src` (state_dicts), reusing dst's tensors (copy_, no new
    memory) wherever they still match: the in-memory last good state written when training goes non-finite."""
    if isinstance(src, torch.Tensor):
        if isinstance(dst, torch.Tensor) and (dst.shape, dst.dtype, dst.device) == (src.shape, src.dtype, src.device):
            return dst.copy_(src)
        return src.detach().clone()
    if isinstance(src, dict):
        dst = dst if isinstance(dst, dict) else {}
        return {k: snapshot_(dst.get(k), v) for k, v in src.items()}
    if isinstance(src, (list, tuple)):
        dst = dst if isinstance(dst, (list, tuple)) and len(dst) == len(src) else [None] * len(src)
        return type(src)(snapshot_(d, v) for d, v in zip(dst, src))
    return copy.deepcopy(src)


# ---------------------------------------------------------------------------------------------------------------

if __name__ == "__main__":
    args = tyro.cli(Args)
    validate(args)
    run_name = args.run_name or f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.join("runs", run_name)
    ckpt_path = os.path.join(run_dir, "checkpoint.pt")
    run_args = {**asdict(args), "run_name": run_name}
    if args.resume:
        check_resume(args, run_dir, run_args)
    elif os.path.exists(ckpt_path):
        sys.exit(f"error: --run-name {run_name}: {run_dir} already holds a checkpoint; add --resume to continue it, "
                 f"or choose another --run-name")
    ensure_writable(run_dir)
    if not args.resume:
        with open(os.path.join(run_dir, "args.json"), "w") as f:
            json.dump(run_args, f, indent=2)
    # mmap: the replay's frames are read from the file page by page into the buffer, never held twice in memory
    t_resume = time.perf_counter()
    ckpt = None
    if args.resume:
        try:
            ckpt = torch.load(ckpt_path, map_location="cpu", mmap=True, weights_only=False)
        except Exception as e:  # noqa: BLE001  (truncated, empty, not a torch file: one line, not a traceback)
            sys.exit(f"error: --resume: cannot read {ckpt_path} ({type(e).__name__}: {str(e).splitlines()[0]})")
        if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
            sys.exit(f"error: --resume: {ckpt_path} is not a checkpoint of format {CHECKPOINT_FORMAT}")
    start_step = ckpt["global_step"] if ckpt else 0
    # Events are logged at the frame count reached by the step that produced them, so a checkpoint at step S
    # already holds the events at S (flushed before it was written): drop only the ones logged after it.
    writer = SummaryWriter(run_dir, purge_step=start_step + 1 if ckpt else None)
    if not ckpt:
        writer.add_text("hyperparameters",
                        "|param|value|\n|-|-|\n%s" % "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    rng = np.random.default_rng(args.seed)

    train_seed, eval_seed = env_seeds(args.seed, start_step)
    env = make_env(args, train_seed)
    eval_env = make_env(args, eval_seed) if args.eval_every > 0 else None
    action_dim, obs_shape = env.action_dim, env.obs_shape
    critic = Critic(obs_shape, action_dim, args).to(device)
    target_critic = copy.deepcopy(critic).requires_grad_(False)
    actor = Actor(critic.encoder.out_dim, action_dim, args).to(device)
    log_alpha = torch.tensor(math.log(args.init_temperature), device=device, requires_grad=True)
    target_entropy = args.target_entropy if args.target_entropy is not None else -action_dim / 2.0
    if args.mitigation == "lnwd":
        critic_opt = torch.optim.AdamW(critic.parameters(), lr=args.q_lr, weight_decay=args.weight_decay)
    else:
        critic_opt = torch.optim.Adam(critic.parameters(), lr=args.q_lr)
    actor_opt = torch.optim.Adam(actor.parameters(), lr=args.policy_lr)
    alpha_opt = torch.optim.Adam([log_alpha], lr=args.alpha_lr)
    hl = HLGauss(args.hl_min, args.hl_max, args.hl_bins, args.hl_sigma, device) if args.mitigation == "hlgauss" \
        else None
    pruner = MagnitudePruner(prunable_weights(critic)) if args.mitigation == "prune" else None
    rb = FrameReplay(args.buffer_size, (3, args.image_size, args.image_size), action_dim, args.frame_stack)
    probe_gen = torch.Generator(device=device)  # re-seeded at every probe: the KDE noise is the same each time

    n_critic = sum(p.numel() for p in critic.parameters())
    n_actor = sum(p.numel() for p in actor.parameters())
    arch = (f"{critic}\n{actor}\ncritic parameters: {n_critic:,} (conv encoder shared with the actor, gradients "
            f"stopped); actor parameters (without encoder): {n_actor:,}; action repeat {env.action_repeat}, "
            f"camera {env.camera_id}, device {device}")
    print(arch)
    if not ckpt:
        writer.add_text("architecture", f"```\n{arch}\n```")

    def training_state():
        """Networks and optimisers (state_dicts reference the live tensors)."""
        return {"critic": critic.state_dict(), "target_critic": target_critic.state_dict(),
                "actor": actor.state_dict(), "log_alpha": log_alpha.detach(), "critic_opt": critic_opt.state_dict(),
                "actor_opt": actor_opt.state_dict(), "alpha_opt": alpha_opt.state_dict()}

    global_step, last_return, probe_batch, last_eval_step = 0, float("nan"), None, -1
    checkpoint_step = None  # step of the checkpoint.pt this run can be resumed from
    if ckpt:
        for module, key in ((critic, "critic"), (target_critic, "target_critic"), (actor, "actor")):
            module.load_state_dict(ckpt[key])
        with torch.no_grad():
            log_alpha.copy_(ckpt["log_alpha"])
        for opt, key in ((critic_opt, "critic_opt"), (actor_opt, "actor_opt"), (alpha_opt, "alpha_opt")):
            opt.load_state_dict(ckpt[key])
        if pruner is not None:
            for mask, saved in zip(pruner.masks, ckpt["prune_masks"]):
                mask.copy_(saved)
        rb.load_state_dict(ckpt["replay"])
        if ckpt["probe_batch"] is not None:
            probe_batch = tuple(t.to(device) for t in ckpt["probe_batch"])
        global_step = checkpoint_step = ckpt["global_step"]
        last_eval_step, last_return = ckpt["last_eval_step"], ckpt["last_return"]
        common.set_rng_state(ckpt["rng"], rng)
        del ckpt
        checksum = param_checksum(critic.state_dict(), target_critic.state_dict(), actor.state_dict())
        print(f"resumed {run_dir} from step {global_step} (parameter checksum {checksum!r}); ready in "
              f"{time.perf_counter() - t_resume:.1f}s", flush=True)
    use_compile = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    use_graphs = device.type == "cuda" and args.cudagraphs != "off"
    for opt in (critic_opt, actor_opt, alpha_opt):  # after load_state_dict, which brings the saved run's setting
        common.set_capturable_(opt, use_graphs)
    last_good = {"step": global_step, "state": snapshot_(None, training_state())}  # for a non-finite stop

    # the hot functions, built once: compiled and/or replayed as CUDA graphs (README "GPU fast paths"). Every
    # mitigation writes what the graphs read in place (reset zeroes Adam state, ReDo and pruning write into the
    # weights, moments and masks), so none of them needs the graphs off.
    update = make_update(critic, target_critic, actor, log_alpha, critic_opt, actor_opt, alpha_opt, args,
                         target_entropy, hl, pruner, use_compile)
    act = common.compiled(make_act(critic, actor), use_compile)
    act_eval = common.compiled(make_act(critic, actor, deterministic=True), use_compile)
    if use_graphs:
        update, act, act_eval = common.cuda_graphed(update), common.cuda_graphed(act), common.cuda_graphed(act_eval)
    print(f"fast paths: torch.compile {'on' if use_compile else 'off'}, CUDA graphs {'on' if use_graphs else 'off'}, "
          f"pinned transfers {'on' if device.type == 'cuda' else 'off (CPU)'}", flush=True)
    sampler = BatchSampler(rb, args.batch_size, device)
    obs_in = common.Staging((1, *obs_shape), torch.uint8, device) if device.type == "cuda" else None
    reward_scale_t = torch.ones((), device=device)  # the critic's reward scale, filled in place when it changes
    reward_scale = 1.0

    def policy_action(fn, obs) -> np.ndarray:
        """fn (act or act_eval) on one observation; the action's host copy is the one sync of an agent step."""
        if obs_in is None:  # CPU: the stack itself, no copy
            x = torch.from_numpy(obs)[None]
        else:  # CUDA: through a pinned buffer, one non-blocking copy
            obs_in.wait()[0] = obs
            x = obs_in.upload()
        return fn(x)[0].cpu().numpy()

    def stop_non_finite(what):
        """Write the last good state to checkpoint_last_good.pt (checkpoint.pt stays the resume point); exit 1."""
        path = os.path.join(run_dir, "checkpoint_last_good.pt")
        common.atomic_save({"format": CHECKPOINT_FORMAT, "global_step": last_good["step"], "args": run_args,
                            **last_good["state"]}, path)
        writer.close()
        resumable = f"{ckpt_path} (step {checkpoint_step})" if checkpoint_step is not None else "(none yet)"
        sys.exit(f"error: non-finite {what}; last good state (step {last_good['step']}) written to {path}; the "
                 f"resumable checkpoint is {resumable}")

    def keep_if_finite(stats):
        """Called where the host syncs anyway (before logging, probing, checkpointing): stop on a non-finite loss
        or parameter, else make the current state the last good one."""
        bad = [k for k, v in stats.items() if not math.isfinite(float(v))]
        if bad:
            stop_non_finite(f"loss at step {global_step} ({', '.join(bad)})")
        params = [*critic.parameters(), *target_critic.parameters(), *actor.parameters(), log_alpha]
        if not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
            stop_non_finite(f"parameters at step {global_step}")
        last_good["step"] = global_step
        last_good["state"] = snapshot_(last_good["state"], training_state())  # copy_ into the same tensors

    def save_checkpoint():
        """Everything the run needs to continue, in one file replaced atomically; returns (MB, seconds)."""
        t = time.perf_counter()
        writer.flush()  # the events logged so far (steps <= global_step) reach the disk before the checkpoint
        size = common.atomic_save({
            "format": CHECKPOINT_FORMAT, "global_step": global_step, "args": run_args, **training_state(),
            "prune_masks": pruner.masks if pruner is not None else None, "replay": rb.state_dict(),
            "last_eval_step": last_eval_step, "last_return": last_return, "probe_batch": probe_batch,
            "rng": common.rng_state(rng)}, ckpt_path)
        return size / 1e6, time.perf_counter() - t

    def to_torch(x):
        return torch.as_tensor(x, device=device)

    def evaluate():
        returns = []
        for _ in range(args.eval_episodes):
            obs, _ = eval_env.reset()
            done, ret = False, 0.0
            while not done:
                obs, _, r, term, trunc, _ = eval_env.step(policy_action(act_eval, obs))
                ret += r
                done = term or trunc
            returns.append(ret)
        return float(np.mean(returns))

    timers = collections.defaultdict(float)  # wall seconds per phase (on CUDA, update time is launch time only)
    start_time = time.time()  # SPS counts the frames of this process only (from start_step)
    obs, frame = env.reset()  # a resumed run starts a fresh episode
    rb.add_first(frame)
    episode_return, episode_frames, stats = 0.0, 0, None
    while global_step < args.total_timesteps:
        prev_step = global_step
        if global_step < args.learning_starts:
            action = rng.uniform(-1.0, 1.0, action_dim).astype(np.float32)
        else:
            action = policy_action(act, obs)
            if not np.isfinite(action).all():  # the host has the action anyway; MuJoCo would raise on it
                stop_non_finite(f"action at step {global_step}")
        obs, frame, reward, terminated, truncated, frames = env.step(action)
        global_step += frames
        episode_return += reward
        episode_frames += frames
        rb.add(frame, action, reward, terminated)
        if terminated or truncated:
            writer.add_scalar("charts/episodic_return", episode_return, global_step)
            writer.add_scalar("charts/episodic_length", episode_frames, global_step)
            last_return, episode_return, episode_frames = episode_return, 0.0, 0
            obs, frame = env.reset()
            rb.add_first(frame)

        if global_step >= args.learning_starts:
            probe_now = (crossed(prev_step, global_step, args.metrics_every)
                         and rb.num_transitions() >= args.metrics_batch)
            t = time.perf_counter()
            batch = sampler.sample(rng)
            timers["replay"] += time.perf_counter() - t
            t = time.perf_counter()
            scale = critic_reward_scale(args.env_id, global_step, args.total_timesteps)
            if scale != reward_scale:
                reward_scale = scale
                reward_scale_t.fill_(scale)
            # with CUDA graphs, stats and grads are the graph's static outputs, overwritten by the next update: they
            # are read below, in this iteration, or never
            stats_t, grads_t = update(*batch, reward_scale_t)
            timers["update"] += time.perf_counter() - t

            t = time.perf_counter()
            if args.mitigation == "reset" and crossed(prev_step, global_step, args.reset_every):
                reset_critic_heads_(critic, target_critic, Critic(obs_shape, action_dim, args).to(device), critic_opt)
                writer.add_scalar("charts/critic_resets", global_step // args.reset_every, global_step)
            if args.mitigation == "redo" and crossed(prev_step, global_step, args.redo_every):
                r_obs, r_act, *_ = rb.sample(args.batch_size, rng)
                n = redo_critic_(critic, actor, to_torch(r_obs), to_torch(r_act), args.redo_tau, critic_opt, actor_opt)
                writer.add_scalar("charts/redo_recycled", n, global_step)
            if pruner is not None and crossed(prev_step, global_step, args.prune_every):
                pruner.update(cubic_sparsity(global_step, args.total_timesteps, args.prune_target, args.prune_start,
                                             args.prune_end))
                writer.add_scalar("charts/critic_sparsity", pruner.sparsity(), global_step)
            timers["mitigation"] += time.perf_counter() - t

            if (probe_now or crossed(prev_step, global_step, args.log_every)
                    or crossed(prev_step, global_step, args.checkpoint_every)):
                stats = dict(zip(STAT_NAMES, stats_t.tolist()))  # the host sync of this update
                stats["charts/critic_reward_scale"] = reward_scale
                keep_if_finite(stats)  # what is about to be probed, logged or saved is finite

            if probe_now:
                t = time.perf_counter()
                if probe_batch is None:  # fixed at the first probe, reused so curves compare like with like
                    p_obs, p_act, *_ = rb.sample(args.metrics_batch, rng)
                    probe_batch = (to_torch(p_obs), to_torch(p_act))
                probe_gen.manual_seed(args.seed)
                with torch.no_grad():
                    layers = critic.probe(critic.encoder(probe_batch[0]), probe_batch[1])
                any_dominant = 0.0
                for name, (acts, pre) in layers.items():
                    m = common.layer_metrics(acts, pre, tau=args.redo_tau, kde_threshold=args.kde_threshold,
                                             kde_noise_std=args.kde_noise_std, generator=probe_gen)
                    m["dominant"] = float(m["max_score"] > acts.shape[1] / 2)  # paper Def. 1: s_i > N/2
                    any_dominant = max(any_dominant, m["dominant"])
                    for k, v in m.items():
                        writer.add_scalar(f"representation/{name}/{k}", v, global_step)
                writer.add_scalar("representation/dominant", any_dominant, global_step)
                for name, g in zip(GRAD_LAYERS, grads_t.tolist()):
                    writer.add_scalar(f"grad/{name}", g, global_step)
                timers["metrics"] += time.perf_counter() - t

        if stats is not None and crossed(prev_step, global_step, args.log_every):
            for k, v in stats.items():
                writer.add_scalar(k, float(v), global_step)
            # float, not CleanRL's int: DrQ on a CPU runs below 1 frame/s
            writer.add_scalar("charts/SPS", (global_step - start_step) / (time.time() - start_time), global_step)

        if eval_env is not None and crossed(prev_step, global_step, args.eval_every):
            t = time.perf_counter()
            writer.add_scalar("eval/episodic_return", evaluate(), global_step)
            last_eval_step = global_step
            timers["eval"] += time.perf_counter() - t

        if crossed(prev_step, global_step, args.log_every) or global_step >= args.total_timesteps:
            sps = (global_step - start_step) / (time.time() - start_time)
            print(f"global_step={global_step}, SPS={sps:.2f}, episodic_return={last_return:.1f} | seconds: "
                  f"physics={env.time_physics:.1f} render={env.time_render:.1f} replay={timers['replay']:.1f} "
                  f"update={timers['update']:.1f} mitigation={timers['mitigation']:.1f} "
                  f"metrics={timers['metrics']:.1f} eval={timers['eval']:.1f}", flush=True)

        # not at the last step: the run finishes right after it, and a finished run is never resumed
        if crossed(prev_step, global_step, args.checkpoint_every) and global_step < args.total_timesteps:
            mb, seconds = save_checkpoint()
            checkpoint_step = global_step
            timers["checkpoint"] += seconds
            print(f"checkpoint: step {global_step}, {mb:.1f} MB, {seconds:.1f}s -> {ckpt_path}", flush=True)

    if eval_env is not None and last_eval_step != global_step:  # end-of-run evaluation
        t = time.perf_counter()
        ret = evaluate()
        writer.add_scalar("eval/episodic_return", ret, global_step)
        timers["eval"] += time.perf_counter() - t
        print(f"final eval/episodic_return={ret:.1f} ({args.eval_episodes} episodes, {timers['eval']:.1f}s in eval)")
    total = time.time() - start_time
    print(f"done: {global_step} frames ({global_step - start_step} in this process, {total:.1f}s, "
          f"SPS={(global_step - start_step) / total:.2f}); seconds: physics="
          f"{env.time_physics:.1f} render={env.time_render:.1f} "
          f"(eval env: physics={getattr(eval_env, 'time_physics', 0):.1f} "
          f"render={getattr(eval_env, 'time_render', 0):.1f}) replay={timers['replay']:.1f} "
          f"update={timers['update']:.1f} "
          f"mitigation={timers['mitigation']:.1f} metrics={timers['metrics']:.1f} eval={timers['eval']:.1f} "
          f"checkpoint={timers['checkpoint']:.1f}")
    if device.type == "cuda":  # scripts/bench.py reads this line
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB allocated, "
              f"{torch.cuda.max_memory_reserved(device) / 2**20:.0f} MiB reserved")
    if args.save_model:
        path = os.path.join(run_dir, f"{args.exp_name}.cleanrl_model")
        torch.save({"critic": critic.state_dict(), "actor": actor.state_dict(), "log_alpha": log_alpha.detach()}, path)
        print(f"model saved to {path}")
    writer.close()
    with open(os.path.join(run_dir, "finished"), "w") as f:  # sweeps skip finished runs; analyze.py counts them
        json.dump({"global_step": global_step, "wall_seconds": total}, f)
    if os.path.exists(ckpt_path):  # a finished run is never resumed, and its checkpoint holds gigabytes of replay
        os.remove(ckpt_path)
