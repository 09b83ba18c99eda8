#!/usr/bin/env bash
# Once, in this checkout, before a GPU session (README "On a GPU"): copy ../shared/gpu and the data parts into
# .gpu/ (ignored by git) and add the wheels the evidence needs beyond them: grad-cam and its needs, for the GPU
# machine's Python 3.12 on x86_64. Everything is downloaded here; the GPU machine reaches no registry.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu
cp -r ../shared/gpu/stage.sh ../shared/gpu/wheels ../shared/cifar10 .gpu/
mkdir -p .gpu/wheels/cam
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
  --platform manylinux2014_x86_64 --no-deps -d .gpu/wheels/cam scikit-learn joblib threadpoolctl ttach
python3 -m pip wheel -q --no-deps -w .gpu/wheels/cam grad-cam==1.5.7
du -sh .gpu/cifar10/p? .gpu/wheels/*
