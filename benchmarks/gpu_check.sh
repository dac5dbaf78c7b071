#!/usr/bin/env bash
# The GPU path in one prepared run, for a machine with one (or more) NVIDIA GPUs and a venv whose torch has CUDA:
#
#     bash benchmarks/gpu_check.sh            # PYTHON=/path/to/python to use another interpreter
#
# 1. the CUDA kernel tests (tests/trainers/test_kernels.py: CUDA against CPU);
# 2. the placement plan of the default job on this machine (saeforge run --plan);
# 3. the default job on the GPU, through a local Ray (producer, evaluator and trainer placed as planned; bf16
#    stream, DeepSpeed bf16 with fp32 master weights, nccl);
# 4. trainer_throughput.py at 131,072 and 1,048,576 latents, d = 2,304, bf16: tokens/s and the fraction of the
#    bf16 encoder-matmul roofline measured on the same GPU;
# 5. producer_throughput.py's forward on the GPU (bf16, cut vs full model) and producer_memory.py on the GPU
#    (peak GPU memory, cut vs full).
# Each step has a time limit (the whole run is meant to take under 8 minutes on one GPU); a step that fails or
# runs out of time is reported with its exit status and the run goes on. Logs go to $OUT (or a temp folder).
# The last line printed is one JSON object: {"gpu", "steps": {name: {"rc", "seconds", "result"}}, ...}.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
SAEFORGE=$(dirname "$PY")/saeforge
LOGS=${OUT:-$(mktemp -d)}
mkdir -p "$LOGS"
export RAY_AUTH_MODE=disabled SAEFORGE_HOME="$LOGS/home" PYTHONUNBUFFERED=1
started=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$LOGS/gpu.txt" 2>&1 || true
"$PY" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available(), torch.cuda.device_count())" \
  > "$LOGS/torch.txt" 2>&1

step() {  # step NAME SECONDS COMMAND...: run it with a limit, keep its log, exit status and duration
  local name=$1 limit=$2 t0 rc
  shift 2
  t0=$(date +%s)
  timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
  rc=$?
  echo "$rc $(( $(date +%s) - t0 ))" > "$LOGS/$name.rc"
  echo "== $name: exit $rc after $(( $(date +%s) - t0 )) s (log: $LOGS/$name.log)"
  tail -n 3 "$LOGS/$name.log" | cut -c1-300
}

step kernels 120 "$PY" -m pytest -q -p no:cacheprovider tests/trainers/test_kernels.py
step plan 60 "$SAEFORGE" run --plan
step default_job 300 "$SAEFORGE" run --quiet
cd benchmarks
step trainer_131072 120 "$PY" trainer_throughput.py --latents 131072 --d 2304 --k 32 --steps 5 --device cuda --precision bf16
step trainer_1048576 180 "$PY" trainer_throughput.py --latents 1048576 --d 2304 --k 32 --steps 3 --device cuda --precision bf16
step producer_forward 120 "$PY" producer_throughput.py --device cuda --skip-producers --batches 5 --handoff-batches 10
step producer_memory 120 "$PY" producer_memory.py --device cuda
cd ..

"$PY" - "$LOGS" "$started" <<'EOF'
import json, pathlib, sys, time

logs, started = pathlib.Path(sys.argv[1]), int(sys.argv[2])
steps = {}
for rc_file in sorted(logs.glob("*.rc")):
    rc, seconds = (int(v) for v in rc_file.read_text().split())
    lines = (logs / f"{rc_file.stem}.log").read_text(errors="replace").splitlines()
    result = None
    for line in reversed(lines):  # the benchmarks' last line is one JSON object
        if line.startswith("{"):
            try:
                result = json.loads(line)
                break
            except json.JSONDecodeError:
                pass
    steps[rc_file.stem] = {"rc": rc, "seconds": seconds, "result": result,
                           **({} if result is not None else {"tail": lines[-12:]})}
print(json.dumps({"gpu": (logs / "gpu.txt").read_text().strip(), "torch": (logs / "torch.txt").read_text().strip(),
                  "seconds": int(time.time()) - started, "ok": all(s["rc"] == 0 for s in steps.values()),
                  "steps": steps}))
EOF
