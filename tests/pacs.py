"""A real PACS for the tests: Debian's Orthanc with its DICOMweb plugin, on 127.0.0.1 and a free
port, its storage in a temporary folder, basic auth on; and the CT series and model the DICOM SEG
tests share (a head whose mask varies over the image, so a misplaced frame shows)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pydicom
import requests
from dicom_series import CT_SLICE, build_series
from pydicom.uid import generate_uid

ORTHANC = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin")


def _plugin() -> Path:
    """The DICOMweb plugin's shared library, as its Debian package lists it (else where
    Debian puts it)."""
    try:
        listed = subprocess.run(
            ["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True, timeout=30
        ).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        listed = []
    found = [p for p in listed if p.endswith("/libOrthancDicomWeb.so")]
    return Path(found[0] if found else "/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


PLUGIN = _plugin()
USER, PASSWORD = "resfuse", "not-a-real-secret"
# rows along the patient's left, columns posterior: the model sees it transposed, so a frame
# written without turning it back onto the stored pixels would not match
TRANSPOSED = (0.0, 1.0, 0.0, 1.0, 0.0, 0.0)
CROP = (160, 150, 96, 128)


def missing() -> str | None:
    """Why the PACS tests cannot run here, or None."""
    if ORTHANC is None:
        return "Orthanc is not installed (apt-get install orthanc orthanc-dicomweb; .ci/run does)"
    if not PLUGIN.is_file():
        return f"Orthanc's DICOMweb plugin is not at {PLUGIN} (apt-get install orthanc-dicomweb)"
    return None


@dataclass
class Orthanc:
    process: subprocess.Popen
    port: int
    folder: Path

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.root}/dicom-web"

    def upload(self, folder: Path) -> None:
        for path in sorted(folder.iterdir()):
            answer = requests.post(
                f"{self.root}/instances", data=path.read_bytes(), auth=(USER, PASSWORD), timeout=30
            )
            answer.raise_for_status()

    def instances(self) -> list[str]:
        answer = requests.get(f"{self.root}/instances", auth=(USER, PASSWORD), timeout=30)
        answer.raise_for_status()
        return list(answer.json())

    def stop(self) -> None:
        """Stopped by its own process id; Orthanc closes its index cleanly on SIGTERM."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=20)


def start(folder: Path, lua: str | None = None) -> Orthanc:
    """Orthanc on a free loopback port, storage and index under `folder`; `lua` is a Lua
    script it runs (e.g. a ReceivedInstanceFilter that refuses some instances)."""
    folder.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    config = {
        "Name": "resfuse-test",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "HttpPort": port,
        "RemoteAccessAllowed": False,  # Orthanc answers loopback clients only
        "DicomServerEnabled": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: PASSWORD},
        "Plugins": [str(PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    if lua is not None:
        (folder / "filter.lua").write_text(lua)
        config["LuaScripts"] = [str(folder / "filter.lua")]
    (folder / "orthanc.json").write_text(json.dumps(config, indent=2))
    log = open(folder / "orthanc.log", "wb")  # noqa: SIM115 - open as long as the process
    process = subprocess.Popen(
        [str(ORTHANC), str(folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT
    )
    server = Orthanc(process, port, folder)
    _wait(server)
    return server


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait(server: Orthanc, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"Orthanc exited ({server.process.returncode}): "
                f"{(server.folder / 'orthanc.log').read_text()[-2000:]}"
            )
        try:
            if requests.get(f"{server.root}/system", auth=(USER, PASSWORD), timeout=2).ok:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"Orthanc did not answer on port {server.port} in {seconds:.0f} s")


def ct_series(folder: Path, count: int = 3, *, skip: int | None = None) -> Path:
    """A CT series of `count` real slices (pydicom-data's), transposed in-plane, cropped, with
    what a scanner writes and the source slice lacks: a Frame of Reference, and the method its
    de-identification (PatientIdentityRemoved YES) used. `skip`: that slice left out (a
    series with a gap). One new study per call."""
    build_series(CT_SLICE, folder, count, orientation=TRANSPOSED, crop=CROP)
    frame, study = generate_uid(), generate_uid()
    for path in sorted(folder.iterdir()):
        dataset = pydicom.dcmread(path)
        if skip is not None and int(dataset.InstanceNumber) == skip + 1:
            path.unlink()
            continue
        dataset.FrameOfReferenceUID = frame
        dataset.StudyInstanceUID = study
        dataset.DeidentificationMethod = "CQ500 public release (de-identified at source)"
        dataset.save_as(path)
    return folder


def varied_head(folder: Path) -> Path:
    """A small 1-channel model with a 3-class head whose classes vary over a CT slice (its
    last convolution scaled up, its bias zeroed), exported with class names."""
    import torch

    from resfuse.export.pipeline import ExportOptions, export_artifact
    from resfuse.models import ModelConfig, build_model
    from resfuse.weights import save_weights

    config = ModelConfig("upsample", stage=2, in_channels=1, features=8, num_classes=3)
    torch.manual_seed(0)
    model = build_model(**config.to_dict(), pretrained=False)
    last = model.head[1]
    with torch.no_grad():
        last.bias.zero_()
        last.weight.mul_(10.0)
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(model, folder / "head.safetensors")
    options = ExportOptions(
        min_size=16, max_size=256, max_batch=8, class_names=("background", "bone", "soft tissue")
    )
    return export_artifact(config, folder, options, folder / "head.safetensors").manifest_path
