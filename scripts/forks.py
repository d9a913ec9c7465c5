"""Runs of a training script as processes forked from a server that imported the script's modules once.

A tiny run of a training script spends seconds importing torch and its environments (envpool, ALE, dm_control) before
it does anything; the tests and the GPU check's CPU rehearsal (scripts/gpu_check.py --dry-run) run many. A Forks server
imports the script's modules once, then forks one child process per run. The child is the run: it runs the script as
`__main__` with the run's argv, in the run's working directory, with the run's environment variables, exactly what
`python script argv` runs there, with its own process id (the leader of its own session, so a SIGKILL of its group hits
the run and only the run), its own exit status (a SystemExit message on stderr and exit 1, a traceback and exit 1,
-N when signal N ended it) and its own stdout and stderr (files the caller names, or returned as text).

The server imports the script as a module (its run must sit under `if __name__ == "__main__":`, as the training
scripts' does), so a source file edited while a server runs reaches its later runs only in part: the script is read
again for each run, the modules it imports are the server's.
What differs from a fresh process, and why it does not matter where this is used: modules are imported once, in the
server, with the server's environment: variables read at import (OMP_NUM_THREADS by torch, MUJOCO_GL by dm_control) are
the server's, so a caller starts a server with the environment its runs share; variables read at run time (the
harness's HARNESS_COUNT_SYNCS, ...) are the run's. A PYTHONPATH entry the run adds is put on sys.path, and a
sitecustomize.py found there is run, as interpreter start-up would. Never fork after CUDA is initialised: the server
imports torch without touching CUDA, but a run that must measure a real GPU process belongs in a fresh process.

    forks = Forks("dqn_atari_hr.py", cwd=tmp, env=dict(os.environ, OMP_NUM_THREADS="1"), workers=2)
    forks.submit("a", ["--total-timesteps", "300"], cwd=run_dir)      # stdout/stderr come back as text
    i, rc, out, err, seconds = forks.result()                          # the next run to end
    forks.submit("b", argv, cwd=run_dir, log="b.log")                  # stdout+stderr to one file
    pid = forks.pid("b"); forks.wait("b")                              # the run's process id; its end
    forks.close()
"""
from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SERVER = r'''
import atexit, json, os, runpy, select, sys, tempfile, time
script, workers = sys.argv[1], int(sys.argv[2])
sys.path[0] = os.path.dirname(script)  # what `python script` puts first
__import__(os.path.basename(script)[:-3])  # the script's imports (torch, the environments), paid once
for name in sys.argv[3:]:
    __import__(name)
texts_dir = tempfile.mkdtemp(prefix="forks_")


def child(job):
    os.setsid()  # its own session and process group: a SIGKILL of the group ends the run and nothing else
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)  # the jobs pipe stays the server's
    if job.get("env") is not None:
        pythonpath = [p for p in job["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
        os.environ.clear()
        os.environ.update(job["env"])
        new = [p for p in pythonpath if p not in sys.path]
        sys.path[1:1] = new  # after the script's directory, as PYTHONPATH is
        for p in new:  # the run's sitecustomize.py, which interpreter start-up would have run
            if os.path.isfile(os.path.join(p, "sitecustomize.py")):
                runpy.run_path(os.path.join(p, "sitecustomize.py"), run_name="sitecustomize")
                break
    if job.get("cwd"):
        os.chdir(job["cwd"])
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    out = os.open(job["out"], flags, 0o644)
    err = out if job["err"] == job["out"] else os.open(job["err"], flags, 0o644)
    os.dup2(out, 1)
    os.dup2(err, 2)
    sys.argv, code = [script, *job["argv"]], 0
    try:  # what `python script argv` does with the script's end
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else (print(e.code, file=sys.stderr), 1)[1]
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    try:  # interpreter shut-down: non-daemon threads are joined, then the atexit functions run
        import threading
        threading._shutdown()
    except Exception:
        pass
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def say(*event):
    sys.stdout.write("@@" + json.dumps(event) + "\n")
    sys.stdout.flush()


pending, running, buf, eof, n = [], {}, b"", False, 0
while not (eof and not pending and not running):
    if not eof and select.select([0], [], [], 0.02)[0]:
        data = os.read(0, 1 << 16)
        eof, buf = not data, buf + data
        *lines, buf = buf.split(b"\n")
        pending += [json.loads(line) for line in lines if line.strip()]
    while pending and len(running) < workers:
        job = pending.pop(0)
        texts, n = job.get("out") is None, n + 1
        if texts:
            job["out"], job["err"] = (os.path.join(texts_dir, f"{n}.{x}") for x in "oe")
        elif job.get("err") is None:
            job["err"] = job["out"]
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            child(job)
        running[pid] = (job, time.time(), texts)
        say("started", job["id"], pid)
    for pid, (job, t0, _) in running.items():
        if job.get("timeout") and time.time() - t0 > job["timeout"] and not job.get("timed_out"):
            job["timed_out"] = True
            try:
                os.killpg(pid, 9)
            except OSError:
                pass
    pid, status, usage = os.wait4(-1, os.WNOHANG) if running else (0, 0, None)
    if pid == 0:
        if eof and not pending:
            time.sleep(0.02)
        continue
    job, t0, texts = running.pop(pid)
    out = []
    if texts:
        for path in (job["out"], job["err"]):
            with open(path, errors="replace") as f:
                out.append(f.read())
            os.remove(path)
    rc = "timeout" if job.get("timed_out") else os.waitstatus_to_exitcode(status)
    say("ended", job["id"], rc, *out, round(time.time() - t0, 1), round(usage.ru_utime + usage.ru_stime, 2))
os.rmdir(texts_dir)
'''


class Forks:
    """A fork server for one script (see the module docstring). `workers` runs at once (more wait their turn in the
    server, in the order submitted); `preload`: more modules to import in the server. `env`: the server's environment,
    which is what the modules are imported with and what a run gets unless its submit names another."""

    # imported by every run of these scripts after its own imports (a run's resume gate, its first update, its event
    # file), or by many of them: 2 s of each fresh process
    PRELOAD = ("torch._dynamo", "torch.utils.tensorboard")

    def __init__(self, script: str, cwd: Optional[str] = None, env: Optional[dict] = None, workers: int = 2,
                 preload: tuple = PRELOAD):
        self.script = os.path.join(REPO, script)
        self.env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, self.script, str(workers), *preload], cwd=cwd,
                                     env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.lock = threading.Condition()
        self.pids, self.ends, self.done = {}, {}, queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if not line.startswith("@@"):
                continue
            event = json.loads(line[2:])
            with self.lock:
                if event[0] == "started":
                    self.pids[event[1]] = event[2]
                else:
                    self.ends[event[1]] = event[2:]
                    self.done.put(event[1:])
                self.lock.notify_all()
        with self.lock:
            self.ended = True
            self.lock.notify_all()
        self.done.put(None)

    ended = False

    def submit(self, i, argv: list, cwd: Optional[str] = None, env: Optional[dict] = None,
               log: Optional[str] = None, out: Optional[str] = None, err: Optional[str] = None,
               timeout: Optional[float] = None) -> None:
        """Run `python script *argv` in cwd (the server's by default) as run `i`. env: the run's whole environment
        (the server's by default). Output: log (stdout and stderr to one file), out and err (two files), or none
        named: both come back as text in its result. timeout: SIGKILL past it, its exit status then "timeout"."""
        job = {"id": i, "argv": [str(a) for a in argv], "cwd": None if cwd is None else str(cwd),
               "env": None if env is None else dict(env, PYTHONUNBUFFERED="1"),
               "out": os.path.abspath(log or out) if (log or out) else None,
               "err": os.path.abspath(log or err) if (log or err) else None, "timeout": timeout}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()

    def pid(self, i, timeout: Optional[float] = None) -> Optional[int]:
        """Run i's process id once it has started (None: the server ended first, or timeout passed)."""
        with self.lock:
            self.lock.wait_for(lambda: i in self.pids or self.ended, timeout)
            return self.pids.get(i)

    def poll(self, i) -> Optional[list]:
        """Run i's end, [exit status, (stdout, stderr,) seconds], or None while it runs."""
        with self.lock:
            return self.ends.get(i)

    def wait(self, i, timeout: Optional[float] = None) -> Optional[list]:
        """Run i's end (as poll), waiting for it (None: the server ended first, or timeout passed)."""
        with self.lock:
            self.lock.wait_for(lambda: i in self.ends or self.ended, timeout)
            return self.ends.get(i)

    def result(self) -> list:
        """The next run to end: [id, exit status or "timeout", stdout, stderr, seconds, CPU seconds] (text output),
        or [id, exit status, seconds, CPU seconds] (output to files)."""
        event = self.done.get()
        if event is None:
            raise AssertionError(f"the fork server ended (exit {self.proc.wait()})")
        return event

    def close(self, timeout: float = 150) -> None:
        """No more runs: the server ends once the submitted ones have."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.reader.join()  # every end the server reported is in self.ends
