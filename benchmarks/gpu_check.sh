#!/usr/bin/env bash
# The CUDA path, checked and timed on a machine with one GPU, in one run of a few minutes.
#
# Usage: bash benchmarks/gpu_check.sh [LOG_DIR]      (from the repository root; LOG_DIR defaults to
#        data/gpu_check; set PYTHON to choose the interpreter, default python3)
#
# Needs a Python with torch (CUDA build), h5py, pyarrow, numpy, einops, click, tqdm, pandas, matplotlib,
# pytest, and vit-pytorch for the equivalence tests; the project itself runs from the checkout (PYTHONPATH),
# it need not be installed. Each step writes LOG_DIR/<step>.log and has its own time limit, so one slow or
# failing step does not hide the others; the exit status is that of the first failing step.
#   1 env       versions, the GPU
#   2 tests     tests/test_model.py on this torch: equals vit-pytorch on CPU and on CUDA (fp32 and bf16)
#   3 data      synth 4 x 2,500 top rows in parallel, convert (8 channels) with 8 workers
#   4 train     massreg.train --model seed --amp --compile on CUDA, 3 epochs, DataLoader workers
#   5 evaluate  massreg.evaluate --amp of the best checkpoint on the test split
#   6 model     benchmarks/bench_model.py --device cuda: ours against vit-pytorch, fp32, bf16, bf16 + compile
#   7 families  the GPU-size hybrid DeepViT and ResNet (bf16, batch 256), and a short training of each on the
#               step-3 data, evaluated on test: the issue-9 study at GPU scale (not yet run on a GPU)
#   8 loop      benchmarks/bench_train.py --device cuda (issue 8): the training loop (reader threads and 4
#               persistent workers, pinned buffers, side-stream copy, flips + normalisation on the GPU)
#               against the model-only step, seed preset, bf16, batch 256, 4 and 8 channels, page cache warm
#               (target: loop / model-only >= 0.85 at 4 channels); the default path (--workers 0) trained for
#               3 epochs at batch 256; cold-cache rows/s of row against block order on this machine's disk
# Not here: DDP over NCCL, which needs two GPUs (torchrun with one process does not start DDP at all).
set -u
LOG=${1:-data/gpu_check}
PY=${PYTHON:-python3}
DATA=$LOG/data
mkdir -p "$LOG" "$DATA"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
status=0

step() {   # step NAME LIMIT_S COMMAND...: run, log, time; remember the first failure
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    echo "=== $name (limit ${limit} s): $*"
    timeout "$limit" "$@" >"$LOG/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$LOG/$name.log"
    echo "=== $name: exit $rc after $((SECONDS - t0)) s"
    if [ $rc -ne 0 ] && [ $status -eq 0 ]; then status=$rc; fi
    return 0
}

step env 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; $PY -c '
import torch, h5py, pyarrow, numpy, einops
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"device\", torch.cuda.get_device_name(0))
print(\"h5py\", h5py.__version__, \"pyarrow\", pyarrow.__version__, \"numpy\", numpy.__version__)
print(\"bf16 supported\", torch.cuda.is_bf16_supported(), \"nccl\", torch.distributed.is_nccl_available())
'"

step tests 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_model.py tests/test_prefetch.py

make_data() {   # 4 files of 2,500 rows, each from its own seed, generated at once (synth uses one core)
    rm -rf "$DATA" && mkdir -p "$DATA/raw" || return 1
    local k
    for k in 0 1 2 3; do
        "$PY" -m pipeline.synth "$DATA/s$k" --process top --rows 2500 --seed $((k + 1)) &
    done
    wait
    for k in 0 1 2 3; do mv "$DATA/s$k/top_synth_000.parquet" "$DATA/raw/top_$k.parquet" || return 1; done
    "$PY" -m pipeline.convert "$DATA/raw" "$DATA/top.h5" --cuts top --channels 0,1,2,3,4,5,6,7 --workers 8 &&
        "$PY" -m pipeline.inspect "$DATA/top.h5"
}
export -f make_data
export PY DATA
step data 180 bash -c make_data

step train 300 "$PY" -m massreg.train "$DATA/top.h5" --model seed --epochs 3 --device cuda --amp --compile \
    --workers 4 --run-dir "$DATA/run" --force
step evaluate 120 "$PY" -m massreg.evaluate "$DATA/run/best_val_loss.pt" "$DATA/top.h5" --split test \
    --device cuda --amp --out "$DATA/eval_test"
step model 150 "$PY" benchmarks/bench_model.py --device cuda --presets seed,small --steps 30 \
    --out "$LOG/model_fp32.json"
step model_bf16 150 "$PY" benchmarks/bench_model.py --device cuda --presets seed,small --steps 30 --bf16 \
    --out "$LOG/model_bf16.json"
step model_bf16_compile 240 "$PY" benchmarks/bench_model.py --device cuda --presets seed --steps 30 --bf16 \
    --compile --out "$LOG/model_bf16_compile.json"

step model_families 150 "$PY" benchmarks/bench_model.py --device cuda --presets hybrid-seed,resnet-wide,seed \
    --steps 30 --bf16 --batch-size 256 --out "$LOG/model_families.json"
for m in hybrid-seed resnet-wide; do
    step "train_$m" 300 "$PY" -m massreg.train "$DATA/top.h5" --model "$m" --epochs 10 --device cuda --amp \
        --batch-size 256 --workers 4 --run-dir "$DATA/run_$m" --force
    step "evaluate_$m" 120 "$PY" -m massreg.evaluate "$DATA/run_$m/best_val_loss.pt" "$DATA/top.h5" \
        --split test --device cuda --amp --out "$DATA/eval_$m"
done

for ch in 4 8; do
    step "loop_${ch}ch" 300 "$PY" benchmarks/bench_train.py --device cuda --preset seed --bf16 \
        --batch-size 256 --channels "$ch" --workers 0,4 --only loop --rounds 5 --steps 20 \
        --dir "$DATA/bench_train" --json "$LOG/loop_${ch}ch.json"
done
step train_threads 240 "$PY" -m massreg.train "$DATA/top.h5" --model seed --epochs 3 --device cuda --amp \
    --batch-size 256 --run-dir "$DATA/run_threads" --force
step cold 240 "$PY" benchmarks/bench_train.py --only cold --rounds 3 --dir "$DATA/bench_train" \
    --json "$LOG/cold.json"

echo "gpu_check: first failing exit status $status (0: all passed); logs in $LOG"
exit $status
