#!/usr/bin/env bash
# Every CUDA path of the project in one call, within 8 minutes, on a machine with one GPU and no internet
# (the repository copied there); one summary table at the end. NOT YET RUN ON A GPU.
#
#   benchmarks/gpu_check.sh              # on the GPU machine
#   benchmarks/gpu_check.sh --dry-run    # the same steps with --device cpu and tiny sizes (a CPU check)
#
# Environment: PYTHON (default python3: on the lent GPU machines, the python that holds CUDA torch);
# WHEELS=DIR: install requirements.txt from the wheels in DIR into a fresh venv first, offline, as .ci/run
# does with the project machines' local wheels (without it the PYTHON's own packages are used, and their
# torch version is printed next to the pinned one). BUDGET_S (default 470): every step's timeout is cut
# to what is left of it, so one hang cannot eat the 8 minutes; a failed step is reported and the rest run.
set -uo pipefail
cd "$(dirname "$0")/.."

dry_run=0
case "${1:-}" in
  --dry-run) dry_run=1 ;;
  "") ;;
  *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac
PY="${PYTHON:-python3}"
work="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
budget_end=$(( $(date +%s) + ${BUDGET_S:-470} ))
rows=()
failed=0
export PYTHONUNBUFFERED=1

# step NAME TIMEOUT_S FIGURE_PATTERN COMMAND...: run COMMAND under timeout, its output in $work/NAME.log;
# the summary row takes the last output line matching FIGURE_PATTERN (grep -E) as the key figure.
step() {
  local name=$1 limit=$2 pattern=$3 left status figure start=$SECONDS
  shift 3
  left=$(( budget_end - $(date +%s) ))
  (( left < limit )) && limit=$left
  if (( limit <= 0 )); then
    status="skipped (budget spent)"
  else
    echo "=== $name (timeout ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$work/$name.log"
    case ${PIPESTATUS[0]} in
      0) status=ok ;;
      124|137) status="failed (timeout ${limit}s)" ;;
      *) status=failed ;;
    esac
  fi
  [[ $status == ok ]] || failed=$(( failed + 1 ))
  figure=$(grep -E "$pattern" "$work/$name.log" 2>/dev/null | tail -n 1 | sed -E 's/^ +//' | cut -c1-110)
  rows+=("$(printf '%-14s %-24s %6s  %s' "$name" "$status" $(( SECONDS - start )) "$figure")")
}

if (( dry_run )); then
  dev=cpu
  norm_args=(--quick --iters 1)
  train_args=(--compile --quick --setups iresnet50 --repeats 2 --warmup 1)
  heads_args=(--classes 20000 --batch 16 --steps 2 --warmup 1)
  train_size=(model.width=8 model.input_size=32 model.embedding_size=16 train.batch_size=8
              data.synth.identities=16 data.synth.images_per_identity=6 data.synth.size=32
              data.synth.verify_identities=20 data.synth.verify_pairs=200 train.max_steps=3 data.num_workers=0)
else
  dev=cuda
  norm_args=()
  train_args=(--compile --setups iresnet50)
  heads_args=(--classes 1000000 --batch 512 --rates 0.1 1.0)
  train_size=(train.max_steps=60 train.precision=bf16 data.num_workers=4)
fi
run_dir="$work/quickstart_run"
data_dir="$work/quickstart_data"

step install 60 "torch " bash -c '
  set -e
  if [[ -n "${WHEELS:-}" ]]; then
    "$0" -m venv "$1/venv" && "$1/venv/bin/pip" install -q --no-index --find-links "$WHEELS" -r requirements.txt
    py="$1/venv/bin/python"
  else
    py="$0"
  fi
  mkdir "$1/src" && cp -r pyproject.toml requirements.txt README.md facerec backbones losses data eval "$1/src"
  "$py" -m pip install -q --no-deps --no-index --no-build-isolation --target "$1/site" "$1/src"
  ls "$1/site/facerec/train.py" > /dev/null  # the package installs from the repository files
  echo "$py" > "$1/python"
  "$py" -c "import cv2, numpy, onnx, onnxruntime, scipy, sklearn, tensorboard, torch, tqdm, yaml
print(\"torch\", torch.__version__, \"(pinned:\", open(\"requirements.txt\").read().split(\"torch==\")[1].split()[0] + \")\",
      \"cuda\", torch.version.cuda, \"devices\", torch.cuda.device_count(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"\")"
' "$PY" "$work"
[[ -s "$work/python" ]] && PY="$(cat "$work/python")"

step bench_norm 60 "worst SN/BN" "$PY" -m benchmarks.bench_norm --device "$dev" "${norm_args[@]}"
step bench_heads 60 "^ +0\.10 " "$PY" -m benchmarks.bench_heads --device "$dev" "${heads_args[@]}"
step nccl 30 "all_reduce" "$PY" -c "
import torch, torch.distributed as dist
device = torch.device('$dev', 0) if '$dev' == 'cuda' else torch.device('cpu')
backend = 'nccl' if device.type == 'cuda' else 'gloo'
dist.init_process_group(backend, init_method='tcp://127.0.0.1:29533', rank=0, world_size=1,
                        device_id=device if device.type == 'cuda' else None)
value = torch.ones(1, device=device)
dist.all_reduce(value)
print(f'{backend} all_reduce ok: {value.item()}')
dist.destroy_process_group()"
step torchrun 90 "images_per_sec|done:" "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 \
  run.py train --config configs/quickstart.yaml train.device="$dev" "${train_size[@]}" \
  data.train="$data_dir" "data.verify=[$data_dir/synth.bin]" train.output_dir="$run_dir" \
  train.resume=none train.progress=false train.log_every=10
step export 45 "wrote|ONNX" "$PY" run.py export --run "$run_dir" --device "$dev" \
  --input "$data_dir/synth.bin" --output "$work/embeddings.npz" --onnx "$work/model.onnx"
step verify 45 "synth" "$PY" run.py verify --run "$run_dir" --device "$dev" --dataset "$data_dir/synth.bin"
# last, with what is left of the budget: compiling iresnet50 (BN and SN) is the longest step
step bench_train 300 "SN compiled .* images/s" \
  "$PY" -m benchmarks.bench_train --device "$dev" "${train_args[@]}"

echo
echo "gpu_check$( ((dry_run)) && echo ' --dry-run (cpu, tiny sizes)'): $failed step(s) not ok; logs in $work"
printf '%-14s %-24s %6s  %s\n' step status seconds "key figure"
printf '%s\n' "${rows[@]}"
exit $(( failed > 0 ))
