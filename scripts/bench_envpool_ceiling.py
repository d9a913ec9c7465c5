"""SPS ceiling of pqn_atari_hr.py: envpool alone stepping uniformly random actions, with the same pool as the
script (num_envs training + num_test_envs test envs in one pool, same envpool settings and threads). SPS counts
training-env steps only, as pqn_atari_hr.py's charts/SPS does.

    python scripts/bench_envpool_ceiling.py --env-id Breakout-v5 --num-envs 128 --num-test-envs 8 --steps 200
"""
import argparse
import time

import envpool
import numpy as np

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--env-id", default="Breakout-v5")
p.add_argument("--num-envs", type=int, default=128)
p.add_argument("--num-test-envs", type=int, default=8)
p.add_argument("--envpool-threads", type=int, default=0, help="0 = envpool's default, as the script")
p.add_argument("--steps", type=int, default=200, help="pool steps to time (after 10 warm-up steps)")
p.add_argument("--seed", type=int, default=1)
a = p.parse_args()

n = a.num_envs + a.num_test_envs
envs = envpool.make(a.env_id, env_type="gymnasium", num_envs=n, seed=a.seed, episodic_life=True, reward_clip=True,
                    noop_max=30, frame_skip=4, repeat_action_probability=0.0, num_threads=a.envpool_threads)
rng = np.random.default_rng(a.seed)
envs.reset()
for _ in range(10):
    envs.step(rng.integers(0, envs.action_space.n, n))
start = time.time()
for _ in range(a.steps):
    envs.step(rng.integers(0, envs.action_space.n, n))
elapsed = time.time() - start
print(f"{a.env_id}: {n} envs ({a.num_envs} train + {a.num_test_envs} test), {a.steps} steps in {elapsed:.1f}s: "
      f"SPS (training-env steps, as charts/SPS) = {a.steps * a.num_envs / elapsed:.0f}, "
      f"all envs = {a.steps * n / elapsed:.0f}")
