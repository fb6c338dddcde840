"""The options that define a model, declared once for every command that builds one from a
checkpoint: resfuse-export, and resfuse-optimize when it starts from weights rather than an
artifact."""

from __future__ import annotations

from pathlib import Path

import click

from resfuse.models import BACKBONES, STAGES
from resfuse.runtime.options import group

model_options = group(
    click.option(
        "--backbone", default="resnet18", show_default=True, type=click.Choice(list(BACKBONES))
    ),
    click.option(
        "--stage",
        default=4,
        show_default=True,
        type=click.Choice([str(s) for s in STAGES]),
        help="Cut the ResNet after this stage (output stride 8, 16, 32).",
    ),
    click.option(
        "--num-classes",
        type=click.IntRange(min=1),
        default=None,
        help="Add a segmentation head with this many classes (output `logits`).",
    ),
    click.option(
        "--class-names",
        default=None,
        metavar="NAME,NAME,...",
        help="The head's class names, background (class 0) first, one per class: the segment "
        "labels of a DICOM SEG output [default: class 1, class 2, ...].",
    ),
    click.option("--in-channels", default=3, show_default=True, type=click.IntRange(min=1)),
    click.option(
        "--features",
        default=64,
        show_default=True,
        type=click.IntRange(min=1),
        help="Channels the fusion adds to the image.",
    ),
    click.option(
        "--weights",
        type=click.Path(path_type=Path),
        default=None,
        help="A .safetensors file or PyTorch state dict (loaded with weights_only=True).",
    ),
)
