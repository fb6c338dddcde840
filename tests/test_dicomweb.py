"""resfuse-predict --dicomweb against a real PACS (Debian's Orthanc with its DICOMweb plugin):
a CT series of real slices uploaded, run, its SEG found in the study, a rerun that stores
nothing; and each fault against the real server: stopped, a missing study, wrong credentials, a
partial series, a STOW it refuses. Each gives one line and leaves nothing half-stored."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("highdicom", reason="needs highdicom: pip install 'resfuse[dicom]'")
pytest.importorskip("dicomweb_client", reason="needs dicomweb-client: pip install 'resfuse[dicom]'")
pydicom = pytest.importorskip("pydicom", reason="needs pydicom")

import pacs  # noqa: E402
from clirun import invoke  # noqa: E402
from dicom_series import CT_SLICE  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402
from test_seg import frames_by_hand, label_map, varied_artifact  # noqa: E402

from resfuse.runtime import load, predict_volume, read_volume  # noqa: E402
from resfuse.runtime.dicomweb import Connection, connect  # noqa: E402
from resfuse.runtime.serve_cli import predict_main  # noqa: E402

pytestmark = [
    pytest.mark.slow,  # a real server, a model export
    pytest.mark.skipif(pacs.missing() is not None, reason=str(pacs.missing())),
    pytest.mark.skipif(not CT_SLICE.is_file(), reason="needs pydicom-data's slices"),
]
# Orthanc refuses every SEG it is sent: a real STOW refusal
REFUSE_SEG = """
function ReceivedInstanceFilter(dicom, origin, info)
  return dicom.Modality ~= 'SEG'
end
"""


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pacs.Orthanc]:
    server = pacs.start(tmp_path_factory.mktemp("orthanc"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return varied_artifact(tmp_path_factory)


@pytest.fixture
def credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RESFUSE_DICOMWEB_TOKEN", raising=False)
    monkeypatch.setenv("RESFUSE_DICOMWEB_USER", pacs.USER)
    monkeypatch.setenv("RESFUSE_DICOMWEB_PASSWORD", pacs.PASSWORD)


def upload_study(server: pacs.Orthanc, folder: Path, **kwargs: int) -> tuple[str, str]:
    """A new CT study on `server`: its StudyInstanceUID and SeriesInstanceUID."""
    series = pacs.ct_series(folder, **kwargs)
    server.upload(series)
    first = pydicom.dcmread(next(series.iterdir()))
    return str(first.StudyInstanceUID), str(first.SeriesInstanceUID)


def run(artifact: Path, url: str, study: str, *extra: str) -> tuple[int, str]:
    proc = invoke(predict_main, str(artifact), "--dicomweb", url, "--study", study,
                  "--timeout", "10", "--retries", "1", *extra)  # fmt: skip
    text = proc.stdout + proc.stderr
    assert pacs.PASSWORD not in text, text
    assert proc.returncode == 0 or "Traceback" not in text, text  # (CliRunner's exit 0 has one)
    return proc.returncode, " ".join(text.split())


def seg_series(server: pacs.Orthanc, study: str) -> list[dict]:
    client = connect(Connection(server.dicomweb))
    return client.search_for_series(study, search_filters={"Modality": "SEG"})


@pytest.mark.usefixtures("credentials")
def test_round_trip_stores_the_seg_once(
    orthanc: pacs.Orthanc, artifact: Path, tmp_path: Path
) -> None:
    study, series = upload_study(orthanc, tmp_path / "ct")
    code, text = run(artifact, orthanc.dicomweb, study)
    assert code == 0 and "1 SEG stored, 0 series already done, 0 failed" in text, text
    (found,) = seg_series(orthanc, study)
    seg_uid = found["0020000E"]["Value"][0]

    client = connect(Connection(orthanc.dicomweb))
    (stored,) = client.retrieve_series(study, seg_uid)
    stored.save_as(tmp_path / "seg.dcm", enforce_file_format=True)
    seg, frames = frames_by_hand(tmp_path / "seg.dcm")
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series
    by_uid = {
        str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, (tmp_path / "ct").iterdir())
    }
    volume = read_volume(tmp_path / "ct")
    with load(artifact) as session:
        mask = predict_volume(session, volume)  # resfuse's own mask of the same series
    ours = label_map(frames, list(by_uid), (int(seg.Rows), int(seg.Columns)))
    for k in range(mask.shape[2]):  # matched by position, not by order
        lps = (volume.affine @ [0, 0, k, 1])[:3] * [-1, -1, 1]
        (uid,) = [
            u
            for u, ds in by_uid.items()
            if np.allclose(np.asarray(ds.ImagePositionPatient, float), lps, atol=1e-3)
        ]
        np.testing.assert_array_equal(ours[uid], mask[:, :, k])

    before = orthanc.instances()
    code, text = run(artifact, orthanc.dicomweb, study)
    assert code == 0 and "0 SEG stored, 1 series already done" in text, text
    assert orthanc.instances() == before


@pytest.mark.usefixtures("credentials")
def test_missing_study_and_unknown_series_fail_in_one_line(
    orthanc: pacs.Orthanc, artifact: Path, tmp_path: Path
) -> None:
    missing = generate_uid()
    code, text = run(artifact, orthanc.dicomweb, missing)
    assert code == 1 and f"study {missing} is not on {orthanc.dicomweb}" in text, text
    study, _ = upload_study(orthanc, tmp_path / "ct")
    code, text = run(artifact, orthanc.dicomweb, study, "--series-uid", missing)
    assert code == 1 and f"series {missing} of study {study} is not an image series" in text


def test_wrong_credentials_fail_in_one_line(
    orthanc: pacs.Orthanc, artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RESFUSE_DICOMWEB_USER", pacs.USER)
    monkeypatch.setenv("RESFUSE_DICOMWEB_PASSWORD", "wrong")
    code, text = run(artifact, orthanc.dicomweb, generate_uid())
    assert code == 1 and "refused the credentials (HTTP 401)" in text, text
    assert "wrong" not in text
    # a token goes first, even beside a good user and password; Orthanc takes basic auth only
    monkeypatch.setenv("RESFUSE_DICOMWEB_PASSWORD", pacs.PASSWORD)
    monkeypatch.setenv("RESFUSE_DICOMWEB_TOKEN", "a-bearer-token")
    code, text = run(artifact, orthanc.dicomweb, generate_uid())
    assert code == 1 and "refused the credentials (HTTP 401)" in text, text
    assert "a-bearer-token" not in text
    url = orthanc.dicomweb.replace("http://", f"http://{pacs.USER}:{pacs.PASSWORD}@")
    proc = invoke(predict_main, "x.json", "--dicomweb", url, "--study", "1.2.3")
    assert proc.returncode == 1 and "carries credentials in its URL" in proc.stderr
    assert pacs.PASSWORD not in proc.stdout + proc.stderr


@pytest.mark.usefixtures("credentials")
def test_partial_series_fails_and_stores_nothing(
    orthanc: pacs.Orthanc, artifact: Path, tmp_path: Path
) -> None:
    study, series = upload_study(orthanc, tmp_path / "ct", count=4, skip=1)
    code, text = run(artifact, orthanc.dicomweb, study)
    assert code == 1 and f"failed: series {series}:" in text and "not evenly spaced" in text
    assert "0 SEG stored" in text and not seg_series(orthanc, study)


@pytest.mark.usefixtures("credentials")
def test_refused_stow_then_stopped_server(artifact: Path, tmp_path: Path) -> None:
    server = pacs.start(tmp_path / "refusing", lua=REFUSE_SEG)
    try:
        study, series = upload_study(server, tmp_path / "ct")
        before = server.instances()
        code, text = run(artifact, server.dicomweb, study)
        assert code == 1 and f"failed: series {series}:" in text, text
        assert "answered the STOW-RS of the SEG" in text and "does not hold it" in text, text
        assert server.instances() == before
    finally:
        server.stop()
    code, text = run(artifact, server.dicomweb, study)
    assert code == 1 and f"cannot reach the DICOMweb server at {server.dicomweb}" in text, text
