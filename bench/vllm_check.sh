#!/usr/bin/env bash
# vLLM's weight loading on this host's GPU, from local files: vLLM's default loader against the
# load format blob2gpu, and runai_streamer where runai-model-streamer is importable
# (bench_vllm_load.py, one repeat of a bounded checkpoint, no Azurite). gpu_check.sh runs it with
# its venv's python; on its own:
#
#   bash bench/vllm_check.sh [PYTHON]
#
#   VLLM_CHECK_MB       checkpoint size in MB (default 1000)
#   VLLM_CHECK_TIMEOUT  seconds for the whole comparison, checkpoint writing included (default 150)
#   VLLM_CHECK_CPU=1    accept vLLM's CPU build too: a rehearsal on a machine without a GPU
#   OUT                 where the log and the JSON go (default /tmp/blob2gpu-gpu-check)
#
# Where vLLM's CUDA build is not importable by PYTHON (or blob2gpu's plugin is not installed for
# it), it prints one line, "vLLM comparison: skipped: <why>", and exits 0: a GPU host without
# vLLM is not a failed check.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python3}
MB=${VLLM_CHECK_MB:-1000}
TIMEOUT=${VLLM_CHECK_TIMEOUT:-150}
OUT=${OUT:-/tmp/blob2gpu-gpu-check}
mkdir -p "$OUT"
START=$(date +%s)

# What PYTHON's vLLM is: "cuda <version>", "cpu <version>" or "skip <why>".
probe=$(timeout "$(( TIMEOUT < 90 ? TIMEOUT : 90 ))" "$PY" - 2>&1 <<'PY' | tail -1
import importlib.metadata as md
import importlib.util
import sys

if importlib.util.find_spec("vllm") is None:
    print(f"skip vLLM is not installed for {sys.executable} (its CUDA build, several GB, is not"
          " in bench/device_bundle.sh's bundle)")
    sys.exit()
plugins = {e.name for e in md.entry_points(group="vllm.general_plugins")}
if "blob2gpu" not in plugins:
    print(f"skip blob2gpu's vLLM plugin is not installed for {sys.executable}")
    sys.exit()
try:
    import torch
    import vllm
    from vllm.platforms import current_platform
except Exception as exc:  # a broken install says why in one line
    print(f"skip vLLM does not import ({type(exc).__name__}: {str(exc).splitlines()[0]})")
    sys.exit()
version = getattr(vllm, "__version__", "?")
kind = "cuda" if current_platform.is_cuda() and torch.cuda.is_available() else "cpu"
print(f"{kind} vllm {version}, torch {torch.__version__}")
PY
)
kind=${probe%% *}
what=${probe#* }
case "$kind" in
  cuda) ;;
  cpu)
    if [ "${VLLM_CHECK_CPU:-0}" != 1 ]; then
      echo "vLLM comparison: skipped: $what is vLLM's CPU build, not its CUDA build"
      exit 0
    fi ;;
  skip) echo "vLLM comparison: skipped: $what"; exit 0 ;;
  *) echo "vLLM comparison: skipped: probing vLLM failed (${probe:-no answer within $(( TIMEOUT < 90 ? TIMEOUT : 90 )) s})"; exit 0 ;;
esac

left=$(( TIMEOUT - ($(date +%s) - START) ))
(( left >= 20 )) || { echo "vLLM comparison: skipped: probing vLLM took all but ${left} s of ${TIMEOUT} s"; exit 0; }
only="default-local blob2gpu-local"
"$PY" -c "import runai_model_streamer" 2>/dev/null && only="$only runai-local"
echo "vLLM comparison ($what): $only, ${MB} MB, 1 repeat, at most ${left} s"
# shellcheck disable=SC2086
timeout "$left" "$PY" bench/bench_vllm_load.py --total-mb "$MB" --repeats 1 --wait-idle 0 \
  --timeout "$left" --only $only --json "$OUT/vllm.json" >"$OUT/vllm.log" 2>&1
rc=$?
if [ "$rc" = 124 ]; then
  echo "vLLM comparison: timed out after ${left} s (log: $OUT/vllm.log)"
  tail -5 "$OUT/vllm.log"
  exit 1
fi
sed -n '/^| contestant/,$p' "$OUT/vllm.log" | grep -v "^wrote "
[ "$rc" = 0 ] || { echo "vLLM comparison: rc=$rc (log: $OUT/vllm.log)"; tail -5 "$OUT/vllm.log"; }
exit "$rc"
