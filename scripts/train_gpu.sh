#!/usr/bin/env bash
# One complete training run on a lent GPU, data copy and ONNX export included, in about 10 minutes
# of device time; or the same run, tiny, on the CPU to check it before spending device time.
#
#   bash scripts/train_gpu.sh prepare          # here, once: pack the data, fetch the wheels it lacks
#   bash scripts/train_gpu.sh run [MINUTES]    # there (or here, with MINUTES=0.2 and SMOKE=1)
#
# With the device tool (64 MiB travel with the working tree: the ONNX models must stay behind):
#   git rm -q --cached models/*.onnx && printf '/models/*.onnx\n' >> .git/info/exclude
#   device run: carry [".data", ".whl"], command `bash scripts/train_gpu.sh run 5.5`, timeout_s 590
#   git reset -q models && sed -i '\#^/models/\*.onnx$#d' .git/info/exclude
#
# What the run does: installs the carried wheels (the GPU image has torch but not smp, albumentations
# or pycocotools), trains from the shipped weights (warm start) for MINUTES of steps with bf16
# autocast and channels_last, validating every epoch, then exports best.pt to ONNX (parity-checked
# against PyTorch). CROP and BATCH set the crop side and batch (default 256 and 64); the next
# experiment (docs/METRICS.md, "What limits the rest"): `CROP=512 BATCH=16`, crops that hold a whole
# astrocyte, the same pixels per step. Everything lands in $OUT (default runs/gpu-out), the checkpoint cut into 15 MiB
# parts because the device tool brings back no file over 16 MiB:
#   cat best.pt.part-* > best.pt
set -euo pipefail
cd "$(dirname "$0")/.."
export NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1
PACKED=.data/packed
WHEELS=.whl

prepare() {
  python scripts/pack_data.py --out "$PACKED" --quality "${JPEG_QUALITY:-80}"
  rm -rf "$WHEELS"
  # Python 3.12 wheels, the GPU image's Python; versions as requirements.txt pins them.
  local pkgs=(segmentation_models_pytorch==0.6.0 albumentations==2.0.8 albucore==0.0.24 pycocotools==2.0.11
              pydantic==2.14.4 pydantic_core==2.50.5 annotated_types==0.8.0 typing_inspection==0.4.5
              simsimd==6.5.16 stringzilla==5.3.2)
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHEELS" "${pkgs[@]}"
  du -sh "$PACKED" "$WHEELS"
}

run() {
  local minutes=${1:-5.5} out=${OUT:-runs/gpu-out} run_dir=runs/gpu
  mkdir -p "$out"
  rm -rf "$run_dir"
  if ! python -c "import importlib.util as u, sys
sys.exit(not all(u.find_spec(m) for m in ('segmentation_models_pytorch', 'albumentations', 'pycocotools')))"; then
    python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
    export PYTHONPATH=/tmp/site
  fi
  python - <<'EOF' | tee "$out/train.log"
import os, torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "cpus", os.cpu_count())
EOF
  local cpus workers
  cpus=$(nproc)
  workers=${WORKERS:-$(( cpus > 4 ? cpus - 2 : 1 ))}
  local smoke=()
  [ -n "${SMOKE:-}" ] && smoke=(--max-images 12 --batch-size 2 --steps-per-epoch 4 --warmup-steps 2)
  # Killed on time if anything hangs, leaving the last completed epoch's checkpoints for the copy below.
  timeout --signal=INT "${TRAIN_TIMEOUT:-$(python -c "print(int(${minutes} * 60 + 180))")}" \
    python -m train --data "$PACKED" --encoder timm-tf_efficientnet_lite0 \
      --encoder-weights pypi-efficientnet-lite0 --init-weights models/livecell-unet.safetensors \
      --batch-size "${BATCH:-64}" --crop "${CROP:-256}" --steps-per-epoch "${STEPS:-500}" --lr "${LR:-2e-3}" \
      --warmup-steps 300 --minutes "$minutes" --workers "$workers" --threads 4 --out "$run_dir" \
      "${smoke[@]}" 2>&1 | tee -a "$out/train.log" | grep -v "it/s\]$" || true
  cp "$run_dir/history.jsonl" "$out/" 2>/dev/null || true
  if [ -f "$run_dir/best.pt" ]; then
    split -b 15M "$run_dir/best.pt" "$out/best.pt.part-"
    # Only the ONNX file travels back (the tool returns 8 files at most); card and weights are made here.
    python -m export --checkpoint "$run_dir/best.pt" --out "$run_dir/export/model.onnx" --data "$PACKED" --no-eval \
      2>&1 | tail -3 && cp "$run_dir/export/model.onnx" "$out/" || echo "export failed: export here from best.pt"
  fi
  ls -la "$out"
}

case "${1:-}" in
  prepare) prepare ;;
  run) shift; run "$@" ;;
  *) echo "usage: $0 prepare | run [MINUTES]" >&2; exit 2 ;;
esac
