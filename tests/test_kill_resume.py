"""Kill -9 anywhere, in every script: seeded trials SIGKILL a tiny run at random points (while a checkpoint or replay
chunk is being written, just after a checkpoint, between checkpoints, before the first one), with cadences drawn not to
line up (log, checkpoint, probe, evaluation, target/encoder intervals, learning start), restart it (--resume where a
checkpoint exists) until it finishes, and compare what it logged with an uninterrupted run of the same flags: every
scalar tag at the same steps (episodic tags: a resume starts fresh episodes), nothing twice, `finished` written, no
traceback, the same network snapshots (--snapshot-every: no gap, no duplicate). The kill launcher is
tests/kill_launcher.py, the trial in tests/conftest.py.

By default one trial per script with two kills; KILL_TRIALS=N runs N (KILL_KILLS=K kills each, KILL_SEED=S another
draw). A failure names its seed and trial: rerun with the same KILL_SEED (and KILL_TRIALS) to reproduce it."""
import os
import random

import pytest

from conftest import EPISODIC, compare_logged_steps, kill_resume_trial, kill_trials_wanted

SEED = int(os.environ.get("KILL_SEED", 0))
KILLS = int(os.environ.get("KILL_KILLS", 2))


def dqn(r):  # agent steps; LOG_EVERY is 100 (a constant); updates every train_frequency steps
    c = r.randint(130, 210)
    return ["--total-timesteps", 500, "--buffer-size", 1000, "--batch-size", 8, "--metrics-batch", 32,
            "--exploration-fraction", 1.0, "--learning-starts", r.randint(60, 230), "--checkpoint-every", c,
            "--metrics-every", r.randint(70, 230), "--target-network-frequency", r.randint(25, 70),
            "--train-frequency", r.choice((3, 4)), "--snapshot-every", r.randint(60, 200)], c


def ppo(r):  # 64 steps per iteration (2 envs x 32 steps): every cadence is crossed, never hit
    c = r.randint(100, 200)
    return ["--num-envs", 2, "--num-steps", 32, "--update-epochs", 1, "--total-timesteps", 512, "--metrics-batch", 32,
            "--checkpoint-every", c, "--metrics-every", r.randint(70, 200), "--snapshot-every", r.randint(60, 200)], c


def pqn(r):  # 32 steps per update (4 envs x 8 steps)
    c = r.randint(50, 130)
    return ["--env-id", "Breakout-v5", "--num-envs", 4, "--num-test-envs", 1, "--num-steps", 8, "--total-timesteps",
            320, "--num-minibatches", 4, "--metrics-batch", 16, "--max-episode-steps", 30, "--torch-threads", 1,
            "--checkpoint-every", c, "--metrics-every", r.randint(40, 130), "--redo", "--redo-interval",
            r.randint(2, 5), "--seed", 5, "--snapshot-every", r.randint(30, 130)], c


def drq(r):  # 8 frames per agent step (cartpole); learning starts and the mitigations count agent steps; an evaluation
    # (125 rendered steps) in a third of the draws
    c = r.randint(110, 180)
    mitigation = r.choice(("prune", "redo", "reset"))
    every = {"prune": "--prune-every", "redo": "--redo-every", "reset": "--reset-every"}[mitigation]
    return ["--env-id", "cartpole-swingup", "--batch-size", 8, "--buffer-size", 24, "--metrics-batch", 16,
            "--image-size", 48, "--total-timesteps", 400, "--seed", 3, "--learning-starts",
            r.randint(5, 20), "--log-every", r.randint(50, 130), "--checkpoint-every", c, "--metrics-every",
            r.randint(60, 170), "--eval-every", r.choice((0, 0, r.randint(150, 300))), "--eval-episodes", 1,
            "--mitigation", mitigation, every, r.randint(3, 9), "--ln-from-step", r.randint(20, 60),
            "--snapshot-every", r.randint(60, 170)], c


def simbav2(r):  # 2 frames per agent step (cartpole); state-based, so evaluation is cheap
    c = r.randint(130, 250)
    return ["--env-id", "cartpole-swingup", "--critic-hidden-dim", 16, "--actor-hidden-dim", 8, "--batch-size", 16,
            "--max-episode-steps", 100, "--metrics-batch", 32, "--seed", 3, "--total-timesteps", 500, "--buffer-size",
            250, "--hr", "--learning-starts", r.randint(50, 150), "--log-every", r.randint(60, 140),
            "--checkpoint-every", c, "--metrics-every", r.randint(70, 200), "--eval-every", r.randint(150, 350),
            "--eval-episodes", 1, "--snapshot-every", r.randint(60, 200)], c


def mrq(r):  # 2 frames per agent step; encoder and targets every --target-update-freq value updates (up to most of
    # the run's: a resume lands far from the next)
    c = r.randint(50, 90)
    return ["--env-id", "cartpole-swingup", "--batch-size", 8, "--episode-frames", 40, "--zs-dim", 32, "--za-dim",
            16, "--zsa-dim", 32, "--enc-hdim", 32, "--value-hdim", 32, "--policy-hdim", 32, "--seed", 3,
            "--image-size", 36, "--buffer-size", 60, "--metrics-batch", 8, "--total-timesteps", 200,
            "--target-update-freq", r.randint(10, 60), "--learning-starts", r.randint(30, 70), "--log-every",
            r.randint(25, 60), "--checkpoint-every", c, "--metrics-every", r.randint(40, 90), "--eval-every",
            r.choice((0, r.randint(70, 130))), "--eval-episodes", 1, "--snapshot-every", r.randint(30, 90)], c


SCRIPTS = {  # script -> (draw of flags and --checkpoint-every, tags that depend on where episodes end)
    "dqn_atari_hr.py": (dqn, EPISODIC),
    "ppo_atari_hr.py": (ppo, EPISODIC),
    "pqn_atari_hr.py": (pqn, EPISODIC + ("charts/human_normalized", "eval/episodic_return", "eval/episodic_length",
                                         "eval/human_normalized")),  # test-env episodes end where they end
    "drq_dmc_dominance.py": (drq, EPISODIC),
    "simbav2_dmc_hr.py": (simbav2, EPISODIC),
    "mrq_dmc_hr.py": (mrq, EPISODIC),
}


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_killed_anywhere_and_resumed_logs_what_an_uninterrupted_run_logs(script, tmp_path):
    draw, episodic = SCRIPTS[script]
    for trial in range(kill_trials_wanted(1)):
        rng = random.Random(f"{script}:{SEED}:{trial}")
        flags, checkpoint_every = draw(rng)
        where = f"KILL_SEED={SEED} trial {trial}: {script} {' '.join(map(str, flags))}"
        try:
            kills = kill_resume_trial(script, flags, tmp_path, f"t{trial}", rng, checkpoint_every, KILLS,
                                      episodic=episodic)
        except AssertionError as e:
            raise AssertionError(f"{where}\n{e}") from None
        print(f"{where}\n  kills: " + ("; ".join(kills) or "none (the run finished first)"))


def test_the_comparison_catches_a_gap_a_duplicate_and_an_extra_step():
    """The check itself can fail: a purge one step off (an event lost or written twice) or a cadence restarted at the
    resume step is reported; episodic tags only for duplicates."""
    ref = {"losses/td_loss": [(100, 1.0), (200, 1.0), (300, 1.0)], "charts/episodic_return": [(37, 1.0)]}
    assert compare_logged_steps(ref, ref) == []
    assert compare_logged_steps(ref, {**ref, "charts/episodic_return": [(12, 0.0), (80, 1.0)]}) == []
    gap = compare_logged_steps(ref, {**ref, "losses/td_loss": [(100, 1.0), (300, 1.0)]})
    assert gap == ["losses/td_loss: missing at steps [200]"]
    twice = compare_logged_steps(ref, {**ref, "losses/td_loss": [(100, 1.0), (200, 1.0), (200, 1.0), (300, 1.0)]})
    assert twice == ["losses/td_loss: logged twice at steps [200]"]
    extra = compare_logged_steps(ref, {**ref, "losses/td_loss": [(100, 1.0), (200, 1.0), (250, 1.0), (300, 1.0)]})
    assert extra == ["losses/td_loss: logged at steps the uninterrupted run did not log [250]"]
    assert compare_logged_steps(ref, {"charts/episodic_return": [(37, 1.0)]})[0].startswith("losses/td_loss: missing")
    assert compare_logged_steps(ref, {**ref, "charts/episodic_return": [(5, 1.0), (5, 2.0)]}) == [
        "charts/episodic_return: logged twice at steps [5]"]
