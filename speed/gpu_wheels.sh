#!/usr/bin/env bash
# The wheels speed/gpu_check.py needs on the GPU machine (Python 3.12, PyTorch 2.11, transformers 5.17,
# huggingface_hub 1.33, torchvision and tensorboard there; no network): what that machine lacks, in the versions
# this project is tested with (peft and accelerate too, whose versions there are not ours). Run here, from the
# repository root; name more (NAME==VERSION) as arguments if the check's preflight line asks for them. datasets 5.2
# needs pyarrow >= 24: its wheel (49 MB) goes to .whl/opt/ and is installed there only where that machine's pyarrow
# is older. All of it: 57 MB, under the device tool's 64 MiB with this repository's 5 MB. The device tool carries
# .whl and .carry (named in its `carry`); the command it runs is printed at the end.
set -euo pipefail
mkdir -p .git/info
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
get() {
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any "$@"
}
get -d .whl diffusers==0.42.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 importlib_metadata==10.2.0 \
    lazy-importer==0.1.0 peft==0.21.2 accelerate==1.16.0 "$@"
get -d .whl/opt pyarrow==24.0.0
du -sh .whl && ls .whl .whl/opt
cat <<'EOF'
carry [".whl", ".carry"] (diffusers' examples/research_projects/diffusion_dpo/train_diffusion_dpo.py in .carry/), command:
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1; w=$(ls .whl/*.whl); python3 -c 'import pyarrow, sys; sys.exit(int(pyarrow.__version__.split(".")[0]) < 24)' || w="$w $(ls .whl/opt/*.whl)"; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $w && export PYTHONPATH=/tmp/site || exit; set -o pipefail; python3 -m speed.gpu_check --out $OUT --budget_s 480 --diffusers_dpo_script .carry/train_diffusion_dpo.py 2>&1 | tee $OUT/run.log
EOF
