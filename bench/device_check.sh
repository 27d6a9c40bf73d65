#!/usr/bin/env bash
# One prepared device check for a GPU machine (H100 / H200), under 8 minutes:
#
#   bench/device_check.sh            # on the GPU machine
#   bench/device_check.sh --tiny     # tiny sizes on CPU (seconds): checks the script itself
#
# Python: $PYTHON (default: python) with the project installed (jax[cuda] on the GPU).
#
# 1. CLIP train step (bench/train_step.py's MlcdTrainer: forward, backward, AdamW), B/16 both
#    towers, batch 256, bfloat16, remat none, with model.attention = fused and = xla. Per run one
#    line: images_per_sec (best of the timed steps), the step's FLOPs from XLA's cost analysis of
#    the compiled program (hlo_tflop) and from bench/train_step.py's count of the transformer
#    layers (counted_tflop), MFU of each against the card's dense bf16 peak (H100 SXM and H200:
#    989 TFLOP/s; n/a for another card or none), and cudnn_fmha=yes|no: whether the compiled HLO
#    calls cuDNN's fused attention (__cudnn$fmha). XLA's cost analysis does not count a custom
#    call's FLOPs, so with fused attention mfu_hlo leaves out attention's q k^T and weights v.
# 2. MLCD loss, forward + backward, 1M centers x 512, batch 1024 (bench/mlcd_loss.py --one
#    sharded): one JSON line (step_s, memory).
# 3. Input pipeline, small (bench/input_pipeline.py): host images/s per core.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}

if [[ "${1:-}" == "--tiny" ]]; then
  MODEL=tiny BATCH=8 STEPS=2 CENTERS=16384 LOSS_BATCH=64 LOSS_DIM=64 IMAGES=10
else
  MODEL=B/16 BATCH=256 STEPS=10 CENTERS=1048576 LOSS_BATCH=1024 LOSS_DIM=512 IMAGES=100
fi

# Dense bf16 peak of the card, TFLOP/s (NVIDIA's datasheets, SXM, without sparsity); 0: unknown.
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 || true)
case "$GPU" in
  *H100* | *H200*) PEAK_TFLOPS=989 ;;
  *) PEAK_TFLOPS=0 ;;
esac
echo "device: ${GPU:-no GPU (nvidia-smi absent)}; bf16 peak ${PEAK_TFLOPS} TFLOP/s (0: unknown)"

for ATTENTION in fused xla; do
  "$PYTHON" - "$MODEL" "$BATCH" "$STEPS" "$ATTENTION" "$PEAK_TFLOPS" <<'EOF'
"""Times bench/train_step.py's CLIP step for one attention implementation; prints one line."""
import os
import sys
import time

sys.path.insert(0, os.path.join(os.getcwd(), "bench"))
import train_step  # bench/train_step.py (it puts the repository root on sys.path)

model, batch, steps, attention, peak_tflops = sys.argv[1:]
batch, steps, peak = int(batch), int(steps), float(peak_tflops) * 1e12
cfg = train_step.model_config(model, "bfloat16")
cfg.remat, cfg.attention = "none", attention
trainer = train_step.MlcdTrainer(cfg, batch)
# The compiled step's own FLOPs (one device: the whole step here).
hlo_flops = trainer._step.cost_analysis()["flops"]
counted_flops = train_step.flops_per_sample(cfg) * batch
fused = "yes" if "__cudnn$fmha" in trainer.hlo_text() else "no"
trainer.step()  # warm-up: the first run of a compiled program allocates its buffers
best = float("inf")
for _ in range(steps):
    start = time.perf_counter()
    trainer.step()  # returns the loss as a Python float: waits for the step
    best = min(best, time.perf_counter() - start)
mfu = lambda flops: f"{flops / best / peak:.1%}" if peak else "n/a"
print(
    f"train_step model={model} batch={batch} bfloat16 remat=none attention={attention}: "
    f"step_ms={1e3 * best:.1f} images_per_sec={batch / best:.1f} "
    f"hlo_tflop={hlo_flops / 1e12:.4g} counted_tflop={counted_flops / 1e12:.4g} "
    f"mfu_hlo={mfu(hlo_flops)} mfu_counted={mfu(counted_flops)} cudnn_fmha={fused} "
    f"compile_s={trainer.compile_s:.0f}",
    flush=True,
)
EOF
done

echo "mlcd_loss sharded C=${CENTERS} D=${LOSS_DIM} batch ${LOSS_BATCH} r=0.1:"
"$PYTHON" bench/mlcd_loss.py --one sharded "$CENTERS" --batch "$LOSS_BATCH" --dim "$LOSS_DIM" \
  --ratio 0.1 --steps 3

echo "input pipeline, ${IMAGES} images:"
"$PYTHON" bench/input_pipeline.py --num-images "$IMAGES" --repeats 1 | tail -n 1
