"""Artifacts on disk: atomic writes, sha256, and the JSON manifest every reader validates."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

from resfuse.compare import Tolerance
from resfuse.contract import InputContract
from resfuse.errors import ArtifactWriteError, ManifestError
from resfuse.models import FusionModel, ModelConfig

FORMAT = "resfuse-artifact"
FORMAT_VERSION = 1
_REQUIRED = ("format", "format_version", "model", "input", "output", "files")


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Staging:
    """Files written under temporary names in the target folder, renamed into place together on
    success (in the order staged: put the manifest last) and deleted on failure, so a crash or an
    error never leaves a half-written artifact and never replaces a good one."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._staged: list[tuple[Path, Path]] = []

    def path(self, name: str) -> Path:
        final = self.folder / name
        temp = self.folder / f".{name}.partial-{os.getpid()}"
        self._staged.append((temp, final))
        return temp

    def commit(self) -> None:
        umask = os.umask(0)
        os.umask(umask)
        for temp, final in self._staged:
            os.chmod(temp, 0o666 & ~umask)  # some writers create 0600 files
            os.replace(temp, final)
        self._staged.clear()

    def discard(self) -> None:
        for temp, _ in self._staged:
            temp.unlink(missing_ok=True)
        self._staged.clear()


def ensure_writable(folder: str | Path) -> None:
    """Fail before any expensive work when the output folder cannot be written."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ArtifactWriteError(
            f"cannot write into {folder} ({exc.strerror or exc}); choose a writable --output folder"
        ) from exc
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ArtifactWriteError(
            f"cannot write into {folder} (permission denied); choose a writable --output folder"
        )


@contextlib.contextmanager
def staging(folder: str | Path) -> Iterator[Staging]:
    folder = Path(folder)
    stage = Staging(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        yield stage
        stage.commit()
    except OSError as exc:  # unwritable folder, full disk: say where, keep what was there
        raise ArtifactWriteError(
            f"cannot write into {folder} ({exc.strerror or exc}); choose a writable --output "
            f"folder with free space; nothing there was changed"
        ) from exc
    finally:
        stage.discard()


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def file_record(path: Path, final_name: str) -> dict[str, Any]:
    return {"path": final_name, "sha256": sha256_of(path), "bytes": path.stat().st_size}


class Manifest:
    """A validated manifest and the folder its relative file paths are resolved against."""

    def __init__(self, data: dict[str, Any], path: Path) -> None:
        self.data = data
        self.path = path
        self.config = ModelConfig.from_dict(data["model"])
        self.contract = InputContract.from_dict(data["input"]["contract"])

    @property
    def precision(self) -> str:
        return str(self.data.get("precision", "float32"))

    @property
    def tolerance(self) -> Tolerance:
        """The tolerance the export's parity sweep passed at: the default for later checks."""
        parity = self.data.get("parity") or {}
        known = {f.name for f in fields(Tolerance)}
        return Tolerance(**{k: v for k, v in parity.items() if k in known})

    def file(self, key: str) -> Path:
        """The artifact file `key` ("onnx", "weights", ...), after checking its sha256."""
        record = self.data["files"].get(key)
        if record is None:
            raise ManifestError(f"{self.path} lists no {key!r} file; re-export the artifact")
        target = self.path.parent / record["path"]
        if not target.is_file():
            raise ManifestError(
                f"{target} named by {self.path} is missing; copy it beside the manifest or "
                f"re-export"
            )
        if sha256_of(target) != record["sha256"]:
            raise ManifestError(
                f"{target} does not match the sha256 in {self.path}: the file was changed or "
                f"replaced after export; re-export it rather than trusting it"
            )
        return target


def read_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    if path.suffix != ".json":
        path = path.with_suffix(".json")  # an artifact's manifest lies beside it
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(
            f"no manifest at {path}; export with resfuse-export, which writes it beside the model"
        ) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ManifestError(f"cannot read manifest {path}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ManifestError(f'{path} is not a resfuse manifest (no "format": "{FORMAT}")')
    missing = [key for key in _REQUIRED if key not in data]
    if missing:
        raise ManifestError(f"{path} lacks the fields {missing}; re-export the artifact")
    if data["format_version"] != FORMAT_VERSION:
        raise ManifestError(
            f"{path} has format version {data['format_version']}, this resfuse reads "
            f"{FORMAT_VERSION}; re-export with this version"
        )
    try:
        return Manifest(data, path)
    except (KeyError, TypeError, ValueError) as exc:
        raise ManifestError(f"{path} has a malformed model or input section: {exc}") from exc


def load_original(manifest_path: str | Path) -> FusionModel:
    """Rebuild the PyTorch original from a manifest and its verified weights, in eval mode."""
    from resfuse.models import build_model

    manifest = read_manifest(manifest_path)
    return build_model(**manifest.config.to_dict(), weights=manifest.file("weights"))
