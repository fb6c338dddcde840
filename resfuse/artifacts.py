"""Artifacts on disk: a manifest NAME.json and the content-tagged files it names.

How a write stays atomic, in three lines:
1. each file is written to a hidden temporary name, fsynced, then renamed to NAME.<sha256[:12]>.ext;
2. the manifest is written the same way and renamed over NAME.json: that rename is the one commit;
3. then NAME's files that the manifest no longer names, and temporaries of killed writes, go.
A reader thus sees the old set or the new set, never a mix; a file lock serialises writers of NAME.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
from collections.abc import Callable, Iterator
from dataclasses import fields
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resfuse.compare import MaskGates, Tolerance
from resfuse.contract import InputContract
from resfuse.errors import ArtifactWriteError, ConfigError, ManifestError
from resfuse.models.spec import ModelConfig
from resfuse.precisions import default_targets
from resfuse.schema import validate_manifest
from resfuse.torch_extra import require_torch

if TYPE_CHECKING:
    from resfuse.models.model import FusionModel

TAG_LENGTH = 12
SUFFIXES = (".onnx", ".safetensors", ".plan")  # data files of artifacts and of TensorRT engines


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_name(name: str) -> str:
    """An artifact name is a plain file name: it can only ever land inside --output."""
    bad = (
        not name
        or name in (".", "..")
        or name.startswith((".", "-"))
        or "/" in name
        or "\\" in name
        or (os.altsep is not None and os.altsep in name)
        or any(ord(ch) < 32 for ch in name)
        or len(name) > 200
        or re.search(rf"\.[0-9a-f]{{{TAG_LENGTH}}}$", name) is not None  # reads as a file's tag
    )
    if bad:
        raise ConfigError(
            f"--name {name!r} is not a plain file name; use letters, digits, '-', '_' or '.' "
            f"without a path (the files go into --output), not starting with '.' or '-'"
        )
    return name


def ensure_writable(folder: str | Path, name: str, option: str = "--output") -> None:
    """Fail before any expensive work when the artifact cannot be written into `folder`."""
    folder = Path(folder)
    fix = f"choose a writable {option}" + (" folder" if option == "--output" else "")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = exc.strerror or exc
        raise ArtifactWriteError(f"cannot write into {folder} ({reason}); {fix}") from exc
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ArtifactWriteError(f"cannot write into {folder} (permission denied); {fix}")
    manifest = folder / f"{name}.json"
    if manifest.exists() and not manifest.is_file():
        raise ArtifactWriteError(
            f"{manifest} exists and is not a file, so the manifest cannot be written there; "
            f"move it away or choose another --name; nothing was written"
        )


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ArtifactWriter:
    """Writes one artifact under the protocol in the module docstring. Use `write_artifact`."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder = folder
        self.name = check_name(name)
        self.manifest_path = folder / f"{name}.json"
        self._token = secrets.token_hex(8)
        self._temp = re.compile(rf"\.{re.escape(name)}\.[0-9a-f]{{16}}\.tmp")
        kinds = "|".join(re.escape(s) for s in SUFFIXES)
        self._tagged = re.compile(rf"{re.escape(name)}\.[0-9a-f]{{{TAG_LENGTH}}}({kinds})")
        # version 1 files (NAME.onnx) go once a new manifest no longer names them
        self._untagged = {f"{name}{s}" for s in SUFFIXES} & set(named_files(self.manifest_path))

    def _temporary(self, suffix: str) -> Path:
        return self.folder / f".{self.name}.{self._token}.tmp{suffix}"

    @staticmethod
    def _written(temp: Path) -> None:
        with open(temp, "rb+") as fh:
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp, 0o666 & ~umask)  # some writers create 0600 files

    def add(self, suffix: str, write: Callable[[Path], None]) -> dict[str, Any]:
        """Write one file with `write(path)` and move it to its content-tagged name; returns
        its manifest record."""
        temp = self._temporary("")
        try:
            write(temp)
            self._written(temp)
            digest = sha256_of(temp)
            final = f"{self.name}.{digest[:TAG_LENGTH]}{suffix}"
            size = temp.stat().st_size
            os.replace(temp, self.folder / final)  # same bytes if the name already exists
        finally:
            temp.unlink(missing_ok=True)
        _fsync_folder(self.folder)
        return {"path": final, "sha256": digest, "bytes": size}

    def commit(self, manifest: dict[str, Any]) -> None:
        temp = self._temporary(".json")
        try:
            write_json(temp, manifest)
            self._written(temp)
            os.replace(temp, self.manifest_path)
        finally:
            temp.unlink(missing_ok=True)
        _fsync_folder(self.folder)

    def collect_garbage(self) -> None:
        """Remove NAME's files that the committed manifest does not name, and temporaries."""
        keep = set(named_files(self.manifest_path))
        for entry in os.scandir(self.folder):
            stale_temp = self._temp.fullmatch(entry.name.removesuffix(".json"))
            ours = self._tagged.fullmatch(entry.name) or entry.name in self._untagged
            unused = ours and entry.name not in keep
            if (stale_temp or unused) and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)


def replace_file(path: Path, data: bytes) -> None:
    """Write one file that belongs to no manifest (a TensorRT timing cache) by the same rule: a
    hidden temporary beside it, fsynced, renamed over `path`. Callers lock if they share it."""
    temp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        temp.write_bytes(data)
        ArtifactWriter._written(temp)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    _fsync_folder(path.parent)


def named_files(manifest_path: Path) -> list[str]:
    """The plain file names a manifest on disk names; [] when it is absent or unreadable."""
    try:
        files = json.loads(manifest_path.read_text()).get("files", {})
        names = [record["path"] for record in files.values()]
    except (OSError, ValueError, AttributeError, TypeError, KeyError):
        return []
    return [n for n in names if isinstance(n, str) and Path(n).name == n]


@contextlib.contextmanager
def write_artifact(folder: str | Path, name: str) -> Iterator[ArtifactWriter]:
    """Lock NAME in `folder`, clear leftovers of killed writes, yield the writer; the caller
    adds files and commits. On any failure nothing the old manifest names is touched."""
    import filelock

    folder = Path(folder)
    check_name(name)
    try:
        with filelock.FileLock(folder / f".{name}.lock"):
            writer = ArtifactWriter(folder, name)
            try:
                writer.collect_garbage()
                yield writer
            finally:
                writer.collect_garbage()
    except OSError as exc:  # unwritable folder, full disk: say where, keep what was there
        raise ArtifactWriteError(
            f"cannot write {name} into {folder} ({exc.strerror or exc}); choose a writable "
            f"--output folder with free space; the artifact there was not changed"
        ) from exc


class Manifest:
    """A validated manifest and the folder its plain file names are resolved in."""

    def __init__(self, data: dict[str, Any], path: Path, raw: bytes) -> None:
        self.data = data
        self.path = path
        self._raw = raw
        self.config = ModelConfig.from_dict(data["model"])
        self.contract = InputContract.from_dict(data["input"]["contract"])

    @property
    def precision(self) -> str:
        return str(self.data["precision"])

    @property
    def targets(self) -> list[str]:
        """The devices the artifact is made for (cpu, cuda, tensorrt); runtimes refuse others."""
        return list(self.data.get("targets") or default_targets(self.precision))

    @property
    def input_name(self) -> str:
        return str(self.data["input"]["name"])

    @property
    def tolerance(self) -> Tolerance:
        """The tolerance the export's parity sweep passed at: the default for later checks."""
        parity = self.data.get("parity") or {}
        known = {f.name for f in fields(Tolerance)}
        return Tolerance(**{k: v for k, v in parity.items() if k in known})

    @property
    def kept_float(self) -> list[dict[str, Any]]:
        """The layers a reduced-precision variant kept float beyond its precision's rules
        (--keep-accuracy's rescue, float16's measured range hazards), with why."""
        return list((self.data.get("mixed") or {}).get("kept_float") or [])

    @property
    def precision_label(self) -> str:
        """The precision as a person reads it: "int8", or "int8, 2 layers kept float"."""
        kept = len(self.kept_float)
        return self.precision if not kept else f"{self.precision}, {kept} layers kept float"

    @property
    def mask_gates(self) -> MaskGates:
        """The mask gates the export's parity sweep passed (a reduced-precision model with a
        head): the default for later checks; none recorded: reported, not gated."""
        gates = (self.data.get("parity") or {}).get("gates") or {}
        known = {f.name for f in fields(MaskGates)}
        return MaskGates(**{k: v for k, v in gates.items() if k in known})

    def record(self, key: str) -> dict[str, Any]:
        record = self.data["files"].get(key)
        if record is None:
            raise ManifestError(f"{self.path} lists no {key!r} file; re-export the artifact")
        return dict(record)

    def read(self, key: str) -> bytes:
        """The bytes of file `key` ("onnx", "weights"), read once and checked against the
        manifest's size and sha256: load from these bytes, so the file checked is the file run."""
        record = self.record(key)
        target = self.path.parent / record["path"]
        changed = (
            f"{target} does not match the size and sha256 in {self.path}: the file was changed, "
            f"truncated or replaced after export; re-export it rather than trusting it"
        )
        missing = partial(self._missing, target)
        return read_checked(target, record["bytes"], record["sha256"], missing, changed)

    def _missing(self, target: Path) -> str:
        try:
            replaced = self.path.read_bytes() != self._raw
        except OSError:
            replaced = True
        if replaced:
            return f"{self.path} was replaced by another export while being opened; open it again"
        return f"{target} named by {self.path} is missing; copy it beside the manifest or re-export"


def manifest_path_for(path: str | Path) -> Path:
    """The manifest of an artifact given by its manifest or by one of its files."""
    path = Path(path)
    if path.suffix == ".json":
        return path
    stem = path.stem  # NAME.<tag> for version 2 files, NAME for version 1
    base, _, tag = stem.rpartition(".")
    if base and re.fullmatch(rf"[0-9a-f]{{{TAG_LENGTH}}}", tag):
        return path.with_name(f"{base}.json")
    return path.with_name(f"{stem}.json")


def read_json(path: Path, what: str, make: str) -> tuple[Any, bytes]:
    """The parsed JSON of `what` ("manifest", "engine manifest") at `path` and its bytes; a
    missing, unreadable or malformed file is a one-line ManifestError (`make`: how to get one)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ManifestError(f"no {what} at {path}; {make}") from None
    except OSError as exc:
        raise ManifestError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    try:
        return json.loads(raw), raw
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ManifestError(f"cannot read {what} {path}: not JSON ({exc})") from exc


def read_checked(
    target: Path, size: int, sha256: str, missing: Callable[[], str], changed: str
) -> bytes:
    """The bytes of a file a manifest records, read once and checked against its recorded size
    and sha256: load from these bytes, so that the file checked is the file run. `missing` says
    why the file is gone (asked only then), `changed` that it differs."""
    try:
        with open(target, "rb") as fh:
            data = fh.read(size + 1)
    except FileNotFoundError:
        raise ManifestError(missing()) from None
    except OSError as exc:
        raise ManifestError(f"cannot read {target}: {exc.strerror or exc}") from exc
    if len(data) != size or hashlib.sha256(data).hexdigest() != sha256:
        raise ManifestError(changed)
    return data


def read_manifest(path: str | Path) -> Manifest:
    """Read and validate a manifest (or the one beside an artifact file); every field is checked
    before use and a bad one is named in a one-line ManifestError."""
    path = manifest_path_for(path)
    make = "export with resfuse-export, which writes it beside the model"
    data, raw = read_json(path, "manifest", make)
    validate_manifest(data, path)
    return Manifest(data, path, raw)


def load_original(manifest: str | Path | Manifest) -> FusionModel:
    """Rebuild the PyTorch original from a manifest and its verified weights, in eval mode."""
    require_torch("the PyTorch original (load_original)")
    from safetensors import SafetensorError
    from safetensors.torch import load

    from resfuse.models import build_model

    if not isinstance(manifest, Manifest):
        manifest = read_manifest(manifest)
    name = manifest.record("weights")["path"]
    model = build_model(**manifest.config.to_dict())
    try:  # safetensors parses the very bytes hashed; nothing in it can run code
        model.load_state_dict(load(manifest.read("weights")), strict=True)
    except (SafetensorError, RuntimeError) as exc:
        detail = " ".join(str(exc).split())[:200]
        raise ManifestError(
            f"{name} does not hold the weights of the model {manifest.path.name} describes "
            f"({detail}); re-export the artifact"
        ) from exc
    return model.eval()
