# Device call 1 (this project's lent GPU; carry .whl .gpu/a): install the wheels, copy the first half of the GGUF to /tmp,
# run the serving benchmark, and start MPS for the sweep. Call 2 must follow within 30 s, while the machine is warm.
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
cp .gpu/a/gguf.part1 /tmp/gguf.part1 &
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)"
timeout 200 python3 benchmarks/serve.py --device cuda --rounds 10 --gen_rounds 1 --out $OUT/serve_cuda.json 2>&1 | grep -v Warning
echo "bench done at $(( $(date +%s) - t0 )) s"
# MPS lets the sweep's processes run kernels at once; the sweep uses it only if this check passes
export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
mkdir -p /tmp/mps /tmp/mps-log
if nvidia-cuda-mps-control -d; then
  for i in 1 2; do timeout 60 python3 -c "import torch; x=torch.randn(2000,2000,device='cuda'); print('client ok', float((x@x).abs().sum())>0)" & done; wait
  ok=$(timeout 60 python3 -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null)
  if [ "$ok" = 1 ]; then touch /tmp/mps_ok; echo "MPS ok"; else echo quit | nvidia-cuda-mps-control; echo "MPS off"; fi
fi
wait; ls -la /tmp/gguf.part1; echo "call1 $(( $(date +%s) - t0 )) s"
