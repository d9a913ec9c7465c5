"""MR.Q with the Hadamard representation on visual DeepMind Control (DMC-Visual).

Reproduces the MR.Q column of the HR v2 paper (papers/hadamard_representation_scaffolding_v2.txt, Sec. 5.2, Table 2,
App. D.4): MR.Q (Fujimoto et al. 2025, "Towards general-purpose model-free reinforcement learning") as its official
code runs it on DMC-Visual, with `--hr` replacing encoder layers by Hadamard representations and `--widen` the
parameter-matched wider baseline. Facts and defaults: facebookresearch/MRQ @8a44a7d (MRQ.py, models.py, buffer.py,
env_preprocessing.py); the paper gives no MR.Q hyperparameter of its own ("default configurations without touching
anything").

Environment: dm_control suite task rendered from pixels (MUJOCO_GL=egl unless set), 84x84 RGB, camera 0 (quadruped 2),
3 frames stacked (the first frame repeated at reset), action repeat 2 on every task with the rewards summed, episodes
truncated at 1000 frames (500 agent steps), never terminated. Step unit: environment frames (physics control steps),
as the DMC literature counts them: --total-timesteps 1000000 is MR.Q's 500k agent steps; --learning-starts,
--eval-every, --log-every, --metrics-every and --checkpoint-every use it too.

Agent (one value + policy update per agent step; every --target-update-freq updates: hard copy of every target net,
reward scale = mean |r| over the replay, then --target-update-freq encoder updates back to back):
  encoder  x/255 - 0.5 -> 4 convs 32@3x3, strides 2,2,2,1, ELU -> Linear(1568 -> 512) -> LayerNorm -> ELU = zs;
           za = ELU(Linear(A -> 256)); zsa = MLP(768 -> 512 -> 512 -> 512), LayerNorm + ELU on the hidden layers;
           model head Linear(512 -> 1 + 512 + 65) = (done, next zs, reward logits). Every LayerNorm is affine-free.
  model    5-step latent rollout from zs(s_0), the predicted (linear) zs fed back; per step MSE to the target
           encoder's zs(s_i) + 0.1 two-hot cross-entropy of the reward (65 bins at symexp(linspace(-10, 10))) + 0.1 done
           MSE (only once the replay holds a termination); steps after a termination are masked.
  value    two Q nets zsa -> 512 -> 512 -> 512 (LayerNorm + ELU) -> 1; target (sum_{i<3} gamma^i r_i + gamma^3 min
           Qbar(zsbar', a') * target_reward_scale) / reward_scale, a' = clip(pibar(zsbar') + clip(N(0, 0.2), +-0.3));
           Huber loss on both, gradient-norm clip 20. RL features come from the encoder without gradient.
  policy   zs -> 512 -> 512 -> A, LayerNorm + ReLU, tanh; loss -mean(Q1, Q2) + 1e-5 mean(pre_tanh^2); exploration
           noise N(0, 0.2); uniformly random actions before --learning-starts.
  replay   one frame stored per agent step (stacks rebuilt by index); LAP prioritised sampling, priority
           max(|Q_i - target|, 1)^0.4, new transitions at the running maximum, no importance weights, encoder batches
           drawn by priority too; rollout starts within 5 steps of a truncation are never drawn.
  AdamW    encoder lr 1e-4, value and policy lr 3e-4, weight decay 1e-4 each; batch 256; gamma 0.99; random shift
           augmentation (replicate pad 4, crop) drawn independently per stack.
Where this port differs, and why (all identical on DMC, where nothing terminates): the 3-step return masks the rewards
after a termination (the official code multiplies each reward by its own not-done flag); the reward scale averages
over stored transitions only; rewards outside the two-hot support are clipped to it; the replay ring holds at most
the slots the run can fill (its size is capped at total agent steps + one reset frame per episode).

Network variants:
  --hr             every layer at the --hr-layers sites becomes act(N(W1 x + b1)) * act(N(W2 x + b2)) (N the layer's
                   own affine-free LayerNorm, or none for convs; act its own ELU). Sites: zs (the Linear 1568 -> 512
                   projection, default: the encoder's one dense hidden layer, the analogue of the Nature CNN's last
                   hidden layer HR takes in DQN; +803k parameters), convs (the 4 convs, +30k), zsa (the 2 hidden
                   layers of the zsa MLP, +656k); comma-separated or `all`.
  --widen          the parameter-matched baseline: the same sites made wider instead (zs -> zs_dim, convs -> channels,
                   zsa -> hidden width), each to the width whose added parameters (encoder + value + policy, the
                   networks the agent trains) come closest to what HR adds there. Both counts are printed.

Probes (every --metrics-every frames, a fixed batch of --metrics-batch un-augmented replay states and their actions):
representation/<layer>/{dormant_kde,dormant_score,srank,max_score,saturated,zombie} for conv1..conv4 (encoder), zs
(the encoder's state embedding), zsa_fc1, zsa_fc2 (the zsa MLP's hidden layers), fc1, fc2, latent (Q1's hidden
layers; latent feeds its head) and representation/hidden_bias, live_contribution of Q1's latent. The paper's claim to
test: MR.Q's dormant rates are already negligible and HR raises the effective rank.

Cost: an encoder update at batch 256 takes ~8.5 s on one CPU core and rendering ~50 ms per agent step, so the recipe
needs a GPU; on CUDA the frames are mirrored in GPU memory (as the official buffer keeps them; each new frame goes up
through a pinned buffer, non-blocking) and a batch is drawn, gathered and augmented on the device, so that an agent
step waits on the GPU only to read its action back (logging, probes and checkpoints sync too). A renderer that cannot
start (EGL, OSMesa) ends the run with one line naming what to try. Checkpoints (harness.py): networks, optimisers,
scales, priorities, probe batch, RNG states; the frames go to runs/NAME/replay/ in chunks and a checkpoint rewrites only
the chunks written since the previous one. A resumed run starts fresh episodes. A non-finite loss, parameter or
action stops the run.

Usage:
  python mrq_dmc_hr.py --env-id dog-run                      # the baseline
  python mrq_dmc_hr.py --env-id dog-run --hr                 # HR on the zs projection
  python mrq_dmc_hr.py --env-id dog-run --widen              # zs_dim widened to HR's parameter count
  python mrq_dmc_hr.py --env-id walker-walk --hr --total-timesteps 20000 --batch-size 32 --buffer-size 20000 \\
      --learning-starts 2000 --no-cuda                       # a CPU try-out
"""
import collections
import copy
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

suite = harness.dm_control_suite(pixels=True)  # MUJOCO_GL=egl (headless) unless set; one line if it cannot start

# DMC-Visual (MR.Q's 28 tasks); the paper's 7 hard ones are the dog and humanoid tasks
DMC_VISUAL = ("acrobot-swingup", "ball_in_cup-catch", "cartpole-balance", "cartpole-balance_sparse", "cartpole-swingup",
              "cartpole-swingup_sparse", "cheetah-run", "dog-run", "dog-stand", "dog-trot", "dog-walk", "finger-spin",
              "finger-turn_easy", "finger-turn_hard", "fish-swim", "hopper-hop", "hopper-stand", "humanoid-run",
              "humanoid-stand", "humanoid-walk", "pendulum-swingup", "quadruped-run", "quadruped-walk", "reacher-easy",
              "reacher-hard", "walker-run", "walker-stand", "walker-walk")
DMC_VISUAL_HARD = ("dog-run", "dog-stand", "dog-trot", "dog-walk", "humanoid-run", "humanoid-stand", "humanoid-walk")
HR_SITES = ("convs", "zs", "zsa")
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
    workspace :4096:8 (harness.deterministic); the LAP sampler's prefix sum by float64 matmuls (torch.cumsum has no
    deterministic CUDA kernel)"""
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
    """save encoder, value and policy to runs/{run_name}/ at the end"""
    run_name: Optional[str] = None
    """run directory runs/NAME; None means {env_id}__{exp_name}__{seed}__{unix_time}"""

    # Environment (MR.Q's DMC-Visual preprocessing)
    env_id: str = "walker-walk"
    """dm_control domain-task; MR.Q's DMC-Visual suite is the 28 tasks of DMC_VISUAL"""
    total_timesteps: int = 1_000_000
    """total environment frames (action-repeated physics steps): MR.Q's 500k agent steps"""
    action_repeat: int = 2
    """physics steps per agent step (MR.Q: 2 on every task), rewards summed"""
    frame_stack: int = 3
    """number of stacked RGB frames"""
    image_size: int = 84
    """rendered frame height and width"""
    episode_frames: int = 1000
    """frames per episode before truncation (dm_control's limit, MR.Q's 500 agent steps)"""

    # Algorithm (MR.Q, official defaults)
    buffer_size: int = 1_000_000
    """replay capacity in agent steps (one uint8 frame each); capped at what the run can fill"""
    batch_size: int = 256
    """batch size of the encoder and of the value/policy updates"""
    learning_starts: int = 20_000
    """frames of uniformly random actions before learning starts (MR.Q: 10k transitions)"""
    gamma: float = 0.99
    """discount factor"""
    target_update_freq: int = 250
    """updates (agent steps) between hard target copies; each copy is followed by as many encoder updates"""
    exploration_noise: float = 0.2
    """std of the Gaussian noise on the policy's actions while training"""
    target_policy_noise: float = 0.2
    """std of the target policy smoothing noise"""
    noise_clip: float = 0.3
    """clip of the target policy smoothing noise"""
    dyn_weight: float = 1.0
    """weight of the latent dynamics MSE in the encoder loss"""
    reward_weight: float = 0.1
    """weight of the two-hot reward cross-entropy in the encoder loss"""
    done_weight: float = 0.1
    """weight of the done MSE in the encoder loss (on once the replay holds a termination)"""
    lap_alpha: float = 0.4
    """LAP priority exponent: priority = max(|TD|, --min-priority)^alpha"""
    min_priority: float = 1.0
    """LAP priority floor (also the first max priority)"""
    enc_horizon: int = 5
    """steps of the latent model rollout"""
    q_horizon: int = 3
    """steps of the multi-step value target"""
    zs_dim: int = 512
    """width of the state embedding zs (with --widen at the zs site: the width to widen from)"""
    za_dim: int = 256
    """width of the action embedding za"""
    zsa_dim: int = 512
    """width of the state-action embedding zsa"""
    enc_hdim: int = 512
    """hidden width of the zsa MLP (with --widen at the zsa site: the width to widen from)"""
    conv_channels: int = 32
    """channels of the 4 convs (with --widen at the convs site: the count to widen from)"""
    enc_lr: float = 1e-4
    """encoder learning rate (AdamW)"""
    enc_wd: float = 1e-4
    """encoder weight decay (AdamW)"""
    value_hdim: int = 512
    """hidden width of the value nets"""
    value_lr: float = 3e-4
    """value learning rate (AdamW)"""
    value_wd: float = 1e-4
    """value weight decay (AdamW)"""
    value_grad_clip: float = 20.0
    """gradient-norm clip of the value update"""
    policy_hdim: int = 512
    """hidden width of the policy"""
    policy_lr: float = 3e-4
    """policy learning rate (AdamW)"""
    policy_wd: float = 1e-4
    """policy weight decay (AdamW)"""
    pre_activ_weight: float = 1e-5
    """weight of the policy's pre-tanh penalty mean(pre^2)"""
    num_bins: int = 65
    """bins of the two-hot reward model"""
    bin_lower: float = -10.0
    """lowest bin before symexp"""
    bin_upper: float = 10.0
    """highest bin before symexp"""
    image_pad: int = 4
    """random-shift augmentation: replicate-pad by this many pixels, then crop back (0 = off)"""

    # Evaluation and logging
    eval_every: int = 10_000
    """frames between evaluations of the noise-free policy (MR.Q: 5k agent steps; 0 = off; also at the end)"""
    eval_episodes: int = 10
    """episodes per evaluation"""
    log_every: int = 1000
    """frames between loss/statistics scalars (charts/SPS included)"""

    # Network variant
    hr: bool = False
    """Hadamard representation at the --hr-layers sites of the encoder"""
    hr_layers: str = "zs"
    """comma-separated encoder sites of --hr / --widen: zs (the 1568->512 projection), convs, zsa; or all"""
    hr_branches: int = 2
    """number of multiplied branches with --hr"""
    widen: bool = False
    """the parameter-matched baseline: the --hr-layers sites widened to HR's parameter count instead"""

    # Metrics
    metrics_every: int = 10_000
    """frames between representation probes (0 = off)"""
    metrics_batch: int = 256
    """un-augmented replay states in the (fixed) probe batch, drawn at the first probe with enough stored"""
    redo_tau: float = 0.1
    """ReDo dormancy threshold on the activation score (dormant_score)"""
    kde_threshold: float = 20.0
    """KDE-peak density above which a neuron counts as dormant (dormant_kde)"""
    kde_noise_std: float = 1e-3
    """std of the Gaussian noise added before the KDE dormancy test"""
    srank_delta: float = 0.01
    """effective rank: the fewest singular values holding 1 - delta of their sum (Kumar et al. 2021; HR papers)"""
    snapshot_every: int = 0
    """frames between encoder and value snapshots in runs/NAME/snapshots/ (0 = off): weights only, for
    scripts/probe.py"""

    # Checkpointing
    checkpoint_every: int = 100_000
    """frames between checkpoints (0 = off); each rewrites only the replay chunks written since the previous one"""
    resume: bool = False
    """continue runs/NAME (needs --run-name) from runs/NAME/checkpoint.pt; the other flags must match its args.json"""

    # Speed
    compile: Literal["auto", "on", "off"] = "auto"
    """torch.compile the encoder loss, the value and policy losses and the acting step (auto: on with CUDA)"""
    cudagraphs: Literal["auto", "on", "off"] = "auto"
    """CUDA graphs are not implemented in this script: auto means off, on is refused"""


def hr_sites(args: Args) -> tuple:
    return HR_SITES if args.hr_layers == "all" else tuple(s.strip() for s in args.hr_layers.split(","))


def conv_out_size(size: int) -> int:
    for stride in (2, 2, 2, 1):
        size = (size - 3) // stride + 1
    return size


def resolve_defaults(args: Args) -> Args:
    """No CUDA-graph path here: --cudagraphs auto resolves to off (recorded in args.json; `on` is refused)."""
    if args.cudagraphs == "auto":
        args.cudagraphs = "off"
    return args


def validate(args: Args) -> None:
    """MR.Q's own checks (harness.Run does the generic ones): one line on stderr naming the flag, exit 1."""
    harness.at_least(args, {"total_timesteps": 1})  # before the budget bounds what follows
    harness.at_most(args, {"action_repeat": args.total_timesteps}, "--total-timesteps frames: one agent step")
    harness.at_most(args, {"hr_branches": harness.MAX_LAYERS}, harness.LAYER_COUNT)
    harness.at_most(args, {"target_update_freq": harness.MAX_PASSES}, "each target update runs this many encoder "
                    "updates at once; " + harness.PASSES)
    domain, _, task = args.env_id.partition("-")
    if (domain, task) not in suite.ALL_TASKS:
        harness.fail(f"--env-id {args.env_id!r} is not a dm_control task (expected domain-task, e.g. walker-walk; "
                     f"DMC-Visual: {len(DMC_VISUAL)} tasks, e.g. dog-run, humanoid-walk)")
    if args.capture_video:
        harness.fail("--capture-video is not supported by mrq_dmc_hr.py")
    if args.cudagraphs == "on":
        harness.fail("--cudagraphs on: mrq_dmc_hr.py has no CUDA-graph path; use --cudagraphs auto or off")
    harness.at_least(args, {"action_repeat": 1, "frame_stack": 1, "episode_frames": 1, "buffer_size": 1,
                            "batch_size": 1, "learning_starts": 0, "target_update_freq": 1, "enc_horizon": 1,
                            "q_horizon": 1, "zs_dim": 1, "za_dim": 1, "zsa_dim": 1, "enc_hdim": 1,
                            "conv_channels": 1, "value_hdim": 1, "policy_hdim": 1, "num_bins": 2, "image_pad": 0,
                            "eval_every": 0, "eval_episodes": 1, "log_every": 1, "hr_branches": 1})
    if conv_out_size(args.image_size) < 1:
        harness.fail(f"--image-size must be >= 31 (the 4 convs need it), got {args.image_size}")
    harness.at_most(args, {"image_pad": args.image_size}, "--image-size: a shift past the whole frame")
    harness.finite(args, ["enc_lr", "value_lr", "policy_lr", "value_grad_clip", "min_priority"])
    harness.finite(args, ["enc_wd", "value_wd", "policy_wd", "exploration_noise", "target_policy_noise", "noise_clip",
                          "dyn_weight", "reward_weight", "done_weight", "lap_alpha", "pre_activ_weight"],
                   positive=False)
    harness.unit_interval(args, ["gamma"])
    if not (math.isfinite(args.bin_lower) and math.isfinite(args.bin_upper) and args.bin_lower < args.bin_upper):
        harness.fail(f"--bin-lower must be below --bin-upper (both finite), got {args.bin_lower}, {args.bin_upper}")
    sites = hr_sites(args)
    if not sites or any(s not in HR_SITES for s in sites) or len(set(sites)) != len(sites):
        harness.fail(f"--hr-layers must be comma-separated sites from {', '.join(HR_SITES)} (or all), got "
                     f"{args.hr_layers!r}")
    if args.hr and args.widen:
        harness.fail("--hr and --widen exclude each other (--widen is the baseline matched to --hr's parameters)")
    if args.hr and args.hr_branches < 2:
        harness.fail(f"--hr-branches must be >= 2 with --hr, got {args.hr_branches}")
    horizon = max(args.enc_horizon, args.q_horizon)
    if args.buffer_size < args.frame_stack + horizon + 2:
        harness.fail(f"--buffer-size must be >= {args.frame_stack + horizon + 2} (a stack and a rollout), got "
                     f"{args.buffer_size}")
    if args.learning_starts < args.action_repeat * (horizon + 1):
        harness.fail(f"--learning-starts must be >= {args.action_repeat * (horizon + 1)} frames (one {horizon}-step "
                     f"rollout stored), got {args.learning_starts}")
    if args.episode_frames < args.action_repeat * (horizon + 1):
        harness.fail(f"--episode-frames must be >= {args.action_repeat * (horizon + 1)} (one {horizon}-step rollout "
                     f"per episode), got {args.episode_frames}")
    if args.metrics_every and args.metrics_batch > args.buffer_size:
        harness.fail(f"--metrics-batch {args.metrics_batch} exceeds --buffer-size {args.buffer_size}")


def replay_capacity(args: Args) -> int:
    """Ring slots: --buffer-size, capped at what the run can fill (an agent step each, plus a reset frame per
    episode): 1M frames at action repeat 2 fill 501,001 slots, so a ring of 1M would be half empty."""
    steps = -(-args.total_timesteps // args.action_repeat)
    episodes = -(-args.total_timesteps // args.episode_frames)
    return min(args.buffer_size, steps + episodes + 1)


def check_gpu_memory(args: Args) -> None:
    """On CUDA the frames are mirrored in GPU memory: refuse before anything is allocated when they cannot fit."""
    if not (args.cuda and torch.cuda.is_available()):
        return
    need = FrameReplay.bytes_needed(replay_capacity(args), args.image_size)
    free, _ = torch.cuda.mem_get_info()
    if need > 0.9 * free:
        harness.fail(f"--buffer-size {args.buffer_size} needs {need / 1e9:.2f} GB of GPU memory for the frame mirror "
                     f"but only {free / 1e9:.2f} GB is free")


# ---------------------------------------------------------------------------------------------------------------
# Environment


class DMCPixels:
    """A dm_control task seen through pixels, MR.Q's DMC-Visual preprocessing: reset() -> (obs, frame), step(a) ->
    (obs, frame, reward, terminated, truncated, frames). obs is the (frame_stack*3, H, W) uint8 stack, oldest frame
    first, filled with the first frame at reset. Reward is summed over the action repeat; only the last physics step
    is rendered. The episode is truncated after `episode_frames` frames (or at dm_control's own limit)."""

    def __init__(self, env_id, seed, image_size=84, frame_stack=3, action_repeat=2, episode_frames=1000):
        domain, _, task = env_id.partition("-")
        self.env = suite.load(domain, task, task_kwargs={"random": seed}, visualize_reward=False)
        self.action_repeat, self.episode_frames, self.image_size = action_repeat, episode_frames, image_size
        self.camera_id = 2 if domain == "quadruped" else 0
        spec = self.env.action_spec()
        self.action_low, self.action_high = spec.minimum.astype(np.float32), spec.maximum.astype(np.float32)
        self.action_dim = spec.shape[0]
        self.frames = collections.deque(maxlen=frame_stack)
        self.obs_shape = (3 * frame_stack, image_size, image_size)
        self.time_physics = self.time_render = 0.0  # seconds, for the speed report
        self.drawn = False  # a first frame rendered
        self.elapsed = 0

    def render(self):
        t = time.perf_counter()
        draw = functools.partial(self.env.physics.render, self.image_size, self.image_size, camera_id=self.camera_id)
        # the renderer's context starts at the first frame: one that cannot draw ends the run with one line
        frame = draw() if self.drawn else harness.first_frame(draw)
        self.drawn = True
        self.time_render += time.perf_counter() - t
        return np.ascontiguousarray(frame.transpose(2, 0, 1))

    def reset(self):
        t = time.perf_counter()
        self.env.reset()
        self.time_physics += time.perf_counter() - t
        self.elapsed = 0
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
        self.elapsed += frames
        frame = self.render()
        self.frames.append(frame)
        terminated = bool(ts.last() and ts.discount == 0.0)
        truncated = not terminated and (ts.last() or self.elapsed >= self.episode_frames)
        return np.concatenate(self.frames), frame, reward, terminated, truncated, frames


def make_env(args: Args, seed: int) -> DMCPixels:
    return DMCPixels(args.env_id, seed, args.image_size, args.frame_stack, args.action_repeat, args.episode_frames)



def evaluate(env: DMCPixels, policy, episodes: int) -> float:
    """Mean return of `episodes` episodes of policy(obs) -> action (the noise-free policy)."""
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
# Replay: one uint8 frame per agent step, stacks rebuilt by index, LAP priorities


def prefix_sum(x: torch.Tensor, block: int = 256) -> torch.Tensor:
    """Inclusive prefix sum of a 1-D tensor in float64 by matmuls: torch.cumsum has no deterministic CUDA kernel for
    floats (its scan adds in an order that can change from run to run), while matmuls are deterministic under
    --torch-deterministic. Each block of `block` entries is summed by a matmul with an upper-triangular matrix of
    ones, then offset by the prefix of the block totals (the same way, recursively). Nondecreasing, and flat across
    zero entries (a zero-weight slot is never drawn), whatever order the matmul adds in, given x >= 0."""
    n = x.shape[0]
    m = -(-n // block)
    xb = F.pad(x.to(torch.float64), (0, m * block - n)).view(m, block)
    tri = torch.ones(block, block, dtype=torch.float64, device=x.device).triu_()
    out = xb @ tri  # out[i, j] = sum_{k <= j} xb[i, k]
    if m > 1:
        out = out + F.pad(prefix_sum(out[:, -1], block)[:-1], (1, 0))[:, None]
    out = out.flatten()[:n]
    # rounding may differ between a block's end and the next block's offset: zero entries repeat the last positive
    # prefix, and the max-scan (exact in any order) keeps the whole sequence nondecreasing
    return torch.cummax(torch.where(x > 0, out, 0.0), 0).values


class Batch(NamedTuple):
    """Rollouts starting at `slots`: obs (B, S, stack*3, H, W) uint8, the stacks s_0..s_h (S = h + 1) or s_0 and s_h
    (S = 2); actions (B, h, A), rewards (B, h), not_done (B, h) float of transitions 0..h-1; slots (B,) int64."""
    obs: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    not_done: torch.Tensor
    slots: torch.Tensor


class FrameReplay:
    """Ring of single frames. Slot k holds frame f_k and the (action, reward, terminated) that led to it from f_{k-1};
    an episode's reset frame is a slot of its own marked `first`. Positions are absolute counters, slot = position %
    capacity. A rollout of h steps starting at position p reads transitions p .. p+h-1 and the stacks ending at
    p-1 .. p+h-1, frames before the episode start replaced by its first frame (as the env's reset fills its stack).

    Valid starts (`valid`, as MR.Q's sampling mask): p once position p + horizon is stored in the same episode (so the
    last `horizon` transitions of a truncated episode never start a rollout), or every start within `horizon` of a
    termination (their losses are masked after it). A start whose stack reaches an overwritten frame is invalidated.
    LAP: `priority` per slot, new slots at the running maximum; sampling is proportional to priority * valid.

    The host arrays are the truth (`store` checkpoints them incrementally through harness.ChunkStore); on CUDA they
    are mirrored on the device and a batch is drawn, gathered and stacked there. On CPU the "device" tensors are views
    of the host arrays."""

    def __init__(self, capacity, frame_shape, action_dim, frame_stack, horizon, device="cpu",
                 chunk: int = REPLAY_CHUNK, min_priority: float = 1.0, mirror: Optional[bool] = None):
        self.capacity, self.stack, self.horizon = capacity, frame_stack, horizon
        self.device = torch.device(device)
        self.frames = np.zeros((capacity, *frame_shape), np.uint8)
        self.actions = np.zeros((capacity, action_dim), np.float32)
        self.rewards = np.zeros(capacity, np.float32)
        self.terminated = np.zeros(capacity, np.bool_)
        self.first = np.zeros(capacity, np.bool_)
        self.start = np.zeros(capacity, np.int64)  # absolute position of the slot's episode start
        names = ("frames", "actions", "rewards", "terminated", "first", "start")
        self.store = harness.ChunkStore({k: getattr(self, k) for k in names}, chunk)
        self.mirror = self.device.type != "cpu" if mirror is None else mirror  # (mirror=True on CPU: tests)
        host = {k: torch.from_numpy(getattr(self, k)) for k in ("frames", "actions", "rewards", "terminated", "start")}
        self.dev = {k: torch.zeros(t.shape, dtype=t.dtype, device=self.device) for k, t in host.items()} \
            if self.mirror else host
        # a new slot reaches the mirror through pinned rows (harness.Staging): a copy from pageable memory would
        # synchronise the stream at every agent step
        self.rows = {k: harness.Staging((1, *t.shape[1:]), t.dtype, self.device) for k, t in self.dev.items()} \
            if self.mirror else None
        self.stack_index = {}  # (horizon, all_stacks) -> the stack-building index of batch(), made once on the device
        self.priority = torch.zeros(capacity, device=self.device)
        self.valid = torch.zeros(capacity, dtype=torch.bool, device=self.device)
        self.max_priority = torch.tensor(float(min_priority), device=self.device)
        self.pos = 0
        self.episode_start = 0
        self.env_terminates = False  # any termination stored yet (turns the done loss on)

    @staticmethod
    def bytes_needed(capacity: int, image_size: int) -> int:
        return capacity * (3 * image_size ** 2 + 64)  # a frame, and ~64 B of action, reward, flags, start, priority

    @property
    def filled(self) -> int:
        return min(self.pos, self.capacity)

    # -- writing ---------------------------------------------------------------------------------------------------
    def add_first(self, frame):
        self.episode_start = self.pos
        self._write(frame, 0.0, 0.0, False, True)

    def add(self, frame, action, reward, terminated):
        """Flags are set by fill_ / index_fill_: `t[i] = True` on a CUDA tensor copies a host scalar and syncs."""
        p = self.pos
        self._write(frame, action, reward, terminated, False)
        if p - self.horizon > self.episode_start:  # start p - horizon now has its whole rollout stored
            self.valid[(p - self.horizon) % self.capacity].fill_(True)
        if terminated:  # the last starts, whose rollouts run into the termination, are valid too
            self.env_terminates = True
            lo = max(self.episode_start + 1, p - self.horizon + 1)
            self.valid.index_fill_(0, torch.arange(lo, p + 1, device=self.device) % self.capacity, True)

    def _write(self, frame, action, reward, terminated, first):
        i = self.pos % self.capacity
        self.store.touch(i)
        self.frames[i] = frame
        self.actions[i] = action
        self.rewards[i] = reward
        self.terminated[i] = terminated
        self.first[i] = first
        self.start[i] = self.episode_start
        if self.mirror:
            for k, t in self.dev.items():
                self.rows[k].wait()[0] = getattr(self, k)[i]  # waits for the row's previous copy, if still in flight
                t[i:i + 1].copy_(self.rows[k].upload())  # device to device, queued after the upload
        self.priority[i] = self.max_priority
        self.valid[i].fill_(False)
        if self.pos >= self.capacity:  # position pos - capacity is gone: starts whose stack reached it go too
            gone = self.pos - self.capacity
            self.valid.index_fill_(0, torch.arange(gone + 1, gone + self.stack + 1, device=self.device) % self.capacity,
                                   False)
        self.pos += 1

    def upload(self) -> None:
        """After a restore into the host arrays: refresh the device mirror."""
        if self.mirror:
            for k, t in self.dev.items():
                t.copy_(torch.from_numpy(getattr(self, k)))

    # -- reading ---------------------------------------------------------------------------------------------------
    def reward_scale(self, eps: float = 1e-8) -> float:
        """Mean |reward| over the stored transitions (MR.Q's reward scale)."""
        n = self.filled
        r = np.abs(self.rewards[:n][~self.first[:n]])
        return max(float(r.mean()) if r.size else 0.0, eps)

    def sample_slots(self, batch_size: int, deterministic: Optional[bool] = None) -> torch.Tensor:
        """Start slots drawn proportionally to priority over the valid starts (LAP), on the device; torch's RNG.
        The prefix sum is torch.cumsum, or prefix_sum where deterministic (None: on CUDA under torch's deterministic
        algorithms, where cumsum would only warn and stay nondeterministic)."""
        weights = self.priority * self.valid
        if deterministic is None:
            deterministic = weights.is_cuda and torch.are_deterministic_algorithms_enabled()
        csum = prefix_sum(weights) if deterministic else torch.cumsum(weights, 0, dtype=torch.float64)
        u = torch.rand(batch_size, device=self.device, dtype=torch.float64) * csum[-1]
        return torch.searchsorted(csum, u, right=True).clamp_(max=self.capacity - 1)

    def batch(self, slots: torch.Tensor, horizon: int, all_stacks: bool) -> Batch:
        """The rollouts starting at `slots` (see the class docstring); positions past the stored ones (only after a
        termination, where every loss is masked) read the newest stored slot."""
        cap, stack, last = self.capacity, self.stack, self.pos - 1
        p = last - (last - slots) % cap  # the absolute position each slot holds
        window = p[:, None] + torch.arange(-stack, horizon, device=self.device)[None, :]  # frames p-stack..p+h-1
        window = torch.maximum(window, self.dev["start"][slots][:, None]).clamp_(max=last) % cap
        frames = self.dev["frames"][window]  # (B, stack + h, 3, H, W)
        obs = frames[:, self._stack_index(horizon, all_stacks)].flatten(2, 3)  # (B, S, stack * 3, H, W)
        trans = (p[:, None] + torch.arange(horizon, device=self.device)[None, :]).clamp_(max=last) % cap
        not_done = 1.0 - self.dev["terminated"][trans].float()
        return Batch(obs, self.dev["actions"][trans], self.dev["rewards"][trans], not_done, slots)

    def _stack_index(self, horizon: int, all_stacks: bool) -> torch.Tensor:
        """(S, stack) window offsets of the stacks ending at p-1 .. p+h-1 (or p-1 and p+h-1); built once per shape,
        so no batch waits on a host-to-device copy of it."""
        key = (horizon, all_stacks)
        if key not in self.stack_index:
            firsts = torch.arange(horizon + 1) if all_stacks else torch.tensor([0, horizon])
            self.stack_index[key] = (firsts[:, None] + torch.arange(self.stack)[None, :]).to(self.device)
        return self.stack_index[key]

    def sample(self, batch_size: int, horizon: int, all_stacks: bool) -> Batch:
        return self.batch(self.sample_slots(batch_size), horizon, all_stacks)

    def update_priority(self, slots: torch.Tensor, priority: torch.Tensor) -> None:
        self.priority[slots] = priority
        torch.maximum(self.max_priority, priority.max(), out=self.max_priority)

    def state(self) -> dict:
        """What a checkpoint needs beyond the chunked arrays: counters, and the priorities and valid starts (small,
        but every update touches them anywhere in the ring, so they are not chunked)."""
        return {"pos": self.pos, "episode_start": self.episode_start, "env_terminates": self.env_terminates,
                "priority": self.priority.cpu().clone(), "valid": self.valid.cpu().clone(),
                "max_priority": float(self.max_priority)}

    def load_state(self, state: dict) -> None:
        self.pos, self.episode_start = int(state["pos"]), int(state["episode_start"])
        self.env_terminates = bool(state["env_terminates"])
        self.priority.copy_(state["priority"])
        self.valid.copy_(state["valid"])
        self.max_priority.fill_(state["max_priority"])
        self.upload()


def random_shift(x: torch.Tensor, pad: int) -> torch.Tensor:
    """DrQ/MR.Q augmentation on a batch of images (N, C, H, W): replicate-pad by `pad`, then crop back at an
    independent random integer offset per image; one gather with clamped indices (no padded copy), uint8 too."""
    if pad == 0:
        return x
    n, c, h, w = x.shape
    oy = torch.randint(0, 2 * pad + 1, (n,), device=x.device)
    ox = torch.randint(0, 2 * pad + 1, (n,), device=x.device)
    rows = (oy[:, None] + torch.arange(-pad, h - pad, device=x.device)).clamp(0, h - 1)[:, None, :, None]
    cols = (ox[:, None] + torch.arange(-pad, w - pad, device=x.device)).clamp(0, w - 1)[:, None, None, :]
    idx_n = torch.arange(n, device=x.device)[:, None, None, None]
    idx_c = torch.arange(c, device=x.device)[None, :, None, None]
    return x[idx_n, idx_c, rows, cols]


def augment(obs: torch.Tensor, pad: int) -> torch.Tensor:
    """Every stack of a (B, S, C, H, W) batch shifted independently."""
    return random_shift(obs.flatten(0, 1), pad).view(obs.shape)


# ---------------------------------------------------------------------------------------------------------------
# Networks (MR.Q models.py: xavier-uniform init with ReLU gain, zero biases, affine-free LayerNorm)


def init_(module: nn.Module) -> nn.Module:
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(m.weight, nn.init.calculate_gain("relu"))
            nn.init.zeros_(m.bias)
    return module


class HiddenLayer(nn.Module):
    """K = branches copies of `make()` (a Linear or Conv2d) -> optional affine-free LayerNorm -> act, multiplied:
    the Hadamard representation act(N(W1 x)) * act(N(W2 x)) when K >= 2, a plain layer when K = 1."""

    def __init__(self, make, branches: int = 1, layernorm: bool = False, act=F.elu):
        super().__init__()
        self.branches = nn.ModuleList([init_(make()) for _ in range(branches)])
        self.layernorm, self.act = layernorm, act

    def forward(self, x, probe=False):
        pres = [b(x) for b in self.branches]
        if self.layernorm:
            pres = [F.layer_norm(p, p.shape[-1:]) for p in pres]
        y = self.act(pres[0])
        for p in pres[1:]:
            y = y * self.act(p)
        return (y, torch.cat(pres, dim=1)) if probe else y


class Widths(NamedTuple):
    conv: int
    zs: int
    enc_hdim: int


SITE_WIDTH = {"convs": "conv", "zs": "zs", "zsa": "enc_hdim"}  # the width --widen grows at each site


class Encoder(nn.Module):
    """zs(obs) = the state embedding; zsa(zs, a) = the state-action embedding; model_all(zs, a) = (done, next zs,
    reward logits). HR (branches at `hr`'s sites) on the convs, the zs projection and/or the zsa hidden layers."""

    def __init__(self, in_channels, image_size, action_dim, args: Args, widths: Widths, hr=(), branches=2):
        super().__init__()
        k = {site: branches if site in hr else 1 for site in HR_SITES}
        convs, c = [], in_channels
        for stride in (2, 2, 2, 1):
            convs.append(HiddenLayer(functools.partial(nn.Conv2d, c, widths.conv, 3, stride), k["convs"]))
            c = widths.conv
        self.convs = nn.ModuleList(convs)
        self.zs_dim, flat = widths.zs, widths.conv * conv_out_size(image_size) ** 2
        self.zs_layer = HiddenLayer(functools.partial(nn.Linear, flat, widths.zs), k["zs"], layernorm=True)
        self.za = init_(nn.Linear(action_dim, args.za_dim))
        self.zsa_fc1 = HiddenLayer(functools.partial(nn.Linear, widths.zs + args.za_dim, widths.enc_hdim), k["zsa"],
                                   layernorm=True)
        self.zsa_fc2 = HiddenLayer(functools.partial(nn.Linear, widths.enc_hdim, widths.enc_hdim), k["zsa"],
                                   layernorm=True)
        self.zsa_out = init_(nn.Linear(widths.enc_hdim, args.zsa_dim))
        self.model = init_(nn.Linear(args.zsa_dim, 1 + widths.zs + args.num_bins))

    def zs(self, obs, probe=False):
        x = obs.float() / 255.0 - 0.5
        if not probe:
            for conv in self.convs:
                x = conv(x)
            return self.zs_layer(x.flatten(1))
        acts = {}
        for i, conv in enumerate(self.convs):
            x, pre = conv(x, probe=True)
            acts[f"conv{i + 1}"] = (x, pre)
        zs, pre = self.zs_layer(x.flatten(1), probe=True)
        return zs, {**acts, "zs": (zs, pre)}

    def zsa(self, zs, action, probe=False):
        h0 = torch.cat([zs, F.elu(self.za(action))], dim=1)
        if not probe:
            return self.zsa_out(self.zsa_fc2(self.zsa_fc1(h0)))
        h1, p1 = self.zsa_fc1(h0, probe=True)
        h2, p2 = self.zsa_fc2(h1, probe=True)
        return self.zsa_out(h2), {"zsa_fc1": (h1, p1), "zsa_fc2": (h2, p2)}

    def model_all(self, zs, action):
        out = self.model(self.zsa(zs, action))
        return out[:, 0], out[:, 1:1 + self.zs_dim], out[:, 1 + self.zs_dim:]


class QNet(nn.Module):
    """zsa -> fc1 -> fc2 -> latent (LayerNorm + ELU each) -> head (MR.Q's ValueNetwork)."""

    def __init__(self, in_dim, hdim):
        super().__init__()
        self.fc1 = HiddenLayer(functools.partial(nn.Linear, in_dim, hdim), layernorm=True)
        self.fc2 = HiddenLayer(functools.partial(nn.Linear, hdim, hdim), layernorm=True)
        self.latent = HiddenLayer(functools.partial(nn.Linear, hdim, hdim), layernorm=True)
        self.head = init_(nn.Linear(hdim, 1))

    def forward(self, x, probe=False):
        if not probe:
            return self.head(self.latent(self.fc2(self.fc1(x))))
        h1, p1 = self.fc1(x, probe=True)
        h2, p2 = self.fc2(h1, probe=True)
        h3, p3 = self.latent(h2, probe=True)
        return self.head(h3), {"fc1": (h1, p1), "fc2": (h2, p2), "latent": (h3, p3)}


class Value(nn.Module):
    def __init__(self, zsa_dim, hdim):
        super().__init__()
        self.q1, self.q2 = QNet(zsa_dim, hdim), QNet(zsa_dim, hdim)

    def forward(self, zsa):
        return torch.cat([self.q1(zsa), self.q2(zsa)], dim=1)


class Policy(nn.Module):
    """zs -> fc1 -> fc2 (LayerNorm + ReLU) -> pre-activation -> tanh (MR.Q's continuous Policy)."""

    def __init__(self, zs_dim, action_dim, hdim):
        super().__init__()
        self.fc1 = HiddenLayer(functools.partial(nn.Linear, zs_dim, hdim), layernorm=True, act=F.relu)
        self.fc2 = HiddenLayer(functools.partial(nn.Linear, hdim, hdim), layernorm=True, act=F.relu)
        self.head = init_(nn.Linear(hdim, action_dim))

    def forward(self, zs):
        pre = self.head(self.fc2(self.fc1(zs)))
        return torch.tanh(pre), pre

    def act(self, zs):
        return self(zs)[0]


def build_networks(args: Args, obs_shape, action_dim, widths: Widths, hr=()) -> tuple:
    """(encoder, value, policy): the networks the agent trains (their targets are copies)."""
    branches = args.hr_branches
    encoder = Encoder(obs_shape[0], obs_shape[1], action_dim, args, widths, hr, branches)
    return encoder, Value(args.zsa_dim, args.value_hdim), Policy(widths.zs, action_dim, args.policy_hdim)


def parameter_count(args: Args, obs_shape, action_dim, widths: Widths, hr=()) -> int:
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        nets = build_networks(args, obs_shape, action_dim, widths, hr)
    return sum(p.numel() for net in nets for p in net.parameters())


def matched_widths(args: Args, obs_shape, action_dim) -> Widths:
    """--widen: the --hr-layers sites widened one after the other, each to the width that brings the parameter count
    (encoder + value + policy) closest to that of HR at the sites so far (ties to the narrower)."""
    base = Widths(args.conv_channels, args.zs_dim, args.enc_hdim)
    sites, out = hr_sites(args), base
    for i, site in enumerate(sites):
        n_out = parameter_count(args, obs_shape, action_dim, out)
        target = parameter_count(args, obs_shape, action_dim, base, sites[:i + 1]) - n_out
        key = SITE_WIDTH[site]

        def added(w):
            return parameter_count(args, obs_shape, action_dim, out._replace(**{key: w})) - n_out

        lo, hi = getattr(out, key), 2 * getattr(out, key) * args.hr_branches + 1
        while lo < hi:  # smallest width adding >= target (added() grows with the width)
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if added(mid) < target else (lo, mid)
        best = lo - 1 if abs(added(lo - 1) - target) <= abs(added(lo) - target) else lo
        out = out._replace(**{key: best})
    return out


class TwoHot:
    """MR.Q's two-hot reward encoding over `bins` = symexp(linspace(lower, upper, n)): a scalar x (clipped to the
    support) puts weight 1 - w on the bin b_k below it and w = (x - b_k) / (b_{k+1} - b_k) on the next; `inverse` is
    the softmax expectation over the bins."""

    def __init__(self, lower, upper, n, device="cpu"):
        b = torch.linspace(lower, upper, n, device=device)
        self.bins = torch.sign(b) * (torch.exp(b.abs()) - 1.0)

    def encode(self, x):
        x = x.clamp(self.bins[0], self.bins[-1])
        k = (torch.searchsorted(self.bins, x, right=True) - 1).clamp(0, len(self.bins) - 2)
        lo, hi = self.bins[k], self.bins[k + 1]
        w = (x - lo) / (hi - lo)
        out = torch.zeros(*x.shape, len(self.bins), device=x.device)
        out.scatter_(-1, k[..., None], (1.0 - w)[..., None])
        return out.scatter_add_(-1, (k + 1)[..., None], w[..., None])

    def inverse(self, logits):
        return (torch.softmax(logits, dim=-1) * self.bins).sum(-1)

    def cross_entropy(self, logits, x):
        return -(self.encode(x) * F.log_softmax(logits, dim=-1)).sum(-1)


# ---------------------------------------------------------------------------------------------------------------
# Probe


@torch.no_grad()
def probe_metrics(encoder: Encoder, value: Value, obs: torch.Tensor, actions: torch.Tensor, args: Args) -> dict:
    """Every representation/* scalar of one probe through common.probe_scalars: the encoder's convs and zs on the
    stacks, its zsa hidden layers and Q1's hidden layers on (zs, the stored action); hidden_bias on Q1's latent."""
    zs, layers = encoder.zs(obs, probe=True)
    zsa, zsa_layers = encoder.zsa(zs, actions, probe=True)
    _, q_layers = value.q1(zsa, probe=True)
    return common.probe_scalars({**layers, **zsa_layers, **q_layers}, value.q1.head.weight, tau=args.redo_tau,
                                kde_threshold=args.kde_threshold, kde_noise_std=args.kde_noise_std, seed=args.seed,
                                delta=args.srank_delta)


def probe_snapshot(args: Args, snapshot: dict, probe: dict, device) -> dict:
    """scripts/probe.py: probe_metrics of one snapshot (harness.Snapshots) in an encoder and value network built as the
    run built them (the widths and HR sites it used)."""
    build = snapshot["build"]
    encoder, value, _ = build_networks(args, tuple(build["obs_shape"]), build["action_dim"], Widths(*build["widths"]),
                                       tuple(build["hr"]))
    encoder, value = encoder.to(device), value.to(device)
    encoder.load_state_dict(snapshot["networks"]["encoder"])
    value.load_state_dict(snapshot["networks"]["value"])
    return probe_metrics(encoder, value, probe["obs"].to(device), probe["actions"].to(device), args)


# ---------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: losses and updates

ENC_STATS = ("losses/encoder_loss", "losses/dynamics_loss", "losses/reward_loss", "losses/done_loss")
RL_STATS = ("losses/value_loss", "losses/policy_loss", "losses/q_values", "losses/q_target")


def make_act(encoder: Encoder, policy: Policy, noise: float = 0.0):
    """act(obs) -> (1, A): the policy on one uint8 stack (1, stack*3, H, W), plus N(0, noise) clipped to [-1, 1]."""
    @torch.no_grad()
    def act(obs_u8: torch.Tensor) -> torch.Tensor:
        a = policy.act(encoder.zs(obs_u8))
        return (a + noise * torch.randn_like(a)).clamp(-1.0, 1.0) if noise > 0 else a

    return act


def multi_step_return(rewards, not_done, gamma):
    """(sum_i gamma^i r_i [no termination before i], prod_i not_done_i) over the horizon of (B, h) tensors."""
    alive = torch.cumprod(torch.cat([torch.ones_like(not_done[:, :1]), not_done[:, :-1]], dim=1), dim=1)
    discounts = gamma ** torch.arange(rewards.shape[1], device=rewards.device, dtype=rewards.dtype)
    return (rewards * alive * discounts).sum(1), not_done.prod(1)


def lap_priority(q, target, min_priority, alpha):
    """LAP (Fujimoto et al. 2020) as MR.Q uses it: max over the Q heads of |Q_i - target|, floored, to the alpha."""
    return (q - target[:, None]).abs().max(dim=1).values.clamp(min=min_priority).pow(alpha)


def encoder_loss(encoder, encoder_target, two_hot, args, obs, actions, rewards, not_done, env_terminates):
    """MR.Q's model loss over an h-step rollout of augmented stacks obs (B, h + 1, C, H, W): returns (loss, stats)."""
    b, horizon = actions.shape[:2]
    with torch.no_grad():
        target_zs = encoder_target.zs(obs[:, 1:].flatten(0, 1)).view(b, horizon, -1)
    zs = encoder.zs(obs[:, 0])
    alive = torch.ones_like(rewards[:, 0])  # 0 after a termination: those steps are masked
    dyn = rew = done = 0.0
    for i in range(horizon):
        done_pred, zs, reward_logits = encoder.model_all(zs, actions[:, i])
        dyn = dyn + ((zs - target_zs[:, i]) ** 2 * alive[:, None]).mean()
        rew = rew + (two_hot.cross_entropy(reward_logits, rewards[:, i]) * alive).mean()
        done = done + ((done_pred - (1.0 - not_done[:, i])) ** 2 * alive).mean()
        alive = alive * not_done[:, i]
    loss = args.dyn_weight * dyn + args.reward_weight * rew + args.done_weight * env_terminates * done
    return loss, torch.stack([loss, dyn, rew, done]).detach()


def value_loss(encoder, encoder_target, policy_target, value, value_target, args, obs, next_obs, actions, rewards,
               not_done, scales):
    """Huber loss of both Q heads to the scaled h-step target; scales = (reward_scale, target_reward_scale).
    Returns (loss, Q (B, 2), target (B,), zs of obs for the policy)."""
    with torch.no_grad():
        ret, nd = multi_step_return(rewards, not_done, args.gamma)
        next_zs = encoder_target.zs(next_obs)
        noise = (torch.randn_like(actions[:, 0]) * args.target_policy_noise).clamp(-args.noise_clip, args.noise_clip)
        next_a = (policy_target.act(next_zs) + noise).clamp(-1.0, 1.0)
        q_next = value_target(encoder_target.zsa(next_zs, next_a)).min(dim=1).values
        target = (ret + nd * args.gamma ** rewards.shape[1] * q_next * scales[1]) / scales[0]
        zs = encoder.zs(obs)
        zsa = encoder.zsa(zs, actions[:, 0])
    q = value(zsa)
    return F.smooth_l1_loss(q, target[:, None].expand(-1, 2)), q, target, zs


def policy_loss(encoder, value, policy, args, zs):
    action, pre = policy(zs)
    return -value(encoder.zsa(zs, action)).mean() + args.pre_activ_weight * pre.pow(2).mean()


def make_train_step(encoder, encoder_target, value, value_target, policy, policy_target, enc_opt, value_opt,
                    policy_opt, two_hot, args: Args, compile_losses: bool = False):
    """(encoder_step, rl_step). encoder_step(batch, env_terminates) -> stats: one model update on an augmented
    rollout batch. rl_step(batch, scales) -> (stats, priority): the value update, then the policy update (its loss
    reaches only the policy's parameters), then the batch's LAP priorities. All device tensors, no host sync."""
    enc_loss_fn = harness.compiled(functools.partial(encoder_loss, encoder, encoder_target, two_hot, args),
                                   compile_losses)
    value_loss_fn = harness.compiled(functools.partial(value_loss, encoder, encoder_target, policy_target, value,
                                                       value_target, args), compile_losses)
    policy_loss_fn = harness.compiled(functools.partial(policy_loss, encoder, value, policy, args), compile_losses)
    policy_params = list(policy.parameters())

    def encoder_step(batch: Batch, env_terminates: torch.Tensor) -> torch.Tensor:
        obs = augment(batch.obs, args.image_pad)
        loss, stats = enc_loss_fn(obs, batch.actions, batch.rewards, batch.not_done, env_terminates)
        enc_opt.zero_grad(set_to_none=True)
        loss.backward()
        enc_opt.step()
        return stats

    def rl_step(batch: Batch, scales: torch.Tensor):
        obs = augment(batch.obs, args.image_pad)
        v_loss, q, target, zs = value_loss_fn(obs[:, 0], obs[:, 1], batch.actions, batch.rewards, batch.not_done,
                                              scales)
        value_opt.zero_grad(set_to_none=True)
        v_loss.backward()
        nn.utils.clip_grad_norm_(value.parameters(), args.value_grad_clip)
        value_opt.step()
        pi_loss = policy_loss_fn(zs)
        policy_opt.zero_grad(set_to_none=True)
        pi_loss.backward(inputs=policy_params)
        policy_opt.step()
        priority = lap_priority(q.detach(), target, args.min_priority, args.lap_alpha)
        return torch.stack([v_loss.detach(), pi_loss.detach(), q.detach().mean(), target.mean()]), priority

    return encoder_step, rl_step


if __name__ == "__main__":
    args = harness.cli(Args)
    validate(args)
    check_gpu_memory(args)
    capacity = replay_capacity(args)
    run = harness.Run(args, resolve=resolve_defaults, memory={f"--buffer-size {args.buffer_size}": (
        FrameReplay.bytes_needed(capacity, args.image_size)),  # one sampled batch: its stacks over the horizon, float32
        f"--batch-size {args.batch_size}": args.batch_size * (args.enc_horizon + 1) * 3 * args.frame_stack
        * args.image_size ** 2 * 4}, log_at_steps_done=True, probes_need_updates=True,
        networks={f"--enc-hdim {args.enc_hdim} --value-hdim {args.value_hdim} --policy-hdim {args.policy_hdim} "
                  f"--zs-dim {args.zs_dim} --hr-branches {args.hr_branches}": lambda: build_networks(
                      args, (3 * args.frame_stack, args.image_size, args.image_size), ACTIONS_MAX, matched_widths(
                          args, (3 * args.frame_stack, args.image_size, args.image_size), ACTIONS_MAX) if args.widen
                      else Widths(args.conv_channels, args.zs_dim, args.enc_hdim), hr_sites(args) if args.hr else ())})
    device = run.device
    rng = np.random.default_rng(args.seed)  # uniformly random actions before learning starts
    probe_rng = np.random.default_rng([args.seed, 1])  # the probe batch's draw: never an RNG that drives the agent
    train_seed, eval_seed = run.env_seeds(eval_offset=100)  # MR.Q's eval seed: seed + 100
    env = make_env(args, train_seed)
    eval_env = make_env(args, eval_seed) if args.eval_every > 0 else None
    action_dim, obs_shape = env.action_dim, env.obs_shape
    sites = hr_sites(args)
    base = Widths(args.conv_channels, args.zs_dim, args.enc_hdim)
    wide = matched_widths(args, obs_shape, action_dim)
    widths = wide if args.widen else base
    encoder, value, policy = (net.to(device) for net in build_networks(args, obs_shape, action_dim, widths,
                                                                        sites if args.hr else ()))
    encoder_target, value_target, policy_target = (copy.deepcopy(n).requires_grad_(False)
                                                   for n in (encoder, value, policy))
    enc_opt = torch.optim.AdamW(encoder.parameters(), lr=args.enc_lr, weight_decay=args.enc_wd)
    value_opt = torch.optim.AdamW(value.parameters(), lr=args.value_lr, weight_decay=args.value_wd)
    policy_opt = torch.optim.AdamW(policy.parameters(), lr=args.policy_lr, weight_decay=args.policy_wd)
    networks = {"encoder": encoder, "encoder_target": encoder_target, "value": value, "value_target": value_target,
                "policy": policy, "policy_target": policy_target}
    optimizers = {"enc_opt": enc_opt, "value_opt": value_opt, "policy_opt": policy_opt}
    two_hot = TwoHot(args.bin_lower, args.bin_upper, args.num_bins, device)
    horizon = max(args.enc_horizon, args.q_horizon)
    rb = FrameReplay(capacity, (3, args.image_size, args.image_size), action_dim, args.frame_stack, horizon, device,
                     min_priority=args.min_priority)
    run.describe(encoder, value, policy)
    snapshots = harness.Snapshots(run, {"encoder": encoder, "value": value}, build={
        "obs_shape": list(obs_shape), "action_dim": action_dim, "widths": list(widths),
        "hr": list(sites if args.hr else ())}, probe_bytes=args.metrics_batch * (math.prod(obs_shape) + 4 * action_dim))
    n_base = parameter_count(args, obs_shape, action_dim, base)
    n_hr = parameter_count(args, obs_shape, action_dim, base, sites)
    n_widen = parameter_count(args, obs_shape, action_dim, wide)
    print(f"parameter arithmetic at sites {','.join(sites)} (encoder + value + policy): baseline {n_base:,}; --hr "
          f"{n_hr:,} (+{n_hr - n_base:,}); --widen {n_widen:,} (+{n_widen - n_base:,}; "
          f"{wide})")
    print(f"{args.env_id}: action repeat {args.action_repeat}, camera {env.camera_id}; replay {capacity:,} slots, "
          f"{FrameReplay.bytes_needed(capacity, args.image_size) / 1e9:.2f} GB"
          + (" (mirrored on the GPU)" if rb.mirror else ""))

    def training_state() -> dict:
        """Networks and optimisers (live references): the last good state, and a checkpoint's core."""
        return {**{k: m.state_dict() for k, m in networks.items()},
                **{k: opt.state_dict() for k, opt in optimizers.items()}}

    scales = torch.tensor([1.0, 0.0], device=device)  # (reward_scale, target_reward_scale), MR.Q's initial values
    env_terminates = torch.zeros((), device=device)
    training_steps, probe_batch, last_eval_step = 0, None, -1
    enc_stats_t = rl_stats_t = stats = None  # the latest updates' losses, read at every log, probe and checkpoint
    if run.checkpoint is not None:
        state = run.checkpoint["state"]
        for key, module in networks.items():
            module.load_state_dict(state[key])
        for key, opt in optimizers.items():  # own copies: on the CPU they would view the memory-mapped file
            opt.load_state_dict(copy.deepcopy(state[key]))
        run.restore_replay(rb.store)
        rb.load_state(state["replay"])
        scales.copy_(state["scales"])
        training_steps, last_eval_step = state["training_steps"], state["last_eval_step"]
        # the encoder's losses of its last update: the next one may be up to --target-update-freq steps away (a
        # checkpoint older than this key has none: those losses are logged again from the next encoder update)
        enc_stats_t = None if state.get("enc_stats") is None else state["enc_stats"].to(device, copy=True)
        if state["probe_batch"] is not None:
            probe_batch = tuple(t.to(device, copy=True) for t in state["probe_batch"])
        harness.set_rng_state(state["rng"], rng, probe_rng)
        run.resumed(encoder, value, policy)
    env_terminates.fill_(float(rb.env_terminates))
    use_compile, _ = run.fast_paths()
    encoder_step, rl_step = make_train_step(encoder, encoder_target, value, value_target, policy, policy_target,
                                            enc_opt, value_opt, policy_opt, two_hot, args, use_compile)
    act = harness.compiled(make_act(encoder, policy, args.exploration_noise), use_compile)
    act_eval = harness.compiled(make_act(encoder, policy), use_compile)
    obs_in = harness.Staging((1, *obs_shape), torch.uint8, device) if device.type == "cuda" else None
    last_good = harness.LastGood()
    last_good.update(run.start_step, training_state())
    timed, timers = run.timed, run.timers  # wall seconds per phase (on CUDA, update time is launch time only)

    def seconds() -> dict:
        return {"physics": env.time_physics, "render": env.time_render, **timers}

    def policy_action(fn, obs) -> np.ndarray:
        """fn (act or act_eval) on one observation; the action's host copy is the one sync of an agent step."""
        if obs_in is None:
            return fn(torch.from_numpy(obs)[None])[0].cpu().numpy()
        obs_in.wait()[0] = obs
        return fn(obs_in.upload())[0].cpu().numpy()

    def keep_if_finite(step: int, stats: dict) -> None:
        """Where the host syncs anyway (logging, probing, checkpointing): stop on a non-finite loss or parameter,
        else the current state becomes the last good one."""
        bad = [k for k, v in stats.items() if not math.isfinite(v)]
        if bad:
            run.stop_nonfinite(step, f"loss ({', '.join(bad)})", last_good)
        if not harness.all_finite([p for m in networks.values() for p in m.parameters()]).item():
            run.stop_nonfinite(step, "parameters", last_good)
        last_good.update(step, training_state())

    global_step = run.start_step
    obs, frame = env.reset()  # a resumed run starts a fresh episode
    rb.add_first(frame)
    episode_return, episode_frames = 0.0, 0
    while global_step < args.total_timesteps:
        prev_step = global_step
        # ALGO LOGIC: uniformly random actions until learning starts, then the policy's with Gaussian noise
        if global_step < args.learning_starts:
            action = rng.uniform(-1.0, 1.0, action_dim).astype(np.float32)
        else:
            action = policy_action(act, obs)
            if not np.isfinite(action).all():  # the host has the action anyway; MuJoCo would raise on it
                run.stop_nonfinite(global_step, "action", last_good)
        obs, frame, reward, terminated, truncated, frames = env.step(action)
        global_step += frames
        episode_return += reward
        episode_frames += frames
        with timed("replay"):
            rb.add(frame, action, reward, terminated)
        if terminated:
            env_terminates.fill_(1.0)  # the done loss is on from now on
        if terminated or truncated:
            run.episode(global_step, episode_return, episode_frames)
            episode_return, episode_frames = 0.0, 0
            obs, frame = env.reset()
            rb.add_first(frame)

        if global_step >= args.learning_starts:
            # ALGO LOGIC: every target_update_freq updates, hard target copies, new reward scales, then as many encoder
            # updates; one value + policy update per agent step
            if training_steps % args.target_update_freq == 0:
                for key in ("encoder", "value", "policy"):
                    networks[f"{key}_target"].load_state_dict(networks[key].state_dict())
                scales[1] = scales[0]  # the target takes the old scale (a device copy)
                scales[0].fill_(rb.reward_scale())  # fill_, not `scales[0] = x`: that copies a host scalar and syncs
                for _ in range(args.target_update_freq):
                    with timed("replay"):
                        batch = rb.sample(args.batch_size, args.enc_horizon, all_stacks=True)
                    with timed("update"):
                        enc_stats_t = encoder_step(batch, env_terminates)
            training_steps += 1
            with timed("replay"):
                batch = rb.sample(args.batch_size, args.q_horizon, all_stacks=False)
            with timed("update"):
                rl_stats_t, priority = rl_step(batch, scales)
                rb.update_priority(batch.slots, priority)

        log_now = harness.due(global_step, args.log_every, prev_step)
        checkpoint_now = run.checkpoint_due(global_step, prev_step)
        probe_now = harness.due(global_step, args.metrics_every, prev_step) and rl_stats_t is not None
        if probe_now and probe_batch is None and (stored := int(rb.valid.sum())) < args.metrics_batch:
            print(f"probe at step {global_step} skipped: the replay holds {stored} rollout starts, fewer than "
                  f"--metrics-batch {args.metrics_batch}", flush=True)
            probe_now = False
        if rl_stats_t is not None and (probe_now or log_now or checkpoint_now):
            stats = {**dict(zip(ENC_STATS, enc_stats_t.tolist() if enc_stats_t is not None else [])),
                     **dict(zip(RL_STATS, rl_stats_t.tolist())),
                     "charts/reward_scale": float(scales[0]), "charts/max_priority": float(rb.max_priority)}
            keep_if_finite(global_step, stats)  # what is about to be probed, logged or saved is finite
        if probe_now:
            with timed("metrics"), run.probing():
                if probe_batch is None:
                    starts = torch.nonzero(rb.valid).flatten().cpu().numpy()
                    slots = torch.as_tensor(probe_rng.choice(starts, args.metrics_batch, replace=False), device=device)
                    b = rb.batch(slots, 1, all_stacks=False)
                    probe_batch = (b.obs[:, 0].clone(), b.actions[:, 0].clone())
                run.log(global_step, probe_metrics(encoder, value, *probe_batch, args))
        if snapshots.due(global_step, prev_step):  # the networks the probe above saw
            snapshots.save(global_step, None if probe_batch is None else dict(zip(("obs", "actions"), probe_batch)))
        if stats is not None and log_now:  # SPS as a float: MR.Q on a CPU runs near 1 frame/s
            sps = (global_step - run.start_step) / max(time.time() - run.start_time, 1e-9)
            run.log(global_step, {**stats, "charts/SPS": sps, "charts/training_steps": training_steps})
        if eval_env is not None and harness.due(global_step, args.eval_every, prev_step):
            with timed("eval"):
                run.log(global_step, {"eval/episodic_return": evaluate(
                    eval_env, lambda o: policy_action(act_eval, o), args.eval_episodes)})
            last_eval_step = global_step
        if checkpoint_now:
            run.save(global_step, {**training_state(), "scales": scales.cpu(), "training_steps": training_steps,
                                   "replay": rb.state(), "last_eval_step": last_eval_step, "probe_batch": probe_batch,
                                   "enc_stats": None if enc_stats_t is None else enc_stats_t.cpu(),
                                   "rng": harness.rng_state(rng, probe_rng)}, replay=rb.store, filled=rb.filled)
        run.progress(global_step, **{k: round(v, 1) for k, v in seconds().items()})

    if eval_env is not None and last_eval_step != global_step:  # end-of-run evaluation
        with timed("eval"):
            ret = evaluate(eval_env, lambda o: policy_action(act_eval, o), args.eval_episodes)
        run.log(global_step, {"eval/episodic_return": ret})
        print(f"final eval/episodic_return={ret:.1f} ({args.eval_episodes} episodes)")
    if args.save_model:
        path = os.path.join(run.dir, f"{args.exp_name}.cleanrl_model")
        torch.save({k: m.state_dict() for k, m in networks.items()}, path)
        print(f"model saved to {path}")
    phases = {**seconds(), "eval_physics": getattr(eval_env, "time_physics", 0.0),
              "eval_render": getattr(eval_env, "time_render", 0.0)}
    print("seconds: " + " ".join(f"{k}={v:.1f}" for k, v in phases.items()))
    run.finish(global_step, seconds=phases)
