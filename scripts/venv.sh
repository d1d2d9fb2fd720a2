#!/usr/bin/env bash
# Prints the path of a virtual environment holding this project's dependencies, creating it first
# if needed. The environment lives outside the repo, keyed by a hash of the dependency lists in
# pyproject.toml, so CI and repeated `make setup` reuse it (torch is several GB) and a change of
# dependencies gets a fresh one. The project itself is installed editable, without dependencies,
# every time (cheap). `.venv` in the repo is linked to it.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
cache=${SENSOR_ANOMALY_CACHE:-$HOME/.cache/sensor-anomaly}
key=$("$python" - <<'PY'
import hashlib, json, sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
spec = [sys.version_info[:2], project["dependencies"], project.get("optional-dependencies", {})]
print(hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16])
PY
)
venv="$cache/venv-$key"
if [ ! -f "$venv/.complete" ]; then
    echo "creating environment $venv (dependencies changed or first run; torch is large, this takes minutes)" >&2
    rm -rf "$venv"
    mkdir -p "$cache"
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip >&2
    "$venv/bin/python" -m pip install -q --progress-bar off -e ".[dev]" >&2
    touch "$venv/.complete"
else
    "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e . >&2 2>/dev/null \
        || "$venv/bin/python" -m pip install -q --no-deps -e . >&2
fi
ln -sfn "$venv" .venv
echo "$venv"
