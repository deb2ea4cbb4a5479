#!/usr/bin/env bash
# One prepared run on a lent GPU machine (see README "Performance"): quiet-CPU LoRA step figures
# pinned to 2 cores (like our dev machines), then the GPU: dequantizing matmul kernels and the
# LoRA step at the reference shape. Writes logs/JSON under $OUT (or ./device_out).
set -u
OUT=${OUT:-device_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "import jax; print('jax', jax.__version__, jax.devices())"; } 2>&1 | tee "$OUT/machine.txt"
echo "== CPU (2 cores pinned) LoRA step, reference shape" | tee "$OUT/cpu_lora_step.txt"
JAX_PLATFORMS=cpu timeout 180 taskset -c 0,1 python3 benchmarks/lora_step.py --shape reference --steps 8 \
  --json "$OUT/cpu_lora_step.json" 2>&1 | tail -20 | tee -a "$OUT/cpu_lora_step.txt"
echo "== GPU dequantizing matmul" | tee "$OUT/gpu_quant_matmul.txt"
timeout 200 python3 benchmarks/quant_matmul.py --sweep --repeats 20 2>&1 | tail -60 | tee -a "$OUT/gpu_quant_matmul.txt"
echo "== GPU LoRA step, reference shape" | tee "$OUT/gpu_lora_step.txt"
timeout 90 python3 benchmarks/lora_step.py --shape reference --steps 20 \
  --json "$OUT/gpu_lora_step.json" 2>&1 | tail -20 | tee -a "$OUT/gpu_lora_step.txt"
echo "== GPU: the benchmark runner's accelerator mode (bf16, larger shapes, tokens/s, MFU)" | tee "$OUT/gpu_bench_device.txt"
timeout 240 python3 benchmarks/run.py --device --no-setup --out "$OUT/gpu_bench_device.json" \
  --report "$OUT/gpu_bench_device.md" --figures "$OUT/figures" 2>&1 | tail -40 | tee -a "$OUT/gpu_bench_device.txt"
