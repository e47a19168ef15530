#!/usr/bin/env bash
# GPU acceptance: every CUDA path of cnnlab against its target, as one Markdown table (docs/gpu_acceptance.md).
# The checks are in scripts/gpu_acceptance.py; this installs what the GPU machine lacks, from the bundle alone.
#
#   bash scripts/gpu_bundle.sh                                   # here, first: builds .gpu_bundle/
#   bash scripts/gpu_acceptance.sh --bundle .gpu_bundle --out "$OUT"   # on the GPU machine (carry .gpu_bundle)
#   bash scripts/gpu_acceptance.sh --smoke --data-dir DIR        # the same checks on the CPU, tiny (the tests run it)
#
# --bundle DIR  install cnnlab and its missing requirements from DIR/wheels (pip, no index) into a fresh folder
#               on PYTHONPATH, check every requirement is met, and read Fashion-MNIST from DIR/data
# --table FILE  where the table goes (docs/gpu_acceptance.md; with --smoke, next to the runs in the workdir)
# --out DIR     also copy the table, the console output and every run's log and profile (logs.tar.gz) there
# Any other flag goes to scripts/gpu_acceptance.py (--budget-s, --workdir, --data-dir, --smoke).
set -euo pipefail
cd "$(dirname "$0")/.."
COMMAND="bash scripts/gpu_acceptance.sh $*"
BUNDLE="" OUT_DIR="" PASS=() TABLE="" WORK="outputs/gpu_acceptance" SMOKE=""
while [ $# -gt 0 ]; do
    case "$1" in
        --bundle) BUNDLE=$2; shift 2 ;;
        --out) OUT_DIR=$2; shift 2 ;;
        --table) TABLE=$2; shift 2 ;;
        --workdir) WORK=$2; PASS+=("$1" "$2"); shift 2 ;;
        --smoke) SMOKE=1; PASS+=("$1"); shift ;;
        *) PASS+=("$1"); shift ;;
    esac
done
# A GPU run's table is the project's record (docs/); a smoke run's stays with its runs.
[ -n "$TABLE" ] || if [ -n "$SMOKE" ]; then TABLE="$WORK/gpu_acceptance.md"; else TABLE="docs/gpu_acceptance.md"; fi
PASS+=(--table "$TABLE")
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -z "$BUNDLE" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi

if [ -n "$BUNDLE" ]; then
    BUNDLE=$(cd "$BUNDLE" 2>/dev/null && pwd) || { echo "gpu_acceptance: no bundle folder $BUNDLE; run scripts/gpu_bundle.sh" >&2; exit 2; }
    [ -f "$BUNDLE/SOURCE" ] && ls "$BUNDLE"/wheels/cnnlab-*.whl >/dev/null 2>&1 \
        || { echo "gpu_acceptance: $BUNDLE is not a complete bundle; run scripts/gpu_bundle.sh" >&2; exit 2; }
    DIGEST=$("$PY" scripts/gpu_bundle.py --digest)
    [ "$DIGEST" = "$(cat "$BUNDLE/SOURCE")" ] \
        || { echo "gpu_acceptance: $BUNDLE was built from other cnnlab source than this checkout; run scripts/gpu_bundle.sh again" >&2; exit 2; }
    SITE=$(mktemp -d /tmp/cnnlab-site.XXXXXX)
    "$PY" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
        --target "$SITE" "$BUNDLE"/wheels/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    "$PY" scripts/gpu_bundle.py --check || exit 2
    export CNNLAB_DATA_DIR="$BUNDLE/data"
    PASS+=(--source "$DIGEST")
fi

copy_out() {
    [ -n "$OUT_DIR" ] || return 0
    mkdir -p "$OUT_DIR"
    cp "$TABLE" "$OUT_DIR/" 2>/dev/null || true
    [ -d "$WORK" ] && tar -czf "$OUT_DIR/logs.tar.gz" -C "$WORK" \
        $(cd "$WORK" && find . -maxdepth 3 \( -name '*.log' -o -name '*.txt' -o -name '*.json' \) ! -path '*/tensorboard/*' | sort) \
        2>/dev/null || true
}
trap copy_out EXIT
set -o pipefail
if [ -n "$OUT_DIR" ]; then
    mkdir -p "$OUT_DIR"
    PYTHONUNBUFFERED=1 "$PY" scripts/gpu_acceptance.py --command "$COMMAND" "${PASS[@]}" 2>&1 | tee "$OUT_DIR/console.log"
else
    "$PY" scripts/gpu_acceptance.py --command "$COMMAND" "${PASS[@]}"
fi
