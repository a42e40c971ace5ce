"""The error family. Every error a user can cause or fix is an AccelError with a one-line message
that names the problem and what to do; the CLI prints it and exits with code 2."""

from __future__ import annotations


class AccelError(Exception):
    """Base of every error accel-port raises on purpose."""

    exit_code = 2


class UsageError(AccelError):
    """A malformed argument or option value."""


class TargetUnavailable(AccelError):
    """A target was asked for explicitly but cannot run here."""


class BackendUnavailable(TargetUnavailable):
    """A backend's framework is not installed or cannot be imported."""


class UnknownTarget(AccelError):
    """A target string that names no known backend or device."""


class UnsupportedDtype(AccelError):
    """A dtype the target's device does not support."""


class RoutingError(AccelError):
    """A routing policy that names an unknown op or an implementation this target lacks."""


class ModelError(AccelError):
    """A model directory, config or preset that cannot be used."""


class CheckpointError(ModelError):
    """A checkpoint file that is missing, corrupt, or disagrees with the model's parameter spec."""


class ConformanceError(AccelError):
    """A conformance run that cannot start (bad golden record, unknown case)."""
