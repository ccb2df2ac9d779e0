#!/usr/bin/env bash
# Build, HERE (a CPU machine with PyPI access), the wheel sets that the lent GPU machine (no network; Python 3.12,
# torch 2.11.0+cu130, torchvision 0.26.0, transformers 5.17.0, ...) lacks; bench/gpu_install.sh installs them THERE.
#
#   bash bench/gpu_wheels.sh                  # both sets
#   PIECE_MB=20 bash bench/gpu_wheels.sh      # vLLM pieces of 20 MiB (default: what fits beside the working tree)
#   ONLY=base bash bench/gpu_wheels.sh        # only .whl/base (ONLY=vllm: only the vLLM pieces)
#   ONLY=ray bash bench/gpu_wheels.sh         # only the Ray pieces (.whl/ray1, .whl/ray2: `osprey annotate --ray`)
#   VLLM_STRIP=0 bash bench/gpu_wheels.sh     # carry vLLM's wheel whole (see "left out" below)
#
# Output (git-ignored, under .whl/):
#   .whl/base/      the project's runtime deps the GPU machine lacks (open_clip_torch, ftfy, pycocotools, pydantic,
#                   fastapi + starlette + opentelemetry-api, uvicorn, openai, deepspeed 0.19.8 built here, hjson, ...)
#                   as wheels; the project itself is not in it (the device run builds it from the carried tree).
#   .whl/vllm1/ ... .whl/vllmN/   one piece each of vllm.tar.xz (vLLM 0.26.0 + its deps that neither the GPU machine
#                   nor .whl/base has), at most PIECE_MB MiB, each with MANIFEST (sha256 of the whole archive and of
#                   every piece), so each folder can be carried in its own device run. A device call carries the
#                   working tree too (tracked + untracked-not-ignored files, ~38 MiB in December 2026) and at most
#                   64 MiB in all: by default PIECE_MB = 62 - (working tree MiB), rounded down (23 then).
#   .whl/ray1/ ... .whl/rayN/     the same for ray[data] 2.60.0 and the few small deps the GPU machine lacks
#                   (jsonschema & co.; it has pandas, pyarrow, msgpack, ...): Ray's 79 MB wheel does not fit one call
#                   beside the tree. gpu_install.sh `stash` takes either kind of piece, `ray` installs them.
#   .whl/_cache/    downloads and resolver reports (reused by reruns; never carry it).
#
# How: pip resolves for CPython 3.12 / manylinux x86_64 (`pip install --dry-run --ignore-installed --report`) with
# dummy wheels offered from a local folder for what must not be fetched: torch 2.11.0, torchvision 0.26.0,
# torchaudio 2.11.0 and triton as `+dummy` local versions (they satisfy `==2.11.0`), and llguidance 1.7.0+dummy
# (vLLM 0.26.0 asks for >=1.7.0,<1.8; 1.6.1 is the newest reachable, so the real 1.6.1 wheel is carried instead).
# Packages already on the GPU machine (its image's list, KINDS.md, read 2026-11-17; versions not recorded there,
# gpu_install.sh reports any that miss vLLM's bounds) are dropped from both sets. The base set is resolved with
# vLLM's picks as constraints, so the two sets agree and the vLLM set leaves out what base carries.
#
# Left out of the vLLM set (optional there; not imported when serving a Llama model on H100/H200):
#   nvidia-cutlass-dsl (CuTe-DSL), quack-kernels, tokenspeed-mla, tilelang (+ z3-solver), humming-kernels,
#   PyNvVideoCodec, torchcodec (video), fastsafetensors (load format), nvtx, flashinfer-python +
#   nvidia-cudnn-frontend (FlashInfer backend/sampler: set VLLM_USE_FLASHINFER_SAMPLER=0 there, which
#   gpu_install.sh prints), fastapi-cloud-cli (+ sentry-sdk, rignore, ...: `fastapi deploy`), CUDA-toolkit wheels
#   (the GPU machine has its own). Resolved against transformers==5.17.0, the GPU machine's. apache-tvm-ffi is
#   carried: xgrammar imports it, and vLLM's engine core imports xgrammar at start (without it: "No module named
#   'tvm_ffi'", seen on the H100 on 7 December 2026).
# With VLLM_STRIP=1 (default) these files are also taken out of vLLM's own wheel (RECORD rewritten):
#   vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so (FlashAttention 2: Hopper uses FA3, vllm_flash_attn imports FA2 in a
#   try), vllm/_moe_C_stable_libtorch.abi3.so (MoE kernels, imported under contextlib.suppress), vllm/vllm-rs
#   (opt-in Rust frontend, VLLM_USE_RUST_FRONTEND), deep_gemm's _C for Pythons other than 3.12.
# The vLLM wheel is re-zipped uncompressed so that xz compresses its kernels (FA3: 37 MB deflated, 10 MB xz).
set -euo pipefail
cd "$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"

# What travels with every device call anyway: tracked and untracked-not-ignored files, and shared/.
TREE_B=$( { git ls-files -z -co --exclude-standard; if [ -d shared ]; then find shared -type f -print0; fi; } \
          | xargs -0 -r stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
TREE_MB=$(( (TREE_B + 1048575) / 1048576 ))
PIECE_MB=${PIECE_MB:-$(( 62 - TREE_MB ))}
[ "$PIECE_MB" -ge 4 ] || { echo "gpu_wheels: working tree is $TREE_MB MiB: no room for pieces (set PIECE_MB)" >&2; exit 1; }
if [ $(( PIECE_MB + TREE_MB )) -gt 63 ]; then
  echo "gpu_wheels: WARNING: $PIECE_MB MiB pieces + the $TREE_MB MiB working tree exceed a call's 64 MiB" >&2
fi
echo "gpu_wheels: working tree $TREE_MB MiB, vLLM pieces of at most $PIECE_MB MiB"
VLLM_VERSION=${VLLM_VERSION:-0.26.0}
VLLM_STRIP=${VLLM_STRIP:-1}
ONLY=${ONLY:-all}
W=.whl/_cache
mkdir -p "$W"

# A CPython 3.12 for the resolver (environment markers are evaluated for the running interpreter).
if [ -z "${PY:-}" ]; then
  for c in python3.12 /root/.pyenv/versions/3.12*/bin/python3 python3; do
    p=$(command -v "$c" 2>/dev/null || true); [ -n "$p" ] || continue
    if "$p" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then PY=$p; break; fi
  done
fi
[ -n "${PY:-}" ] || { echo "gpu_wheels: no CPython 3.12 found; set PY=/path/to/python3.12" >&2; exit 1; }
pip_() {  # pip without the noise of this machine's extra file:// indexes
  "$PY" -m pip "$@" 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
}
echo "gpu_wheels: resolving with $PY ($("$PY" -m pip --version | cut -d' ' -f1-2))"

PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none)
for t in manylinux_2_28 manylinux_2_27 manylinux_2_26 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  PLAT+=(--platform "${t}_x86_64")
done
PLAT+=(--platform any)

# What the GPU machine already has (KINDS.md "Python packages already there", image 'cuda', 2026-11-17).
cat > "$W/gpu_present.txt" <<'EOF'
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
EOF

# Dummy wheels: name version (a `+dummy` local version; high versions for `>=` needs so PyPI's never wins).
cat > "$W/dummies.txt" <<'EOF'
torch 2.11.0
torchvision 0.26.0
torchaudio 2.11.0
triton 3.7.0
llguidance 1.7.0
nvidia-cutlass-dsl 4.6.0
nvidia-cutlass-dsl-libs-base 4.6.0
quack-kernels 999.0
tokenspeed-mla 0.1.8
tilelang 0.1.9
z3-solver 999.0
humming-kernels 0.1.10
pynvvideocodec 2.0.4
torchcodec 999.0
fastsafetensors 999.0
nvtx 0.2.15
flashinfer-python 0.6.14
flashinfer-cubin 999.0
nvidia-cudnn-frontend 999.0
fastapi-cloud-cli 999.0
EOF

# Versions known on the GPU machine (so that the resolve pulls only what those versions need).
printf '%s\n' torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0 transformers==5.17.0 > "$W/gpu_known.txt"

mkdummies() {  # mkdummies LIST DIR: a "+dummy" wheel for each "name version" line
"$PY" - "$@" <<'EOF'
import base64, hashlib, pathlib, sys, zipfile
lst, d = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]); d.mkdir(parents=True, exist_ok=True)
wanted = set()
for line in lst.read_text().split("\n"):
    if not line.strip():
        continue
    name, ver = line.split(); ver += "+dummy"; norm = name.replace("-", "_")
    path = d / f"{norm}-{ver}-py3-none-any.whl"
    wanted.add(path.name)
    if path.exists():
        continue
    di = f"{norm}-{ver}.dist-info"
    files = {f"{di}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {ver}\n",
             f"{di}/WHEEL": "Wheel-Version: 1.0\nGenerator: gpu_wheels\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    rec = "".join(f"{k},sha256={base64.urlsafe_b64encode(hashlib.sha256(v.encode()).digest()).rstrip(b'=').decode()},{len(v)}\n"
                  for k, v in files.items()) + f"{di}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for k, v in files.items():
            z.writestr(k, v)
        z.writestr(f"{di}/RECORD", rec)
for stale in d.glob("*.whl"):  # a stand-in no longer listed (e.g. a package now carried) must not be offered
    if stale.name not in wanted:
        stale.unlink()
EOF
}
mkdummies "$W/dummies.txt" "$W/dummy"

# deepspeed 0.19.8 is a source package on PyPI: build its wheel once (ops compile just in time, no torch needed).
mkdir -p "$W/built"
if ! ls "$W"/built/deepspeed-0.19.8-*.whl >/dev/null 2>&1; then
  echo "gpu_wheels: building deepspeed 0.19.8 wheel"
  pip_ wheel -q --no-deps -w "$W/built" deepspeed==0.19.8
fi

resolve() {  # resolve OUT.json [pip args...]: dry-run install report for the GPU machine's tags
  local out=$1; shift
  rm -rf "$W/target"
  pip_ install -q --dry-run --ignore-installed --report "$out" --target "$W/target" "${PLAT[@]}" \
    --find-links "$W/dummy" --find-links "$W/built" "$@"
}

# keep REPORT EXCLUDE_FILE... : "name==version" lines of the report's non-dummy items whose names are in no list
keep() {
  "$PY" - "$@" <<'EOF'
import json, re, sys
norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
items = json.load(open(sys.argv[1]))["install"]
skip = set()
for f in sys.argv[2:]:
    skip |= {norm(x.split("==")[0]) for x in open(f).read().split()}
for it in sorted(items, key=lambda i: norm(i["metadata"]["name"])):
    n, v = norm(it["metadata"]["name"]), it["metadata"]["version"]
    if "+dummy" in v or n in skip:
        continue
    print(f"{n}=={v}")
EOF
}

download() {  # download REQ_FILE DEST: exactly these pins, no dependencies
  mkdir -p "$2"
  pip_ download -q --no-deps "${PLAT[@]}" --find-links "$W/built" -d "$2" -r "$1"
}

make_pieces() {  # make_pieces NAME SRC_DIR HEADER: SRC_DIR's files -> NAME.tar.xz in PIECE_MB pieces, .whl/NAME1..N
  local name=$1 src=$2 header=$3 n i=0 p
  rm -rf .whl/"$name"[0-9]* "$W/pieces"; mkdir -p "$W/pieces"
  echo "gpu_wheels: compressing $name (xz -6, a few minutes)"
  tar -C "$src" -cf - . | xz -6 -T0 > "$W/$name.tar.xz"
  split -b "${PIECE_MB}m" -d -a 2 "$W/$name.tar.xz" "$W/pieces/$name.tar.xz.part"
  n=$(ls "$W/pieces" | wc -l)
  {
    echo "$header"
    echo "archive $name.tar.xz $(sha256sum "$W/$name.tar.xz" | cut -d' ' -f1) $(stat -c %s "$W/$name.tar.xz")"
    echo "pieces $n"
    for p in "$W"/pieces/*; do echo "piece $(basename "$p") $(sha256sum "$p" | cut -d' ' -f1) $(stat -c %s "$p")"; done
  } > "$W/MANIFEST"
  for p in "$W"/pieces/*; do
    i=$((i + 1)); mkdir -p ".whl/$name$i"; mv "$p" ".whl/$name$i/"; cp "$W/MANIFEST" ".whl/$name$i/"
  done
  rm -f "$W/$name.tar.xz"
}

rezip_stored() {  # rezip_stored WHEEL: the same wheel uncompressed, so that xz compresses its binaries
"$PY" - "$1" <<'EOF'
import os, sys, zipfile
src = sys.argv[1]; tmp = src + ".tmp"
with zipfile.ZipFile(src) as zi, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zo:
    for info in zi.infolist():
        data = zi.read(info); info.compress_type = zipfile.ZIP_STORED; zo.writestr(info, data)
os.replace(tmp, src)
EOF
}

# ---- Ray (ONLY=ray): ray[data] and what the GPU machine lacks of its deps, in pieces ----
if [ "$ONLY" = ray ]; then
  RAY_VERSION=${RAY_VERSION:-2.60.0}
  echo "gpu_wheels: resolving ray[data]==$RAY_VERSION"
  resolve "$W/ray_report.json" "ray[data]==$RAY_VERSION" -c "$W/gpu_known.txt"
  keep "$W/ray_report.json" "$W/gpu_present.txt" > "$W/ray_keep.txt"
  rm -rf "$W/dl_ray"; download "$W/ray_keep.txt" "$W/dl_ray"
  echo "gpu_wheels: Ray set: $(ls "$W/dl_ray" | tr '\n' ' ')"
  rezip_stored "$(ls "$W"/dl_ray/ray-*.whl)"
  make_pieces ray "$W/dl_ray" "ray $RAY_VERSION"
  du -sh .whl/ray[0-9]* | sort -V -k2
  exit 0
fi

# ---- 1. vLLM resolve first (its picks constrain base) ----
echo "gpu_wheels: resolving vllm==$VLLM_VERSION"
resolve "$W/vllm_report.json" "vllm==$VLLM_VERSION" -c "$W/gpu_known.txt"
keep "$W/vllm_report.json" > "$W/vllm_constraints.txt"

# ---- 2. base set ----
cat > "$W/base_req.txt" <<'EOF'
open_clip_torch>=3.0
ftfy
pycocotools>=2.0.8
safetensors>=0.4
pydantic>=2.6
pyyaml>=6.0
tqdm>=4.66
fastapi>=0.115
starlette
opentelemetry-api
uvicorn>=0.30
httpx>=0.27
prometheus-client>=0.20
openai>=1.40
deepspeed==0.19.8
hjson
EOF
echo "gpu_wheels: resolving the project's runtime deps"
resolve "$W/base_report.json" -r "$W/base_req.txt" -c "$W/vllm_constraints.txt" -c "$W/gpu_known.txt"
keep "$W/base_report.json" "$W/gpu_present.txt" > "$W/base_keep.txt"

if [ "$ONLY" != vllm ]; then
  rm -rf .whl/base; download "$W/base_keep.txt" "$W/dl_base"
  mkdir -p .whl/base
  while IFS= read -r pin; do
    n=${pin%%==*}; v=${pin#*==}
    f=$(ls "$W"/dl_base/* "$W"/built/* 2>/dev/null | "$PY" -c "
import re, sys
norm = lambda s: re.sub(r'[-_.]+', '-', s).lower()
for p in sys.stdin.read().split():
    b = p.rsplit('/', 1)[-1]
    if b.endswith('.whl') and norm(b.split('-')[0]) == '$n' and b.split('-')[1] == '$v': print(p); break")
    [ -n "$f" ] || { echo "gpu_wheels: no wheel for $pin" >&2; exit 1; }
    cp "$f" .whl/base/
  done < "$W/base_keep.txt"
  echo "gpu_wheels: .whl/base: $(ls .whl/base | wc -l) wheels, $(du -sh .whl/base | cut -f1)"; ls .whl/base
fi
[ "$ONLY" = base ] && exit 0

# ---- 3. vLLM set: its resolve minus the GPU machine's packages, minus base, plus the real llguidance 1.6.1 ----
keep "$W/vllm_report.json" "$W/gpu_present.txt" "$W/base_keep.txt" > "$W/vllm_keep.txt"
echo "llguidance==1.6.1" >> "$W/vllm_keep.txt"
rm -rf "$W/dl_vllm"; download "$W/vllm_keep.txt" "$W/dl_vllm"
echo "gpu_wheels: vLLM set: $(ls "$W/dl_vllm" | wc -l) wheels, $(du -sh "$W/dl_vllm" | cut -f1) as downloaded"

# strip + re-zip vLLM's own wheel uncompressed (same name: pip checks the name against the metadata)
"$PY" - "$W/dl_vllm" "$VLLM_STRIP" <<'EOF'
import glob, re, sys, zipfile, os
d, strip = sys.argv[1], sys.argv[2] == "1"
(src,) = glob.glob(f"{d}/vllm-*.whl")
drop = re.compile(r"^vllm/(vllm_flash_attn/_vllm_fa2_C\.abi3\.so|_moe_C_stable_libtorch\.abi3\.so|vllm-rs"
                  r"|third_party/deep_gemm/_C\.cpython-3(?!12-)\d+-.*\.so)$") if strip else re.compile(r"^$")
tmp = src + ".tmp"; dropped = []
with zipfile.ZipFile(src) as zi, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zo:
    for info in zi.infolist():
        if drop.match(info.filename):
            dropped.append(info.filename); continue
        data = zi.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            data = "".join(l for l in data.decode().splitlines(True) if not drop.match(l.split(",")[0])).encode()
        info.compress_type = zipfile.ZIP_STORED
        zo.writestr(info, data)
os.replace(tmp, src)
print("gpu_wheels: left out of the vLLM wheel:", ", ".join(dropped) or "nothing")
EOF

# ---- 4. tar.xz, split into pieces, one folder each, MANIFEST in each ----
make_pieces vllm "$W/dl_vllm" "vllm $VLLM_VERSION strip=$VLLM_STRIP"

# ---- 5. check: reassemble the pieces as gpu_install.sh does, then resolve vLLM + the project's deps offline from
# them + .whl/base, with "+dummy" stand-ins for what the GPU machine has (at the versions resolved above) ----
if [ "${VERIFY:-1}" = 1 ]; then
  echo "gpu_wheels: checking the pieces and that the wheel set is complete"
  parts=$(for d in $(ls -d .whl/vllm[0-9]* | sort -V); do ls "$d"/vllm.tar.xz.part*; done)
  want=$(awk '$1 == "archive" {print $3}' .whl/vllm1/MANIFEST)
  got=$(cat $parts | sha256sum | cut -d' ' -f1)
  [ "$got" = "$want" ] || { echo "gpu_wheels: reassembled sha256 $got != manifest $want" >&2; exit 1; }
  echo "gpu_wheels: reassembled archive matches MANIFEST ($got)"
  rm -rf "$W/verify" "$W/gpu_dummy"; mkdir -p "$W/verify"
  cat $parts | xz -d | tar -C "$W/verify" -xf -
  "$PY" - "$W" > "$W/gpu_dummies.txt" <<'EOF'
import json, re, sys
norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
w = sys.argv[1]; present = set(open(f"{w}/gpu_present.txt").read().split()); seen = set()
for rep in ("vllm_report.json", "base_report.json"):
    for it in json.load(open(f"{w}/{rep}"))["install"]:
        n, v = norm(it["metadata"]["name"]), it["metadata"]["version"]
        if n in present and "+dummy" not in v and n not in seen:
            seen.add(n); print(n, v)
EOF
  mkdummies "$W/gpu_dummies.txt" "$W/gpu_dummy"
  rm -rf "$W/target"
  # no pip configuration here: this machine's own find-links/indexes would hide a missing wheel
  PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= PIP_EXTRA_INDEX_URL= PIP_CONSTRAINT= \
  pip_ install -q --dry-run --ignore-installed --no-index --report "$W/verify_report.json" --target "$W/target" \
    "${PLAT[@]}" --find-links "$W/verify" --find-links .whl/base --find-links "$W/dummy" --find-links "$W/gpu_dummy" \
    "vllm==$VLLM_VERSION" -r "$W/base_req.txt"
  "$PY" - "$W/verify_report.json" <<'EOF'
import json, sys
items = json.load(open(sys.argv[1]))["install"]
real = [i for i in items if "+dummy" not in i["metadata"]["version"]]
print(f"gpu_wheels: offline resolve OK: {len(items)} packages, {len(real)} carried, {len(items) - len(real)} stand-ins")
EOF
fi
echo "gpu_wheels: folders (carry each in its own device run):"
du -sh .whl/base .whl/vllm[0-9]* | sort -V -k2
echo "gpu_wheels: each call carries the $TREE_MB MiB working tree plus its folder (64 MiB at most in all)"
