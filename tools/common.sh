# Sourced by the tool scripts, after `set -euo pipefail`: sets ROOT (the repository root, also
# the working directory from here on) and `me` (the script's name, which prefixes its
# messages), and defines the helpers below.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
me="$(basename "${BASH_SOURCE[1]}" .sh)"
cd "$ROOT"

fail() { echo "$me: FAILED: $*" >&2; exit 1; }
skip() { echo "$me: SKIPPED: $*"; exit 0; }

# Sets `py` to the Python the script runs, as an absolute path (some scripts change directory
# again): $PYTHON if set (a relative path is taken from ROOT), else the repository's .venv,
# else python3.
find_python() {
  local venv="$ROOT/.venv/bin/python"
  [[ -x "$venv" ]] || venv=python3
  py="${PYTHON:-$venv}"
  if [[ "$py" == */* ]]; then
    py="$(cd "$(dirname "$py")" && pwd)/$(basename "$py")"
  else
    py="$(command -v "$py")" || { echo "no Python interpreter '${PYTHON:-python3}' on PATH" >&2; exit 1; }
  fi
}

# Prints the first executable of these: $1 on PATH, in $CUDA_HOME/bin, in /usr/local/cuda/bin;
# nothing when there is none.
cuda_tool() {
  local c
  for c in "$(command -v "$1" || true)" "${CUDA_HOME:-/nonexistent}/bin/$1" "/usr/local/cuda/bin/$1"; do
    if [[ -n "$c" && -x "$c" ]]; then echo "$c"; return; fi
  done
}
