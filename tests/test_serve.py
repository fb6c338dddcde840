"""resfuse-serve: a real Ray Serve on loopback, one instance for the module, real HTTP.

Error codes under test: 400 a body that is not what it claims (or a bad query), 413 a body
over the limit, 415 another Content-Type, 422 an input that breaks the contract, a DICOM object
that is no image or a DICOM compression without a decoder, 404/405. Real DICOM and NIfTI
bodies are pydicom's and nibabel's sample files.
"""

from __future__ import annotations

import gzip
import http.client
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray.serve", reason="needs Ray Serve: pip install 'resfuse[serve]'")
Image = pytest.importorskip("PIL.Image", reason="needs Pillow")
pydicom = pytest.importorskip("pydicom", reason="needs pydicom")

from nibabel.testing import data_path as nibabel_data  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402

from resfuse.runtime import load  # noqa: E402
from resfuse.runtime.serve import ServeOptions, start, stop  # noqa: E402

pytestmark = pytest.mark.slow  # Ray Serve servers

NPY = "application/octet-stream"
DICOM = "application/dicom"
NIFTI = "application/x-nifti"
LIMIT_MB = 1.0
SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"  # the SOP Class UID of DICOM SEG


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def npy(x: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, x)
    return buffer.getvalue()


def png(h: int, w: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def request(
    url: str, body: bytes | None = None, content_type: str | None = None, method: str = "POST"
) -> tuple[int, bytes]:
    """One HTTP exchange; http.client sends no Content-Type unless given (urllib would)."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=60)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    headers = {"Content-Type": content_type} if content_type else {}
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def wait_healthy(url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if request(f"{url}/healthz", method="GET")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {seconds} s")


class Server:
    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        self.url = options.url
        self.started = start(options)
        self.running = True

    def stop(self) -> None:
        if self.running:
            self.running = False
            stop(self.started)


@pytest.fixture(scope="module")
def server(head_artifact: Path) -> Iterator[Server]:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    options = ServeOptions(
        head_artifact, port=free_port(), max_batch=3, batch_wait_ms=50, max_body_mb=LIMIT_MB
    )
    try:
        running = Server(options)
        wait_healthy(running.url, 120)
        yield running
        running.stop()
    finally:
        ray.shutdown()


def test_healthz_and_metadata(server: Server) -> None:
    assert request(f"{server.url}/healthz", method="GET") == (200, b'{"status": "ok"}')
    status, body = request(f"{server.url}/metadata", method="GET")
    meta = json.loads(body)
    assert status == 200
    assert meta["method"] == "masked" and meta["precision"] == "float32"
    assert meta["num_classes"] == 3 and meta["backend"] == "onnxruntime"
    assert meta["contract"]["height"] == {"min": 32, "max": 256}
    assert meta["contract"]["batch"] == {"min": 1, "max": 4}


def test_concurrent_sizes_match_the_runtime(server: Server) -> None:
    """Twelve requests of three sizes at once, batches of up to 3 images (--max-batch), so
    batches gather several sizes: each answer equals a direct runtime call."""
    rng = np.random.default_rng(0)
    inputs = [
        rng.standard_normal((n, 3, h, w), dtype=np.float32)
        for h, w in ((64, 64), (96, 128), (33, 45))
        for n in (1, 2, 1, 1)
    ]
    with ThreadPoolExecutor(len(inputs)) as pool:
        answers = list(pool.map(lambda x: request(f"{server.url}/predict", npy(x), NPY), inputs))
    with load(server.options.artifact) as session:
        tolerance = session.manifest.tolerance
        for x, (status, body) in zip(inputs, answers, strict=True):
            assert status == 200, body
            got = np.load(io.BytesIO(body), allow_pickle=False)
            np.testing.assert_allclose(
                got, session.run(x), atol=tolerance.atol, rtol=tolerance.rtol
            )


def test_images_and_png_masks(server: Server, tmp_path: Path) -> None:
    with load(server.options.artifact) as session:
        for i, (h, w) in enumerate(((64, 80), (120, 72))):
            path = tmp_path / f"{i}.png"
            path.write_bytes(png(h, w, seed=i))
            expected = session.run(path)
            status, body = request(f"{server.url}/predict", path.read_bytes(), "image/png")
            assert status == 200, body
            np.testing.assert_allclose(np.load(io.BytesIO(body)), expected, atol=1e-4, rtol=1e-4)
            status, body = request(
                f"{server.url}/predict?format=png", path.read_bytes(), "image/png"
            )
            assert status == 200, body
            mask = np.asarray(Image.open(io.BytesIO(body)))
            assert mask.shape == (h, w) and mask.dtype == np.uint8
            np.testing.assert_array_equal(mask, expected[0].argmax(axis=0))


BAD = [
    ("empty body", b"", NPY, "", 400, "empty"),
    ("not npy", b"hello", NPY, "", 400, "not .npy, DICOM or NIfTI"),
    ("pickled npy", "pickle", NPY, "", 400, "not .npy"),
    ("corrupt png", b"\x89PNG\r\n\x1a\n garbage", "image/png", "", 400, "not a readable image"),
    ("unknown format", (1, 3, 32, 32), NPY, "?format=gif", 400, "format='gif'"),
    ("png of a batch", "batch2", NPY, "?format=png", 400, "one image"),
    ("content type", b"{}", "application/json", "", 415, "application/json"),
    ("no content type", b"abc", None, "", 415, "(none)"),
    ("channels", (1, 2, 64, 64), NPY, "", 422, "expected 3 input channels"),
    ("rank", (3, 64, 64), NPY, "", 422, "4-D"),
    ("dtype", "float64", NPY, "", 422, "dtype float32"),
    ("too small", (1, 3, 16, 64), NPY, "", 422, "height 16 is outside the allowed range 32..256"),
    (
        "too large",
        (1, 3, 64, 300),
        NPY,
        "",
        422,
        "width 300 is outside the allowed range 32..256; run it in tiles (?tile=auto)",
    ),
    ("bad tile", (1, 3, 32, 32), NPY, "?tile=big", 400, "tile= must be 'auto'"),
    ("tile too large", (1, 3, 32, 32), NPY, "?tile=512", 400, "tile 512x512 is outside"),
    ("bad overlap", (1, 3, 32, 32), NPY, "?tile=auto&overlap=1", 400, "overlap must be in"),
    ("dicom seg", "seg", DICOM, "", 422, "Segmentation (SEG)"),
    ("dicom seg as octet", "seg", NPY, "", 422, "Segmentation (SEG)"),
    ("jpeg dicom", "jpeg dicom", DICOM, "", 422, "pip install pylibjpeg"),
    ("garbage dicom", b"x" * 200, DICOM, "", 400, "not a readable DICOM file"),
    ("nifti as png", "nifti", NIFTI, "?format=png", 400, "answered as NIfTI"),
    ("4-D nifti", "nifti 4d", NIFTI, "", 422, "pick one with ?volume_index=0..1"),
    ("volume index", "nifti 4d", NIFTI, "?volume_index=5", 422, "the NIfTI body's 2 volumes"),
    ("bad volume index", "nifti 4d", NIFTI, "?volume_index=one", 400, "whole number"),
    ("bad axis", "nifti", NIFTI, "?axis=3", 400, "axis=3 is not a voxel axis"),
    ("mosaic", "mosaic", DICOM, "", 422, "Siemens MOSAIC"),
    ("garbage nifti", b"y" * 400, NIFTI, "", 422, "cannot read the NIfTI body as NIfTI"),
    ("batch", (5, 3, 32, 32), NPY, "", 422, "batch size 5"),
    ("over max batch", (4, 3, 32, 32), NPY, "", 422, "over this server's --max-batch 3"),
    ("nan", "nan", NPY, "", 422, "NaN"),
    ("image too small", "small png", "image/png", "", 422, "outside the allowed range"),
    ("over the limit", "big", NPY, "", 413, "limit"),
]


def _as_segmentation(path: Path) -> bytes:
    """A real CT file relabelled as a DICOM SEG object: refused by its SOP class."""
    dataset = pydicom.dcmread(path)
    dataset.SOPClassUID = SEGMENTATION
    dataset.file_meta.MediaStorageSOPClassUID = SEGMENTATION
    buffer = io.BytesIO()
    dataset.save_as(buffer)
    return buffer.getvalue()


def _pickled() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return buffer.getvalue()


def _body(spec: object) -> bytes:
    if isinstance(spec, bytes):
        return spec
    if isinstance(spec, tuple):
        return npy(np.zeros(spec, np.float32))
    made = {
        "pickle": lambda: _pickled(),
        "batch2": lambda: npy(np.zeros((2, 3, 32, 32), np.float32)),
        "float64": lambda: npy(np.zeros((1, 3, 32, 32), np.float64)),
        "nan": lambda: npy(np.full((1, 3, 32, 32), np.nan, np.float32)),
        "small png": lambda: png(20, 40),
        "big": lambda: npy(np.zeros((1, 3, 256, 256 * 3), np.float32)),  # 2.25 MiB
        "seg": lambda: _as_segmentation(Path(get_testdata_file("CT_small.dcm"))),
        "jpeg dicom": lambda: Path(get_testdata_file("JPEG-lossy.dcm")).read_bytes(),
        "nifti": lambda: Path(nibabel_data, "anatomical.nii").read_bytes(),
        "nifti 4d": lambda: Path(nibabel_data, "example4d.nii.gz").read_bytes(),
        "mosaic": lambda: Path(nibabel_data, "0.dcm").read_bytes(),
    }
    return made[str(spec)]()


@pytest.mark.parametrize(
    ("body", "content_type", "query", "code", "text"),
    [case[1:] for case in BAD],
    ids=[case[0] for case in BAD],
)
def test_bad_requests_get_a_json_error(
    server: Server, body: object, content_type: str | None, query: str, code: int, text: str
) -> None:
    status, answer = request(f"{server.url}/predict{query}", _body(body), content_type)
    assert status == code, answer
    error = json.loads(answer)["error"]
    assert text in error
    # an HTTP client is told query parameters, never command-line options or server paths
    assert not re.search(r"--tile|--volume-index|--axis|--overlap|resfuse-serve-", error), error


@pytest.mark.parametrize("content_type", [DICOM, NPY])
def test_a_dicom_body_by_its_type_or_its_preamble(server: Server, content_type: str) -> None:
    path = Path(get_testdata_file("CT_small.dcm"))  # real CT, signed 16-bit
    status, body = request(f"{server.url}/predict", path.read_bytes(), content_type)
    assert status == 200, body
    with load(server.options.artifact) as session:
        expected = session.run(path)
    np.testing.assert_allclose(np.load(io.BytesIO(body)), expected, atol=1e-4, rtol=1e-4)


def test_an_image_larger_than_the_range_is_answered_in_tiles(
    server: Server, tmp_path: Path
) -> None:
    path = tmp_path / "large.png"
    path.write_bytes(png(300, 400))
    status, body = request(f"{server.url}/predict", path.read_bytes(), "image/png")
    assert status == 422 and "tile" in json.loads(body)["error"]
    query = "?tile=128&overlap=0.5&blend=constant&format=png"
    status, body = request(f"{server.url}/predict{query}", path.read_bytes(), "image/png")
    assert status == 200, body
    with load(server.options.artifact) as session:
        expected = session.run(path, tile=128, overlap=0.5, blend="constant")
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(body))), expected[0].argmax(0))


@pytest.mark.parametrize("content_type", [NIFTI, NPY])
def test_a_nifti_body_is_answered_as_nifti_over_the_same_voxels(
    server: Server, content_type: str
) -> None:
    import nibabel

    from resfuse.runtime.volumes import predict_volume, read_volume

    path = Path(nibabel_data, "anatomical.nii")
    status, body = request(f"{server.url}/predict", path.read_bytes(), content_type)
    assert status == 200, body
    answer = nibabel.Nifti1Image.from_bytes(gzip.decompress(body))
    source = nibabel.load(path)
    np.testing.assert_array_equal(answer.affine, source.affine)
    with load(server.options.artifact) as session:
        expected = predict_volume(session, read_volume(path))
    np.testing.assert_array_equal(np.asarray(answer.dataobj), expected)


def test_one_volume_of_a_4d_body_by_its_index(server: Server) -> None:
    import nibabel

    from resfuse.runtime.volumes import predict_volume, read_volume

    path = Path(nibabel_data, "example4d.nii.gz")
    status, body = request(f"{server.url}/predict?volume_index=1", path.read_bytes(), NIFTI)
    assert status == 200, body
    answer = nibabel.Nifti1Image.from_bytes(gzip.decompress(body))
    with load(server.options.artifact) as session:
        expected = predict_volume(session, read_volume(path, index=1))
    np.testing.assert_array_equal(np.asarray(answer.dataobj), expected)


def test_a_volume_body_is_named_without_the_server_path() -> None:
    """A sheared NIfTI's geometry note, as the X-Resfuse-Warning header carries it."""
    import nibabel

    from resfuse.runtime.serve import decode_volume

    source = nibabel.load(Path(nibabel_data, "anatomical.nii"))
    affine = source.affine.copy()
    affine[0, 2] = 1.0  # slices shifted along x as they go: a sheared grid
    sheared = nibabel.Nifti1Image(np.asanyarray(source.dataobj), affine)
    volume = decode_volume(sheared.to_bytes())
    assert volume.name == "the NIfTI body" and volume.notes
    assert all("resfuse-serve-" not in note and "the NIfTI body" in note for note in volume.notes)


def test_unknown_route_and_method(server: Server) -> None:
    assert request(f"{server.url}/nope", method="GET")[0] == 404
    assert request(f"{server.url}/predict", method="GET")[0] == 405
    assert request(f"{server.url}/healthz", b"x", NPY)[0] == 405


def test_a_bad_request_never_fails_its_batch(server: Server) -> None:
    good = np.zeros((1, 3, 32, 32), np.float32)
    bodies = [npy(good), npy(np.zeros((1, 2, 32, 32), np.float32))] * 4
    with ThreadPoolExecutor(len(bodies)) as pool:
        codes = [s for s, _ in pool.map(lambda b: request(f"{server.url}/predict", b, NPY), bodies)]
    assert codes == [200, 422] * 4


def test_stop_closes_the_port(server: Server) -> None:
    server.stop()
    with pytest.raises(OSError):
        request(f"{server.url}/healthz", method="GET")


def test_cli_stops_on_sigterm(head_artifact: Path) -> None:
    """The command a user runs: serves, answers, and exits 0 on SIGTERM after shutting down."""
    port = free_port()
    exe = Path(sys.executable).with_name("resfuse-serve")
    env = {**os.environ, "RAY_ADDRESS": ""}  # a Ray of its own, not the module's
    proc = subprocess.Popen(
        [str(exe), str(head_artifact), "--port", str(port), "--max-batch", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        wait_healthy(f"http://127.0.0.1:{port}", 120)
        status, _ = request(f"http://127.0.0.1:{port}/predict", png(40, 40), "image/png")
        assert status == 200
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    assert f"serving {head_artifact} at http://127.0.0.1:{port}" in stdout
    with pytest.raises(OSError):
        request(f"http://127.0.0.1:{port}/healthz", method="GET")


def test_cli_refuses_bad_options_in_one_line(tmp_path: Path, head_artifact: Path) -> None:
    exe = Path(sys.executable).with_name("resfuse-serve")
    missing = tmp_path / "missing.json"
    for args, text in (
        ([str(missing)], "missing.json"),
        ([str(head_artifact), "--replicas", "2", "--max-replicas", "1"], "--max-replicas 1"),
    ):
        proc = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        assert text in proc.stderr, proc.stderr
