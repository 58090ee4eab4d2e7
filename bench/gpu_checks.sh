#!/usr/bin/env bash
# This project's GPU checks, each stage one command of under 10 minutes, for a CUDA box that has jax,
# flax, optax, orbax-checkpoint, numpy and pillow but no TensorFlow and no network.  Run from the
# repository root.  Each stage leaves few files in $OUT (default ./gpu_results), since such boxes send
# back only a handful of files of at most 16 MiB: STAGE.tgz (logs, JSON results, evaluation reports;
# written even when a step fails), trace.tgz, and the bf16 weights' params in 8 MiB parts.
#
#   bash bench/gpu_checks.sh speed             # profile_train_step (f32 and bf16 rows, a trace), run_all.py
#   bash bench/gpu_checks.sh bf16 EXPORT_DIR   # the release recipe of checkpoints/300w_paper trained with
#                                              # model.compute_dtype=bfloat16; both weights evaluated on common
#
# EXPORT_DIR is a 300-W array export made where TensorFlow is installed:
#     python -m data_prep.export_arrays --dataset 300w --data_dir DIR --out exports/300w
# (keep it out of git, e.g. in .git/info/exclude, and carry it to the GPU box with the checkout).
# TINY=1 runs both stages with a tiny network for seconds, on any machine: try it before a GPU run.
set -euo pipefail

OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
stage=${1:-}
case "$stage" in speed|bf16) ;; *) echo "usage: bash bench/gpu_checks.sh speed | bf16 EXPORT_DIR" >&2; exit 2 ;; esac
if [ "$stage" = speed ]; then mine=("$OUT/speed.tgz" "$OUT/trace.tgz"); else mine=("$OUT/bf16.tgz" "$OUT"/params.msgpack.part_*); fi
for f in "${mine[@]}"; do  # (an unmatched glob stays literal and does not exist)
  if [ -e "$f" ]; then echo "gpu_checks.sh: $f exists; move it away (nothing was overwritten)" >&2; exit 1; fi
done
R=$(mktemp -d)  # this stage's results, packed into $OUT/$stage.tgz on exit, however it exits
W=$(mktemp -d)  # the training workdir (checkpoints stay here; its log and metrics go into the results)
trap 'cp "$W"/ckpt_bf16/metrics.jsonl "$W"/ckpt_bf16/lgcn.log "$R"/ 2>/dev/null || true; tar -czf "$OUT/$stage.tgz" -C "$R" . ; rm -rf "$R" "$W"' EXIT
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL=2

if [ "${TINY:-0}" = 1 ]; then
  net=(model.num_filters=4 model.local_5x5_layers=1 model.local_3x3_layers=1 model.global_layers=1
       model.kernel_size=9 data.image_size=32)
  profile=(--preset quick --batch 2 --repeats 1 --no_cost --config "${net[@]}")
  all=(--tiny)
  recipe=("${net[@]}" train.num_steps=4 train.eval_every=2 train.checkpoint_every=2 train.log_every=1
          train.bn_recalibration_batches=1 train.eval_batches=1)
  recalibrate=2
else
  profile=(--preset paper --batch 64)
  all=()
  recipe=()
  recalibrate=100
fi

case "$stage" in
  speed)
    (nvidia-smi || true) > "$R/nvidia_smi.txt" 2>&1
    python bench/profile_train_step.py "${profile[@]}" --trace "$R/trace" --out "$R/results_profile.json" \
      2>&1 | tee "$R/profile.log"
    tar -czf "$OUT/trace.tgz" -C "$R" trace && rm -rf "$R/trace"
    python bench/run_all.py ${all[@]+"${all[@]}"} --out "$R/results.json" 2>&1 | tee "$R/run_all.log"
    ;;
  bf16)
    data=${2:?"usage: bash bench/gpu_checks.sh bf16 EXPORT_DIR (a 300-W array export)"}
    work="$W/ckpt_bf16"
    # The recipe of checkpoints/300w_paper (README there), with bf16 convolution blocks.
    python run_train.py --workdir "$work" --preset paper --dataset 300w --data_dir "$data" --no_progress --config \
      train.batch_size=64 train.num_steps=2500 train.optimizer=adam train.learning_rate=0.002 \
      train.grad_clip=0 "train.lr_decay_steps=[1875,2250]" "train.lr_decay_factors=[0.3,0.3]" \
      train.eval_every=250 train.checkpoint_every=250 train.log_every=25 model.compute_dtype=bfloat16 ${recipe[@]+"${recipe[@]}"} \
      2>&1 | tee "$R/train_bf16.log"
    python run_train.py --workdir "$work" --export "$R/300w_paper_bf16" --recalibrate "$recalibrate" --calibrate_x_offset \
      2>&1 | tee "$R/export_bf16.log"
    runs=("bf16_trained:--checkpoint $R/300w_paper_bf16")
    if [ "${TINY:-0}" != 1 ]; then  # the released weights, f32 and with bf16 blocks, on the same machine
      runs+=("released_f32:--checkpoint 300w_paper" "released_in_bf16:--checkpoint 300w_paper --config model.compute_dtype=bfloat16")
    fi
    for run in "${runs[@]}"; do
      name=${run%%:*}
      # shellcheck disable=SC2086
      python run_eval.py ${run#*:} --split common --data_dir "$data" --no_progress --out "$R/eval_$name" \
        2>&1 | tee "$R/eval_$name.log"
    done
    # The paper network's params (16.0 MiB) come back in parts: cat params.msgpack.part_* > params.msgpack
    split -b 8M "$R/300w_paper_bf16/params.msgpack" "$OUT/params.msgpack.part_"
    rm "$R/300w_paper_bf16/params.msgpack"
    ;;
esac
