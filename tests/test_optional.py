"""A library only a feature needs: missing, it is one line naming the feature and the extra."""

from __future__ import annotations

import pytest

from resfuse.errors import ConfigError
from resfuse.optional import optional_module


def test_a_missing_optional_library_names_the_feature_and_the_extra() -> None:
    with pytest.raises(ConfigError) as caught:
        optional_module("resfuse_no_such_module", "DICOM SEG output", "dicom")
    assert str(caught.value) == (
        "DICOM SEG output needs resfuse_no_such_module: pip install 'resfuse[dicom]'"
    )
    assert optional_module("json", "JSON", "none").dumps([]) == "[]"
