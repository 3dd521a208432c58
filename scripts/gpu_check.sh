#!/usr/bin/env bash
# One prepared run of the CUDA checks: the CUDA tests, accuracy on the CamVid val clip in fp32 and
# fp16 (per-frame and 1 in 5, against the CPU figures of models/README.md), and latency per model,
# size and precision. Written for a lent GPU machine with a short time budget (one call of about
# 6 minutes on an H100); it installs nothing.
#
#   bash scripts/gpu_check.sh [OUT_DIR]          # default $OUT, else out/gpu_check
#
# What the machine needs: python3 with a CUDA torch, numpy, opencv, scipy, pyyaml, tqdm,
# matplotlib, onnx and onnxruntime (rosbags, scikit-video and TensorRT are optional: the tests that
# need them skip). Data: the CamVid val clip, as ../shared/data or copied into the checkout:
#
#   mkdir -p .devdata/camvid      # git-ignored && cp -r ../shared/data/camvid/val ../shared/data/camvid/valannot .devdata/camvid/
#
# and carried along (29 MB). Every step has its own time limit, so one slow step cannot eat the
# rest; the figures land in five files under OUT_DIR (environment.txt, pytest.txt, evals.jsonl,
# bench.md, bench.json) plus log.txt (progress and errors). DEVICE=cpu QUICK=1 runs the same plumbing on a CPU
# (fp32 only, 10 frames, small benchmark), to check the script itself.
set -u
out=${1:-${OUT:-out/gpu_check}}
device=${DEVICE:-cuda}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPVSS_CACHE_DIR=/tmp/mpvss_gpu_check_cache
[ -d .devdata/camvid ] && export MPVSS_SHARED_DATA="$PWD/.devdata"
mpvss() { python3 scripts/mpvss "$@"; }
step() { echo "=== $* ($(date +%T))"; }

if [ "${QUICK:-0}" = 1 ]; then
    precisions=fp32; frames=(--max-frames 10); sizes=(360x480); models=(mpvss_lite); repeats=2; e2e=5
else
    precisions="fp32 fp16"; frames=(); sizes=(360x480 512x1024 1024x2048); models=(mpvss_lite mpvss_r50); repeats=20; e2e=60
fi
[ "$device" = cpu ] && precisions=fp32

step environment
{
    nvidia-smi 2>/dev/null || echo "no nvidia-smi"
    python3 -c "import torch, cv2, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, 'cv2', cv2.__version__, 'numpy', numpy.__version__)"
    python3 -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())" 2>&1
    python3 -c "import tensorrt as t; print('tensorrt', t.__version__)" 2>&1 | tail -1
    echo "shared data: ${MPVSS_SHARED_DATA:-../shared/data}"
} 2>&1 | tee "$out/environment.txt"

step "tests (runtime: CUDA backends, export parity; segmenter; shipped model)"
timeout 240 python3 -m pytest -q -p no:cacheprovider -rs test/runtime test/test_segmenter.py test/test_shipped_model.py \
    2>&1 | tail -40 | tee "$out/pytest.txt"

step "accuracy and cost on the CamVid val clip (one JSON line per run in evals.jsonl)"
for precision in $precisions; do
    for schedule in fixed:1 fixed:5; do
        echo "eval $precision $schedule" >>"$out/log.txt"
        timeout 120 mpvss eval --device "$device" --precision "$precision" --schedule "$schedule" "${frames[@]}" \
            2>>"$out/log.txt" | tee -a "$out/evals.jsonl"
    done
done

step "latency (mpvss bench)"
backends=(torch:$device)
[ "$device" = cuda ] && backends+=(torch:cuda:fp16)
timeout 300 mpvss bench --models "${models[@]}" --sizes "${sizes[@]}" --backends "${backends[@]}" \
    --repeats "$repeats" --e2e-frames "$e2e" --json "$out/bench.json" 2>>"$out/log.txt" | tee "$out/bench.md"
step done
