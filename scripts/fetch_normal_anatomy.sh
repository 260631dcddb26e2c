#!/usr/bin/env bash
# Fetch the normal anatomy the default model is trained and evaluated on, from
# the package registries a fresh Debian machine can reach (no other download):
#   - MNI ICBM152 2009a nonlinear symmetric T1 template, shipped in the nilearn wheel (PyPI)
#   - Colin27 ("ch2") T1 brain, Debian package mricron-data
#   - 2D MRI slices of the ITK examples, Debian package insighttoolkit5-examples
# Usage: scripts/fetch_normal_anatomy.sh DIR   (needs: pip of the active venv, apt-get)
set -euo pipefail
DIR="${1:?usage: $0 DIR}"
mkdir -p "$DIR/deb"
cd "$DIR/deb"
apt-get download mricron-data insighttoolkit5-examples
for deb in *.deb; do dpkg -x "$deb" "$DIR/extracted"; done
python -m pip install -q "nilearn==0.14.1"
echo "normal anatomy in $DIR/extracted (and the nilearn package)"
