#!/usr/bin/env bash
# The sweep behind results/smollm2-135m, one pipeline per task (each task has its own cap on new
# tokens), each split over WORKERS processes that share one GPU (the 135M model leaves an H100
# mostly idle, so several cells at once finish sooner than one after another). Every cell has
# the same budget.
#   1. r = 8 at both learning rates for every configuration, plus Table 3's cells (LoRA on
#      layer 0, 15 or 29 alone);
#   2. each configuration's learning rate chosen on validation at r = 8 (tiedlora.paper.sweep.chosen_lrs);
#   3. r = 2, 32, 128 at that learning rate, until DEADLINE seconds have passed;
#   4. with SEEDS (e.g. "1 2"), lora, tl5 and tl6 at r = 8 again at each of those seeds (the
#      seed sets the adapter's init and the data order), at the same learning rates, each seed in
#      its own folder $OUT_DIR/seed<N>/ (its budget differs by --seed); `tiedlora report` gives
#      their mean and spread in seeds.csv.
# A cell cut off by the deadline has no results.json; running this again resumes it.
#
#   DATA=../shared/data OUT_DIR=sweeps/smollm2-135m DEADLINE=3600 scripts/sweep_smollm2.sh
#   tiedlora report sweeps/smollm2-135m --out results/smollm2-135m
set -u
OUT_DIR=${OUT_DIR:-sweeps/smollm2-135m}
DATA=${DATA:-../shared/data}
WORKERS=${WORKERS:-1}  # per task; 2 per task (10 processes) ran out of the H100's 80 GB
DEADLINE=${DEADLINE:-86400}
TIEDLORA=${TIEDLORA:-tiedlora}
PYTHON=${PYTHON:-python}
MODEL=${MODEL:-smollm2-135m}
EXTRA=${EXTRA:-}  # more flags, e.g. a smaller budget for a trial
SEEDS=${SEEDS:-}  # more seeds for lora, tl5 and tl6 at r = 8, e.g. "1 2"
BUDGET=(--source "$DATA" --batch_size 32 --micro_batch_size 16 --max_steps 80 --warmup_steps 10 --val_every 20
        --val_rows 64 --patience 2 --test_rows 150 --eval_batch_size 128)
declare -A NEW_TOKENS=([squad]=32 [hellaswag]=8 [iwslt2017-de-en]=128 [dialogsum]=128 [gsm8k]=256)
mkdir -p "$OUT_DIR"
start=$(date +%s)

left() { echo $((DEADLINE - ($(date +%s) - start))); }

shards() {  # folder, task, then the grid flags: WORKERS shards of one sweep, in parallel, until the deadline
  local out=$1 task=$2 k
  shift 2
  [ "$(left)" -gt 0 ] || return 0
  mkdir -p "$out"
  for k in $(seq 1 "$WORKERS"); do
    # shellcheck disable=SC2086  # $EXTRA is several flags
    timeout "$(left)" $TIEDLORA sweep --model "$MODEL" --tasks "$task" "$@" --max_new_tokens "${NEW_TOKENS[$task]}" \
      --out "$out/$task" --shard "$k/$WORKERS" "${BUDGET[@]}" $EXTRA >> "$out/$task.$k.log" 2>&1 &
  done
  wait
}

for task in gsm8k dialogsum iwslt2017-de-en squad hellaswag; do
  (
    shards "$OUT_DIR" "$task" --presets all --ranks 8 --layers 0,15,29 --lrs 1e-3,1e-2
    [ "$(left)" -gt 0 ] || exit 0
    lrs=$($PYTHON -c "from tiedlora.paper.sweep import chosen_lrs; print(chosen_lrs('$OUT_DIR/$task', 8))")
    echo "$task: learning rates chosen on validation at r = 8: $lrs"
    for seed in $SEEDS; do
      shards "$OUT_DIR/seed$seed" "$task" --presets lora,tl5,tl6 --ranks 8 --lrs "$lrs" --seed "$seed"
    done
    shards "$OUT_DIR" "$task" --presets all --ranks 2,32,128 --lrs "$lrs"
  ) &
done
wait
echo "sweep: $(find "$OUT_DIR" -name results.json | wc -l) cells done in $(($(date +%s) - start)) s"
