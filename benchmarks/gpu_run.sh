#!/usr/bin/env bash
# The prepared GPU run (benchmarks/gpu_run.py) for a machine with CUDA torch and no network.
#
# Here, once (downloads the pure-Python wheels that machine lacks into .whl/, git-ignored):
#   benchmarks/gpu_run.sh --fetch-wheels
# There, as one call (the device tool: carry .whl; $OUT collects the JSON):
#   bash benchmarks/gpu_run.sh            # about 9 minutes (--budget 540); --smoke: a CPU check here
#   bash benchmarks/gpu_run.sh --parts latent_flux,fp8_quality   # the Flux-sized cases alone
# The machine has torch but no diffusers, ray, webdataset or torchao, and no network: the wheels
# above travel in .whl (9.6 MiB). torchao gives fp8 its W8A8 path (float8 dynamic activation
# + weight); if it cannot load there, fp8 runs as layerwise casting and the JSON says which ran.
# One prepared call (the device tool):
#   run(command="bash benchmarks/gpu_run.sh", carry=[".whl"], timeout_s=600)
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS="diffusers==0.42.1 torchao==0.18.0 webdataset==1.0.2 braceexpand==0.1.7 importlib_metadata==10.2.0 zipp==4.1.2"
if [[ "${1:-}" == "--fetch-wheels" ]]; then
  mkdir -p .whl
  exclude="$(git rev-parse --git-path info/exclude)"   # a worktree's .git is a file
  mkdir -p "$(dirname "$exclude")"
  grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    -d .whl $WHEELS
  ls -la .whl
  exit 0
fi
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
OUT="${OUT:-out/gpu_run}"
mkdir -p "$OUT"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
python3 benchmarks/gpu_run.py --json "$OUT/gpu_run.json" "$@" 2>&1 | tee "$OUT/gpu_run.log"
