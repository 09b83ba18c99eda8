#!/usr/bin/env bash
# On the GPU machine, after the three staging commands (README "On a GPU"): install grad-cam's wheels, then run
# `python -m helpers.evidence` with the given arguments and leave its log, summary and archive in $OUT.
set -uo pipefail
source .gpu/stage.sh
python3 -m pip install -q --no-index --no-deps --no-compile --target /root/s9stage/site .gpu/wheels/cam/*.whl
python3 -m helpers.evidence --copy-to "$OUT" "$@" 2>&1 | tee "$OUT/evidence.log"
exit "${PIPESTATUS[0]}"
