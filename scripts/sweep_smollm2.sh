#!/usr/bin/env bash
# The sweep behind results/smollm2-135m: one `tiedlora sweep` per task (each task has its own
# cap on new tokens), each split over WORKERS processes that share one GPU (the 135M model
# leaves an H100 mostly idle, so several cells at once finish sooner than one after another).
# Every cell has the same budget. Ranks go in order of importance: r = 8 and r = 2 with the
# Table 3 cells (LoRA on layer 0, 15 or 29 alone), then r = 32 and r = 128, until DEADLINE
# seconds have passed; a cell cut off by the deadline has no results.json and is resumed by
# running this again.
#
#   DATA=../shared/data OUT_DIR=sweeps/smollm2-135m WORKERS=2 DEADLINE=3600 scripts/sweep_smollm2.sh
#   tiedlora report sweeps/smollm2-135m --out results/smollm2-135m
set -u
OUT_DIR=${OUT_DIR:-sweeps/smollm2-135m}
DATA=${DATA:-../shared/data}
WORKERS=${WORKERS:-2}
DEADLINE=${DEADLINE:-86400}
TIEDLORA=${TIEDLORA:-tiedlora}
MODEL=${MODEL:-smollm2-135m}
EXTRA=${EXTRA:-}  # more flags, e.g. a smaller budget for a trial
BUDGET=(--source "$DATA" --batch_size 32 --micro_batch_size 32 --max_steps 100 --warmup_steps 10 --val_every 20
        --val_rows 100 --patience 3 --test_rows 200 --eval_batch_size 128 --lrs 1e-3,1e-2)
declare -A NEW_TOKENS=([squad]=32 [hellaswag]=8 [iwslt2017-de-en]=128 [dialogsum]=128 [gsm8k]=256)
mkdir -p "$OUT_DIR"
start=$(date +%s)
for task in gsm8k dialogsum iwslt2017-de-en squad hellaswag; do
  for k in $(seq 1 "$WORKERS"); do
    (
      for ranks in "--ranks 8,2 --layers 0,15,29" "--ranks 32,128"; do
        left=$((DEADLINE - ($(date +%s) - start)))
        [ "$left" -gt 0 ] || break
        # shellcheck disable=SC2086  # $ranks and $EXTRA are several flags
        timeout "$left" $TIEDLORA sweep --model "$MODEL" --tasks "$task" --configs all $ranks --max_new_tokens "${NEW_TOKENS[$task]}" \
          --out "$OUT_DIR/$task" --shard "$k/$WORKERS" "${BUDGET[@]}" $EXTRA
      done
    ) > "$OUT_DIR/$task.$k.log" 2>&1 &
  done
done
wait
echo "sweep: $(find "$OUT_DIR" -name results.json | wc -l) cells done in $(($(date +%s) - start)) s"
