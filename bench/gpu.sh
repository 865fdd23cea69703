#!/usr/bin/env bash
# Everything that needs an NVIDIA GPU, in one call: the GPU-only tests, then the train-step and
# sampler benchmarks (einsum and cuDNN attention), then the generated results (README.md, docs/results.md).
#   bash bench/gpu.sh            # from the repository root, with the package installed (`.[cuda]`)
# Writes bench/results/{train_step,sampler}_<gpu>.json (the device named in the file and inside).
set -euo pipefail
cd "$(dirname "$0")/.."
# A machine without internet: on a connected host, `pip download -d wheelhouse .` first, then carry
# wheelhouse/ along; it is installed from there.
if [ -d wheelhouse ]; then pip install -q --no-index --find-links wheelhouse -e .; fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python -c "import jax; print(jax.__version__, jax.devices())"
python -m pytest -q tests/test_gpu.py tests/test_sampler.py tests/test_models.py
python bench/sampler.py
python bench/train_step.py --models qwen2.5-0.5b,qwen2.5-1.5b --gpu-seqs 2048,4096
python bench/train_step.py --models qwen2.5-1.5b --gpu-seqs 4096 --attention cudnn --no-torch \
  --out "bench/results/train_step_$(python -c 'import jax,re; print(re.sub("[^a-z0-9]+","_",jax.devices()[0].device_kind.lower()).strip("_"))')_cudnn.json"
python bench/update_readme.py
