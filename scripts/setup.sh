#!/usr/bin/env bash
# Set up cnnlab in ./.venv (idempotent): the package with its test tools, a torch/torchvision
# pair that imports, and Fashion-MNIST from Debian's package where apt is available.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
    if ! "$PYTHON" -m venv .venv 2>/dev/null; then
        # Debian ships venv separately.
        if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
            apt-get install -y python3-venv >/dev/null || { apt-get update >/dev/null && apt-get install -y python3-venv >/dev/null; }
            rm -rf .venv && "$PYTHON" -m venv .venv
        else
            echo "setup: '$PYTHON -m venv' failed; install python3-venv (Debian/Ubuntu) and run again" >&2
            exit 1
        fi
    fi
fi

# pyproject asks for torch>=2.4, so pip takes the registry's newest torch (a CUDA build, which
# also runs on a CPU) together with the torchvision built for it.
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"

# Some machines keep a CPU-only torch wheel in a local wheel folder (pip's find-links); the
# registry's torchvision does not import with it ("operator torchvision::nms does not exist").
# Reinstall both from the registry alone if that happened.
if ! .venv/bin/python -c "import torchvision" 2>/dev/null; then
    echo "setup: torchvision does not import with the installed torch; reinstalling both from the package registry"
    PIP_FIND_LINKS= .venv/bin/python -m pip install --quiet --disable-pip-version-check --force-reinstall \
        "torch>=2.4,!=2.13.0+cpu" torchvision
    .venv/bin/python -c "import torchvision"
fi

# Fashion-MNIST for offline training: Debian's package puts it in /usr/share/datasets/fashion-mnist.
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo"; else SUDO="-"; fi
    if [ "$SUDO" != "-" ]; then
        $SUDO apt-get install -y dataset-fashion-mnist >/dev/null 2>&1 \
            || { $SUDO apt-get update >/dev/null 2>&1 && $SUDO apt-get install -y dataset-fashion-mnist >/dev/null 2>&1; } \
            || echo "setup: could not install dataset-fashion-mnist; cnnlab will download Fashion-MNIST instead (needs internet)"
    else
        echo "setup: for offline training run 'sudo apt-get install dataset-fashion-mnist'; otherwise cnnlab downloads Fashion-MNIST"
    fi
fi

.venv/bin/python -c "import torch, torchvision, cnnlab; print(f'setup: cnnlab {cnnlab.__version__}, torch {torch.__version__}, torchvision {torchvision.__version__}, CUDA available: {torch.cuda.is_available()}')"
