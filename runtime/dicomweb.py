"""A PACS in and out over DICOMweb: find a study's series (QIDO-RS), fetch each (WADO-RS), run
the artifact on it, and store its DICOM SEG back in the study (STOW-RS).

Resumable: before any work, one query lists the study's SEG series whose SeriesDescription
names this artifact and SEG type (resfuse.runtime.seg.identity); their metadata name the series
they reference, and those series are skipped. A SEG is one instance, stored by one STOW request
after it is complete, so a failure at any step leaves nothing half-stored: the server holds the
whole SEG or none of it.

Credentials come from the environment only (RESFUSE_DICOMWEB_TOKEN for a bearer token, else
RESFUSE_DICOMWEB_USER and RESFUSE_DICOMWEB_PASSWORD for basic auth), are set on the HTTP session
(dicomweb-client logs its requests' own headers, never the session's), and appear in no message.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from resfuse.artifacts import Manifest, read_manifest
from resfuse.errors import ConfigError, InputContractError, ResfuseError
from resfuse.optional import optional_module
from resfuse.runtime import seg
from resfuse.runtime.session import Session, load

ENV_TOKEN = "RESFUSE_DICOMWEB_TOKEN"
ENV_USER = "RESFUSE_DICOMWEB_USER"
ENV_PASSWORD = "RESFUSE_DICOMWEB_PASSWORD"
# series a model does not run on: other results, documents, presentation states
_NOT_IMAGES = {"SEG", "SR", "PR", "KO", "RTSTRUCT", "RTPLAN", "RTDOSE", "REG", "DOC", "OT_SR"}
_MODALITY = "00080060"
_SERIES_UID = "0020000E"
_SERIES_DESCRIPTION = "0008103E"
_INSTANCES = "00201209"  # NumberOfSeriesRelatedInstances
_REFERENCED_SERIES = "00081115"


class DicomwebError(ResfuseError):
    """The DICOMweb server cannot be reached, refuses a request or lacks what was asked for."""


class Unreachable(DicomwebError):
    """No request can succeed (the server is down or slow, the credentials are refused): the
    run ends rather than fail every series alike."""


class Refused(DicomwebError):
    """The server refused one request (HTTP 4xx/5xx other than 401/403): that series fails."""


@dataclass(frozen=True)
class Connection:
    url: str
    timeout: float = 30.0  # seconds, each request
    retries: int = 3  # more tries for a refused connection or a busy server (429, 503, 504)


@dataclass
class Outcome:
    """What a run did, series by series."""

    stored: list[str] = field(default_factory=list)  # source series whose SEG was stored now
    skipped: list[str] = field(default_factory=list)  # a SEG of this artifact was there already
    failures: list[tuple[str, str]] = field(default_factory=list)  # (series, reason)
    seconds: float = 0.0

    def describe(self) -> str:
        return (
            f"{len(self.stored)} SEG stored, {len(self.skipped)} series already done, "
            f"{len(self.failures)} failed, in {self.seconds:.1f} s"
        )


def dicomweb_client() -> Any:
    return optional_module("dicomweb_client", "--dicomweb", "dicom")


def connect(connection: Connection) -> Any:
    """A DICOMwebClient on `connection.url` with the environment's credentials, a timeout on
    every request and retries (refused connections by urllib3, busy answers by the client)."""
    check_url(connection.url)
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    session = requests.Session()
    session.auth = _credentials()
    retry = Retry(total=None, connect=connection.retries, read=0, status=0, backoff_factor=0.2)
    session.mount("http://", HTTPAdapter(max_retries=retry))
    session.mount("https://", HTTPAdapter(max_retries=retry))
    client = dicomweb_client().DICOMwebClient(
        connection.url.rstrip("/"), session=session, timeout=connection.timeout
    )
    client.set_http_retry_params(
        retry=True, max_attempts=connection.retries + 1, wait_exponential_multiplier=200
    )
    return client


def check_url(url: str) -> None:
    """An http(s) URL without credentials in it (they would show in logs and messages)."""
    parts = urlsplit(url)
    if parts.username or parts.password:
        raise ConfigError(
            f"--dicomweb carries credentials in its URL; pass the URL without them and set "
            f"{ENV_USER} and {ENV_PASSWORD} (or {ENV_TOKEN}) in the environment"
        )
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"--dicomweb {url!r} is no http(s) URL; pass the DICOMweb root, e.g. "
            f"http://127.0.0.1:8042/dicom-web"
        )


def _credentials() -> Any:
    """The environment's bearer token or user and password, as a requests auth; None: none."""
    import requests

    token = os.environ.get(ENV_TOKEN)
    if token:

        class Bearer(requests.auth.AuthBase):
            def __call__(self, request: Any) -> Any:
                request.headers["Authorization"] = f"Bearer {token}"
                return request

        return Bearer()
    user, password = os.environ.get(ENV_USER), os.environ.get(ENV_PASSWORD)
    if bool(user) != bool(password):
        raise ConfigError(f"set both {ENV_USER} and {ENV_PASSWORD} (or {ENV_TOKEN}), not one")
    return requests.auth.HTTPBasicAuth(user, str(password)) if user else None


@contextmanager
def talking(url: str, what: str) -> Iterator[None]:
    """Network and HTTP failures of one request as one-line DicomwebErrors naming the fix."""
    import requests

    try:
        yield
    except requests.exceptions.HTTPError as exc:
        code = getattr(exc.response, "status_code", None)
        kind = Unreachable if code in (401, 403) else Refused
        raise kind(_http_problem(url, what, exc.response)) from None
    except requests.exceptions.Timeout:
        raise Unreachable(
            f"{url} did not answer {what} in time; retry later or raise --timeout"
        ) from None
    except requests.exceptions.ConnectionError:
        raise Unreachable(
            f"cannot reach the DICOMweb server at {url} ({what}); check the URL and that the "
            f"server runs"
        ) from None


def _http_problem(url: str, what: str, response: Any) -> str:
    code = getattr(response, "status_code", "?")
    if code in (401, 403):
        return (
            f"{url} refused the credentials (HTTP {code}) for {what}; set {ENV_USER} and "
            f"{ENV_PASSWORD}, or {ENV_TOKEN}, to an account that may read and store"
        )
    return f"{url} answered HTTP {code} to {what}; check the server's log"


# The work


def predict_dicomweb(
    artifact: str | Path,
    connection: Connection,
    study: str,
    series: list[str] | None = None,
    *,
    seg_type: str = "binary",
    backend: str = "onnxruntime",
    device: str = "cpu",
    batch_size: int = 8,
    on_plan: Callable[[int], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> Outcome:
    """Run `artifact` on each image series of `study` (or those in `series`) that has no SEG of
    it yet, and store each SEG in the study. Server-wide failures (down, refused credentials, a
    missing study) raise DicomwebError before any work; one series' failure is recorded and the
    others go on."""
    check_url(connection.url)
    manifest = read_manifest(artifact)
    seg.check_seg_type(seg_type)
    seg.check_head(manifest)
    seg.highdicom()  # before any download: refused at once where it is not installed
    client = connect(connection)
    todo, done = plan(client, connection.url, manifest, seg_type, study, series)
    outcome = Outcome(skipped=done)
    if on_plan is not None:
        on_plan(len(todo))
    start = time.perf_counter()
    if todo:
        with load(artifact, backend, device) as session:
            for uid in todo:
                reason = _one_series(
                    client, connection.url, session, study, uid, seg_type, batch_size
                )
                (
                    outcome.stored.append(uid)
                    if reason is None
                    else outcome.failures.append((uid, reason))
                )
                if progress is not None:
                    progress(1)
    outcome.seconds = time.perf_counter() - start
    return outcome


def plan(
    client: Any, url: str, manifest: Manifest, seg_type: str, study: str, wanted: list[str] | None
) -> tuple[list[str], list[str]]:
    """(series to run, series this artifact's SEG already covers), each in the study's order."""
    with talking(url, f"the QIDO-RS query for study {study}"):
        found = client.search_for_series(study, fields=[_MODALITY, _SERIES_DESCRIPTION, _INSTANCES])
    if not found:
        raise DicomwebError(
            f"study {study} is not on {url} (or has no series); check the StudyInstanceUID"
        )
    images = [s for s in found if _value(s, _MODALITY) not in _NOT_IMAGES]
    uids = [_value(s, _SERIES_UID) for s in images]
    if wanted:
        missing = [uid for uid in wanted if uid not in uids]
        if missing:
            raise DicomwebError(
                f"series {', '.join(missing)} of study {study} is not an image series on {url}; "
                f"its image series are {', '.join(uids) or 'none'}"
            )
        uids = [uid for uid in uids if uid in wanted]
    covered = _covered(client, url, study, found, seg.identity(manifest, seg_type))
    return [u for u in uids if u not in covered], [u for u in uids if u in covered]


def _covered(client: Any, url: str, study: str, found: list[dict], identity: str) -> set[str]:
    """The series that a SEG of this artifact and type in the study references."""
    covered: set[str] = set()
    for entry in found:
        if _value(entry, _MODALITY) != "SEG" or _value(entry, _SERIES_DESCRIPTION) != identity:
            continue
        uid = _value(entry, _SERIES_UID)
        with talking(url, f"the metadata of SEG series {uid}"):
            instances = client.retrieve_series_metadata(study, uid)
        for instance in instances:
            for item in instance.get(_REFERENCED_SERIES, {}).get("Value", []):
                covered.add(_value(item, _SERIES_UID))
    return covered


def _one_series(
    client: Any, url: str, session: Session, study: str, uid: str, seg_type: str, batch_size: int
) -> str | None:
    """Fetch, run and store one series; None when stored, else the one-line reason. Unreachable
    (the server gone, credentials refused) raises and ends the run."""
    with tempfile.TemporaryDirectory(prefix="resfuse-dicomweb-") as tmp:
        folder = Path(tmp)
        try:
            _fetch(client, url, study, uid, folder)
            sources, frames = seg.series_frames(session, folder, seg_type, batch_size)
            data = seg.seg_bytes(session.manifest, sources, frames, seg_type)
        except (InputContractError, ConfigError, ValueError, Refused) as exc:
            return str(exc)
    return _store(client, url, study, uid, data)


def _fetch(client: Any, url: str, study: str, uid: str, folder: Path) -> None:
    """The series' instances as files in `folder`; all of them, or an error: a series the
    server holds only part of (fewer instances than its QIDO count) is refused, not run."""
    with talking(url, f"the WADO-RS retrieval of series {uid}"):
        expected = client.search_for_series(study, search_filters={"SeriesInstanceUID": uid})
        datasets = client.retrieve_series(study, uid)
    count = int(_value(expected[0], _INSTANCES) or len(datasets)) if expected else len(datasets)
    if len(datasets) != count:
        raise InputContractError(
            f"series {uid} came back with {len(datasets)} of its {count} instances; retry once "
            f"the server holds the whole series"
        )
    for k, dataset in enumerate(datasets):
        dataset.save_as(folder / f"{k:05d}.dcm", enforce_file_format=True)


def _store(client: Any, url: str, study: str, uid: str, data: bytes) -> str | None:
    """STOW-RS of the one SEG instance; a refusal (HTTP error, or the instance listed as failed
    in the answer) is reported, and the server holds nothing of it."""
    import io

    from pydicom import dcmread

    dataset = dcmread(io.BytesIO(data))
    try:
        with talking(url, f"the STOW-RS of the SEG of series {uid}"):
            answer = client.store_instances([dataset], study_instance_uid=study)
    except Refused as exc:
        return str(exc)
    if answer is not None and answer.get("FailedSOPSequence"):
        reason = answer.FailedSOPSequence[0].get("FailureReason", "?")
        return f"{url} refused the SEG of series {uid} (STOW failure reason {reason})"
    return _check_stored(client, url, study, uid, dataset)


def _check_stored(client: Any, url: str, study: str, uid: str, dataset: Any) -> str | None:
    """A STOW answered as a success is checked by a query for the instance: a server's filter
    (Orthanc's ReceivedInstanceFilter) can drop it and still answer success."""
    with talking(url, f"the QIDO-RS check of the SEG of series {uid}"):
        found = client.search_for_instances(
            study,
            str(dataset.SeriesInstanceUID),
            search_filters={"SOPInstanceUID": str(dataset.SOPInstanceUID)},
        )
    if found:
        return None
    return (
        f"{url} answered the STOW-RS of the SEG of series {uid} as a success but does not hold "
        f"it (a filter on the server dropped it?); check the server's log and rules"
    )


def _value(entry: dict, tag: str) -> Any:
    values = entry.get(tag, {}).get("Value", [])
    return values[0] if values else None
