"""Run deployed fusion models: load an artifact on a backend, check it, time it.

from resfuse import runtime
with runtime.load("artifacts/masked-resnet18.json") as session:
    fused = session.run(image_array)
"""

from resfuse.runtime.backends import BACKENDS, Runner
from resfuse.runtime.session import Session, load

__all__ = ["BACKENDS", "Runner", "Session", "load"]
