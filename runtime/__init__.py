"""Run deployed fusion models: load an artifact on a backend, check it, time it.

from resfuse import runtime
with runtime.load("artifacts/masked-resnet18.json") as session:
    fused = session.run(image_array)
    mask = runtime.predict_volume(session, runtime.read_volume("scan.nii.gz"))
"""

from resfuse.runtime.backends import BACKENDS, Runner
from resfuse.runtime.session import Session, load
from resfuse.runtime.volumes import Volume, predict_volume, read_volume, write_nifti

__all__ = [
    "BACKENDS",
    "Runner",
    "Session",
    "Volume",
    "load",
    "predict_volume",
    "read_volume",
    "write_nifti",
]
