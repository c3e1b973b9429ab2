#!/usr/bin/env bash
# Download the wheels `python -m serve.bench.denoise_bench` needs on a GPU machine that has torch,
# transformers, accelerate, safetensors and onnx but not diffusers (nor Pillow, which diffusers imports),
# and no network. Run it here, where the registry is reachable; carry OUT_DIR there with the code.
#
#   serve/bench/gpu_wheels.sh [OUT_DIR]            (default: tmp/gpu-wheels, git-ignored)
#
# Versions are this venv's exact ones: the dependency closure of diffusers and transformers read from the
# installed metadata (no resolver guesses). Pure-Python wheels are fetched once (--platform any); the few
# binary ones (Pillow, numpy, regex, pyyaml, pydantic-core, ...) for each CPython in PY_VERSIONS on
# x86_64 manylinux (abi3 wheels such as tokenizers, safetensors and hf-xet once).
#
#   PY_VERSIONS  CPython versions of the GPU machine's interpreter (default "3.10 3.11 3.12 3.13";
#                one version, e.g. PY_VERSIONS=3.12, keeps the folder small)
#   PYTHON       the interpreter whose installed versions are pinned (default: this repo's .venv, else python3)
#
# On the GPU machine (no network), from the repository root:
#   sh OUT_DIR/install.sh          # pip takes from OUT_DIR only what that machine lacks or has too old
#   python -m serve.bench.denoise_bench --profile sdxl-random --device cuda --dtype float16 --out denoise.json
set -euo pipefail

here="$(cd "$(dirname "$0")/../.." && pwd)"
out="${1:-$here/tmp/gpu-wheels}"
py_versions="${PY_VERSIONS:-3.10 3.11 3.12 3.13}"
python="${PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x "$here/.venv/bin/python" ]; then python="$here/.venv/bin/python"; else python=python3; fi
fi
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
mkdir -p "$out"

# name==version for every distribution diffusers and transformers need (extras excluded), from metadata.
mapfile -t pins < <("$python" - <<'EOF'
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

seen: dict[str, str] = {}
todo = ["diffusers", "transformers"]
while todo:
    name = canonicalize_name(todo.pop())
    if name in seen:
        continue
    dist = metadata.distribution(name)  # a missing one is an error: this venv must hold the closure
    seen[name] = dist.version
    for text in dist.requires or []:
        requirement = Requirement(text)
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            todo.append(requirement.name)
for name, version in sorted(seen.items()):
    print(f"{name}=={version}")
EOF
)

diffusers_pin="" transformers_pin=""
for pin in "${pins[@]}"; do
  case "$pin" in diffusers==*) diffusers_pin="$pin" ;; transformers==*) transformers_pin="$pin" ;; esac
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
# transformers is older than 5) from this folder alone; pip keeps every installed package that already fits.
set -e
here=\$(cd "\$(dirname "\$0")" && pwd)
python=\${PYTHON:-python}
wanted="$diffusers_pin"
if ! "\$python" -c 'import sys, transformers; sys.exit(int(transformers.__version__.split(".")[0]) < 5)' 2>/dev/null; then
  wanted="\$wanted $transformers_pin"
fi
"\$python" -m pip install --no-index --find-links "\$here" \$wanted
"\$python" -c 'import diffusers, PIL, transformers, torch; print("diffusers", diffusers.__version__, "| transformers", transformers.__version__, "| pillow", PIL.__version__, "| torch", torch.__version__, "| cuda", torch.cuda.is_available())'
EOF
chmod +x "$out/install.sh"
echo "wrote $(ls "$out"/*.whl | wc -l) wheels ($(du -sh "$out" | cut -f1)) and install.sh to $out"
