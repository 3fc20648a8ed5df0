#!/usr/bin/env bash
# flatstack on an NVIDIA Hopper GPU (H100, H200) in one call: the GPU tests, `bench kernels`, bf16
# training of a ~1B dense Llama-style model and a ~1.9B Grok-architecture MoE, one FSDP2 rank under
# torchrun (NCCL), decode (batch 1) and throughput (64 requests) of a random-initialised llama-3.2-1b
# beside transformers on the same card.
# Needs torch and triton already installed (as on the device machine's image); installs nothing and
# reaches no network. JSON and logs go to $OUT (default ./gpu-check); a summary goes to stdout last.
#
#   scripts/gpu_check.sh                            # on the GPU machine, about 6-8 minutes
#   FLATSTACK_CHECK_SMALL=1 scripts/gpu_check.sh    # tiny shapes on whatever device is there: checks
#                                                   # the script itself, on a CPU too
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
SMALL=${FLATSTACK_CHECK_SMALL:-0}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
FAILED=()

FS=("$PY" -m flatstack.cli)

# step NAME SECONDS COMMAND...: run it with a time limit, its output in $OUT/NAME.log
step() {
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    if timeout "$limit" "$@" >"$OUT/$name.log" 2>&1; then
        echo "ok    $name ($((SECONDS - start)) s)"
    else
        echo "FAIL  $name ($((SECONDS - start)) s; exit $?; $OUT/$name.log ends:)"
        tail -n 15 "$OUT/$name.log" | sed 's/^/      /'
        FAILED+=("$name")
    fi
}

if [ "$SMALL" = 1 ]; then
    DEVICE=$("$PY" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')
    KERNELS=(--small) TRAIN=(--small --batch 2 --warmup 1 --steps 1)
    DECODE=(--prompt-tokens 16 --max-tokens 16 --repeats 1)
    THROUGHPUT=(--num-requests 8 --prompt-range 8 32 --output-range 8 16)
else
    DEVICE=cuda
    KERNELS=() TRAIN=(--batch 4 --warmup 2 --steps 3)
    DECODE=(--prompt-tokens 128 --max-tokens 256 --repeats 3)
    THROUGHPUT=(--num-requests 64 --prompt-range 128 512 --output-range 128 256 --baseline-batch 64)
fi

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>&1
    "$PY" -c 'import sys, torch, triton; print(sys.version.split()[0], "torch", torch.__version__,
"triton", triton.__version__, "cuda", torch.version.cuda)'
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

step tests 240 "$PY" -m pytest -q -p no:cacheprovider -x tests/test_triton_kernels.py tests/test_kernels.py \
    "tests/test_engine.py::test_the_engine_on_a_gpu_equals_the_reference"
step kernels 150 "${FS[@]}" bench kernels --device "$DEVICE" "${KERNELS[@]}" --json-out "$OUT/kernels.json"
step train 300 "${FS[@]}" bench train --device "$DEVICE" "${TRAIN[@]}" --json-out "$OUT/train.json"
STDLIB=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
fsdp_step() {  # one rank under torchrun: FSDP2 over NCCL (gloo on a CPU), sharded checkpoint at the end
    rm -rf "$OUT/fsdp-data" "$OUT/fsdp-run"
    "$PY" -m flatstack.cli prepare "$STDLIB/email" --include '*.py' --tokenizer byte --out "$OUT/fsdp-data" --quiet &&
    "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 -m flatstack train --data "$OUT/fsdp-data" \
        --out "$OUT/fsdp-run" --device "$DEVICE" --model grok-1-tiny --seq-len 256 --batch-size 16 \
        --max-steps 20 --eval-tokens 4096 --samples 0 --progress false
}
export -f fsdp_step
export PY OUT DEVICE STDLIB
step fsdp 300 bash -c fsdp_step
step model 120 "$PY" scripts/random_llama.py "$OUT/llama-3.2-1b" $([ "$SMALL" = 1 ] && echo --small)
step decode 180 "${FS[@]}" bench decode --device "$DEVICE" --model "$OUT/llama-3.2-1b" "${DECODE[@]}" \
    --json-out "$OUT/decode.json"
step throughput 240 "${FS[@]}" bench throughput --device "$DEVICE" --model "$OUT/llama-3.2-1b" "${THROUGHPUT[@]}" \
    --json-out "$OUT/throughput.json"
rm -rf "$OUT/llama-3.2-1b"  # 2.5 GB of random weights: not worth carrying back

"$PY" scripts/gpu_summary.py "$OUT"
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "failed: ${FAILED[*]}"
    exit 1
fi
