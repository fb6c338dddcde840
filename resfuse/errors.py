"""One exception family: every message names the bad value, what is allowed, and the fix."""


class ResfuseError(Exception):
    """Base class of every error resfuse raises on purpose."""


class ConfigError(ResfuseError, ValueError):
    """A model or export option is unknown or out of range."""


class InputContractError(ResfuseError, ValueError):
    """An input tensor does not meet the model's input contract (rank, channels, dtype, size)."""


class WeightsError(ResfuseError):
    """A weights file cannot be read safely or does not fit the model."""


class ExportError(ResfuseError):
    """The exporter failed or produced a graph that breaks the declared contract."""


class ArtifactWriteError(ResfuseError):
    """An artifact could not be written; nothing in the target folder was changed."""


class ParityError(ResfuseError):
    """A deployed model disagrees with its PyTorch original beyond the tolerance."""


class ManifestError(ResfuseError):
    """A manifest is missing, malformed, or does not match the artifact beside it."""


class BackendUnavailableError(ResfuseError):
    """A backend, device or execution provider is not installed or not present here."""


class ModelLoadError(ResfuseError):
    """A backend refused an artifact's verified model file (a graph it rejects, external data)."""


class SessionClosedError(ResfuseError, RuntimeError):
    """A runtime session was used after close()."""


class EngineError(ResfuseError):
    """A TensorRT engine does not fit this machine, or holds host code that was not trusted."""
