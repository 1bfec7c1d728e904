#!/usr/bin/env bash
# All set-up on a fresh machine: the Fashion-MNIST package (the embedded default dataset) and the
# Python packages. Safe to run again; it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist \
        || echo "setup: could not install dataset-fashion-mnist; vit/data will fall back to torchvision's download (into ~/.cache/vit)."
fi
python3 -m pip install -q -r requirements.txt
