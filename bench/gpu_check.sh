#!/usr/bin/env bash
# The one-GPU check (< 8 min on an H100/H200): bench/gpu_check.sh [--dry-run] [--out DIR]
# Writes bench/results/gpu_check.json and gpu_check.md; each part prints PASS/FAIL/ERROR/SKIP with its figure.
set -u
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" -m bench.gpu_check "$@"
