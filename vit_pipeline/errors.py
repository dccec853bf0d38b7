"""Errors the pipeline reports to users as one line, without a traceback."""


class PipelineError(Exception):
    """Base class for problems caused by input or environment, not by a bug."""


class ConfigError(PipelineError, ValueError):
    """An invalid configuration value, preset or field name."""


class DataError(PipelineError, ValueError):
    """Missing, unreadable, corrupt or inconsistent data."""


class TrackingUnavailable(PipelineError):
    """The MLflow tracking server did not answer (worth retrying later)."""


class TrainingInProgress(PipelineError):
    """Another process is training the same run (e.g. an orphan beside a resume)."""
