#!/usr/bin/env bash
# What the GPU check's device calls carry (docs/running.md "Checking a GPU"): the Python packages the GPU machine lacks, as
# wheels for its Python 3.12 on manylinux x86_64, cut down to what the check loads, one folder per device command:
#
#   .whl/atari  envpool (Atari only), its Atari ROMs, ale-py, gymnasium, tyro and their small dependencies
#   .whl/dmc    mujoco, dm-control (without the locomotion/soccer assets), glfw, PyOpenGL, tyro, ... (DrQ, SimbaV2,
#               MR.Q)
#   .gl         the libglvnd EGL/OpenGL loader .debs MuJoCo's EGL rendering needs (the device README's recipe)
#
# Each folder stays far below the 64 MiB a device call carries (the full wheels do not: envpool 50 MiB, its assets
# 60 MiB, dm-control 54 MiB, mujoco 25 MiB); the sizes are printed at the end. torch, numpy, scipy, tensorboard,
# opencv, pillow, matplotlib, absl-py, protobuf, lxml, etils ... are on the machine already and are NOT sent.
# The full downloads stay in $GPU_WHEELS_CACHE (default /tmp/gpu_wheels_dl), outside the repository; .whl/ and .gl/
# are ignored by git (.gitignore).
#
#   bash scripts/gpu_wheels.sh            # download (cached), prune, print the sizes
#   SKIP_GL=1 bash scripts/gpu_wheels.sh  # no .debs (a machine without apt-get)
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${GPU_WHEELS_CACHE:-/tmp/gpu_wheels_dl}
PY=${PYTHON:-python3}
mkdir -p "$CACHE"

# versions: requirements.txt's pins where it has them, else the versions pip resolves for those pins (checked here)
pin() { grep -iE "^$1(\[[a-z,]*\])?==" requirements.txt | head -1 | sed -E 's/\[[a-z,]*\]//; s/[[:space:]]*#.*//'; }
ATARI=("$(pin envpool)" envpool-assets==0.3.0 "$(pin ale-py)" "$(pin gymnasium)" farama-notifications==0.0.6
       "$(pin tyro)" docstring-parser==0.18.0 typeguard==4.6.1 typing-extensions==4.15.0 optree==0.20.0 dm-env==1.6
       dm-tree==0.1.10)
DMC=("$(pin mujoco)" "$(pin dm-control)" dm-env==1.6 dm-tree==0.1.10 glfw==2.11.0 pyopengl==3.1.10 labmaze==1.0.6
     "$(pin tyro)" docstring-parser==0.18.0 typeguard==4.6.1 typing-extensions==4.15.0)
for p in "${ATARI[@]}" "${DMC[@]}"; do
  [[ "$p" == *==* ]] || { echo "gpu_wheels.sh: no pin for '$p' in requirements.txt" >&2; exit 1; }
done

# manylinux tags: pip matches each exactly, and envpool/mujoco/ale-py ship manylinux_2_27/2_28 wheels only
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$CACHE" $(printf '%s\n' "${ATARI[@]}" "${DMC[@]}" | sort -u) 2>&1 |
  { grep -v "is ignored: it is neither" || true; }

# prune: rebuild each wheel without the files the check never loads (RECORD rewritten to match), one folder per
# device command. The rules name directories inside the wheels; everything else is kept as it is.
rm -rf .whl/atari .whl/dmc
"$PY" - "$CACHE" "${ATARI[*]}" "${DMC[*]}" <<'EOF'
import base64, glob, hashlib, os, re, sys, zipfile

cache, parts = sys.argv[1], {"atari": sys.argv[2].split(), "dmc": sys.argv[3].split()}
OTHER_ENVPOOL = ("box2d", "classic_control", "gfootball", "highway", "jumanji", "minigrid", "mujoco", "pgx",
                 "procgen", "toy_text", "vizdoom")
# (wheel project, rule): a path matching `drop` goes, unless `keep_py` and it is a .py file. envpool keeps Atari
# only: its other env families go whole, and envpool/entry.py (which `import envpool` runs to register every family,
# importing each family's compiled library) is replaced by one that registers Atari alone.
RULES = {
    "envpool": [(re.compile(rf"^envpool/({'|'.join(OTHER_ENVPOOL)})/"), False)],
    "envpool_assets": [(re.compile(r"^envpool_assets/(?!atari/|__init__\.py)"), False)],
    "dm_control": [(re.compile(r"^dm_control/locomotion/(soccer|walkers)/"), True),
                   (re.compile(r"^dm_control/(mujoco/testing|blender|mjcf/test_assets)/"), True)],
    "mujoco": [(re.compile(r"^mujoco/experimental/"), True)],
}
REPLACE = {"envpool/entry.py": b'"""The envpool wheel pruned by scripts/gpu_wheels.sh: Atari only."""\n\n'
                               b"import envpool.atari.registration  # noqa: F401\n"}


def norm(name):
    return re.sub(r"[-_.]+", "_", name).lower()


def wheel_for(req):
    name, version = req.split("==")
    hits = [w for w in glob.glob(os.path.join(cache, "*.whl"))
            if norm(os.path.basename(w).split("-")[0]) == norm(name) and os.path.basename(w).split("-")[1] == version]
    if len(hits) != 1:
        sys.exit(f"gpu_wheels.sh: expected one wheel for {req} in {cache}, found {hits}")
    return hits[0]


def prune(src, dst):
    project = norm(os.path.basename(src).split("-")[0])
    rules = RULES.get(project, [])
    zin = zipfile.ZipFile(src)
    kept = [i for i in zin.infolist()
            if not any(rx.match(i.filename) and not (keep_py and i.filename.endswith(".py")) for rx, keep_py in rules)]
    names = {i.filename for i in kept}
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
        for i in kept:
            data = REPLACE.get(i.filename) or zin.read(i.filename)
            if i.filename.endswith(".dist-info/RECORD"):
                lines = []
                for ln in data.decode().splitlines():
                    path = ln.split(",")[0]
                    if path in REPLACE:
                        digest = base64.urlsafe_b64encode(hashlib.sha256(REPLACE[path]).digest()).rstrip(b"=")
                        ln = f"{path},sha256={digest.decode()},{len(REPLACE[path])}"
                    if path in names:
                        lines.append(ln + "\n")
                data = "".join(lines).encode()
            zout.writestr(i, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)


for part, reqs in parts.items():
    os.makedirs(os.path.join(".whl", part), exist_ok=True)
    print(f"{part}:")
    total = 0
    for req in reqs:
        src = wheel_for(req)
        dst = os.path.join(".whl", part, os.path.basename(src))
        prune(src, dst)
        total += os.path.getsize(dst)
        print(f"  {os.path.getsize(src) / 2**20:7.2f} MiB -> {os.path.getsize(dst) / 2**20:6.2f} MiB  "
              f"{os.path.basename(src)}")
    print(f"  .whl/{part}: {total / 2**20:.1f} MiB")
EOF

# the EGL/OpenGL loaders (libglvnd) for MuJoCo's MUJOCO_GL=egl, as the device README downloads them
if [[ -z "${SKIP_GL:-}" ]]; then
  mkdir -p .gl /tmp/amd64/partial
  o=(-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64)
  debs=(libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)
  missing=()
  for d in "${debs[@]}"; do ls .gl/"${d}"_*.deb >/dev/null 2>&1 || missing+=("$d"); done
  if ((${#missing[@]})); then
    apt-get "${o[@]}" update -qq
    (cd .gl && apt-get "${o[@]}" download -qq "${missing[@]}" 2>/dev/null)
  fi
fi

size() { du -sb "$@" 2>/dev/null | awk '{s += $1} END {printf "%.1f", s / 1048576}'; }
tree=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -1 |
       awk '{printf "%.1f", $1 / 1048576}')
echo
echo "what each device call carries (limit 64 MiB, the working tree included):"
echo "  working tree (tracked + untracked, not ignored): ${tree} MiB"
echo "  atari call: carry .whl/atari       $(size .whl/atari) MiB"
echo "  dmc call:   carry .whl/dmc .gl     $(size .whl/dmc .gl) MiB"
