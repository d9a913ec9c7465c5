"""DrQ on pixel DeepMind Control with the neuron-dominance paper's tasks, metrics and mitigations.

Reproduces "Understanding the Effects of Neuron Dominance in Deep RL" (Wu et al.; papers/neuron_dominance_drq.md):
DrQ (Kostrikov, Yarats & Fergus 2021) with jaxrl's settings, the paper's sparse-reward task variants, its
critic-dominance probes (largest ReDo score, next-layer saturation, srank, gradients reaching each layer) and the
mitigations it compares. `--hr` (Hadamard representation on the critic's hidden layers) is our extension.

Environment: dm_control suite tasks rendered from pixels (MUJOCO_GL=egl unless set), 84x84 RGB, camera 0
(quadruped: 2), frame stack 3, action repeat from jaxrl's PlaNet table keyed by the FULL task name (cartpole-swingup 8,
reacher-easy 4, cheetah-run 4, ball_in_cup-catch 4, finger-spin 2, walker-walk 2, every other task 2; a modified task
below uses the repeat of the task it modifies). Only the last physics step of each action repeat is rendered.

Step units (jaxrl's train_pixels counts both):
  frames       environment (physics control) steps: --total-timesteps (jaxrl max_steps, 500k), --eval-every,
               --metrics-every, --log-every, --checkpoint-every, the pruning window (--prune-start/--prune-end are
               fractions of the run) and the x axis of every logged scalar
  agent steps  actions (one per action repeat; jaxrl's loop counter i): --learning-starts (jaxrl start_training 1000:
               random actions while i < 1000, one update per agent step from i = 1000 on), --reset-every (Nikishin et
               al.'s resets), --redo-every (dopamine's ReDo update_step), --prune-every (jaxpruner's update_freq),
               --ln-from-step. Once learning runs, agent steps and gradient steps advance together.
  gradient steps  critic updates done: --reward-mask-steps (reacher-easy_masked, paper App. B.1)
charts/agent_steps and charts/gradient_steps are logged beside the losses to convert between them.

Sparse tasks (paper App. B.1): native `cartpole-swingup_sparse` and `cartpole-balance_sparse`; modified, with ids of
their own:
  cartpole-balance_sparse_narrow  task._CART_RANGE=(-1e-4, 1e-4), task._ANGLE_COSINE_RANGE=(0.9999, 1)
  finger-spin_fast                dm_control.suite.finger._SPIN_VELOCITY = 30 (a MODULE-GLOBAL constant read at reward
                                  time: every finger-spin env in the process sees it; making a plain finger env
                                  restores dm_control's 15. Use one finger variant per process.) The paper also
                                  lists _INITIAL_SPIN_VELOCITY/_STOP_VELOCITY, which dm_control 1.0.50 never reads.
  reacher-easy_masked             the critic's reward is masked to 0 for the first --reward-mask-steps (500k) gradient
                                  steps (paper App. B.1); episode returns in charts/ stay the true ones. The default
                                  500k frames (125k agent steps at repeat 4) never lift the mask: the sweep runs
                                  this task for 4M frames (1M agent steps)

Mitigations (--mitigation; paper Sec. 4 / App. B):
  none     DrQ
  ln       LayerNorm before the ReLU of every critic hidden layer (fc1, fc2 of both Q networks)
  lnwd     ln + AdamW (decoupled weight decay --weight-decay 1e-4) on the critic
  hlgauss  HL-Gauss (Farebrother et al. 2024): 101 bins on [0, 100], sigma 0.75, cross-entropy; Q = softmax expectation
           over bin centres; TD targets clipped to the support; the target histogram is of r + gamma min Q' without the
           entropy bonus (the first author's code; --hl-target-entropy puts it in)
  reset    every --reset-every agent steps re-initialise the critic's non-conv layers (latent projection + both Q
           MLPs), their optimiser state and their target copies; the conv encoder is kept (Nikishin et al. 2022)
  redo     every --redo-every agent steps recycle tau-dormant neurons (score <= --redo-tau) of the critic's conv layers
           and Q hidden layers (Sokar et al. 2023, dopamine's NeuronRecycler): incoming weights re-drawn from Xavier
           uniform, biases zeroed, then -- after every layer's incoming re-init -- outgoing weights zeroed, and the
           Adam moments of all of them zeroed
  prune    gradual magnitude pruning (Zhu & Gupta 2017; Obando-Ceron et al. 2024 via jaxpruner) of the critic's conv
           and dense weights (not biases/LayerNorm/output heads), per layer; final per-layer sparsities from
           --prune-distribution (erk: jaxpruner's Erdos-Renyi-kernel allocation, the default of jaxpruner's dopamine
           baseline; uniform: --prune-target everywhere) scaled by the cubic schedule (1 - (1 - p)^3), p from 20% to 80%
           of training; masks updated every --prune-every agent steps, re-applied after every critic optimiser step
Beside them: --ln-from-step N (critic LayerNorm switched on at agent step N; paper Figs. 10 and 16) and --encoder
resnet18 (paper Fig. 12).

Probes (every --metrics-every frames, fixed batch of --metrics-batch un-augmented replay samples, critic Q1):
representation/{latent,fc1,fc2}/{max_score,dormant_score,dormant_kde,srank,saturated,zombie,dominant} and
representation/dominant (1 when any probed layer has a neuron with ReDo score > N/2, paper Def. 1), plus grad/{latent,
fc1,fc2}: mean |dL/dW| of that layer's weights in the critic update at the probe step (paper App. C.2). Here `latent`
is the 50-d LayerNorm+tanh encoder output that feeds the Q MLPs; fc2 is the penultimate layer (the one the paper sees
saturate) and fc1 the layer where dominant neurons appear. A probe due before the replay holds --metrics-batch
transitions is skipped (one line says so).

Cost: rendering is ~25-40 frames/s per CPU core, but one batch-512 update is ~10 CPU-seconds on this project's CPU
box, so the 500k-frame recipe needs a GPU; the final summary splits wall time into physics/render/replay/update/eval.

Checkpoints and resume: harness.py. A checkpoint (every --checkpoint-every frames) holds the networks, optimisers,
pruning masks, evaluation schedule, probe batch and RNG states; the replay (frames stored once, ~21 KB per agent step
at 84x84, ~2.1 GB at the default --buffer-size) goes to runs/NAME/replay/ in chunks of 8,192 slots, and a checkpoint
rewrites only the chunks written since the previous one. A resumed run starts fresh episodes. A non-finite loss,
parameter or action stops the run; losses and parameters are checked where the host syncs anyway (every --log-every
frames, before probes and checkpoints).

GPU fast paths (docs/running.md "GPU fast paths"): torch.compile of the two losses and the acting step; CUDA graphs of
the whole update (critic, target lerp, actor, temperature, capturable Adam) and of the acting step; the frame ring
mirrored on the GPU when it fits in half its free memory, so a batch is gathered there by index (BatchSampler; else on
the host into a pinned buffer). Per agent step the only host sync is the action MuJoCo needs.

Usage:
  python drq_dmc_dominance.py --env-id cartpole-swingup_sparse --mitigation lnwd
  python drq_dmc_dominance.py --env-id reacher-easy_masked --mitigation hlgauss --seed 2
  python drq_dmc_dominance.py --env-id finger-spin_fast --mitigation none --hr
  python drq_dmc_dominance.py --env-id reacher-easy_masked --total-timesteps 4000000 --ln-from-step 501000  # Fig. 10
  python drq_dmc_dominance.py --env-id cartpole-swingup_sparse --encoder resnet18                          # Fig. 12
  python drq_dmc_dominance.py --env-id finger-spin_fast --run-name fs1 --resume   # continue a killed run
"""
import collections
import copy
import functools
import importlib
import math
import os
import time
from dataclasses import dataclass
from typing import Literal, NamedTuple, Optional, get_args

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import harness

suite = harness.dm_control_suite(pixels=True)  # MUJOCO_GL=egl unless set; a renderer that cannot start: one line
from dm_control.suite import finger as dmc_finger  # noqa: E402 - after the renderer is chosen
import mujoco  # noqa: E402

Mitigation = Literal["none", "ln", "lnwd", "hlgauss", "reset", "redo", "prune"]
MITIGATIONS = get_args(Mitigation)
# modified sparse tasks: id -> (dm_control domain, task)
MODIFIED_TASKS = {
    "cartpole-balance_sparse_narrow": ("cartpole", "balance_sparse"),
    "finger-spin_fast": ("finger", "spin"),
    "reacher-easy_masked": ("reacher", "easy"),
}
# jaxrl examples/train_pixels.py: keyed by the full task name, 2 for every task not listed
PLANET_ACTION_REPEAT = {"cartpole-swingup": 8, "reacher-easy": 4, "cheetah-run": 4, "finger-spin": 2,
                        "ball_in_cup-catch": 4, "walker-walk": 2}
DEFAULT_SPIN_VELOCITY = dmc_finger._SPIN_VELOCITY  # dm_control's value (15), restored for plain finger envs
FAST_SPIN_VELOCITY = 30.0
REPLAY_CHUNK = 8192  # replay slots per checkpoint chunk file (~170 MB of 84x84 frames)

ACTIONS_MAX = 38  # the most action dimensions of a dm_control task (dog): the network check's bound, before any env


@dataclass
class Args:
    # Run
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, repeatable on CUDA: cuDNN deterministic, torch.use_deterministic_algorithms (warn-only), cuBLAS
    workspace :4096:8 (harness.deterministic); every op of the update, the augmentation and the batch gather then
    has a deterministic CUDA kernel"""
    cuda: bool = True
    """if toggled, cuda will be enabled when available"""
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
    """run directory runs/NAME; None means {env_id}__{exp_name}__{seed}__{unix_time}"""

    # Environment
    env_id: str = "cartpole-swingup"
    """dm_control domain-task, or cartpole-balance_sparse_narrow, finger-spin_fast, reacher-easy_masked"""
    total_timesteps: int = 500_000
    """total environment frames (action-repeated physics steps); 500k is jaxrl train_pixels' max_steps"""
    action_repeat: Optional[int] = None
    """action repeat; None means jaxrl's PlaNet table by full task name (cartpole-swingup 8, reacher-easy/cheetah-run/
    ball_in_cup-catch 4, others 2; a modified task takes its base task's)"""
    frame_stack: int = 3
    """number of stacked RGB frames"""
    image_size: int = 84
    """rendered frame height and width"""
    camera_id: Optional[int] = None
    """camera to render; None means 0 (quadruped 2)"""

    # Algorithm (DrQ / SAC, jaxrl defaults)
    buffer_size: int = 100_000
    """replay capacity in agent steps (one uint8 frame stored per step)"""
    batch_size: int = 512
    """batch size of each update"""
    learning_starts: int = 1000
    """AGENT STEPS: random actions while the agent step i < this, one update per agent step from i = this on (jaxrl
    start_training, compared with its loop counter i)"""
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
    """SAC target entropy; None means -|A| (jaxrl DrQLearner and the paper's first author's code)"""
    image_pad: int = 4
    """random-shift augmentation: replicate-pad by this many pixels, then random crop back"""
    hidden_dim: int = 256
    """width of the actor and critic MLP hidden layers"""
    latent_dim: int = 50
    """width of the LayerNorm+tanh projection of the conv features"""
    encoder: Literal["drq", "resnet18"] = "drq"
    """conv encoder: drq (jaxrl's 4 convs) or resnet18 (paper Fig. 12; see ResNet18Encoder)"""

    # Evaluation and logging
    eval_every: int = 10_000
    """frames between evaluations of the deterministic policy (0 = off; also evaluates at the end)"""
    eval_episodes: int = 10
    """episodes per evaluation"""
    log_every: int = 1000
    """frames between loss/statistics scalars (charts/SPS included)"""

    # Network variant and mitigations
    mitigation: Mitigation = "none"
    """the paper's mitigation of neuron dominance (see the module docstring)"""
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
    hl_target_entropy: bool = False
    """HL-Gauss: include the SAC entropy bonus in the target histogram (off: the first author's code)"""
    reset_every: int = 100_000
    """AGENT STEPS between critic resets (reset; Nikishin et al. 2022 count agent steps)"""
    redo_every: int = 1000
    """AGENT STEPS between ReDo recyclings (redo; dopamine's ReDo counts agent steps)"""
    redo_tau: float = 0.1
    """ReDo dormancy threshold on the activation score (redo, and the dormant_score metric)"""
    prune_target: float = 0.95
    """final sparsity of gradual magnitude pruning (prune)"""
    prune_start: float = 0.2
    """fraction of training at which pruning starts (prune)"""
    prune_end: float = 0.8
    """fraction of training at which the final sparsity is reached (prune)"""
    prune_every: int = 1000
    """AGENT STEPS between pruning-mask updates (prune; jaxpruner's update_freq counts updates)"""
    prune_distribution: Literal["uniform", "erk"] = "erk"
    """per-layer final sparsities: erk (jaxpruner's Erdos-Renyi-kernel, the default of its dopamine baseline, whose
    other defaults -- sparsity 0.95, update_freq 1000 -- the paper calls recommended) or uniform (--prune-target)"""
    ln_from_step: int = 0
    """AGENT STEP from which the critic's hidden layers apply LayerNorm (paper Figs. 10, 16); before it the LayerNorm
    layers exist but are skipped (identity). 0 = off (LN from the start with --mitigation ln/lnwd, else never)"""
    reward_mask_steps: int = 500_000
    """GRADIENT STEPS (critic updates) during which reacher-easy_masked's critic sees reward 0 (paper App. B.1)"""

    # Metrics
    metrics_every: int = 10_000
    """frames between critic representation probes (0 = off)"""
    metrics_batch: int = 256
    """un-augmented replay samples in the (fixed) probe batch, drawn at the first probe with enough stored"""
    kde_threshold: float = 20.0
    """KDE-peak density above which a neuron counts as dormant (dormant_kde)"""
    kde_noise_std: float = 1e-3
    """std of the Gaussian noise added before the KDE dormancy test"""
    srank_delta: float = 0.01
    """effective rank: the fewest singular values holding 1 - delta of their sum (Kumar et al. 2021; HR papers)"""
    snapshot_every: int = 0
    """frames between critic snapshots in runs/NAME/snapshots/ (0 = off): weights and LayerNorm switch, for
    scripts/probe.py"""

    # Checkpointing
    checkpoint_every: int = 50_000
    """frames between checkpoints (0 = off); each rewrites only the replay chunks written since the previous one"""
    resume: bool = False
    """continue runs/NAME (needs --run-name) from runs/NAME/checkpoint.pt; the other flags must match its args.json"""

    # Speed
    compile: Literal["auto", "on", "off"] = "auto"
    """torch.compile the critic and actor losses and the acting step (auto: on with CUDA; CPU compiling gains little)"""
    cudagraphs: Literal["auto", "on", "off"] = "auto"
    """replay the acting step and the whole update as CUDA graphs (auto: on with CUDA; needs CUDA)"""


def parse_env_id(env_id: str):
    """'domain-task' -> (domain, task) of the dm_control suite; modified sparse tasks map to their base task."""
    if env_id in MODIFIED_TASKS:
        return MODIFIED_TASKS[env_id]
    domain, _, task = env_id.partition("-")
    if (domain, task) not in suite.ALL_TASKS:
        return None
    return domain, task


def validate(args: Args) -> None:
    """DrQ's own checks (harness.Run does the generic ones): one line on stderr naming the flag, exit 1."""
    if args.action_repeat is not None:  # one agent step must fit the budget
        harness.at_least(args, {"total_timesteps": 1})  # before the budget bounds what follows
        harness.at_most(args, {"action_repeat": args.total_timesteps}, "--total-timesteps frames: one agent step")
    harness.at_most(args, {"hr_branches": harness.MAX_LAYERS}, harness.LAYER_COUNT)
    if parse_env_id(args.env_id) is None:
        harness.fail(f"--env-id {args.env_id!r} is not a dm_control task (expected domain-task, e.g. cartpole-swingup, "
                     f"or one of {', '.join(MODIFIED_TASKS)})")
    if args.capture_video:
        harness.fail("--capture-video is not supported by drq_dmc_dominance.py")
    if args.camera_id is not None:  # the model's camera count, read from its XML: no environment is built
        domain = parse_env_id(args.env_id)[0]
        xml, assets = importlib.import_module(f"dm_control.suite.{domain}").get_model_and_assets()
        cameras = mujoco.MjModel.from_xml_string(xml, assets).ncam
        if not -1 <= args.camera_id < cameras:
            harness.fail(f"--camera-id must be -1 (the free camera) or a fixed camera of {domain}, 0..{cameras - 1}, "
                         f"got {args.camera_id}")
    harness.at_least(args, {"frame_stack": 1, "image_size": 1, "buffer_size": 1, "batch_size": 1, "hidden_dim": 1,
                            "latent_dim": 1, "log_every": 1, "eval_episodes": 1, "hr_branches": 1, "hl_bins": 1,
                            "learning_starts": 0, "eval_every": 0, "image_pad": 0, "ln_from_step": 0,
                            "reward_mask_steps": 0})
    if args.action_repeat is not None:
        harness.at_least(args, {"action_repeat": 1})
    harness.finite(args, ["policy_lr", "q_lr", "alpha_lr", "init_temperature"])
    harness.finite(args, ["weight_decay"], positive=False)  # AdamW refuses a negative one
    harness.at_most(args, {"image_pad": args.image_size}, "--image-size: a shift past the whole frame")
    if args.hr and args.hr_branches < 2:
        harness.fail(f"--hr-branches must be >= 2 with --hr, got {args.hr_branches}")
    if args.batch_size > args.buffer_size:
        harness.fail(f"--batch-size {args.batch_size} exceeds --buffer-size {args.buffer_size}")
    if args.metrics_every and args.metrics_batch > args.buffer_size:
        harness.fail(f"--metrics-batch {args.metrics_batch} exceeds --buffer-size {args.buffer_size}")
    harness.unit_interval(args, ["gamma"])
    if not 0.0 < args.tau <= 1.0:
        harness.fail(f"--tau must be in (0, 1], got {args.tau}")
    if args.mitigation == "hlgauss" and (args.hl_bins < 2 or args.hl_max <= args.hl_min or args.hl_sigma <= 0):
        harness.fail(f"--hl-bins >= 2, --hl-max > --hl-min and --hl-sigma > 0 needed, got {args.hl_bins}, "
                     f"[{args.hl_min}, {args.hl_max}], {args.hl_sigma}")
    if args.mitigation == "reset":
        harness.at_least(args, {"reset_every": 1})
    if args.mitigation == "redo":
        harness.at_least(args, {"redo_every": 1, "redo_tau": 0})
    if args.mitigation == "prune":
        if not (0.0 <= args.prune_target < 1.0 and 0.0 <= args.prune_start < args.prune_end <= 1.0):
            harness.fail(f"--prune-target must be in [0, 1) and 0 <= --prune-start < --prune-end <= 1, got "
                         f"{args.prune_target}, {args.prune_start}, {args.prune_end}")
        harness.at_least(args, {"prune_every": 1})


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
        self.action_repeat = action_repeat or planet_action_repeat(env_id)
        self.camera_id = camera_id if camera_id is not None else (2 if domain == "quadruped" else 0)
        self.image_size = image_size
        spec = self.env.action_spec()
        self.action_low, self.action_high = spec.minimum.astype(np.float32), spec.maximum.astype(np.float32)
        self.action_dim = spec.shape[0]
        self.frames = collections.deque(maxlen=frame_stack)
        self.obs_shape = (3 * frame_stack, image_size, image_size)
        self.time_physics = self.time_render = 0.0  # seconds, for the speed report
        self.rendered = False

    def render(self):
        t = time.perf_counter()
        draw = functools.partial(self.env.physics.render, self.image_size, self.image_size, camera_id=self.camera_id)
        # a renderer can import fine and fail when its context is made, at the first frame (e.g. GLFW without a display)
        frame = draw() if self.rendered else harness.first_frame(draw)
        self.rendered = True
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


def critic_layernorm(args: Args) -> bool:
    """Whether the critic's hidden layers have LayerNorm: --mitigation ln/lnwd, or --ln-from-step."""
    return args.mitigation in ("ln", "lnwd") or args.ln_from_step > 0


def target_entropy_for(args: Args, action_dim: int) -> float:
    """SAC's target entropy: --target-entropy, else -|A| (jaxrl DrQLearner's default)."""
    return args.target_entropy if args.target_entropy is not None else -float(action_dim)


def make_env(args: Args, seed: int) -> DMCPixels:
    return DMCPixels(args.env_id, seed, args.image_size, args.frame_stack, args.action_repeat, args.camera_id)


def planet_action_repeat(env_id: str) -> int:
    """jaxrl's action repeat for a task id: the PlaNet table by full task name, 2 for any other task; a modified
    task (MODIFIED_TASKS) takes the repeat of the dm_control task it modifies."""
    domain, task = parse_env_id(env_id)
    return PLANET_ACTION_REPEAT.get(f"{domain}-{task}", 2)


def critic_reward_scale(env_id: str, grad_step: int, mask_steps: int) -> float:
    """reacher-easy_masked hides the reward from the critic in its first `mask_steps` gradient steps (paper App. B.1:
    500k); grad_step is the 1-based index of the update about to run."""
    if env_id == "reacher-easy_masked" and grad_step <= mask_steps:
        return 0.0
    return 1.0



def evaluate(env: DMCPixels, policy, episodes: int) -> float:
    """Mean return of `episodes` episodes of policy(obs) -> action (the deterministic policy)."""
    returns = []
    for _ in range(episodes):
        obs, _ = env.reset()
        done, ret = False, 0.0
        while not done:
            obs, _, r, term, trunc, _ = env.step(policy(obs))
            ret += r
            done = term or trunc
        returns.append(ret)
    return float(np.mean(returns))


# ---------------------------------------------------------------------------------------------------------------
# Replay: one uint8 frame per time step, stacks rebuilt at sampling


class Batch(NamedTuple):
    """A batch of transitions: numpy from FrameReplay.sample, device tensors (views of persistent buffers) from
    BatchSampler.sample."""
    obs: object  # (B, stack*3, H, W) uint8
    actions: object  # (B, A) float32 in [-1, 1]
    rewards: object  # (B,) float32, summed over the action repeat
    terminated: object  # (B,) bool (numpy) / 0. or 1. float32 (tensors): 1 where the step terminated
    next_obs: object  # (B, stack*3, H, W) uint8


class FrameReplay:
    """Ring of single frames. Slot k holds frame f_k and the (action, reward, terminated) that led to it from f_{k-1};
    an episode's reset frame is a slot of its own marked `first`. A transition is any non-first slot p: obs = stack
    ending at p-1, next_obs = stack ending at p, where frames before the episode start are replaced by the episode's
    first frame (as the env's reset fills its stack). Positions are absolute counters; slot = position % capacity.
    `store` checkpoints the ring incrementally (harness.ChunkStore): every write marks its slot's chunk changed.
    The host arrays are the truth (checkpoints, ReDo's and the probe's batches); mirror() keeps the frames on the
    device too, where BatchSampler gathers the stacks."""

    def __init__(self, capacity, frame_shape, action_dim, frame_stack, chunk: int = REPLAY_CHUNK):
        self.capacity, self.stack = capacity, frame_stack
        self.frames = np.zeros((capacity, *frame_shape), np.uint8)
        self.actions = np.zeros((capacity, action_dim), np.float32)
        self.rewards = np.zeros(capacity, np.float32)
        self.terminated = np.zeros(capacity, np.bool_)
        self.first = np.zeros(capacity, np.bool_)
        self.start = np.zeros(capacity, np.int64)  # absolute position of the slot's episode start
        self.pos = 0
        self.episode_start = 0
        self.store = harness.ChunkStore({k: getattr(self, k) for k in
                                         ("frames", "actions", "rewards", "terminated", "first", "start")}, chunk)
        self.frames_dev: Optional[torch.Tensor] = None  # mirror(): the frames where the update runs
        self.frame_in: list = []  # CUDA mirror: pinned buffers the written frames go up through

    @staticmethod
    def bytes_needed(capacity: int, image_size: int) -> int:
        return capacity * (3 * image_size ** 2 + 64)  # a frame, and ~64 B of action, reward, flags, start

    @property
    def filled(self) -> int:
        return min(self.pos, self.capacity)

    def mirror(self, device: torch.device) -> None:
        """Keep the frames on `device` as well: copied whole now (after a restore: what was restored), then each
        written frame follows. On the CPU the "device" frames are the host array itself (no second copy)."""
        if device.type == "cpu":
            self.frames_dev = torch.from_numpy(self.frames)
            return
        self.frames_dev = torch.from_numpy(self.frames).to(device)
        # two buffers, alternating: a frame is copied into one while the other's upload may still be in flight
        self.frame_in = [harness.Staging(self.frames.shape[1:], torch.uint8, device) for _ in range(2)]

    def add_first(self, frame):
        self.episode_start = self.pos
        self._write(frame, 0.0, 0.0, False, True)

    def add(self, frame, action, reward, terminated):
        self._write(frame, action, reward, terminated, False)

    def _write(self, frame, action, reward, terminated, first):
        i = self.pos % self.capacity
        self.store.touch(i)
        self.frames[i] = frame
        self.actions[i] = action
        self.rewards[i] = reward
        self.terminated[i] = terminated
        self.first[i] = first
        self.start[i] = self.episode_start
        if self.frame_in:  # non-blocking, and on the stream, so before any later gather that reads slot i
            staging = self.frame_in[self.pos % 2]
            staging.wait()[...] = frame
            self.frames_dev[i].copy_(staging.upload(), non_blocking=True)
        self.pos += 1

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

    def sample(self, batch_size, rng: np.random.Generator) -> Batch:
        """Uniform over valid transitions, as numpy arrays."""
        p = self.sample_positions(batch_size, rng)
        slot = p % self.capacity
        f = self.frames[self.stack_slots(p)]  # (B, stack+1, C, H, W)
        b, _, c, h, w = f.shape
        obs = f[:, :-1].reshape(b, self.stack * c, h, w)
        next_obs = f[:, 1:].reshape(b, self.stack * c, h, w)
        return Batch(obs, self.actions[slot], self.rewards[slot], self.terminated[slot], next_obs)


def frames_fit_on(device: torch.device, nbytes: int) -> bool:
    """Whether BatchSampler keeps the frame ring on `device`: on CUDA when it takes at most half the free memory (the
    update's activations need the rest: ~1 GB at batch 512, several with --encoder resnet18); on the CPU always (the
    ring is already there: torch's gather reads it in place)."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= free // 2


class BatchSampler:
    """FrameReplay.sample(batch_size, rng) into persistent tensors: obs and next_obs stacks in one uint8 buffer
    (2B, stack*C, H, W), actions, rewards, terminated in one float32 buffer (A + 2, B) (pinned on CUDA, one
    non-blocking copy). sample() returns a Batch of views of the same device memory at every call (CUDA-graph
    inputs: use them before the next sample()); terminated is 0./1. float. Same RNG draws and same values as
    FrameReplay.sample.

    Frames, two ways (`on_device`; None: frames_fit_on):
      device  the ring is mirrored where the update runs (FrameReplay.mirror); only the (2, B, stack) slot indices go
              up (24 KB at the recipe's sizes) and the stacks are gathered there by index_select, queued behind the
              previous update: nothing of a batch is copied on the host. On the CPU it reads the host ring in place.
      host    the ring stays on the host (it does not fit beside the update): the stacks are gathered with np.take
              into a pinned buffer (~65 MB at the recipe's sizes) and go up in one non-blocking copy; that gather
              waits for the previous upload and runs while the GPU idles after the action sync."""

    def __init__(self, rb: FrameReplay, batch_size: int, device: torch.device, on_device: Optional[bool] = None):
        self.rb, self.batch_size = rb, batch_size
        c, h, w = rb.frames.shape[1:]
        self.a = a = rb.actions.shape[1]
        shape = (2 * batch_size, rb.stack * c, h, w)
        self.on_device = frames_fit_on(device, rb.frames.nbytes) if on_device is None else on_device
        if self.on_device:
            if rb.frames_dev is None:
                rb.mirror(device)
            self.slots = harness.Staging((2, batch_size, rb.stack), torch.int64, device)
            f = torch.empty(shape, dtype=torch.uint8, device=device)
            self.frames_out = f.view(2 * batch_size * rb.stack, c, h, w)  # a view: index_select writes the batch
        else:
            self.frames = harness.Staging(shape, torch.uint8, device)
            self.frames_np = self.frames.np.reshape(2, batch_size, rb.stack, c, h, w)  # a view: [0] obs, [1] next
            f = self.frames.device
        # rows: actions (transposed), reward, terminated. Every view is dense, so the clones cuda_graphed captures on
        # keep its strides (a column of a (B, A + 2) buffer would come back contiguous and make dynamo recompile)
        self.scalars = harness.Staging((a + 2, batch_size), torch.float32, device)
        x = self.scalars.device
        self.batch = Batch(f[:batch_size], x[:a].t(), x[a], x[a + 1], f[batch_size:])

    def sample(self, rng: np.random.Generator) -> Batch:
        rb, a = self.rb, self.a
        p = rb.sample_positions(self.batch_size, rng)
        q = rb.stack_slots(p)
        if self.on_device:
            slots = self.slots.wait()
            slots[0], slots[1] = q[:, :-1], q[:, 1:]
            torch.index_select(rb.frames_dev, 0, self.slots.upload().view(-1), out=self.frames_out)
        else:
            self.frames.wait()
            np.take(rb.frames, np.stack([q[:, :-1], q[:, 1:]]), axis=0, out=self.frames_np, mode="clip")  # valid slots
            self.frames.upload()
        slot = p % rb.capacity
        scalars = self.scalars.wait()
        scalars[:a] = rb.actions[slot].T
        scalars[a] = rb.rewards[slot]
        scalars[a + 1] = rb.terminated[slot]
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
# Networks (jaxrl DrQ: orthogonal sqrt(2) init for convs and MLP layers; the latent projection is a plain Flax
# nn.Dense, so Flax's default init; every LayerNorm is Flax's, eps 1e-6)

LN_EPS = 1e-6  # flax.linen.LayerNorm's default epsilon (torch's is 1e-5)


def ortho_(layer: nn.Module, gain: float = math.sqrt(2)) -> nn.Module:
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.zeros_(layer.bias)
    return layer


def lecun_normal_(layer: nn.Module) -> nn.Module:
    """Flax's default Dense init (lecun_normal = variance_scaling(1, fan_in, truncated_normal)): a normal truncated at
    +-2 std, its std divided by 0.8796... (the std of a unit normal truncated at +-2) so the variance is 1/fan_in;
    zero bias."""
    std = math.sqrt(1.0 / layer.weight.shape[1]) / 0.87962566103423978
    nn.init.trunc_normal_(layer.weight, 0.0, std, -2.0 * std, 2.0 * std)
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

    def conv_weights(self):
        return [c.weight for c in self.convs]


class BasicBlock(nn.Module):
    """He et al. (2016) basic residual block: 3x3 conv -> ReLU -> 3x3 conv, plus the shortcut (a strided 1x1 conv
    when the shape changes), then ReLU. No BatchNorm (see ResNet18Encoder)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x):
        out = self.conv2(F.relu(self.conv1(x)))
        return F.relu(out + (self.shortcut(x) if self.shortcut is not None else x))


class ResNet18Encoder(nn.Module):
    """ResNet-18 (He et al. 2016) in place of DrQ's 4 convs (paper Fig. 12, "DrQ-ResNet18"; the paper names no
    variant). Our choice: the ImageNet ResNet-18 topology unchanged -- 7x7/2 stem conv, 3x3/2 max-pool, four stages of
    two BasicBlocks with 64, 128, 256, 512 channels and strides 1, 2, 2, 2 -- which takes 84x84 to 42, 21, 21, 11, 6, 3;
    the 512x3x3 map is flattened (no global pooling: DrQ flattens its conv map into the Dense(50) projection, and
    pooling would drop the spatial layout a 3x3 map still has). Two adaptations for RL, both because of how DrQ uses
    the encoder: no BatchNorm (its batch statistics would differ between the single-observation acting step, the
    512-sample update and the target network, and the probes read the Q MLP, not the encoder) so the convs keep a
    zero-initialised bias; kaiming-normal (fan_out, ReLU) conv init as torchvision's ResNet. uint8 input scaled to
    [0, 1]. ReDo leaves this encoder alone (its score-based recycling is defined here for the plain conv stack)."""

    def __init__(self, in_channels, image_size):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 64, 7, 2, 3)
        blocks, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        size = (image_size + 2 * 3 - 7) // 2 + 1  # stem
        size = (size + 2 * 1 - 3) // 2 + 1  # max-pool
        for _ in range(3):  # the three stride-2 stages
            size = (size + 2 * 1 - 3) // 2 + 1
        self.out_hw = size * size
        self.out_dim = 512 * self.out_hw

    def forward(self, obs, probe=False):
        x = F.max_pool2d(F.relu(self.stem(obs.float() / 255.0)), 3, 2, 1)
        x = self.blocks(x).flatten(1)
        return (x, {}) if probe else x

    def conv_weights(self):
        return [m.weight for m in self.modules() if isinstance(m, nn.Conv2d)]


def make_encoder(kind: str, in_channels: int, image_size: int) -> nn.Module:
    return ResNet18Encoder(in_channels, image_size) if kind == "resnet18" else Encoder(in_channels, image_size)


class HiddenLayer(nn.Module):
    """K = branches copies of Linear -> optional LayerNorm -> ReLU, multiplied (HR when K >= 2; K = 1 plain).
    With LayerNorm, the 0-d bool buffer `ln_gate` switches it (off: the pre-activation passes unchanged), so
    --ln-from-step can turn it on part-way through training with the parameters and optimiser state already in
    place; the gate is not in the state_dict (the checkpoint keeps it as `ln_on`)."""

    def __init__(self, in_dim, out_dim, layernorm=False, branches=1, ln_on=True):
        super().__init__()
        self.linears = nn.ModuleList([ortho_(nn.Linear(in_dim, out_dim)) for _ in range(branches)])
        self.norms = nn.ModuleList([nn.LayerNorm(out_dim, eps=LN_EPS) for _ in range(branches)]) if layernorm \
            else None
        if layernorm:
            self.register_buffer("ln_gate", torch.tensor(bool(ln_on)), persistent=False)

    def forward(self, x, probe=False):
        pres = [lin(x) for lin in self.linears]
        if self.norms is not None:  # torch.where: both ways exact, and no host sync (CUDA graphs read the gate)
            pres = [torch.where(self.ln_gate, norm(p), p) for norm, p in zip(self.norms, pres)]
        y = F.relu(pres[0])
        for p in pres[1:]:
            y = y * F.relu(p)
        return (y, torch.cat(pres, dim=1)) if probe else y

    def incoming(self):
        """(weight, bias) pairs whose dim 0 indexes this layer's neurons (for ReDo)."""
        pairs = [(lin.weight, lin.bias) for lin in self.linears]
        return pairs + ([(n.weight, n.bias) for n in self.norms] if self.norms is not None else [])


class QNet(nn.Module):
    def __init__(self, in_dim, hidden_dim, out_dim, layernorm, branches, ln_on=True):
        super().__init__()
        self.fc1 = HiddenLayer(in_dim, hidden_dim, layernorm, branches, ln_on)
        self.fc2 = HiddenLayer(hidden_dim, hidden_dim, layernorm, branches, ln_on)
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
        self.encoder = make_encoder(args.encoder, obs_shape[0], obs_shape[1])
        self.proj = lecun_normal_(nn.Linear(self.encoder.out_dim, args.latent_dim))
        self.proj_norm = nn.LayerNorm(args.latent_dim, eps=LN_EPS)
        layernorm = critic_layernorm(args)
        branches = args.hr_branches if args.hr else 1
        out_dim = args.hl_bins if args.mitigation == "hlgauss" else 1
        ln_on = args.ln_from_step == 0  # with --ln-from-step the LayerNorms start switched off
        self.q1 = QNet(args.latent_dim + action_dim, args.hidden_dim, out_dim, layernorm, branches, ln_on)
        self.q2 = QNet(args.latent_dim + action_dim, args.hidden_dim, out_dim, layernorm, branches, ln_on)

    def hidden_layers(self):
        return [self.q1.fc1, self.q1.fc2, self.q2.fc1, self.q2.fc2]

    @torch.no_grad()
    def set_layernorm_(self, on: bool) -> None:
        """Switch the hidden layers' LayerNorm on or off, in place (the buffers a CUDA graph reads)."""
        for layer in self.hidden_layers():
            if layer.norms is not None:
                layer.ln_gate.fill_(bool(on))

    def layernorm_on(self) -> bool:
        layer = self.q1.fc1
        return layer.norms is not None and bool(layer.ln_gate)

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
        self.proj = lecun_normal_(nn.Linear(feat_dim, args.latent_dim))
        self.proj_norm = nn.LayerNorm(args.latent_dim, eps=LN_EPS)
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


def erk_sparsities(shapes, sparsity: float) -> list:
    """jaxpruner's Erdos-Renyi-kernel allocation (sparsity_distributions.get_sparsities_erdos_renyi, include_kernel):
    layer i keeps the fraction eps * sum(shape_i) / prod(shape_i) of its weights, eps chosen so that the kept count
    over all layers is what uniform sparsity keeps (sum of n_i - floor(s n_i)); a layer whose density would exceed 1
    is made dense (sparsity 0), its pruned count charged to the others, and eps solved again. Returns per-layer
    sparsities in the order of `shapes` (the sum and product of a shape do not depend on its axis order, so torch's
    (out, in, kh, kw) gives what Flax's (kh, kw, in, out) gives)."""
    sizes = [math.prod(s) for s in shapes]
    raw = [sum(s) / n for s, n in zip(shapes, sizes)]
    dense = set()
    while True:
        rhs = sum(-math.floor(sparsity * n) if i in dense else n - math.floor(sparsity * n)
                  for i, n in enumerate(sizes))
        divisor = sum(raw[i] * n for i, n in enumerate(sizes) if i not in dense)
        eps = rhs / divisor
        live = [i for i in range(len(sizes)) if i not in dense]
        top = max(raw[i] for i in live)
        if top * eps <= 1:
            return [0.0 if i in dense else 1.0 - eps * raw[i] for i in range(len(sizes))]
        dense |= {i for i in live if raw[i] == top}


def layer_sparsities(distribution: str, shapes, sparsity: float) -> list:
    """Final per-layer sparsities of --prune-distribution: uniform (every layer `sparsity`) or erk."""
    return erk_sparsities(shapes, sparsity) if distribution == "erk" else [float(sparsity)] * len(shapes)


class MagnitudePruner:
    """Per-layer magnitude pruning masks over the given weights; `update(sparsity)` zeroes the smallest-|w| fraction
    of every weight (`sparsity` a number, or one per weight; already-pruned weights are zero, so they stay pruned),
    `apply()` re-applies the masks."""

    def __init__(self, weights):
        self.weights = list(weights)
        self.masks = [torch.ones_like(w, dtype=torch.bool) for w in self.weights]

    @torch.no_grad()
    def update(self, sparsity):
        per_layer = sparsity if isinstance(sparsity, (list, tuple)) else [sparsity] * len(self.weights)
        for w, m, s in zip(self.weights, self.masks, per_layer):
            k = int(round(s * w.numel()))
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
    ws = critic.encoder.conv_weights() + [critic.proj.weight]
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
    """ReDo (Sokar et al. 2023) on the critic as dopamine's NeuronRecycler does it: the neurons with activation score
    <= tau in conv1..conv4 (the DrQ encoder; not the ResNet-18) and in fc1/fc2 of both Q networks, all scored on the
    same batch first; then every such neuron gets fresh incoming weights (Xavier uniform over the whole weight's
    shape, dopamine's weight_reinit_random) and a zero bias; only after ALL incoming re-inits are their outgoing
    weights zeroed, so a weight joining two recycled neurons (fc2[k, j] for j recycled in fc1 and k in fc2) ends at 0,
    as in dopamine, where the outgoing masks are applied after the incoming ones. Adam moments of every touched slice
    are zeroed. conv4 feeds both the critic's and the actor's latent projection, so both lose those columns. The
    LayerNorm+tanh latent is left alone (its outgoing weights share fc1's input with the action)."""
    feats, conv_acts = critic.encoder(obs, probe=True)
    z = torch.tanh(critic.proj_norm(critic.proj(feats)))
    za = torch.cat([z, actions], dim=1)
    init = nn.init.xavier_uniform_  # dopamine: flax.linen.initializers.xavier_uniform()
    # (mask, incoming (weight, bias) pairs, [(outgoing weight, optimizer)], outgoing_group)
    layers = []
    convs = getattr(critic.encoder, "convs", [])
    for i, conv in enumerate(convs):
        mask = common.activation_scores(conv_acts[f"conv{i + 1}"]) <= tau
        if i + 1 < len(convs):
            layers.append((mask, [(conv.weight, conv.bias)], [(convs[i + 1].weight, critic_opt)], 1))
        else:
            layers.append((mask, [(conv.weight, conv.bias)], [(critic.proj.weight, critic_opt),
                                                              (actor.proj.weight, actor_opt)], critic.encoder.out_hw))
    for q in (critic.q1, critic.q2):
        acts = q(za, probe=True)[1]
        m1, m2 = (common.activation_scores(acts[k][0]) <= tau for k in ("fc1", "fc2"))
        layers.append((m1, q.fc1.incoming(), [(lin.weight, critic_opt) for lin in q.fc2.linears], 1))
        layers.append((m2, q.fc2.incoming(), [(q.head.weight, critic_opt)], 1))
    recycled = sum(common.redo_recycle_(mask, incoming, [], critic_opt, init) for mask, incoming, _, _ in layers)
    for mask, _, outgoing, group in layers:  # after every incoming re-init
        for weight, opt in outgoing:
            common.redo_recycle_(mask, [], [weight], opt, outgoing_group=group)
    return recycled


# ---------------------------------------------------------------------------------------------------------------
# Probe


@torch.no_grad()
def probe_metrics(critic: Critic, obs: torch.Tensor, actions: torch.Tensor, grads: Optional[torch.Tensor],
                  args: Args) -> dict:
    """Every representation/* and grad/* scalar of one probe: common.probe_scalars on Q1's latent, fc1 and fc2 (no
    hidden_bias: the latent reaches the head only through fc1, beside the action), each layer's `dominant` (paper
    Def. 1: some neuron's ReDo score > N/2) and their maximum, and the critic-loss gradients of this step's update
    (none with grads None: a snapshot has no update)."""
    layers = critic.probe(critic.encoder(obs), actions)
    out = common.probe_scalars(layers, tau=args.redo_tau, kde_threshold=args.kde_threshold,
                               kde_noise_std=args.kde_noise_std, seed=args.seed, delta=args.srank_delta)
    for name, (acts, _) in layers.items():
        out[f"representation/{name}/dominant"] = float(out[f"representation/{name}/max_score"] > acts.shape[1] / 2)
    out["representation/dominant"] = max(out[f"representation/{name}/dominant"] for name in layers)
    if grads is None:
        return out
    return {**out, **{f"grad/{name}": g for name, g in zip(GRAD_LAYERS, grads.tolist())}}


def probe_snapshot(args: Args, snapshot: dict, probe: dict, device) -> dict:
    """scripts/probe.py: the representation/* scalars of one snapshot (harness.Snapshots) in a critic built as the run
    built it, its LayerNorm switch as it was (--ln-from-step; the gate is no part of the state_dict). Pruning masks
    need no restoring: the pruned weights are zero in the weights themselves. No grad/*: those are the gradients of
    the update at the probe step."""
    build = snapshot["build"]
    critic = Critic(tuple(build["obs_shape"]), build["action_dim"], args).to(device)
    critic.load_state_dict(snapshot["networks"]["critic"])
    if critic_layernorm(args):
        critic.set_layernorm_(snapshot["extra"]["ln_on"])
    return probe_metrics(critic, probe["obs"].to(device), probe["actions"].to(device), None, args)


# ---------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: acting and the update, as functions of tensors the loop builds once (compiled and/or replayed as CUDA
# graphs with --compile / --cudagraphs). None of them syncs with the host; everything a graph reads (parameters,
# optimiser state, pruning masks, log_alpha, the batch tensors) stays in place.

STAT_NAMES = ("losses/qf_loss", "losses/qf1_values", "losses/actor_loss", "losses/alpha_loss", "losses/alpha",
              "losses/entropy")  # the rows of train_step's stats tensor
GRAD_LAYERS = ("latent", "fc1", "fc2")  # the rows of train_step's grads tensor: grad/<layer>


def make_act(critic: Critic, actor: Actor, deterministic: bool = False):
    """act(obs) -> (1, A) action in [-1, 1]: the policy's sample (or its mean with `deterministic`, for evaluation)
    on the critic's conv features of one uint8 stack (1, stack*3, H, W)."""
    @torch.no_grad()
    def act(obs_u8: torch.Tensor) -> torch.Tensor:
        feats = critic.encoder(obs_u8)
        return actor.act_deterministic(feats) if deterministic else actor.sample(feats)[0]

    return act


def q_value(out: torch.Tensor, hl: Optional[HLGauss]) -> torch.Tensor:
    return hl.value(out) if hl is not None else out.squeeze(-1)


def mean_abs_grad(params) -> torch.Tensor:
    """Mean |dL/dW| over the given parameters' gradients, as a 0-d tensor (no host sync)."""
    return torch.cat([p.grad.abs().flatten() for p in params]).mean()


def critic_loss(critic, target_critic, actor, hl, args, obs_u8, actions, rewards, terminated, next_u8, reward_scale,
                alpha):
    """Random shift of both stacks, soft TD target from the target critic (jaxrl backup_entropy; with HL-Gauss, without
    the entropy bonus unless --hl-target-entropy), MSE or HL-Gauss on both Q heads. Returns (loss, mean Q1, the
    shifted obs the actor then uses)."""
    obs, next_obs = random_shift(obs_u8, args.image_pad), random_shift(next_u8, args.image_pad)  # still uint8
    with torch.no_grad():
        next_a, next_logp = actor.sample(critic.encoder(next_obs))
        tq1, tq2 = target_critic(target_critic.encoder(next_obs), next_a)
        next_v = torch.min(q_value(tq1, hl), q_value(tq2, hl))
        if hl is None or args.hl_target_entropy:  # HL-Gauss: the author's code makes the histogram without it
            next_v = next_v - alpha * next_logp
        target = rewards * reward_scale + args.gamma * (1.0 - terminated) * next_v
    q1, q2 = critic(critic.encoder(obs), actions)
    if hl is not None:
        loss = hl.loss(q1, target) + hl.loss(q2, target)
    else:
        loss = F.mse_loss(q1.squeeze(-1), target) + F.mse_loss(q2.squeeze(-1), target)
    return loss, q_value(q1, hl).detach().mean(), obs


def actor_loss(critic, actor, hl, obs, alpha):
    """SAC's actor loss on the updated critic's conv features, gradients stopped (jaxrl copies the encoder into the
    actor). Returns (loss, entropy estimate)."""
    with torch.no_grad():
        feats = critic.encoder(obs)
    pi, logp = actor.sample(feats)
    pq1, pq2 = critic(feats, pi)
    return (alpha * logp - torch.min(q_value(pq1, hl), q_value(pq2, hl))).mean(), -logp.detach().mean()


def make_train_step(critic: Critic, target_critic: Critic, actor: Actor, log_alpha: torch.Tensor,
                    critic_opt: torch.optim.Optimizer, actor_opt: torch.optim.Optimizer,
                    alpha_opt: torch.optim.Optimizer, args: Args, target_entropy: float,
                    hl: Optional[HLGauss] = None, pruner: Optional[MagnitudePruner] = None, compile_loss: bool = False):
    """train_step(obs, actions, rewards, terminated, next_obs, reward_scale) -> (stats, grads): one DrQ update --
    critic step, pruning masks re-applied, target lerp, actor step, temperature step. Inputs are tensors (a Batch, then
    reward_scale as a 0-d tensor); stats holds STAT_NAMES and grads the mean |dL/dW| of the critic loss at GRAD_LAYERS
    (Q1's path), device tensors read only where the loop syncs. The two losses are what torch.compile sees; the whole
    step is what a CUDA graph captures."""
    critic_params, target_params = list(critic.parameters()), list(target_critic.parameters())
    grad_groups = ([critic.proj.weight], [lin.weight for lin in critic.q1.fc1.linears],
                   [lin.weight for lin in critic.q1.fc2.linears])
    critic_loss_fn = harness.compiled(functools.partial(critic_loss, critic, target_critic, actor, hl, args),
                                      compile_loss)
    actor_loss_fn = harness.compiled(functools.partial(actor_loss, critic, actor, hl), compile_loss)

    def train_step(obs_u8, actions, rewards, terminated, next_u8, reward_scale):
        alpha = log_alpha.detach().exp()
        qf_loss, q1_mean, obs = critic_loss_fn(obs_u8, actions, rewards, terminated, next_u8, reward_scale, alpha)
        critic_opt.zero_grad(set_to_none=True)
        qf_loss.backward()
        grads = torch.stack([mean_abs_grad(ps) for ps in grad_groups])  # cheap: always computed, read when probing
        critic_opt.step()
        if pruner is not None:
            pruner.apply()
        with torch.no_grad():
            torch._foreach_lerp_(target_params, critic_params, args.tau)
        pi_loss, entropy = actor_loss_fn(obs, alpha)
        actor_opt.zero_grad(set_to_none=True)
        pi_loss.backward()
        actor_opt.step()
        alpha_loss = log_alpha.exp() * (entropy - target_entropy)
        alpha_opt.zero_grad(set_to_none=True)
        alpha_loss.backward()
        alpha_opt.step()
        return torch.stack([qf_loss.detach(), q1_mean, pi_loss.detach(), alpha_loss.detach(), alpha, entropy]), grads

    return train_step


make_update = make_train_step  # the name of earlier versions


if __name__ == "__main__":
    args = harness.cli(Args)
    validate(args)
    run = harness.Run(args, memory={f"--buffer-size {args.buffer_size}": FrameReplay.bytes_needed(
        args.buffer_size, args.image_size)}, log_at_steps_done=True,  # events at S belong to the checkpoint at S
        learning_starts=args.learning_starts * (args.action_repeat or planet_action_repeat(args.env_id)),  # in frames
        probes_need_updates=True,
        networks={f"--hidden-dim {args.hidden_dim} --latent-dim {args.latent_dim} --hr-branches {args.hr_branches}":
                  lambda: [critic := Critic((3 * args.frame_stack, args.image_size, args.image_size), ACTIONS_MAX, args),
                           Actor(critic.encoder.out_dim, ACTIONS_MAX, args)]})
    device = run.device
    rng = np.random.default_rng(args.seed)  # random actions before learning starts, replay sampling, ReDo's batch
    probe_rng = np.random.default_rng([args.seed, 1])  # the probe batch's draw: never an RNG that drives the agent
    train_seed, eval_seed = run.env_seeds()
    env = make_env(args, train_seed)
    eval_env = make_env(args, eval_seed) if args.eval_every > 0 else None
    action_dim, obs_shape = env.action_dim, env.obs_shape
    critic = Critic(obs_shape, action_dim, args).to(device)
    target_critic = copy.deepcopy(critic).requires_grad_(False)
    actor = Actor(critic.encoder.out_dim, action_dim, args).to(device)
    log_alpha = torch.tensor(math.log(args.init_temperature), device=device, requires_grad=True)
    target_entropy = target_entropy_for(args, action_dim)
    if args.mitigation == "lnwd":
        critic_opt = torch.optim.AdamW(critic.parameters(), lr=args.q_lr, weight_decay=args.weight_decay)
    else:
        critic_opt = torch.optim.Adam(critic.parameters(), lr=args.q_lr)
    actor_opt = torch.optim.Adam(actor.parameters(), lr=args.policy_lr)
    alpha_opt = torch.optim.Adam([log_alpha], lr=args.alpha_lr)
    optimizers = {"critic_opt": critic_opt, "actor_opt": actor_opt, "alpha_opt": alpha_opt}
    networks = {"critic": critic, "target_critic": target_critic, "actor": actor}
    hl = HLGauss(args.hl_min, args.hl_max, args.hl_bins, args.hl_sigma, device) if args.mitigation == "hlgauss" \
        else None
    pruner = MagnitudePruner(prunable_weights(critic)) if args.mitigation == "prune" else None
    prune_targets = layer_sparsities(args.prune_distribution, [tuple(w.shape) for w in pruner.weights],
                                     args.prune_target) if pruner is not None else None
    rb = FrameReplay(args.buffer_size, (3, args.image_size, args.image_size), action_dim, args.frame_stack)
    run.describe(critic, actor)
    snapshots = harness.Snapshots(run, {"critic": critic}, build={"obs_shape": list(obs_shape),
                                                                  "action_dim": action_dim},
                                  probe_bytes=args.metrics_batch * (math.prod(obs_shape) + 4 * action_dim))
    print(f"{args.env_id}: action repeat {env.action_repeat}, camera {env.camera_id}, encoder {args.encoder}; actor on "
          f"the critic's encoder (gradients stopped); target entropy {target_entropy:g}; replay "
          f"{FrameReplay.bytes_needed(rb.capacity, args.image_size) / 1e9:.2f} GB")

    if args.env_id == "reacher-easy_masked" and args.reward_mask_steps and \
            args.total_timesteps // env.action_repeat - args.learning_starts + 1 <= args.reward_mask_steps:
        print(f"note: {args.total_timesteps} frames = {args.total_timesteps // env.action_repeat} agent steps: the "
              f"critic's reward stays masked the whole run (--reward-mask-steps {args.reward_mask_steps} gradient "
              f"steps)", flush=True)

    def training_state() -> dict:
        """Networks, temperature and optimisers (live references): the last good state, and a checkpoint's core."""
        return {**{k: m.state_dict() for k, m in networks.items()}, "log_alpha": log_alpha.detach(),
                **{k: opt.state_dict() for k, opt in optimizers.items()}}

    probe_batch, last_eval_step = None, -1  # the probe batch is fixed at the first probe: curves compare like with like
    agent_step = grad_step = 0  # actions taken (jaxrl's loop counter i) and critic updates done
    if run.checkpoint is not None:
        state = run.checkpoint["state"]
        for key, module in networks.items():
            module.load_state_dict(state[key])
        for key, opt in optimizers.items():  # own copies: on the CPU they would view the memory-mapped file
            opt.load_state_dict(copy.deepcopy(state[key]))
        with torch.no_grad():
            log_alpha.copy_(state["log_alpha"])
            for mask, saved in zip(pruner.masks if pruner is not None else [], state["prune_masks"] or []):
                mask.copy_(saved)
        run.restore_replay(rb.store)
        rb.pos, rb.episode_start = int(state["replay"]["pos"]), int(state["replay"]["episode_start"])
        if state["probe_batch"] is not None:
            probe_batch = tuple(t.to(device, copy=True) for t in state["probe_batch"])
        last_eval_step = state["last_eval_step"]
        # checkpoints older than the agent-step counters: every action then filled a whole repeat
        agent_step = int(state.get("agent_step", run.start_step // env.action_repeat))
        grad_step = int(state.get("grad_step", max(0, agent_step - max(args.learning_starts, 1) + 1)))
        if critic_layernorm(args):  # the gate is not in the state_dicts
            ln_on = bool(state.get("ln_on", args.ln_from_step == 0 or agent_step >= args.ln_from_step))
            critic.set_layernorm_(ln_on)
            target_critic.set_layernorm_(ln_on)
        harness.set_rng_state(state["rng"], rng, probe_rng)
        run.resumed(critic, target_critic, actor)
    use_compile, use_graphs = run.fast_paths()
    for opt in optimizers.values():  # after load_state_dict, which brings the saved run's setting
        harness.set_capturable_(opt, use_graphs)
    # every mitigation writes what the graphs read in place (reset zeroes Adam state, ReDo and pruning write into the
    # weights, moments and masks), so none of them needs the graphs off
    train_step = make_train_step(critic, target_critic, actor, log_alpha, critic_opt, actor_opt, alpha_opt, args,
                                 target_entropy, hl, pruner, use_compile)
    act = harness.compiled(make_act(critic, actor), use_compile)
    act_eval = harness.compiled(make_act(critic, actor, deterministic=True), use_compile)
    if use_graphs:
        train_step, act, act_eval = map(harness.cuda_graphed, (train_step, act, act_eval))
    sampler = BatchSampler(rb, args.batch_size, device)  # after the restore: a mirror starts from the restored frames
    if device.type == "cuda":
        where = "on the GPU" if sampler.on_device else "on the host (a GPU copy would take over half the free memory)"
        print(f"replay frames gathered {where}", flush=True)
    obs_in = harness.Staging((1, *obs_shape), torch.uint8, device) if device.type == "cuda" else None
    reward_scale_t = torch.ones((), device=device)  # the critic's reward scale, filled in place when it changes
    reward_scale = 1.0
    last_good = harness.LastGood()
    last_good.update(run.start_step, training_state())
    timed, timers = run.timed, run.timers  # wall seconds per phase (on CUDA, update time is launch time only)

    def seconds() -> dict:
        return {"physics": env.time_physics, "render": env.time_render, **timers}

    def policy_action(fn, obs) -> np.ndarray:
        """fn (act or act_eval) on one observation; the action's host copy is the one sync of an agent step."""
        if obs_in is None:  # CPU: the stack itself, no copy
            return fn(torch.from_numpy(obs)[None])[0].cpu().numpy()
        obs_in.wait()[0] = obs  # CUDA: through a pinned buffer, one non-blocking copy
        return fn(obs_in.upload())[0].cpu().numpy()

    def keep_if_finite(step: int, stats: dict) -> None:
        """Where the host syncs anyway (logging, probing, checkpointing): stop on a non-finite loss or parameter,
        else the current state becomes the last good one."""
        bad = [k for k, v in stats.items() if not math.isfinite(v)]
        if bad:
            run.stop_nonfinite(step, f"loss ({', '.join(bad)})", last_good)
        if not harness.all_finite([*critic.parameters(), *target_critic.parameters(), *actor.parameters(),
                                   log_alpha]).item():
            run.stop_nonfinite(step, "parameters", last_good)
        last_good.update(step, training_state())

    global_step = run.start_step
    ln_on = critic.layernorm_on()
    obs, frame = env.reset()  # a resumed run starts a fresh episode
    rb.add_first(frame)
    episode_return, episode_frames, stats = 0.0, 0, None
    while global_step < args.total_timesteps:
        prev_step = global_step
        agent_step += 1  # this step's number, as jaxrl's i
        # ALGO LOGIC: uniformly random actions until learning starts (agent steps, as jaxrl), then the policy's; one
        # frame stored per step
        if agent_step < args.learning_starts:
            action = rng.uniform(-1.0, 1.0, action_dim).astype(np.float32)
        else:
            action = policy_action(act, obs)
            if not np.isfinite(action).all():  # the host has the action anyway; MuJoCo would raise on it
                run.stop_nonfinite(global_step, "action", last_good)
        obs, frame, reward, terminated, truncated, frames = env.step(action)
        global_step += frames
        episode_return += reward
        episode_frames += frames
        rb.add(frame, action, reward, terminated)
        if args.ln_from_step and not ln_on and agent_step >= args.ln_from_step:  # paper Figs. 10, 16: before this
            critic.set_layernorm_(True)  # step's update (acting reads only the encoder, which has no such LayerNorm)
            target_critic.set_layernorm_(True)
            ln_on = True
            print(f"LayerNorm switched on at agent step {agent_step} (frame {global_step})", flush=True)
            run.log(global_step, {"charts/layernorm_on": 1.0})
        if terminated or truncated:
            run.episode(global_step, episode_return, episode_frames)
            episode_return, episode_frames = 0.0, 0
            obs, frame = env.reset()
            rb.add_first(frame)

        log_now = harness.due(global_step, args.log_every, prev_step)
        checkpoint_now = run.checkpoint_due(global_step, prev_step)
        if agent_step >= args.learning_starts:
            # ALGO LOGIC: one update per agent step, then the mitigation due at this agent step
            grad_step += 1
            with timed("replay"):
                batch = sampler.sample(rng)
            with timed("update"):
                scale = critic_reward_scale(args.env_id, grad_step, args.reward_mask_steps)
                if scale != reward_scale:
                    reward_scale = scale
                    reward_scale_t.fill_(scale)
                # with CUDA graphs, stats_t and grads_t are the graph's static outputs, overwritten by the next
                # update: they are read below, in this iteration, or never
                stats_t, grads_t = train_step(*batch, reward_scale_t)
            with timed("mitigation"):
                if args.mitigation == "reset" and harness.due(agent_step, args.reset_every):
                    reset_critic_heads_(critic, target_critic, Critic(obs_shape, action_dim, args).to(device),
                                        critic_opt)  # the LayerNorm gates are buffers outside the state_dict: kept
                    run.log(global_step, {"charts/critic_resets": agent_step // args.reset_every})
                if args.mitigation == "redo" and harness.due(agent_step, args.redo_every):
                    r = rb.sample(args.batch_size, rng)
                    n = redo_critic_(critic, actor, torch.as_tensor(r.obs, device=device),
                                     torch.as_tensor(r.actions, device=device), args.redo_tau, critic_opt, actor_opt)
                    run.log(global_step, {"charts/redo_recycled": n})
                if pruner is not None and harness.due(agent_step, args.prune_every):
                    schedule = cubic_sparsity(global_step, args.total_timesteps, 1.0, args.prune_start, args.prune_end)
                    pruner.update([target * schedule for target in prune_targets])
                    run.log(global_step, {"charts/critic_sparsity": pruner.sparsity()})

            probe_now = harness.due(global_step, args.metrics_every, prev_step)
            if probe_now and probe_batch is None and (stored := rb.num_transitions()) < args.metrics_batch:
                print(f"probe at step {global_step} skipped: the replay holds {stored} transitions, fewer than "
                      f"--metrics-batch {args.metrics_batch}", flush=True)
                probe_now = False
            if probe_now or log_now or checkpoint_now:
                stats = dict(zip(STAT_NAMES, stats_t.tolist()))  # the host sync of this update
                stats["charts/critic_reward_scale"] = reward_scale
                stats["charts/agent_steps"], stats["charts/gradient_steps"] = agent_step, grad_step
                keep_if_finite(global_step, stats)  # what is about to be probed, logged or saved is finite
            if probe_now:
                with timed("metrics"), run.probing():
                    if probe_batch is None:
                        p = rb.sample(args.metrics_batch, probe_rng)
                        probe_batch = (torch.as_tensor(p.obs, device=device), torch.as_tensor(p.actions, device=device))
                    run.log(global_step, probe_metrics(critic, *probe_batch, grads_t, args))
        if snapshots.due(global_step, prev_step):  # the critic (and LayerNorm switch) the probe above saw
            snapshots.save(global_step, None if probe_batch is None else dict(zip(("obs", "actions"), probe_batch)),
                           extra={"ln_on": ln_on})

        if stats is not None and log_now:  # SPS as a float, not CleanRL's int: DrQ on a CPU runs below 1 frame/s
            sps = (global_step - run.start_step) / max(time.time() - run.start_time, 1e-9)
            run.log(global_step, {**stats, "charts/SPS": sps})
        if eval_env is not None and harness.due(global_step, args.eval_every, prev_step):
            with timed("eval"):
                run.log(global_step, {"eval/episodic_return": evaluate(
                    eval_env, lambda o: policy_action(act_eval, o), args.eval_episodes)})
            last_eval_step = global_step
        if checkpoint_now:
            run.save(global_step, {**training_state(), "prune_masks": pruner.masks if pruner is not None else None,
                                   "replay": {"pos": rb.pos, "episode_start": rb.episode_start},
                                   "last_eval_step": last_eval_step, "probe_batch": probe_batch,
                                   "agent_step": agent_step, "grad_step": grad_step, "ln_on": ln_on,
                                   "rng": harness.rng_state(rng, probe_rng)}, replay=rb.store, filled=rb.filled)
        run.progress(global_step, **{k: round(v, 1) for k, v in seconds().items()})

    if eval_env is not None and last_eval_step != global_step:  # end-of-run evaluation
        with timed("eval"):
            ret = evaluate(eval_env, lambda o: policy_action(act_eval, o), args.eval_episodes)
        run.log(global_step, {"eval/episodic_return": ret})
        print(f"final eval/episodic_return={ret:.1f} ({args.eval_episodes} episodes)")
    if args.save_model:
        path = os.path.join(run.dir, f"{args.exp_name}.cleanrl_model")
        torch.save({"critic": critic.state_dict(), "actor": actor.state_dict(), "log_alpha": log_alpha.detach()}, path)
        print(f"model saved to {path}")
    phases = {**seconds(), "eval_physics": getattr(eval_env, "time_physics", 0.0),
              "eval_render": getattr(eval_env, "time_render", 0.0)}
    print("seconds: " + " ".join(f"{k}={v:.1f}" for k, v in phases.items()))
    run.finish(global_step, seconds=phases)
