#!/usr/bin/env bash
# The GPU figures of the README's "Speed and memory" in one run: a full-size SD1.5 UNet
# (860M) and a 1.0B SD3 MMDiT built through ComfyUI's detection, Train LoRA against core's
# TrainLoraNode (step time, step in sampler forwards, peak VRAM, model_with_lora inference),
# then Train LoRA's own cells. Each part has its own time limit (150 s by default), so a
# slow part cannot starve the ones after it.
#
# usage: COMFYUI_DIR=/path/to/ComfyUI bash benchmarks/gpu_figures.sh OUT_DIR [SECONDS_PER_PART]
#   PYTHON (default python3): the interpreter that runs ComfyUI
#   COMFYUI_EXTRA_PATH: import stand-ins ComfyUI needs where they are not installed
#   DEVICE (cuda), UNET (sd15_full), DIT (dit_1b): e.g. DEVICE=cpu UNET=sd15 DIT=sd3 to try
#   the script on the tiny models without a GPU
# Writes OUT_DIR/<part>.md (the table and the log's end) and OUT_DIR/<part>.json (raw timings).
set -uo pipefail
out=$(realpath -m "${1:?usage: COMFYUI_DIR=... bash benchmarks/gpu_figures.sh OUT_DIR [SECONDS_PER_PART]}")
cd "$(dirname "$0")/.."
limit=${2:-150}
python=${PYTHON:-python3}
device=${DEVICE:-cuda}
unet=${UNET:-sd15_full}
dit=${DIT:-dit_1b}
: "${COMFYUI_DIR:?COMFYUI_DIR must point at a ComfyUI checkout}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1

{
  if [ "$device" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    "$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" 2>&1
  else
    "$python" -c "import torch; print('torch', torch.__version__, 'cpu')" 2>&1
  fi
} > "$out/machine.txt"
cat "$out/machine.txt"

part() {  # part NAME ARGS...: one bench_step.py run under the time limit
  local name=$1; shift
  echo "== $name: bench_step.py $*"
  timeout --signal=INT --kill-after=20 "$limit" "$python" benchmarks/bench_step.py \
    --backend comfy --device "$device" --json "$out/$name.json" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  { echo "exit $rc after at most ${limit} s"; grep -v "it/s\]\|step/s\]" "$out/$name.log" | tail -n 25; } \
    > "$out/$name.md"
  cat "$out/$name.md"
}

part unet_vs_core --vs-core --model "$unet" --repeat 3 --warmup 2 --steps 5
part dit_vs_core --vs-core --model "$dit" --repeat 3 --warmup 2 --steps 5
part unet_cells --model "$unet" --repeat 1 --warmup 3 --steps 10 --forwards 10
part dit_cells --model "$dit" --repeat 1 --warmup 3 --steps 10 --forwards 10
