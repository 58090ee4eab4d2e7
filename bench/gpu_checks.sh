#!/usr/bin/env bash
# This project's GPU checks, each stage one command of under 10 minutes, for a CUDA box that has jax,
# flax, optax, orbax-checkpoint, numpy and pillow but no TensorFlow and no network.  Run from the
# repository root; results go to $OUT (default ./gpu_results).
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

stage=${1:-}
case "$stage" in
  speed)
    (nvidia-smi || true) > "$OUT/nvidia_smi.txt" 2>&1
    python bench/profile_train_step.py "${profile[@]}" --trace "$OUT/trace" --out "$OUT/results_profile.json" \
      2>&1 | tee "$OUT/profile.log"
    tar -czf "$OUT/trace.tgz" -C "$OUT" trace && rm -rf "$OUT/trace"
    python bench/run_all.py ${all[@]+"${all[@]}"} --out "$OUT/results.json" 2>&1 | tee "$OUT/run_all.log"
    ;;
  bf16)
    data=${2:?"usage: bash bench/gpu_checks.sh bf16 EXPORT_DIR (a 300-W array export)"}
    work="$OUT/ckpt_bf16"
    if [ -e "$work" ]; then echo "gpu_checks.sh: $work exists; move it away (nothing was overwritten)" >&2; exit 1; fi
    # The recipe of checkpoints/300w_paper (README there), with bf16 convolution blocks.
    python run_train.py --workdir "$work" --preset paper --dataset 300w --data_dir "$data" --no_progress --config \
      train.batch_size=64 train.num_steps=2500 train.optimizer=adam train.learning_rate=0.002 \
      train.grad_clip=0 "train.lr_decay_steps=[1875,2250]" "train.lr_decay_factors=[0.3,0.3]" \
      train.eval_every=250 train.checkpoint_every=250 train.log_every=25 model.compute_dtype=bfloat16 ${recipe[@]+"${recipe[@]}"} \
      2>&1 | tee "$OUT/train_bf16.log"
    cp "$work/metrics.jsonl" "$OUT/metrics_bf16.jsonl"
    python run_train.py --workdir "$work" --export "$OUT/300w_paper_bf16" --recalibrate "$recalibrate" --calibrate_x_offset \
      2>&1 | tee "$OUT/export_bf16.log"
    runs=("bf16_trained:--checkpoint $OUT/300w_paper_bf16")
    if [ "${TINY:-0}" != 1 ]; then  # the released weights, f32 and with bf16 blocks, on the same machine
      runs+=("released_f32:--checkpoint 300w_paper" "released_in_bf16:--checkpoint 300w_paper --config model.compute_dtype=bfloat16")
    fi
    for run in "${runs[@]}"; do
      name=${run%%:*}
      # shellcheck disable=SC2086
      python run_eval.py ${run#*:} --split common --data_dir "$data" --no_progress --out "$OUT/eval_$name" \
        2>&1 | tee "$OUT/eval_$name.log"
    done
    # Files come back from such boxes up to 16 MiB each; the paper network's params are a little more.
    split -b 8M "$OUT/300w_paper_bf16/params.msgpack" "$OUT/300w_paper_bf16/params.msgpack.part_"
    rm "$OUT/300w_paper_bf16/params.msgpack"
    rm -rf "$work"
    ;;
  *)
    echo "usage: bash bench/gpu_checks.sh speed | bf16 EXPORT_DIR" >&2
    exit 2
    ;;
esac
