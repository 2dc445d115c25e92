#!/usr/bin/env bash
# Builds the documentation site (docs/: Sphinx, MyST Markdown pages, the furo theme) into
# OUTDIR (default build/docs), with warnings as errors: a broken link between pages, a
# missing heading anchor, an unresolved API name or a docstring that does not parse fails it.
#   usage: scripts/build_docs.sh [OUTDIR]
# The API reference is generated from the importable gradcomp (its docstrings and argument
# parsers), so gradcomp must import: installed (pip install .), or a build on PYTHONPATH.
# The docs extra's requirements are read from pyproject.toml (one list, kept there) and
# installed with pip; `pip install .[docs]` would rebuild the compiled package instead.
set -euo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-build/docs}
PY=${PYTHON:-python3}

# The docs extra's requirements, from pyproject.toml; those already satisfied are left out (no
# pip run at all when every one is: quick, and offline).
missing=$("$PY" - <<'PYEOF'
import sys
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    try:
        import tomli as tomllib
    except ModuleNotFoundError:
        sys.exit("build_docs.sh: reading pyproject.toml needs Python 3.11+ (tomllib) or tomli (pip install tomli)")
with open("pyproject.toml", "rb") as f:
    reqs = tomllib.load(f)["project"]["optional-dependencies"]["docs"]
if not reqs:
    sys.exit("build_docs.sh: pyproject.toml's docs extra is empty")
try:
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import Requirement
except ImportError:  # no packaging: let pip decide
    print("\n".join(reqs))
    sys.exit(0)
for r in reqs:
    req = Requirement(r)
    try:
        ok = req.specifier.contains(version(req.name), prereleases=True)
    except PackageNotFoundError:
        ok = False
    if not ok:
        print(r)
PYEOF
) || exit 1
if [ -n "$missing" ]; then
  mapfile -t reqs <<< "$missing"
  echo "== installing the docs extra's requirements: ${reqs[*]}"
  "$PY" -m pip install -q --disable-pip-version-check "${reqs[@]}"
else
  echo "== the docs extra's requirements are installed"
fi

where=$("$PY" -c 'import gradcomp, os; print(os.path.dirname(gradcomp.__file__), gradcomp.__version__)' 2>&1) || {
  echo "build_docs.sh: gradcomp does not import, and the API reference is generated from it:" >&2
  echo "$where" | tail -5 >&2
  echo "install it (pip install .) or put a build on PYTHONPATH (e.g. PYTHONPATH=\$PWD/python)" >&2
  exit 1
}
echo "== documenting gradcomp from $where"

start=$(date +%s)
# -E: a fresh environment every time, so a page whose warnings failed an earlier build is read again
"$PY" -m sphinx -E -W --keep-going -n -q -b html docs "$OUTDIR"
echo "== docs built into $OUTDIR in $(( $(date +%s) - start )) s"
