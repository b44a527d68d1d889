#!/usr/bin/env bash
# The CUDA path, checked end to end on a machine with one GPU, and its step times:
#   1. the speed suite (finetune, ilmil, ilmil with a bfloat16 teacher) in float32;
#   2. the kd suite's quick budget on every detector, its main rows (eight runs at a time);
#   3. the same kd runs with mixed-precision training (SOLVER.AMP.ENABLED);
#   4. the speed suite with mixed-precision training;
#   5. the one-stage suite's quick budget (incremental RetinaNet, FCOS, YOLO).
# Each part has its own time limit and the next runs even if one fails; the log says
# which passed. Results: OUT/<part>/ (tables as in benchmarks/results/), OUT/<part>.log,
# step times and peak GPU memory in each run's stage_N/iteration_times.json.
#
#   benchmarks/gpu_check.sh [OUT]      (default OUT: output/gpu_check; PYTHON=... to choose)
#   PARTS="speed speed_amp" benchmarks/gpu_check.sh      (some parts only)
#   KD_DETECTORS="fcos yolov3" PARTS=kd benchmarks/gpu_check.sh   (the kd part on some detectors)
#   SPEED_ARGS=--quick PARTS=speed benchmarks/gpu_check.sh       (the speed suite's short budget)
#
# Every run costs 20-50 s besides its steps (start-up, the dataset check, evaluation of
# the test images). On an H100 with 16 cores (2026-12-05) the parts took: speed 115 s
# (63 s with --quick), kd 113 s (Faster R-CNN, FCOS and YOLO rows), speed_amp 109 s,
# one_stage 90 s; where calls are time-limited, leave each part room to finish.
#
# NCCL needs one GPU per process, so on one GPU the torchrun path (NCCL from two
# processes) cannot be checked; a machine with two GPUs runs it with the README's command.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-output/gpu_check}
PY=${PYTHON:-python}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())" \
    | tee -a "$OUT/gpu.txt"

PARTS=${PARTS:-speed kd kd_amp speed_amp one_stage}
part() {  # part NAME SECONDS ARGS...: one benchmarks/run.py invocation, logged and timed
    local name=$1 limit=$2
    shift 2
    [[ " $PARTS " == *" $name "* ]] || return 0
    local start=$SECONDS
    timeout "$limit" $PY benchmarks/run.py --runs-dir "$OUT/runs/$name" --results-dir "$OUT/$name" "$@" \
        > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "part $name: $([ $rc = 0 ] && echo passed || echo "FAILED (exit $rc)") in $((SECONDS - start)) s" \
        | tee -a "$OUT/summary.txt"
    [ $rc = 0 ] || tail -n 30 "$OUT/$name.log"
}

part speed "${SPEED_LIMIT:-300}" --suite speed ${SPEED_ARGS:-} MODEL.DEVICE cuda
kd_rows=()
for d in ${KD_DETECTORS:-faster_rcnn retinanet fcos yolov3}; do
    if [ "$d" = yolov3 ]; then
        kd_rows+=("$d no KD" "$d output" "$d alignment" "$d information map")
    else
        kd_rows+=("$d no KD" "$d PKD" "$d FGFI" "$d output" "$d output, bfloat16 teacher" "$d review" "$d M-KD"
                  "$d M-KD + assistant")
    fi
done
part kd "${KD_LIMIT:-300}" --suite kd --quick --jobs 8 --variants "${kd_rows[@]}" -- MODEL.DEVICE cuda
part kd_amp "${KD_AMP_LIMIT:-300}" --suite kd --quick --jobs 8 --variants "${kd_rows[@]}" -- MODEL.DEVICE cuda \
    SOLVER.AMP.ENABLED True
part speed_amp "${AMP_LIMIT:-300}" --suite speed MODEL.DEVICE cuda SOLVER.AMP.ENABLED True
part one_stage "${ONE_STAGE_LIMIT:-240}" --suite one_stage --quick --jobs 6 MODEL.DEVICE cuda
cat "$OUT/summary.txt" 2>/dev/null
