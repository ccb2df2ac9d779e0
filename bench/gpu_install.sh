#!/usr/bin/env bash
# Install, THERE (the lent GPU machine: no network), the wheel sets that bench/gpu_wheels.sh built here under .whl/.
# Run from the repository root on the device; each mode is idempotent (a rerun redoes nothing that is done).
#
#   bash bench/gpu_install.sh base                # carry .whl/base: the project's runtime deps -> /tmp/site
#   bash bench/gpu_install.sh stash .whl/vllmN    # carry .whl/vllmN: copy that piece to /tmp/vllm_pieces/
#                                                 #   (.whl/rayN likewise, to /tmp/ray_pieces/)
#   bash bench/gpu_install.sh vllm                # after all pieces are stashed: check, unpack, install vLLM
#                                                 #   -> /tmp/vllm_site (needs /tmp/site: runs `base` first if
#                                                 #   .whl/base was carried in the same call and /tmp/site is absent)
#   bash bench/gpu_install.sh ray                 # after the Ray pieces are stashed: Ray -> /tmp/site
#
# The pieces arrive one device run each (a piece per `carry`, 45 MiB by default, under the 64 MiB a call) while the
# machine stays warm; /tmp survives between runs on a warm machine, not on a fresh one. Then:
#   export PYTHONPATH=/tmp/vllm_site:/tmp/site PATH=/tmp/vllm_site/bin:/tmp/site/bin:$PATH
#   export VLLM_USE_FLASHINFER_SAMPLER=0    # flashinfer is not carried (see gpu_wheels.sh, "Left out")
# (the script prints the exact lines). vLLM needs `if __name__ == "__main__":` in the script that starts it.
set -euo pipefail
cd "$(git -C "$(dirname "$0")" rev-parse --show-toplevel 2>/dev/null || (cd "$(dirname "$0")/.." && pwd))"

SITE=/tmp/site
CHECK_IMPORTS=${CHECK_IMPORTS:-1}   # 0: skip the import checks (for a dry run of this script on a machine without torch)
export PIP_ROOT_USER_ACTION=ignore
VSITE=/tmp/vllm_site
PIECES=/tmp/vllm_pieces
RAY_PIECES=/tmp/ray_pieces
PIP=(python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check
     --upgrade --target)
say() { echo "gpu_install: $*"; }
die() { echo "gpu_install: ERROR: $*" >&2; exit 1; }

sha_of() { sha256sum "$1" | cut -d' ' -f1; }

install_base() {
  ls .whl/base/*.whl >/dev/null 2>&1 || die "no wheels in .whl/base (carry .whl/base; build it with bench/gpu_wheels.sh)"
  local stamp; stamp=$(cd .whl/base && ls *.whl | sha256sum | cut -c1-16)
  if [ -f "$SITE/.gpu_install_base_$stamp" ]; then
    say "base already installed in $SITE ($(ls .whl/base/*.whl | wc -l) wheels)"
  else
    mkdir -p "$SITE"
    "${PIP[@]}" "$SITE" .whl/base/*.whl 2> >(grep -v "^WARNING: Target directory .* already exists" >&2)
    touch "$SITE/.gpu_install_base_$stamp"
    say "installed $(ls .whl/base/*.whl | wc -l) wheels into $SITE"
  fi
  [ "$CHECK_IMPORTS" = 1 ] || { say "import check skipped (CHECK_IMPORTS=0)"; return 0; }
  PYTHONPATH=$SITE python3 -c "import open_clip, pycocotools, fastapi, uvicorn, pydantic, deepspeed, openai" \
    || die "base import check failed"
  say "base import check OK (open_clip, pycocotools, fastapi, uvicorn, pydantic, deepspeed, openai)"
}

print_base_env() {
  echo "export PYTHONPATH=\$PWD:$SITE\${PYTHONPATH:+:\$PYTHONPATH} PATH=$SITE/bin:\$PATH"
}

manifest_check() {  # manifest_check MANIFEST DIR: every piece in DIR with its sha256; echo the count present
  local m=$1 dir=$2 n=0 name sha
  while read -r kind name sha _; do
    [ "$kind" = piece ] || continue
    if [ -f "$dir/$name" ]; then
      [ "$(sha_of "$dir/$name")" = "$sha" ] || die "$dir/$name: sha256 differs from MANIFEST (rebuild or re-stash)"
      n=$((n + 1))
    fi
  done < "$m"
  echo "$n"
}

unpack_pieces() {  # unpack_pieces DIR DEST: check DIR's pieces against their MANIFEST, untar the archive into DEST
  local dir=$1 dest=$2 total want have got missing
  [ -f "$dir/MANIFEST" ] || die "no pieces in $dir (run 'stash' with each piece's folder first, on this warm machine)"
  total=$(awk '$1 == "pieces" {print $2}' "$dir/MANIFEST")
  want=$(awk '$1 == "archive" {print $3}' "$dir/MANIFEST")
  have=$(manifest_check "$dir/MANIFEST" "$dir")
  if [ "$have" != "$total" ]; then
    missing=$(awk '$1 == "piece" {print $2}' "$dir/MANIFEST" | while read -r n; do [ -f "$dir/$n" ] || echo "$n"; done)
    die "$have of $total pieces stashed; missing: $(echo $missing)"
  fi
  got=$(awk '$1 == "piece" {print $2}' "$dir/MANIFEST" | sed "s|^|$dir/|" | xargs cat | sha256sum | cut -d' ' -f1)
  [ "$got" = "$want" ] || die "reassembled archive sha256 $got != MANIFEST $want"
  say "archive complete ($total pieces, sha256 OK); unpacking"
  rm -rf "$dest"; mkdir -p "$dest"
  awk '$1 == "piece" {print $2}' "$dir/MANIFEST" | sed "s|^|$dir/|" | xargs cat | xz -d | tar -C "$dest" -xf -
}

case "${1:-}" in
  base)
    install_base; print_base_env
    ;;

  stash)
    src=${2:-}; [ -n "$src" ] || die "usage: bash bench/gpu_install.sh stash .whl/vllmN"
    [ -f "$src/MANIFEST" ] || die "$src/MANIFEST missing (was $src carried?)"
    PIECES=/tmp/$(awk 'NR == 1 {print $1}' "$src/MANIFEST")_pieces
    mkdir -p "$PIECES"
    if [ -f "$PIECES/MANIFEST" ] && ! cmp -s "$src/MANIFEST" "$PIECES/MANIFEST"; then
      say "pieces of another build were in $PIECES: removing them"; rm -f "$PIECES"/*
    fi
    cp -f "$src/MANIFEST" "$PIECES/"
    for p in "$src"/*.tar.xz.part*; do
      [ -e "$p" ] || die "no piece in $src"
      if [ -f "$PIECES/$(basename "$p")" ] && cmp -s "$p" "$PIECES/$(basename "$p")"; then
        say "$(basename "$p") already stashed"
      else
        cp -f "$p" "$PIECES/"; say "stashed $(basename "$p") ($(du -h "$p" | cut -f1))"
      fi
    done
    have=$(manifest_check "$PIECES/MANIFEST" "$PIECES"); total=$(awk '$1 == "pieces" {print $2}' "$PIECES/MANIFEST")
    say "$have of $total pieces in $PIECES"
    ;;

  vllm)
    [ -f "$PIECES/MANIFEST" ] || die "no pieces in $PIECES (run 'stash .whl/vllmN' for each piece first, on this warm machine)"
    want=$(awk '$1 == "archive" {print $3}' "$PIECES/MANIFEST")
    if [ ! -d "$SITE" ] || ! ls "$SITE"/.gpu_install_base_* >/dev/null 2>&1; then
      if ls .whl/base/*.whl >/dev/null 2>&1; then install_base >/dev/null; say "installed base first"
      else say "warning: $SITE has no base install (fastapi, pydantic, openai, ... come from it): carry .whl/base and run 'base'"; fi
    fi
    stamp="$VSITE/.gpu_install_vllm_${want:0:16}"
    if [ -f "$stamp" ]; then
      say "vLLM already installed in $VSITE (archive ${want:0:16})"
    else
      unpack_pieces "$PIECES" /tmp/vllm_wheels
      say "installing $(ls /tmp/vllm_wheels/*.whl | wc -l) wheels into $VSITE"
      rm -rf "$VSITE"; mkdir -p "$VSITE"
      "${PIP[@]}" "$VSITE" /tmp/vllm_wheels/*.whl
      rm -rf /tmp/vllm_wheels
      touch "$stamp"
    fi
    export PYTHONPATH=$VSITE:$SITE${PYTHONPATH:+:$PYTHONPATH} VLLM_USE_FLASHINFER_SAMPLER=0
    # vLLM's requirements against what is importable now (the GPU machine's own packages' versions are not
    # recorded here): report, don't fail; the left-out optional packages are expected to be reported missing.
    python3 - <<'EOF' || true
import importlib.metadata as md
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
left_out = {"nvidia-cutlass-dsl", "quack-kernels", "tokenspeed-mla", "tilelang", "humming-kernels", "pynvvideocodec",
            "torchcodec", "fastsafetensors", "nvtx", "flashinfer-python", "nvidia-cudnn-frontend"}
norm = lambda s: s.replace("_", "-").replace(".", "-").lower()
bad = []
for r in md.requires("vllm") or []:
    req = Requirement(r)
    if req.marker and not req.marker.evaluate({"extra": ""}):
        continue
    if norm(req.name) in left_out:
        continue
    try:
        v = md.version(req.name)
    except md.PackageNotFoundError:
        bad.append(f"{req.name}: missing (wants {req.specifier})"); continue
    if req.specifier and not req.specifier.contains(v, prereleases=True):
        bad.append(f"{req.name} {v}: vLLM wants {req.specifier}")
print("gpu_install: vLLM requirement check: " + ("all met" if not bad else "; ".join(bad)))
EOF
    echo "export PYTHONPATH=\$PWD:$VSITE:$SITE\${PYTHONPATH:+:\$PYTHONPATH} PATH=$VSITE/bin:$SITE/bin:\$PATH VLLM_USE_FLASHINFER_SAMPLER=0"
    [ "$CHECK_IMPORTS" = 1 ] || { say "import check skipped (CHECK_IMPORTS=0)"; exit 0; }
    python3 -c "import vllm; print('gpu_install: import vllm OK, version', vllm.__version__)" \
      || die "import vllm failed (PYTHONPATH=$PYTHONPATH)"
    ;;

  ray)
    ls "$SITE"/.gpu_install_base_* >/dev/null 2>&1 || die "run 'base' first (Ray goes into $SITE beside it)"
    want=$(awk '$1 == "archive" {print $3}' "$RAY_PIECES/MANIFEST" 2>/dev/null || true)
    if [ -n "$want" ] && [ -f "$SITE/.gpu_install_ray_${want:0:16}" ]; then
      say "Ray already installed in $SITE"
    else
      unpack_pieces "$RAY_PIECES" /tmp/ray_wheels
      say "installing $(ls /tmp/ray_wheels/*.whl | wc -l) wheels into $SITE"
      "${PIP[@]}" "$SITE" /tmp/ray_wheels/*.whl 2> >(grep -v "^WARNING: Target directory .* already exists" >&2)
      rm -rf /tmp/ray_wheels
      touch "$SITE/.gpu_install_ray_${want:0:16}"
    fi
    [ "$CHECK_IMPORTS" = 1 ] || { say "import check skipped (CHECK_IMPORTS=0)"; exit 0; }
    PYTHONPATH=$SITE python3 -c "import ray, ray.data; print('gpu_install: import ray OK, version', ray.__version__)" \
      || die "import ray failed"
    ;;

  *)
    sed -n '2,19p' "$0"; exit 2
    ;;
esac
