"""Run a training script as `python <script> <args>` would, and SIGKILL it at the point KILL_PLAN (JSON) names:

    {"at": "step", "after": D}          at the first loop iteration whose step is >= the process's start step + D
                                        (between checkpoints, or before the first one on a fresh start)
    {"at": "write", "save": N, "write": J, "how": "partial" | "before_rename"}
                                        during this process's N-th checkpoint, at its J-th file write (replay chunks
                                        first, checkpoint.pt last; a J past the last write means checkpoint.pt): the
                                        temporary file half-written, or fully written but not yet renamed over the old
    {"at": "after_save", "save": N}     just after this process's N-th checkpoint returns

The kill is a real SIGKILL of this process (no clean-up runs), at a point drawn by tests/conftest.py from a seed, so
a failure reproduces. Used by tests/test_kill_resume.py only; the scripts know nothing of it."""
import io
import json
import os
import runpy
import signal
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import harness  # noqa: E402  (the scripts import this same module object)
import torch  # noqa: E402


def die(where):
    print(f"kill_launcher: SIGKILL {where}", flush=True)
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main():
    plan = json.loads(os.environ["KILL_PLAN"])
    script, argv = sys.argv[1], sys.argv[2:]
    saves = {"n": 0, "writes": 0}

    if plan["at"] == "step":
        progress = harness.Run.progress

        def killing_progress(self, step, *a, **kw):
            if step >= self.start_step + plan["after"]:
                die(f"at step {step} (this process started at step {self.start_step}; last checkpoint "
                    f"{self.ckpt_step})")
            return progress(self, step, *a, **kw)

        harness.Run.progress = killing_progress
    else:
        save = harness.Run.save

        def killing_save(self, *a, **kw):
            saves["n"] += 1
            saves["writes"] = 0
            out = save(self, *a, **kw)
            if plan["at"] == "after_save" and saves["n"] == plan["save"]:
                die(f"just after the checkpoint at step {self.ckpt_step}")
            return out

        harness.Run.save = killing_save
        if plan["at"] == "write":
            atomic_save = harness.atomic_save

            def killing_write(obj, path):
                if saves["n"] == plan["save"]:
                    saves["writes"] += 1
                    if saves["writes"] >= plan["write"] or os.path.basename(path) == "checkpoint.pt":
                        data = io.BytesIO()
                        torch.save(obj, data)
                        raw = data.getvalue()
                        with open(f"{path}.tmp", "wb") as f:
                            f.write(raw[:len(raw) // 2] if plan["how"] == "partial" else raw)
                        die(f"while writing {os.path.relpath(path)} ({plan['how']}, write {saves['writes']} of "
                            f"checkpoint {saves['n']} of this process)")
                return atomic_save(obj, path)

            harness.atomic_save = killing_write  # ChunkStore.save and Run.save look it up at each call

    sys.argv = [os.path.join(REPO, script), *argv]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
