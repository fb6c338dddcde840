"""Four of scikit-image's photographs as PNGs, the images `make demo` optimizes on.

python benchmarks/demo_images.py artifacts/demo-images
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image
from skimage import data

NAMES = ("astronaut", "coffee", "chelsea", "rocket")


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "artifacts/demo-images")
    folder.mkdir(parents=True, exist_ok=True)
    for name in NAMES:
        Image.fromarray(getattr(data, name)()).save(folder / f"{name}.png")
    print(f"{len(NAMES)} photographs in {folder}")


if __name__ == "__main__":
    main()
