#!/usr/bin/env bash
# Builds the project-local environment .venv: pinned requirements, detectron2 0.6
# and ilmil itself (editable). Idempotent: returns at once when nothing changed.
#
#   ILMIL_PYTHON=python3.11       interpreter for the venv (default: python3.11, else python3)
#   ILMIL_DETECTRON2=SPEC         a pip spec or path of your own detectron2 build (e.g. a
#                                 source checkout compiled with CUDA ops) used instead of
#                                 the pure-Python PyPI sdist
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
D2_SDIST=pb1-detectron2-0.6.tar.gz
# sha256 of the PyPI sdist; its Python files are byte-identical to detectron2 v0.6.
D2_SHA256=5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29

stamp="$VENV/.ilmil-bootstrap"
want="$(cat requirements.txt setup.py tools/bootstrap.sh | sha256sum | cut -d' ' -f1) ${ILMIL_DETECTRON2:-sdist}"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

python=${ILMIL_PYTHON:-$(command -v python3.11 || command -v python3)}
if ! "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "bootstrap: $python is not Python 3.11; set ILMIL_PYTHON to a Python 3.11 interpreter" >&2
  exit 1
fi
[ -x "$VENV/bin/python" ] || "$python" -m venv "$VENV"
pip="$VENV/bin/python -m pip --disable-pip-version-check"

echo "bootstrap: installing pinned requirements into $VENV (first time: a few minutes)"
$pip install -q -r requirements.txt

if [ -n "${ILMIL_DETECTRON2:-}" ]; then
  echo "bootstrap: installing detectron2 from $ILMIL_DETECTRON2"
  $pip install -q --no-build-isolation "$ILMIL_DETECTRON2"
else
  mkdir -p .cache
  if [ ! -f ".cache/$D2_SDIST" ]; then
    # Its setup.py imports torch even for metadata, hence no build isolation.
    $pip download -q --no-deps --no-build-isolation --no-binary :all: \
      pb1-detectron2==0.6 -d .cache
  fi
  echo "$D2_SHA256  .cache/$D2_SDIST" | sha256sum --check --quiet || {
    echo "bootstrap: .cache/$D2_SDIST does not match the pinned sha256; delete it and retry" >&2
    exit 1
  }
  src=$(mktemp -d)
  trap 'rm -rf "$src"' EXIT
  tar xzf ".cache/$D2_SDIST" -C "$src"
  # The sdist lacks the C++ sources: install the Python package without the extension
  # (ilmil/compat.py supplies the placeholder module and torchvision does the ops).
  setup_py="$src/pb1-detectron2-0.6/setup.py"
  grep -q 'ext_modules=get_extensions(),' "$setup_py"
  sed -i 's/ext_modules=get_extensions(),/ext_modules=[],/' "$setup_py"
  $pip install -q --no-deps --no-build-isolation "$src/pb1-detectron2-0.6"
fi

$pip install -q --no-deps --no-build-isolation -e .
echo "$want" > "$stamp"
echo "bootstrap: $VENV ready"
