"""What a 2-D model sees of a slice: one in-plane orientation, defined in the patient's frame.

A slice stored as (a, b) can reach a model in eight ways (transposed or not, each axis flipped
or not). DICOM gives pixels as (row, column), dcm2niix and SimpleITK as (column, row) with the
rows reversed, a NIfTI reoriented to RAS another way again: the same anatomy, and a 2-D model
trained on one of them sees the others rotated or mirrored. So every source is turned to one
orientation, the radiological display that DICOM's standard planes define (the patient seen
from the feet or the front, their left on the viewer's right):

| slice plane (normal closest to) | down the rows | along a row |
| --- | --- | --- |
| axial (S) | posterior | patient's left |
| coronal (A/P) | inferior | patient's left |
| sagittal (L/R) | inferior | posterior |

An oblique slice takes the plane its normal is closest to, and each target direction takes the
stored axis closest to it: only transposes and flips, never interpolation, so a slice's pixels
reach the model unchanged and the output goes back onto the input's grid exactly. This is what
MONAI's `Orientation` transforms do for a whole volume, applied per slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RADIOLOGICAL = "radiological"
# what a manifest's preprocess.slice_orientation may name: the one convention so far, recorded
# so that an artifact says how its model saw slices, and a second convention has a place
ORIENTATIONS = (RADIOLOGICAL,)
# (down the rows, along a row) in DICOM's LPS+ patient axes, by the axis the normal is closest to
_DISPLAY = {
    0: ((0.0, 0.0, -1.0), (0.0, 1.0, 0.0)),  # sagittal
    1: ((0.0, 0.0, -1.0), (1.0, 0.0, 0.0)),  # coronal
    2: ((0.0, 1.0, 0.0), (1.0, 0.0, 0.0)),  # axial
}
RAS_TO_LPS = np.asarray([-1.0, -1.0, 1.0])  # NIfTI's world axes are R, A, S; DICOM's L, P, S


@dataclass(frozen=True)
class InPlane:
    """How a stored slice's two axes become the model's (H, W): transposed first, then flipped.
    Works on the last two axes of any array, and back."""

    transpose: bool = False
    flip_rows: bool = False
    flip_columns: bool = False

    @property
    def identity(self) -> bool:
        return not (self.transpose or self.flip_rows or self.flip_columns)

    def to_model(self, x: np.ndarray, axes: tuple[int, int] = (-2, -1)) -> np.ndarray:
        """`x` with its `axes` (stored order) turned as the model sees them: a view."""
        if self.transpose:
            x = np.swapaxes(x, *axes)
        return self._flip(x, axes)

    def to_stored(self, y: np.ndarray, axes: tuple[int, int] = (-2, -1)) -> np.ndarray:
        """The inverse: a model output's `axes` back in the stored slice's order."""
        y = self._flip(y, axes)
        return np.swapaxes(y, *axes) if self.transpose else y

    def model_size(self, stored: tuple[int, int]) -> tuple[int, int]:
        """The (H, W) the model sees of a stored (a, b) slice."""
        return (stored[1], stored[0]) if self.transpose else stored

    def _flip(self, x: np.ndarray, axes: tuple[int, int]) -> np.ndarray:
        flipped = [a for a, on in zip(axes, (self.flip_rows, self.flip_columns), strict=True) if on]
        return np.flip(x, tuple(flipped)) if flipped else x


def in_plane(first: np.ndarray, second: np.ndarray) -> InPlane:
    """The InPlane that shows a slice in the radiological display, given the LPS+ world
    directions of its stored axes: `first` (moving down its rows), `second` (along a row)."""
    a = np.asarray(first, dtype=np.float64) / np.linalg.norm(first)
    b = np.asarray(second, dtype=np.float64) / np.linalg.norm(second)
    down, along = (np.asarray(v) for v in _DISPLAY[int(np.argmax(np.abs(np.cross(a, b))))])
    keep = abs(a @ down) + abs(b @ along) >= abs(b @ down) + abs(a @ along)
    rows, columns = (a, b) if keep else (b, a)
    return InPlane(not keep, bool(rows @ down < 0), bool(columns @ along < 0))


def dicom_in_plane(cosines: np.ndarray) -> InPlane:
    """From a DICOM ImageOrientationPatient (along a row, then down a column: LPS+)."""
    cosines = np.asarray(cosines, dtype=np.float64)
    return in_plane(cosines[3:], cosines[:3])
