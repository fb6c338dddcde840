"""The INT8 and float16 hazard a trained network can hold, planted in a fusion model's backbone
(tests/test_keep_accuracy.py and benchmarks/rescue.py): the float32 output stays the same."""

from __future__ import annotations

from pathlib import Path

import torch

from resfuse.models import ModelConfig, build_model
from resfuse.weights import save_weights

# the test model: small, one channel, no head: the fused features show every error
CONFIG = ModelConfig("upsample", stage=2, in_channels=1, features=8)


def plant(path: Path, factor: float, config: ModelConfig = CONFIG) -> Path:
    """The seed-0 model with channel 5 of encoder.layers.0.0.bn1 scaled by `factor` (kept
    positive, so the ReLU passes it) and conv2's weights for that channel divided by it."""
    torch.manual_seed(0)
    model = build_model(**config.to_dict(), pretrained=False)
    modules = dict(model.named_modules())
    bn, conv = modules["encoder.layers.0.0.bn1"], modules["encoder.layers.0.0.conv2"]
    with torch.no_grad():
        bn.weight[5] *= factor
        bn.bias[5] = (bn.bias[5].abs() + 0.5) * factor
        conv.weight[:, 5] /= factor
    save_weights(model, path)
    return path
