"""The S9 kit, in reading order: recipe, dataset, model, backprop (train, test); then device, checkpoint, lr_finder,
measure, results, utils (plots)."""

import os

# albumentations asks PyPI for a newer version on every import (2 s timeout, offline machines wait and
# warn), in this process and in every DataLoader worker. Set before any helper imports it; workers
# inherit the environment, spawned ones also re-run this file.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
