# Sourced by the tool scripts: sets `py` to the Python they run, as an absolute path (the
# scripts change directory): $PYTHON if set, else the repository's .venv, else python3.
# Expects ROOT (the repository root) to be set.
py="${PYTHON:-}"
if [[ -z "$py" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then py="$ROOT/.venv/bin/python"; else py=python3; fi
fi
if [[ "$py" == */* ]]; then
  py="$(cd "$(dirname "$py")" && pwd)/$(basename "$py")"
else
  py="$(command -v "$py")" || { echo "no Python interpreter '$PYTHON' on PATH" >&2; exit 1; }
fi
