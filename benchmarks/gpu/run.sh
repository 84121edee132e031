#!/usr/bin/env bash
# Run on the GPU machine, from the repository root, after benchmarks/gpu/prepare.sh here:
#   device tool: run(command="bash benchmarks/gpu/run.sh", carry=[".gpu"], timeout_s=600)
# Torch only (no Ray). Every log lands in $OUT (or ./gpu-out). Each benchmark has its own time limit, so
# one that fails or hangs leaves the others their share of a short lease. A dry run here, on CPU, small:
#   PYTHON=.venv/bin/python SDPO_DEVICE=cpu SDPO_ONLY=smollm2_fp32 SDPO_EXTRA="--synthetic-llama 25m --pairs 8 --batch 4" \
#     bash benchmarks/gpu/run.sh
set -uo pipefail
py="${PYTHON:-python3}"
out="${OUT:-gpu-out}"; mkdir -p "$out"
export PYTHONUNBUFFERED=1
"$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl \
  || echo "wheel install failed: TRL rows will be missing"
export PYTHONPATH="/tmp/site:$PWD/platform"
{ nvidia-smi -L; "$py" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"; } 2>&1 | tee "$out/env.txt"
trl=--trl
"$py" -c "import trl" 2>>"$out/env.txt" || { trl=; echo "no TRL: ours only" | tee -a "$out/env.txt"; }
common=(--device "${SDPO_DEVICE:-cuda}" --model .gpu/assets/stories260K --data .gpu/assets/ultrafeedback_binarized_1k.jsonl --online $trl)
bench() {  # name, seconds, args...
  local name=$1 limit=$2; shift 2
  [[ -n "${SDPO_ONLY:-}" && "$name" != "$SDPO_ONLY" ]] && return
  set -- "$@" ${SDPO_EXTRA:-}  # later flags win
  echo "== $name: throughput.py $*" | tee "$out/$name.log"
  timeout "$limit" "$py" benchmarks/throughput.py "${common[@]}" "$@" 2>&1 | grep -v -i warn | tee -a "$out/$name.log"
  echo "exit ${PIPESTATUS[0]}" | tee -a "$out/$name.log"
}
bench smollm2_bf16 150 --synthetic-llama smollm2-135m --pairs 256 --batch 16 --precision bf16
bench llama1b_bf16 180 --synthetic-llama llama3.2-1b --pairs 128 --batch 8 --precision bf16 --layouts shared,prefix
bench smollm2_fp32 120 --synthetic-llama smollm2-135m --pairs 128 --batch 16 --precision fp32 --layouts shared,prefix
# the 1B again with its logits in 256 MiB slices (the default, 1024, leaves most of its steps whole): what
# the sliced lm_head, whose backward recomputes each slice's logits, costs on a GPU
bench llama1b_bf16_sliced 90 --synthetic-llama llama3.2-1b --pairs 64 --batch 8 --precision bf16 --layouts prefix --max-logits-mb 256
