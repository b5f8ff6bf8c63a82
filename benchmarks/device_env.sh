# Sourced by the device scripts beside it: output folder, python, and the wheels of packages
# a bare GPU image lacks (albumentations, torchsampler, grad-cam...) from .whl/ if present.
#   OUT      results folder (default: $PWD/$1)     PY      python (default: python3)
#   WHEELS=0 skip the wheels (a dry run on a machine that has the packages)
OUT=${OUT:-$PWD/$1}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
if [ "${WHEELS:-1}" = 1 ] && compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || { echo "wheel install failed"; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
