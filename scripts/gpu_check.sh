#!/usr/bin/env bash
# The GPU figures BENCHMARKS.md still lacks (issues 12 and 13), prepared so that a session lent a
# GPU spends its few minutes measuring rather than typing. Each part is one `scripts/bench.py` run;
# its whole output goes to $OUT/<part>.log (default ./gpu_logs) and its last lines to
# $OUT/summary.txt. Parts run in the order given; the default is all of them.
#
#   bash scripts/gpu_check.sh train decode_cmdbuf decode_profile scan moe   # what is still missing, most wanted first
#   bash scripts/gpu_check.sh decode tidar     # measured then (BENCHMARKS.md, "GPU: one H200")
#
# Through the device tool (10 minutes a command, 15 minutes of device time a session, the start
# included): one call of the first line, timeout_s 590; `PY=python3` there. The parts' limits add up
# to more than 590 s, but each stops early when it is done; the last ones are the first to go. Needs jax with CUDA,
# flax, optax, orbax, torch (and transformers for the HF decode peer); not grain or wandb. The first
# session lost the train part to a 2.5-3.6 minute compile of the state's initialisation, since
# fixed (docs/perf.md, "GPU start-up"): check the `start-up:` line of train.log first.
#
#   train   llama-374m bf16, batch 16 x 1024: jaxllm's step (MFU), torch_ref eager and torch.compile
#           (issue 13: >= 50% MFU; torch.compile peer 35.8%, DESIGN.md).
#   decode  llama-374m bf16, batch 1 and 32: jaxllm, torch_ref, HF static cache
#           (issue 13: <= 1.0 ms/token at batch 1, >= 25k tokens/s at batch 32).
#   decode_cmdbuf  jaxllm's decode again with XLA's command buffers over the while loop's body (the
#           first session's decode looked launch-bound: 1.71 ms/token at batch 1, 1.85 at batch 32).
#   decode_profile  jaxllm's decode (64 new tokens) traced by jax.profiler: XLA ops and device busy time
#           a token, and the kernels that take it (bench.py decode --profile); the traces stay in /tmp.
#   tidar   the cost of a TiDAR step against a one-token step on the GPU (random weights, so the
#           tokens per forward are ~1; the trained figure is the CPU's: BENCHMARKS.md) (issue 12).
#   moe     grouped (ragged_dot) against dense MoE dispatch on seed002-customllm.
#   scan    llama-374m with model.scan_layers false, then true: each run's wall time (mostly compilation)
#           and step time, to choose the default (issue 13).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_logs}
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1  # JAX and torch share the GPU
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # jaxllm from this checkout, installed or not
PY=${PY:-$(command -v python || command -v python3)}
SUMMARY="$OUT/summary.txt"

part() {  # part NAME SECONDS COMMAND...: run with a time limit, keep the log, summarise
    local name=$1 limit=$2
    shift 2
    echo "== $name ($(date -u +%H:%M:%S)): $*" | tee -a "$SUMMARY"
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "-- $name: exit $rc after $((SECONDS - start)) s" | tee -a "$SUMMARY"
    grep -v -i "warning" "$OUT/$name.log" | tail -n 14 >>"$SUMMARY"
}

parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(train decode tidar moe scan)
for p in "${parts[@]}"; do
    case $p in
        train | decode | decode_cmdbuf | decode_profile | tidar | moe | scan) ;;
        *) echo "gpu_check.sh: unknown part '$p'; allowed: train decode decode_cmdbuf decode_profile tidar moe scan" >&2; exit 2 ;;
    esac
done
mkdir -p "$OUT"

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
    $PY -c "import jax, flax, optax, torch; print('jax', jax.__version__, jax.devices(), '| flax', flax.__version__, \
'| optax', optax.__version__, '| torch', torch.__version__, torch.cuda.is_available())" 2>&1
    git log -1 --format='commit %h %s' 2>/dev/null
} >>"$SUMMARY"

for p in "${parts[@]}"; do
    case $p in
        train) part train 300 $PY scripts/bench.py train --config configs/llama-374m.yaml --dtype bfloat16 \
                   --batch 16 --seq 1024 --steps 10 --warmup 3 --compile
               if ! grep -q "^jaxllm" "$OUT/train.log"; then  # no jaxllm row: measure it without cuDNN's kernel
                   part train_xla 120 $PY scripts/bench.py train --config configs/llama-374m.yaml --dtype bfloat16 \
                       model.attention.implementation=xla --batch 16 --seq 1024 --steps 10 --warmup 3 --no-torch
               fi ;;
        decode) part decode 180 $PY scripts/bench.py decode --config configs/llama-374m.yaml --dtype bfloat16 \
                    --batch 1,32 ;;
        tidar) part tidar 90 $PY scripts/bench.py decode --config configs/llama-374m.yaml --dtype bfloat16 \
                   model.diffusion.enabled=true --batch 1 --no-torch --no-hf --speculative tidar --block 4,8,16 ;;
        decode_cmdbuf) XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL" \
                    part decode_cmdbuf 120 $PY scripts/bench.py decode --config configs/llama-374m.yaml \
                        --dtype bfloat16 --batch 1,32 --no-torch --no-hf ;;
        decode_profile) part decode_profile 150 $PY scripts/bench.py decode --config configs/llama-374m.yaml \
                    --dtype bfloat16 --batch 1,32 --new 64 --runs 1 --no-torch --no-hf --profile /tmp/decode_trace ;;
        moe) part moe 60 $PY scripts/bench.py moe model.n_layer=8 --batch 8 --seq 1024 ;;
        scan) for scan in false true; do  # the wall time of each (printed by part) is mostly compilation
                  part "scan_layers_$scan" 100 $PY scripts/bench.py train --config configs/llama-374m.yaml \
                      --dtype bfloat16 model.scan_layers=$scan --batch 16 --seq 1024 --steps 3 --warmup 1 --no-torch
              done ;;
    esac
done
cat "$SUMMARY"
