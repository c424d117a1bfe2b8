#!/usr/bin/env bash
# The main job: install from scratch into .venv, print how the package was built, which
# backends this machine has and every op's max error against the references.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash tools/setup_env.sh
.venv/bin/kasmina-kernels info
.venv/bin/kasmina-kernels check "$@"
