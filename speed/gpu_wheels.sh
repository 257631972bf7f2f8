#!/usr/bin/env bash
# The wheels speed/gpu_check.py needs on the GPU machine (Python 3.12, PyTorch, accelerate, peft, torchvision and
# tensorboard there; no network): what that machine lacks, in the versions this project is tested with. Run here,
# from the repository root; name more (NAME==VERSION) as arguments if the check's preflight line asks for them,
# e.g. pyarrow==24.0.0 (49 MB) where that machine's pyarrow is older than datasets needs. The device tool carries
# .whl (named in its `carry`, 64 MiB a call) and the check's command starts with
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
grep -qx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl \
    diffusers==0.42.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 importlib_metadata==10.2.0 "$@"
du -sh .whl && ls .whl
