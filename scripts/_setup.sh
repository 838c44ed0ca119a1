# Sourced by scripts/serve and scripts/test: a Python >= 3.12 virtualenv in .venv with the project
# installed (re-installed only when pyproject.toml changes).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

find_python() {
  local candidate
  for candidate in "${PYTHON:-}" python3.12 python3.13 python3 python "/root/.pyenv/versions/$(cat .python-version 2>/dev/null)/bin/python"; do
    [ -n "$candidate" ] || continue
    command -v "$candidate" >/dev/null 2>&1 || [ -x "$candidate" ] || continue
    if "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      echo "$candidate"
      return 0
    fi
  done
  echo "llmgateway needs Python >= 3.12 (set PYTHON=/path/to/python3.12)" >&2
  return 1
}

extras="${1:-}"
if [ ! -x .venv/bin/python ]; then
  "$(find_python)" -m venv .venv
fi
stamp=".venv/.llmgateway-installed${extras:+-$extras}"
wanted="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".${extras:+[$extras]}"
  echo "$wanted" > "$stamp"
fi
export PATH="$PWD/.venv/bin:$PATH"
