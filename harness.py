"""The run's lifecycle, written once for every training script: what no reader comes to study.

    args = harness.cli(Args)                       # tyro, bad flags folded into one "error: ..." line
    ...algorithm-specific checks (harness.at_least / finite / unit_interval / fail)...
    run = harness.Run(args, resolve=resolve_defaults, memory={"--buffer-size 1000000": need_bytes})
    ...build envs, replay, networks; run.restore(...) on resume...
    for step in range(run.start_step, args.total_timesteps):
        ...
        if harness.due(step, args.metrics_every):
            with run.probing(): run.log(step, probe_scalars(...))
        if run.checkpoint_due(step + 1): run.save(step + 1, state, replay=rb.store)
        run.progress(step, last_return=...)
    run.finish(args.total_timesteps)

What it owns: the CLI; generic checks; the run directory (inside runs/, owned by one live process through a lock a
killed process cannot leave behind), args.json, the resume gate with ONE list of flags that may differ on resume;
the SummaryWriter with purge_step; atomic checkpoints with one-line errors (disk full, unreadable files); chunked
incremental saving of frame replays (ChunkStore); the last-good state and the non-finite stop; cadences; the fast
paths; console progress; Ctrl-C / SIGTERM; and the end-of-run summary written as JSON to runs/NAME/finished, which
scripts/bench.py, sweep.py and analyze.py read. It holds no algorithm.

One rule for a directory that holds events but no checkpoint (a run stopped before its first checkpoint): it is moved
aside to runs/NAME.partial-<unix time> with one line saying so, and the run starts fresh; nothing is logged twice.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import io
import json
import math
import os
import random
import re
import resource
import signal
import sys
import time
import weakref
from typing import Callable, Iterable, Optional

import numpy as np
import torch

CHECKPOINT_FORMAT = 3  # harness checkpoints: {"format", "global_step", "args", "state", "counters", "replay"}
RUNS = "runs"
# flags that do not change what is trained (device, speed, bookkeeping, evaluation after training): they may differ
# between a run and its --resume. One list for every script; a name a script does not have is simply absent.
MAY_DIFFER_ON_RESUME = ("resume", "run_name", "checkpoint_every", "cuda", "torch_deterministic", "torch_threads",
                        "compile", "cudagraphs", "track", "wandb_project_name", "wandb_entity", "capture_video",
                        "save_model", "eval_episodes", "eval_epsilon", "progress_every", "envpool_threads",
                        "snapshot_every")


def fail(msg: str):
    """The one way a run ends on bad input or a broken file: one line on stderr, no traceback, exit 1."""
    sys.stdout.flush()
    sys.exit(f"error: {msg}")


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")



def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: a job's slice of a node), not the host's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity on this platform
        return max(1, os.cpu_count() or 1)

# ---------------------------------------------------------------------------------------------------------------
# MuJoCo's renderer (dm_control picks it from MUJOCO_GL when it is first imported)
RENDERER_HINT = ("try MUJOCO_GL=egl (a GPU's EGL; NVIDIA: __EGL_VENDOR_LIBRARY_FILENAMES=.../10_nvidia.json) or "
                 "MUJOCO_GL=osmesa (software rendering: apt-get install libosmesa6)")


def renderer_error(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return (f"MuJoCo's renderer MUJOCO_GL={os.environ.get('MUJOCO_GL', '')!r} cannot start ({type(e).__name__}: "
            f"{first}); {RENDERER_HINT}")


def dm_control_suite(pixels: bool):
    """`dm_control.suite`, imported with a renderer only where the run needs pixels. State tasks never render:
    MUJOCO_GL=disable, so a machine without a working EGL/OSMesa still runs them. Pixel tasks default to EGL (headless)
    unless MUJOCO_GL is set; a renderer that cannot start ends the run with one line naming what to try."""
    previous = os.environ.get("MUJOCO_GL")
    if pixels:
        os.environ.setdefault("MUJOCO_GL", "egl")
    elif "dm_control.suite" not in sys.modules:  # dm_control reads MUJOCO_GL once, at its first import
        os.environ["MUJOCO_GL"] = "disable"
    try:
        from dm_control import suite
    except Exception as e:  # noqa: BLE001 - EGL/OSMesa fail at import with ImportError, OSError or RuntimeError
        fail(renderer_error(e))
    finally:
        if not pixels:  # read: leave the user's setting to child processes (a pixel script started from here)
            if previous is None:
                os.environ.pop("MUJOCO_GL", None)
            else:
                os.environ["MUJOCO_GL"] = previous
    return suite


def first_frame(render: Callable):
    """render() once, a renderer that cannot draw (it creates its context at the first frame) ending the run with
    one line; later frames are rendered plainly."""
    try:
        return render()
    except Exception as e:  # noqa: BLE001 - e.g. a GL context that cannot be made (GLFW without a display)
        fail(renderer_error(e))

# ---------------------------------------------------------------------------------------------------------------
# command line


def cli(cls, argv: Optional[list] = None):
    """tyro.cli(cls), with tyro's boxed parse errors (unknown flag, invalid choice, a value that is not a number)
    folded into one "error: ..." line and exit 1, like the rest of the bad input. --help prints help_text(cls)."""
    import tyro

    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        try:
            print(help_text(cls), flush=True)
        except BrokenPipeError:  # `--help | head`: the reader left; nothing to say
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = tyro.cli(cls, args=argv)
    except SystemExit as e:
        if e.code in (0, None):  # --help
            sys.stderr.write(err.getvalue())
            raise
        body = err.getvalue().split("\u2500\u2500\u2500 \u2502", 1)[0]  # the box's message, before its first rule
        words = " ".join(re.sub(r"[\u2500-\u257f]", " ", line) for line in body.splitlines()[1:]).split()
        fail(" ".join(words) or "bad command line (see --help)")
    sys.stderr.write(err.getvalue())  # warnings, if any
    return args


def help_text(cls, width: Optional[int] = None) -> str:
    """--help grouped as the Args class is: each `# Title` comment in its body starts a group (run / environment /
    algorithm / network variant / metrics / checkpointing / speed); each flag shows its values, its docstring
    re-wrapped as one paragraph, and its default once."""
    import ast
    import inspect
    import shutil
    import textwrap
    import typing

    import tyro

    width = width or min(shutil.get_terminal_size((100, 24)).columns, 120)
    lines = inspect.getsource(cls).splitlines()
    body = ast.parse(textwrap.dedent("\n".join(lines))).body[0].body
    hints, defaults = typing.get_type_hints(cls), {f.name: f.default for f in dataclasses.fields(cls)}
    groups, title, prev_end = {}, "options", 0
    for i, node in enumerate(body):
        comments = [ln.strip()[1:].strip() for ln in lines[prev_end:node.lineno - 1] if ln.strip().startswith("#")]
        prev_end = node.end_lineno
        if comments:
            title = comments[0].split(" (")[0].rstrip(":").lower()
        if not isinstance(node, ast.AnnAssign):
            continue
        name = node.target.id
        if tyro.conf.Suppress in getattr(typing.get_type_hints(cls, include_extras=True)[name], "__metadata__", ()):
            continue  # not a flag (a value filled in from the others)
        doc = body[i + 1].value.value if i + 1 < len(body) and isinstance(body[i + 1], ast.Expr) else ""
        kind = hints[name]
        args_ = [a for a in typing.get_args(kind) if a is not type(None)]
        if kind is bool:
            spec = f"{flag(name)}, --no-{flag(name)[2:]}"
        elif typing.get_origin(kind) is typing.Literal or (args_ and typing.get_origin(args_[0]) is typing.Literal):
            spec = f"{flag(name)} {{{','.join(map(str, typing.get_args(args_[0] if args_ else kind) or args_))}}}"
        else:
            spec = f"{flag(name)} {(args_[0] if args_ else kind).__name__.upper()}"
        text = " ".join(doc.split()) + f" (default: {defaults[name]})"
        groups.setdefault(title, []).append((spec, text))
    out, pad = [f"usage: {os.path.basename(sys.argv[0])} [OPTIONS]", ""], 28
    for title, items in groups.items():
        out.append(f"{title}:")
        for spec, text in items:
            wrapped = textwrap.wrap(text, width - pad, break_on_hyphens=False) or [""]
            if len(spec) > pad - 5:  # a long flag gets a line of its own
                out.append(f"  {spec}")
                spec = ""
            out += [f"  {(spec if j == 0 else '').ljust(pad - 2)}{w}" for j, w in enumerate(wrapped)]
        out.append("")
    return "\n".join(out).rstrip()


def at_least(args, bounds: dict) -> None:
    """{field: lowest allowed value}: '--x must be >= lo, got v' for the first field below its bound."""
    for name, lo in bounds.items():
        value = getattr(args, name)
        if value < lo:
            fail(f"{flag(name)} must be >= {lo}, got {value}")


F32_MAX = float(np.finfo(np.float32).max)  # 3.4e38: float flags become float32 tensors (Adam's lr, coefficients)


def as_float32(value: float) -> float:
    """`value` as the float32 it becomes on the device (0.0 for a positive float64 below float32's smallest)."""
    return float(np.float32(value)) if math.isfinite(value) and abs(value) <= F32_MAX else value


def finite(args, names: Iterable[str], positive: bool = True) -> None:
    """Rates and scales: finite and > 0 (or >= 0 with positive=False), in float32, the precision they are used in (a
    positive 1e-50 is 0 there)."""
    for name in names:
        value = getattr(args, name)
        v32 = as_float32(value)
        if not (math.isfinite(value) and abs(value) <= F32_MAX and (v32 > 0 if positive else v32 >= 0)):
            why = ("" if not math.isfinite(value) else f" (a float32, the precision it is used in, holds at most "
                   f"3.4e38)" if abs(value) > F32_MAX else f" (it is {v32} as a float32, the precision it is used in)")
            fail(f"{flag(name)} must be a finite number {'> 0' if positive else '>= 0'}, got {value}{why}")


def at_most(args, bounds: dict, why: str = "") -> None:
    """{field: highest allowed value}: '--x must be <= hi (why), got v' for the first field above its bound."""
    for name, hi in bounds.items():
        value = getattr(args, name)
        if value > hi:
            fail(f"{flag(name)} must be <= {hi}{f' ({why})' if why else ''}, got {value}")


MAX_LAYERS = 100_000  # layer and branch counts: more is refused before the networks are measured (meta_bytes)
LAYER_COUNT = "a network with more layers or branches would take minutes just to measure; it cannot fit in memory"
MAX_PASSES = 10_000  # epochs over one rollout, updates per environment step
PASSES = "more passes over the same data per step than this cannot finish a run"
MAX_THREADS = 1024
THREADS = "more threads than any machine has"


def number_flags(args) -> None:
    """The generic rule for every numeric flag: a float flag must be a finite number a float32 can hold (the device
    computes in float32: 1e308 passes float64's isfinite, then overflows inside Adam); an int flag must fit an int64
    (numpy and torch hold it as one)."""
    for field in dataclasses.fields(args):
        value = getattr(args, field.name)
        if isinstance(value, float) and not (math.isfinite(value) and abs(value) <= F32_MAX):
            fail(f"{flag(field.name)} must be a finite number a float32 can hold (|x| <= 3.4e38), got {value}")
        if isinstance(value, int) and not isinstance(value, bool) and not -2**63 <= value < 2**63:
            fail(f"{flag(field.name)} must fit a 64-bit integer, got {value}")


def unit_interval(args, names: Iterable[str]) -> None:
    for name in names:
        value = getattr(args, name)
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            fail(f"{flag(name)} must be in [0, 1], got {value}")


def mem_available_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), in bytes."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable not found in /proc/meminfo")


def check_memory(memory: dict) -> None:
    """{what: bytes}, e.g. {"--buffer-size 1000000": 7.1e9}: their sum must fit in free host memory."""
    need = sum(memory.values())
    if need and need > (avail := mem_available_bytes()):
        alone = [k for k, v in memory.items() if v > avail]  # name the flag to change, not every contributor
        what = " + ".join(alone[:1] or memory)
        need = memory[alone[0]] if alone else need
        fail(f"{what} needs {need / 1e9:.2f} GB of memory but only {avail / 1e9:.2f} GB is available (MemAvailable)")


def meta_bytes(build: Callable) -> int:
    """Bytes of the parameters and buffers of the modules `build()` returns, built on the meta device: shapes without
    storage, so a network too large for any memory is measured, not made. nn.utils.skip_init, which would make the
    module on the CPU, makes it on the meta device here."""
    skip_init = torch.nn.utils.skip_init
    torch.nn.utils.skip_init = lambda module_cls, *args, **kwargs: module_cls(*args, **kwargs)
    try:
        with torch.device("meta"):
            modules = build()
    finally:
        torch.nn.utils.skip_init = skip_init
    return sum(t.numel() * t.element_size() for m in modules for t in (*m.parameters(), *m.buffers()))


TRAINING_COPIES = 4  # per parameter while training: the weights, their gradients, Adam's two moments


def network_memory(networks: dict, cuda: bool) -> dict:
    """{flags to change: build} -> {what: bytes} a run's trained networks need while training (TRAINING_COPIES per
    parameter; a target network adds one copy of the weights, one batch's activations a little more: the estimate is a
    lower bound, and a network it refuses cannot fit), estimated without allocating (meta_bytes). On CUDA the networks
    must fit the GPU's free memory (refused here); on the CPU the result joins the host memory check."""
    need = {}
    for what, build in networks.items():
        try:
            need[what] = TRAINING_COPIES * meta_bytes(build)
        except (RuntimeError, OverflowError, ValueError, TypeError, MemoryError) as e:  # sizes past int64
            fail(f"{what}: networks this large cannot be built ({type(e).__name__}: "
                 f"{(str(e).splitlines() or [''])[0][:120]})")
    if cuda and need:
        free, _ = torch.cuda.mem_get_info()
        total = sum(need.values())
        if total > 0.9 * free:
            fail(f"{' + '.join(need)}: the networks need {total / 1e9:.2f} GB of GPU memory while training but only "
                 f"{free / 1e9:.2f} GB is free")
        return {}
    return {f"{what} (networks)": n for what, n in need.items()}


def never_warnings(args, learning_starts: int, first_probe: int, cadence: str = "") -> None:
    """A run that will never learn, or never probe, says so at its start; both compared in --total-timesteps' unit.
    learning_starts: the step of the first update; cadence: the flag that puts it past --learning-starts (DQN's
    "--train-frequency 4": an update every 4th step after --learning-starts), named when it alone is the cause."""
    total = args.total_timesteps
    if learning_starts >= total:
        flag = getattr(args, "learning_starts", learning_starts)
        probe = "" if not first_probe else ", and no probe"
        if cadence and flag < total:  # --learning-starts is before the end: the cadence puts the first update past it
            warn(f"{cadence}: no update will run (the first would be at step {learning_starts:,}, after "
                 f"--learning-starts {flag}, past --total-timesteps {total}){probe}")
            return
        unit = "" if learning_starts == flag or cadence else f" (step {learning_starts:,} in --total-timesteps' unit)"
        warn(f"--learning-starts {flag}{unit} is not before --total-timesteps {total}: no update will run{probe}")
        return
    every = getattr(args, "metrics_every", 0)
    first = -(-max(first_probe, 1) // every) * every if every > 0 else None  # the first multiple >= first_probe
    if first is not None and first > total:
        warn(f"--metrics-every {every}: no probe will run (the first would be at step {first:,}, past --total-timesteps "
             f"{total})")


_CHECKED = weakref.WeakValueDictionary()  # id -> args: an id alone is reused once its object is freed


def checks(args) -> None:
    """The generic checks, once per args object: Run makes them; a script that builds something before Run (SimbaV2's
    probe environment, for the sizes) calls this first."""
    if _CHECKED.get(id(args)) is not args:
        _CHECKED[id(args)] = args
        _generic_checks(args)


def _generic_checks(args) -> None:
    fields = {f.name for f in dataclasses.fields(args)}
    number_flags(args)
    at_least(args, {k: v for k, v in {"total_timesteps": 1, "checkpoint_every": 0, "metrics_every": 0,
                                      "metrics_batch": 2}.items() if k in fields})
    if not 0 <= args.seed < 2**32:
        fail(f"--seed must be in [0, 2**32), got {args.seed}")
    # the probe's flags (common.probe_scalars), in every script that probes: the KDE test needs a threshold > 0
    finite(args, [k for k in ("kde_threshold",) if k in fields])
    finite(args, [k for k in ("kde_noise_std", "redo_tau") if k in fields], positive=False)
    if "srank_delta" in fields and not 0.0 <= args.srank_delta < 1.0:  # srank keeps 1 - delta of the spectrum
        fail(f"--srank-delta must be in [0, 1), got {args.srank_delta}")
    if "snapshot_every" in fields:
        at_least(args, {"snapshot_every": 0})
        if args.snapshot_every and not args.metrics_every:
            fail(f"--snapshot-every {args.snapshot_every} needs probes (--metrics-every > 0): scripts/probe.py "
                 f"recomputes the metrics on the run's fixed probe batch, which the first probe draws")
    # combinations a run would silently ignore: said once, the run goes on (learning and probes: Run.__init__)
    if getattr(args, "save_model", True) and getattr(args, "eval_episodes", 1) == 0:
        warn("--eval-episodes 0: no evaluation episode will be played")
    if getattr(args, "track", False):
        try:
            import wandb  # noqa: F401
        except ImportError:
            fail("--track needs wandb, which is not installed (pip install wandb)")
    if args.resume and args.run_name is None:
        fail("--resume needs --run-name NAME (the run directory to continue)")
    if args.run_name is not None:
        parts = args.run_name.replace("\\", "/").split("/")
        if not args.run_name.strip() or os.path.isabs(args.run_name) or any(p in ("", ".", "..") for p in parts):
            fail(f"--run-name {args.run_name!r} must name a directory inside {RUNS}/ (no '..', no absolute path)")
    if "/" in args.exp_name or args.exp_name in ("", ".", ".."):
        fail(f"--exp-name {args.exp_name!r} must be a plain name (it becomes part of the run directory's name)")
    if getattr(args, "cudagraphs", "off") == "on" and not (args.cuda and torch.cuda.is_available()):
        fail("--cudagraphs on needs a CUDA GPU (none is available, or --no-cuda); use --cudagraphs auto or off")


# ---------------------------------------------------------------------------------------------------------------
# files


def atomic_save(obj, path: str) -> int:
    """torch.save `obj` to `path` atomically: write `path.tmp`, fsync, rename over `path`, fsync the directory (a
    kill at any moment leaves the old file or the new one, never half of one). Returns the bytes written. A full disk
    removes the temporary file and ends the run with one line; the previous file is untouched."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        size = os.path.getsize(tmp)
        os.replace(tmp, path)
        dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        with contextlib.suppress(OSError):
            os.remove(tmp)
        full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(e)
        reason = "no space left on the device" if full else (str(e).splitlines() or [type(e).__name__])[0]
        fail(f"cannot write {path}: {reason}; the previous checkpoint, if any, is intact")
    return size


def read_checkpoint(path: str, what: str = "--resume") -> dict:
    """torch.load on the CPU, memory-mapped (a large replay is copied once, from the page cache into its buffer).
    Any unreadable file (empty, truncated, garbage, another format) gets the same one-line answer."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
            got = ckpt.get("format", ckpt.get("version")) if isinstance(ckpt, dict) else type(ckpt).__name__
            raise ValueError(f"checkpoint format {got}; this version of the scripts reads format {CHECKPOINT_FORMAT}")
    except Exception as e:  # noqa: BLE001 -- one answer for every unreadable file
        fail(f"{what}: cannot read {path} ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})")
    return ckpt


def rng_state(*generators: np.random.Generator) -> dict:
    """The global RNG states (python, numpy, torch CPU and CUDA) plus those of the given numpy Generators."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "generators": [g.bit_generator.state for g in generators]}


def set_rng_state(state: dict, *generators: np.random.Generator) -> None:
    """Restore what rng_state returned, in place (the same Generators, in the same order)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    if len(state["generators"]) != len(generators):
        raise ValueError(f"checkpoint holds {len(state['generators'])} generator states, {len(generators)} given")
    for g, s in zip(generators, state["generators"]):
        g.bit_generator.state = s


def arg_conflicts(saved: dict, current: dict, may_differ: Iterable[str] = MAY_DIFFER_ON_RESUME) -> list[str]:
    """Names whose values differ between a run's saved arguments and the current ones, ignoring `may_differ`."""
    keys = (set(saved) | set(current)) - set(may_differ)
    return sorted(k for k in keys if saved.get(k) != current.get(k))


class ChunkStore:
    """Incremental checkpoints of a ring of equal-length numpy arrays (a frame replay): the ring is cut into chunks of
    `chunk` slots; `touch(i)` marks slot i's chunk changed; `save` writes each changed chunk to a new file
    `chunkNNNNN_<tag>.pt` and returns the manifest naming the newest file of every filled chunk. The files of the
    previous manifest stay until `prune`, so until the checkpoint naming the new manifest replaces the old one, the
    old one is complete. A 1M-slot Atari ring rewrites 8-9 of its 31 chunks per 250k steps instead of 7 GB."""

    def __init__(self, arrays: dict, chunk: int = 32_768):
        self.arrays, self.chunk = arrays, chunk
        self.capacity = len(next(iter(arrays.values())))
        self.dirty = np.ones(-(-self.capacity // chunk), dtype=bool)
        self.saved: dict = {}  # chunk index -> file name of its newest saved copy

    def touch(self, i: int) -> None:
        self.dirty[i // self.chunk] = True

    def layout(self) -> dict:
        return {"capacity": self.capacity, "chunk": self.chunk,
                **{k: (str(a.dtype), tuple(a.shape[1:])) for k, a in self.arrays.items()}}

    def save(self, directory: str, tag: str, filled: int) -> tuple[dict, int]:
        os.makedirs(directory, exist_ok=True)
        written = 0
        for i in range(-(-filled // self.chunk)):
            if self.dirty[i] or i not in self.saved:
                lo, hi = i * self.chunk, min((i + 1) * self.chunk, filled)
                name = f"chunk{i:05d}_{tag}.pt"  # views: torch.save copies nothing in memory
                written += atomic_save({k: torch.from_numpy(a[lo:hi]) for k, a in self.arrays.items()},
                                       os.path.join(directory, name))
                self.saved[i], self.dirty[i] = name, False
        return {"layout": self.layout(), "files": {i: self.saved[i] for i in range(-(-filled // self.chunk))}}, written

    @staticmethod
    def prune(directory: str, manifest: Optional[dict]) -> None:
        """Delete the chunk and temporary files of `directory` that `manifest` does not name."""
        keep = set(manifest["files"].values()) if manifest else set()
        for name in os.listdir(directory) if os.path.isdir(directory) else []:
            if name.startswith("chunk") and name not in keep:
                os.remove(os.path.join(directory, name))

    @staticmethod
    def check(directory: str, manifest: dict) -> None:
        """Raise if a named chunk file is missing or unreadable (empty, truncated): before anything is allocated."""
        for name in manifest["files"].values():
            part = torch.load(os.path.join(directory, name), map_location="cpu", weights_only=True, mmap=True)
            del part

    def load(self, directory: str, manifest: dict) -> None:
        if manifest["layout"] != self.layout():
            raise ValueError(f"replay layout {manifest['layout']} does not fit this buffer's {self.layout()}")
        for i, name in manifest["files"].items():
            part = torch.load(os.path.join(directory, name), map_location="cpu", weights_only=True, mmap=True)
            lo = i * self.chunk
            for k, a in self.arrays.items():
                a[lo:lo + part[k].shape[0]] = part[k].numpy()
            del part  # the mapping goes with it
        self.saved, self.dirty[:] = dict(manifest["files"]), False


# ---------------------------------------------------------------------------------------------------------------
# network snapshots (scripts/probe.py recomputes the metrics from them) and TensorBoard's metric layout

SNAPSHOT_FORMAT = 1
# every per-layer metric common.probe_scalars (and DrQ's dominance test) writes: representation/<layer>/<metric>
LAYER_METRICS = ("dormant_kde", "dormant_score", "srank", "max_score", "saturated", "zombie", "dominant")


def metrics_layout() -> dict:
    """TensorBoard's custom-scalars layout: one chart per metric with one line per layer (a regex over the tags, so
    every layer of every script matches), and one chart of the network-wide tags."""
    charts = {m: ["Multiline", [rf"^representation/.+/{m}$"]] for m in LAYER_METRICS}
    charts["network-wide"] = ["Multiline", [r"^representation/(hidden_bias|live_contribution|dominant)$"]]
    return {"representation": charts}


def snapshot_name(step: int) -> str:
    return f"step_{step:012d}.pt"


def snapshot_step(name: str) -> Optional[int]:
    m = re.fullmatch(r"step_(\d+)\.pt", name)
    return int(m.group(1)) if m else None


class Snapshots:
    """runs/NAME/snapshots/: every --snapshot-every steps, the weights of the networks the probe reads (no optimizer,
    no replay), each file written atomically; and probe.pt, the fixed probe batch, once. scripts/probe.py loads them
    into the script's own networks (built from args.json and `build`: the sizes the environment gave) and recomputes
    the metrics. On resume the snapshots at or after the resume's purge step go, as TensorBoard's events do: the
    resumed run takes them again, so the series has no gap and no duplicate."""

    def __init__(self, run: "Run", networks: dict, build: dict, probe_bytes: int):
        self.run, self.networks, self.build = run, networks, build
        self.every = getattr(run.args, "snapshot_every", 0)
        self.dir = os.path.join(run.dir, "snapshots")
        self.probe_path = os.path.join(self.dir, "probe.pt")
        if os.path.isdir(self.dir):
            purge = math.inf if run.purge_step is None else run.purge_step
            for name in os.listdir(self.dir):
                step = snapshot_step(name)
                if name == "probe.pt":  # drawn after the checkpoint: the resumed run draws it from other transitions
                    try:
                        step = int(torch.load(self.probe_path, map_location="cpu", mmap=True)["step"])
                    except Exception:  # noqa: BLE001 - unreadable: gone, the run writes it again at its next snapshot
                        step = -1
                        os.remove(self.probe_path)
                if name.endswith(".tmp") or (step is not None and step >= purge):
                    os.remove(os.path.join(self.dir, name))
        if self.every:
            each = sum(t.numel() * t.element_size() for m in networks.values() for t in m.state_dict().values())
            count = run.args.total_timesteps // self.every
            print(f"snapshots: every {self.every:,} steps, about {count:,} x {each / 1e6:.2f} MB + the probe batch "
                  f"{probe_bytes / 1e6:.2f} MB = {(count * each + probe_bytes) / 1e9:.3f} GB in {self.dir}", flush=True)

    def due(self, step: int, prev: Optional[int] = None) -> bool:
        return due(step, self.every, prev)

    def save(self, step: int, probe: Optional[dict], extra: Optional[dict] = None) -> None:
        """Snapshot the networks at `step` (the step the probe at this point of the loop logs at); `probe`: the fixed
        probe batch ({name: tensor}, None until drawn), written once; `extra`: anything else the probe reads (e.g.
        observation statistics), saved in the snapshot."""
        os.makedirs(self.dir, exist_ok=True)
        if probe is not None and not os.path.exists(self.probe_path):
            atomic_save({"format": SNAPSHOT_FORMAT, "script": self.run.script, "step": step,
                         "probe": {k: v.detach().cpu() for k, v in probe.items()}}, self.probe_path)
        atomic_save({"format": SNAPSHOT_FORMAT, "script": self.run.script, "step": step, "device":
                     self.run.device.type, "build": self.build, "extra": extra or {},
                     "networks": {name: {k: v.detach().cpu() for k, v in m.state_dict().items()}
                                  for name, m in self.networks.items()}},
                    os.path.join(self.dir, snapshot_name(step)))


# ---------------------------------------------------------------------------------------------------------------
# cadences and finiteness


def due(step: int, every: int, prev: Optional[int] = None) -> bool:
    """True when `step` is a positive multiple of `every` (0 = never); with `prev`, when a multiple of `every` lies in
    (prev, step] (for loops whose step counter jumps by a whole rollout)."""
    if every <= 0:
        return False
    if prev is None:
        return step > 0 and step % every == 0
    return step // every > prev // every


def all_finite(params, *tensors) -> torch.Tensor:
    """One device-side bool: every parameter and every given tensor is finite. No host sync until it is read."""
    checks = [torch.isfinite(t).all() for t in (*params, *tensors) if t is not None]
    return torch.stack(checks).all()


class LastGood:
    """Device-side copy of the latest state that passed the finiteness check: cloned once, refreshed in place with
    copy_ (no host sync); written to checkpoint_last_good.pt by Run.stop_nonfinite. `step` has the checkpoint's
    meaning: every step before it is done."""

    def __init__(self):
        self.state, self.step, self._mine = None, None, []

    @staticmethod
    def _tensors(obj) -> list:
        if isinstance(obj, torch.Tensor):
            return [obj]
        items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else []
        return [t for v in items for t in LastGood._tensors(v)]

    @staticmethod
    def _clone(obj):
        if isinstance(obj, torch.Tensor):
            return obj.detach().clone()
        if isinstance(obj, dict):
            return {k: LastGood._clone(v) for k, v in obj.items()}
        return [LastGood._clone(v) for v in obj] if isinstance(obj, (list, tuple)) else obj

    def update(self, step: int, state: dict) -> None:
        live = self._tensors(state)
        if self.state is None or len(live) != len(self._mine):  # first call, or the optimiser's state appeared
            self.state = self._clone(state)
            self._mine = self._tensors(self.state)
        else:
            for mine, t in zip(self._mine, live):
                mine.copy_(t, non_blocking=True)
        self.step = step

DETERMINISTIC_CUDA_NOTE = "has no deterministic CUDA implementation"


def deterministic(on: bool, device: torch.device) -> None:
    """--torch-deterministic. On CUDA: cuDNN's deterministic convolutions, torch's deterministic algorithms (scatter_add_,
    index_put_, gather's backward... sum in a fixed order) and the cuBLAS workspace that makes matmuls repeatable
    (CUBLAS_WORKSPACE_CONFIG, read when cuBLAS starts: set before the first matmul). An op with no deterministic CUDA
    kernel warns once, as one `warning:` line, instead of stopping the run (warn_only): that run is not
    bit-repeatable. On the CPU torch's kernels are deterministic already."""
    torch.backends.cudnn.deterministic = on
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = False
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on, warn_only=True)
    if on:
        _route_warnings()


_SEEN_WARNINGS: set = set()
SYNC_WARNING = "called a synchronizing CUDA operation"


def _route_warnings() -> None:
    """torch's nondeterminism warnings as one `warning:` line per op; sync-debug warnings to the SyncCounter (if any)."""
    import warnings

    if getattr(warnings.showwarning, "_harness", False):
        return
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        text = str(message)
        if SYNC_WARNING in text and SyncCounter.active is not None:
            SyncCounter.active.count += 1
            return
        if "does not have a deterministic implementation" in text:
            op = text.split(" does not have", 1)[0].strip()
            if op not in _SEEN_WARNINGS:
                _SEEN_WARNINGS.add(op)
                warn(f"--torch-deterministic: {op} {DETERMINISTIC_CUDA_NOTE}; this run is not bit-repeatable")
            return
        previous(message, category, filename, lineno, file, line)

    show._harness = True
    warnings.showwarning = show


class SyncCounter:
    """Host syncs of a CUDA run, counted for scripts/gpu_check.py when HARNESS_COUNT_SYNCS=1: torch's sync debug mode
    warns at every synchronizing CUDA call; the count is sampled at each loop iteration (Run.progress), and `finished`
    reports the steady-state rate, the second half of the loop (set-up and compilation excluded; logging, probes and
    checkpoints amortised in): syncs per loop iteration and per step."""
    ENV = "HARNESS_COUNT_SYNCS"
    active: Optional["SyncCounter"] = None

    def __init__(self):
        self.count = 0
        self.samples: list = []  # (iteration, step, count)

    @classmethod
    def from_env(cls, device: torch.device) -> Optional["SyncCounter"]:
        if os.environ.get(cls.ENV) != "1":
            return None
        import warnings

        counter = cls.active = cls()
        warnings.filterwarnings("always", message=f".*{SYNC_WARNING}.*")
        _route_warnings()
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        return counter

    def tick(self, step: int) -> None:
        self.samples.append((len(self.samples), step, self.count))

    def summary(self) -> dict:
        out = {"total": self.count, "iterations": len(self.samples), "per_iteration": None, "per_step": None}
        if len(self.samples) >= 4:
            (i0, s0, c0), (i1, s1, c1) = self.samples[len(self.samples) // 2], self.samples[-1]
            out["per_iteration"] = (c1 - c0) / max(i1 - i0, 1)
            out["per_step"] = (c1 - c0) / max(s1 - s0, 1)
        return out



def param_checksum(*modules) -> float:
    """Sum of every float tensor of the modules' state_dicts in float64: printed on resume so tests can compare."""
    return sum(t.double().sum().item() for m in modules for t in m.state_dict().values() if t.is_floating_point())


# ---------------------------------------------------------------------------------------------------------------
# the run


class Run:
    """Owns runs/NAME for the life of the process. Everything that can refuse the run happens in __init__, before any
    environment, buffer or directory exists (the resume gate reads only): flags, run name, resume, memory."""

    def __init__(self, args, resolve: Callable = lambda a: a, memory: Optional[dict] = None,
                 progress_every: float = 10.0, log_at_steps_done: bool = False, networks: Optional[dict] = None,
                 learning_starts: Optional[int] = None, probes_need_updates: bool = False, update_cadence: str = ""):
        """log_at_steps_done: the script logs a step's scalars at the count of steps done, so those at a checkpoint's
        own step belong to it (CleanRL's PPO logs an iteration at global_step after its rollout): resume purges from
        the step after the checkpoint's, not from it. networks: {flags to change: a callable that builds the run's
        networks}, built on the meta device and checked against free memory (network_memory) before anything
        exists. learning_starts: the step of the first update in --total-timesteps' unit (default --learning-starts,
        where the two share a unit, or where a cadence puts it later: update_cadence names that flag, as
        never_warnings says); probes_need_updates: the script probes only once it has updated."""
        checks(args)
        resolve(args)  # defaults that depend on other flags: recorded in args.json, compared on --resume
        self.learning_starts = getattr(args, "learning_starts", 0) if learning_starts is None else learning_starts
        never_warnings(args, self.learning_starts, self.learning_starts if probes_need_updates else 0, update_cadence)
        memory = {**(memory or {}), **network_memory(networks or {}, torch.cuda.is_available() and args.cuda)}
        if args.run_name is None:
            args.run_name = f"{args.env_id.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}"
        self.args, self.dir = args, os.path.join(RUNS, args.run_name)
        self.ckpt_path = os.path.join(self.dir, "checkpoint.pt")
        self.replay_dir = os.path.join(self.dir, "replay")
        self.script = os.path.basename(sys.argv[0])
        self.checkpoint = self._resume_gate(resolve) if args.resume else None
        self.manifest = None if self.checkpoint is None else self.checkpoint.get("replay")
        self._fresh_gate()
        check_memory(memory or {})
        self._own_directory()
        self.start_step = 0 if self.checkpoint is None else int(self.checkpoint["global_step"])
        self.ckpt_step = self.start_step if self.checkpoint else None  # step of the newest resumable checkpoint
        self.counters = {"probe_seconds": 0.0, "n_probes": 0, "wall_seconds": 0.0, "last_return": float("nan")}
        if self.checkpoint is not None:
            self.counters.update(self.checkpoint.get("counters", {}))
        from torch.utils.tensorboard import SummaryWriter

        if getattr(args, "track", False):  # before the writer: wandb mirrors the TensorBoard events it writes
            import wandb

            wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                       config=vars(args), name=args.run_name, save_code=True)
        # on resume, TensorBoard drops the events (and Snapshots the snapshots) at or after this step
        self.purge_step = None if self.checkpoint is None else self.start_step + int(log_at_steps_done)
        self.writer = SummaryWriter(self.dir, purge_step=self.purge_step)
        if self.checkpoint is None:
            self.writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(
                f"|{k}|{v}|" for k, v in vars(args).items()))
            if getattr(args, "metrics_every", 0):
                self.writer.add_custom_scalars(metrics_layout())
        random.seed(args.seed)
        np.random.seed(args.seed)
        torch.manual_seed(args.seed)
        self.device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
        deterministic(args.torch_deterministic, self.device)
        self.syncs = SyncCounter.from_env(self.device)
        self.start_time = time.time()
        self._progress_every, self._last_print = progress_every, self.start_time
        self._marks: list = [(self.start_time, self.start_step)] if self.start_step >= self.learning_starts else []
        self.use_compile = self.use_graphs = False
        self.timers: dict[str, float] = {}  # wall seconds per phase, see timed()
        self._install_signals()

    # -- gates ---------------------------------------------------------------------------------------------------
    def _resume_gate(self, resolve) -> dict:
        finished = os.path.join(self.dir, "finished")
        if os.path.isfile(finished):
            try:
                with open(finished) as f:
                    detail = f"at step {json.load(f)['global_step']}"
            except (OSError, ValueError, KeyError):
                detail = f"{finished} exists"
            print(f"run {self.args.run_name} already finished ({detail}); nothing to resume")
            sys.exit(0)
        if not os.path.isfile(self.ckpt_path):
            fail(f"--resume: no checkpoint in {self.dir}")
        try:
            with open(os.path.join(self.dir, "args.json")) as f:
                saved = json.load(f)
        except (OSError, ValueError) as e:
            fail(f"--resume: cannot read {self.dir}/args.json ({e})")
        cls = type(self.args)
        known = {f.name for f in dataclasses.fields(cls)}
        try:  # resolve the saved flags as this script resolves its own
            saved = {**saved, **dataclasses.asdict(resolve(cls(**{k: v for k, v in saved.items() if k in known})))}
        except (TypeError, ValueError):
            pass
        current = dataclasses.asdict(self.args)
        conflicts = arg_conflicts(saved, current)
        if conflicts:
            fail(f"--resume: {self.dir} was made with other flags: " + ", ".join(
                f"{flag(k)} (saved {saved.get(k)}, now {current.get(k)})" for k in conflicts))
        ckpt = read_checkpoint(self.ckpt_path)
        if ckpt.get("replay"):
            try:
                ChunkStore.check(self.replay_dir, ckpt["replay"])
            except Exception as e:  # noqa: BLE001
                fail(f"--resume: cannot read {self.replay_dir}, named by {self.ckpt_path} ({type(e).__name__}: "
                     f"{(str(e).splitlines() or [''])[0]})")
        return ckpt

    def _fresh_gate(self) -> None:
        if self.checkpoint is not None:
            return
        name = self.args.run_name
        if os.path.exists(self.dir) and not os.path.isdir(self.dir):
            fail(f"--run-name {name}: cannot write {self.dir} (it exists and is not a directory)")
        if os.path.exists(self.ckpt_path):
            fail(f"--run-name {name}: {self.dir} already holds a checkpoint; add --resume to continue it, or choose "
                 f"another --run-name")
        if os.path.exists(os.path.join(self.dir, "finished")):
            fail(f"--run-name {name}: {self.dir} holds a finished run; choose another --run-name")

    def _own_directory(self) -> None:
        """Create runs/NAME and take its lock (fcntl: the kernel drops it when the process dies, however it dies).
        A fresh start in a directory that already holds events moves them aside first."""
        try:
            os.makedirs(RUNS, exist_ok=True)
            if self.checkpoint is None and os.path.isdir(self.dir) and _holds_events(self.dir):
                self._lock(self.dir)  # not while its owner still runs
                aside = f"{self.dir}.partial-{int(time.time())}"
                while os.path.exists(aside):  # two move-asides within one second
                    aside += "x"
                os.rename(self.dir, aside)
                os.close(self._lock_fd)
                print(f"{self.dir} held the events of a run stopped before its first checkpoint: moved to {aside}")
            os.makedirs(self.dir, exist_ok=True)
            self._lock(self.dir)
            for name in os.listdir(self.dir):  # stale temporary files of a killed write
                if name.endswith(".tmp"):
                    os.remove(os.path.join(self.dir, name))
            ChunkStore.prune(self.replay_dir, self.manifest if self.checkpoint else None)
            if self.checkpoint is None:  # a resumed run keeps the args.json it was made with
                with open(os.path.join(self.dir, "args.json"), "w") as f:
                    json.dump(dataclasses.asdict(self.args), f, indent=2)
        except OSError as e:
            fail(f"--run-name {self.args.run_name}: cannot write {self.dir} ({e.strerror or e})")

    def _lock(self, directory: str) -> None:
        self._lock_fd = os.open(os.path.join(directory, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(self._lock_fd, 32, 0).decode(errors="replace").strip() or "?"
            fail(f"--run-name {self.args.run_name}: {directory} is in use by another running process (pid {pid})")
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, str(os.getpid()).encode(), 0)

    # -- fast paths ----------------------------------------------------------------------------------------------
    def fast_paths(self) -> tuple[bool, bool]:
        """(use torch.compile, use CUDA graphs) from --compile/--cudagraphs (auto = on with CUDA), and the status
        line every run prints."""
        a, cuda = self.args, self.device.type == "cuda"
        self.use_compile = a.compile == "on" or (a.compile == "auto" and cuda)
        self.use_graphs = cuda and a.cudagraphs != "off"
        print(f"fast paths: torch.compile {'on' if self.use_compile else 'off'}, CUDA graphs "
              f"{'on' if self.use_graphs else 'off'}, pinned transfers {'on' if cuda else 'off (CPU)'}", flush=True)
        return self.use_compile, self.use_graphs

    def describe(self, *modules, name: str = "architecture") -> int:
        """Print the network(s) and parameter count (and put them in TensorBoard's text tab on a fresh run)."""
        n = sum(p.numel() for m in modules for p in m.parameters())
        text = "\n".join(str(m) for m in modules)
        print(text)
        print(f"parameters: {n:,}")
        if self.checkpoint is None:
            self.writer.add_text(name, f"```\n{text}\n```\n\nparameters: {n:,}")
        return n

    # -- during the run ------------------------------------------------------------------------------------------
    def env_seeds(self, eval_offset: int = 10_000) -> tuple[int, int]:
        """(training env, evaluation env) seeds: --seed and --seed + eval_offset on a fresh start; on resume, seeds
        drawn from (--seed, resume step), so a resumed run starts fresh episodes of its own."""
        if self.start_step == 0:
            return self.args.seed, self.args.seed + eval_offset
        train, evaluation = np.random.SeedSequence([self.args.seed, self.start_step]).generate_state(2)
        return int(train), int(evaluation)

    def log(self, step: int, scalars: dict) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)

    def sps(self, step: int) -> int:
        return int((step - self.start_step) / max(time.time() - self.start_time, 1e-9))

    @contextlib.contextmanager
    def probing(self):
        """Time a metric probe: probe_seconds / wall time is the probe share reported in `finished`."""
        t0 = time.perf_counter()
        yield
        self.counters["probe_seconds"] += time.perf_counter() - t0
        self.counters["n_probes"] += 1

    @contextlib.contextmanager
    def timed(self, phase: str):
        """Add the block's wall seconds to self.timers[phase] (where a run's time goes; on CUDA, launch time only)."""
        t0 = time.perf_counter()
        yield
        self.timers[phase] = self.timers.get(phase, 0.0) + time.perf_counter() - t0

    def wall(self) -> float:
        return self.counters["wall_seconds"] + time.time() - self.start_time

    def progress(self, step: int, force: bool = False, **fields) -> None:
        """At most one console line every `progress_every` seconds: step, SPS, ETA, last return, and `fields`.
        Called once per loop iteration (the host-sync count samples there)."""
        if self.syncs is not None:
            self.syncs.tick(step)
        now = time.time()
        if not force and now - self._last_print < self._progress_every:
            return
        self._last_print = now
        total, sps = self.args.total_timesteps, self.sps(step)
        eta = self._eta(step, now)
        extra = "".join(f" {k}={v:.4g}" if isinstance(v, float) else f" {k}={v}" for k, v in fields.items())
        print(f"step {step:,}/{total:,} ({100 * step / total:.1f}%) SPS={sps:,} ETA={eta} "
              f"return={self.counters['last_return']:.4g} probe_share="
              f"{100 * self.counters['probe_seconds'] / max(self.wall(), 1e-9):.2f}%{extra}", flush=True)

    def _eta(self, step: int, now: float) -> str:
        """Time left at the recent training rate: the last few progress lines' steps per second, counted only once
        updates run. During the warm-up (random actions, no update: often 10x faster) no rate says how long training
        takes, so the ETA is not known yet: `?`, with the warm-up's own time left."""
        total = self.args.total_timesteps
        if step < self.learning_starts:
            warm = self.sps(step)
            left = int((self.learning_starts - step) / warm) if warm > 0 else None
            return "?" + ("" if left is None else f" (warm-up ends in {_hms(left)}; training speed not known yet)")
        self._marks.append((now, step))
        del self._marks[:-6]  # the recent rate: the last 5 intervals between progress lines
        (t0, s0), (t1, s1) = self._marks[0], self._marks[-1]
        if s1 <= s0 or t1 <= t0:
            return "? (training speed not known yet)"
        return _hms(int((total - step) / ((s1 - s0) / (t1 - t0))))

    def episode(self, step: int, episodic_return: float, length: int) -> None:
        self.counters["last_return"] = float(episodic_return)
        self.writer.add_scalar("charts/episodic_return", episodic_return, step)
        self.writer.add_scalar("charts/episodic_length", length, step)

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def checkpoint_due(self, next_step: int, prev: Optional[int] = None) -> bool:
        """A checkpoint after the step that makes `next_step` steps done, every --checkpoint-every; none at the end."""
        return next_step < self.args.total_timesteps and due(next_step, self.args.checkpoint_every, prev)

    def save(self, step: int, state: dict, replay: Optional[ChunkStore] = None, filled: int = 0) -> None:
        """Checkpoint at `step` (every step before it is done): replay chunks first (new files), then checkpoint.pt,
        which names them, replaces the old one atomically, then the superseded chunk files go. A kill at any moment
        leaves one complete resumable checkpoint."""
        t0 = time.perf_counter()
        self.writer.flush()  # every event logged so far is on disk before the checkpoint that purges after it
        manifest, replay_bytes = None, 0
        if replay is not None:
            manifest, replay_bytes = replay.save(self.replay_dir, str(step), filled)
        counters = {**self.counters, "wall_seconds": self.wall()}
        size = atomic_save({"format": CHECKPOINT_FORMAT, "global_step": step, "script": self.script,
                            "args": dataclasses.asdict(self.args), "state": state, "counters": counters,
                            "replay": manifest}, self.ckpt_path)
        if replay is not None:
            ChunkStore.prune(self.replay_dir, manifest)
        self.ckpt_step = step
        more = f" + {replay_bytes / 1e6:.1f} MB of changed replay chunks" if replay is not None else ""
        print(f"checkpoint: step {step}, {size / 1e6:.1f} MB{more}, {time.perf_counter() - t0:.1f}s -> "
              f"{self.ckpt_path}", flush=True)

    def restore_replay(self, store: ChunkStore) -> None:
        if self.checkpoint is not None and self.checkpoint.get("replay"):
            store.load(self.replay_dir, self.checkpoint["replay"])

    def resumed(self, *modules) -> None:
        """The resume line (tests compare its checksum with the checkpoint's); drops the memory-mapped checkpoint."""
        print(f"resumed {self.dir} from step {self.start_step} (parameter checksum {param_checksum(*modules)!r})",
              flush=True)
        self.checkpoint = None

    def stop_nonfinite(self, step: int, what: str, last_good: LastGood) -> None:
        """Write the last good state beside the resumable checkpoint, say where both are, exit 1."""
        path = os.path.join(self.dir, "checkpoint_last_good.pt")
        atomic_save({"format": CHECKPOINT_FORMAT, "global_step": last_good.step, "args": dataclasses.asdict(self.args),
                     "state": last_good.state}, path)
        self.writer.close()
        resumable = self.ckpt_path + (f" (step {self.ckpt_step})" if self.ckpt_step else " (none yet)")
        fail(f"non-finite {what} at step {step}; last good state (step {last_good.step}) written to {path}; the "
             f"resumable checkpoint is {resumable}")

    # -- the end -------------------------------------------------------------------------------------------------
    def finish(self, step: int, keep_checkpoint: bool = False, **extra) -> dict:
        """Close the writer and write runs/NAME/finished (JSON): what bench.py, sweep.py and analyze.py read."""
        self.writer.close()
        wall_here = time.time() - self.start_time
        summary = {"script": self.script, "global_step": step, "steps_this_process": step - self.start_step,
                   "wall_seconds": self.wall(), "wall_seconds_this_process": wall_here,
                   "sps": (step - self.start_step) / max(wall_here, 1e-9),
                   "probe_seconds": self.counters["probe_seconds"], "n_probes": self.counters["n_probes"],
                   "probe_share": self.counters["probe_seconds"] / max(self.wall(), 1e-9),
                   "last_return": self.counters["last_return"],
                   "peak_host_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                   "device": self.device.type, "compile": self.use_compile, "cudagraphs": self.use_graphs,
                   "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra}
        if self.syncs is not None:
            summary["host_syncs"] = self.syncs.summary()
        if self.device.type == "cuda":
            summary["peak_gpu_allocated_bytes"] = torch.cuda.max_memory_allocated(self.device)
            summary["peak_gpu_reserved_bytes"] = torch.cuda.max_memory_reserved(self.device)
        with open(os.path.join(self.dir, "finished.tmp"), "w") as f:
            json.dump(summary, f, indent=1)
        os.replace(os.path.join(self.dir, "finished.tmp"), os.path.join(self.dir, "finished"))
        if not keep_checkpoint:  # a finished run is never resumed; a replay checkpoint holds gigabytes
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.ckpt_path)
            ChunkStore.prune(self.replay_dir, None)
            with contextlib.suppress(OSError):
                os.rmdir(self.replay_dir)
        print(f"done: {step} steps ({summary['steps_this_process']} in this process) in {wall_here:.1f}s, "
              f"SPS={int(summary['sps'])}; {summary['n_probes']} probes took {summary['probe_seconds']:.2f}s = "
              f"{100 * summary['probe_share']:.2f}% of wall time; peak host RSS "
              f"{summary['peak_host_rss_bytes'] / 2**20:.0f} MiB" + (
                  f", peak GPU memory {summary['peak_gpu_allocated_bytes'] / 2**20:.0f} MiB allocated"
                  if self.device.type == "cuda" else ""), flush=True)
        return summary

    # -- Ctrl-C / SIGTERM ----------------------------------------------------------------------------------------
    def _install_signals(self) -> None:
        """Ctrl-C or SIGTERM (a scheduler's pre-emption): one line, no traceback, exit 130; the events logged after
        the last checkpoint are dropped on --resume (purge_step), so the run continues from its last checkpoint."""
        def on_term(signum, frame):
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, on_term)
        previous = sys.excepthook

        def hook(kind, value, tb):
            if not issubclass(kind, KeyboardInterrupt):
                return previous(kind, value, tb)
            with contextlib.suppress(Exception):
                self.writer.close()
                sys.stdout.flush()  # os._exit skips it
            how = (f"continues from its checkpoint at step {self.ckpt_step} with --resume --run-name "
                   f"{self.args.run_name}" if self.ckpt_step else
                   "has no checkpoint yet: start it again without --resume (its events are moved aside)")
            sys.stderr.write(f"interrupted: {self.dir} {how}\n")
            sys.stderr.flush()
            os._exit(130)

        sys.excepthook = hook


def _hms(seconds: int) -> str:
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _holds_events(directory: str) -> bool:
    return any(name.startswith("events.out.tfevents") for _, _, files in os.walk(directory) for name in files)


# ---------------------------------------------------------------------------------------------------------------
# GPU fast paths (each checked against the plain code on CPU by the tests)


def compiled(fn: Callable, enabled: bool = True, strict: bool = False, **compile_kwargs) -> Callable:
    """`torch.compile(fn)` when `enabled`, else `fn`. If compiling fails (no C++ compiler or Triton, an unsupported
    op) and not `strict`, one warning goes to stderr and `fn` runs eagerly from then on. Tests pass strict=True."""
    if not enabled:
        return fn
    fast = torch.compile(fn, **compile_kwargs)
    chosen: list[Callable] = []

    def call(*args):
        if chosen:
            return chosen[0](*args)
        try:
            out = fast(*args)
        except Exception as e:  # noqa: BLE001 - any compiler failure means "run eagerly"
            if strict:
                raise
            print(f"warning: torch.compile of {getattr(fn, '__name__', fn)} failed ({type(e).__name__}: "
                  f"{str(e).splitlines()[0] if str(e) else ''}); running it eagerly", file=sys.stderr, flush=True)
            chosen.append(fn)
            return fn(*args)
        chosen.append(fast)
        return out

    return call


def cuda_graphed(fn: Callable, warmup: int = 3, strict: bool = False) -> Callable:
    """A callable equivalent to `fn(*tensors)` whose steady state replays a CUDA graph of `fn`: `warmup` eager calls
    on a side stream (workspaces, autotuning, lazily created optimizer state), then capture on static copies of the
    inputs, then replay. `fn` must not sync with the host and must update its state in place (set_capturable_). The
    outputs are the graph's static tensors: consume them before the next call. A failed capture falls back to eager
    with one warning unless `strict`."""
    state: dict = {"calls": 0, "graph": None, "eager": False}

    def call(*args):
        if state["graph"] is not None:
            for static, a in zip(state["inputs"], args):
                static.copy_(a, non_blocking=True)
            state["graph"].replay()
            return state["outputs"]
        if state["eager"]:
            return fn(*args)
        if not args or not all(torch.is_tensor(a) and a.is_cuda for a in args):
            raise ValueError("cuda_graphed: every argument must be a CUDA tensor (CUDA graphs need a GPU)")
        if state["calls"] < warmup:
            state["calls"] += 1
            side = state.setdefault("stream", torch.cuda.Stream())
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = fn(*args)
            torch.cuda.current_stream().wait_stream(side)
            return out
        inputs = [a.clone() for a in args]
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outputs = fn(*inputs)
        except Exception as e:  # noqa: BLE001
            if strict:
                raise
            print(f"warning: CUDA-graph capture of {getattr(fn, '__name__', fn)} failed ({type(e).__name__}: "
                  f"{str(e).splitlines()[0] if str(e) else ''}); running it eagerly", file=sys.stderr, flush=True)
            state["eager"] = True
            return fn(*args)
        state.update(graph=graph, inputs=inputs, outputs=outputs)
        graph.replay()  # capture records the kernels without running them: this call's step happens here
        return outputs

    return call


def set_capturable_(optimizer: torch.optim.Optimizer, capturable: bool) -> None:
    """Make an Adam-family optimizer's state updatable inside a CUDA graph (lr and step counters become device
    tensors) or undo it. In place; call it after load_state_dict too. Change the lr with set_lr."""
    for group in optimizer.param_groups:
        device = group["params"][0].device
        lr = float(group["lr"])
        group["lr"] = torch.tensor(lr, device=device) if capturable else lr
        group["capturable"] = capturable
        for p in group["params"]:
            st = optimizer.state.get(p, {})
            if torch.is_tensor(st.get("step")):
                st["step"] = st["step"].to(device if capturable else "cpu", torch.float32)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every param group's learning rate: filled in place when it is a tensor (no host sync), else assigned."""
    for group in optimizer.param_groups:
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


class Staging:
    """A host buffer and its device twin for batched uploads: fill the array `wait()` returns, then `upload()`. On
    CUDA the host side is pinned, upload() is one non-blocking copy followed by an event, and wait() blocks on that
    event so the host buffer is never rewritten while a copy may be in flight. On CPU both sides are the same memory.
    upload() returns the same device tensor every time (CUDA-graph inputs stay put)."""

    def __init__(self, shape, dtype: torch.dtype, device):
        cuda = torch.device(device).type == "cuda"
        self.host = torch.empty(shape, dtype=dtype, pin_memory=cuda)
        self.np = self.host.numpy()
        self.device = torch.empty(shape, dtype=dtype, device=device) if cuda else self.host
        self.copied = torch.cuda.Event() if cuda else None

    def wait(self) -> np.ndarray:
        if self.copied is not None:
            self.copied.synchronize()
        return self.np

    def upload(self) -> torch.Tensor:
        if self.copied is not None:
            self.device.copy_(self.host, non_blocking=True)
            self.copied.record()
        return self.device
