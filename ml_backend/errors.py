"""Named exceptions. The web layer maps them to JSON errors; nothing here imports our code."""


class BackendError(Exception):
    """Base class of every error this package raises on purpose.

    ``http_status`` is what the web layer answers when such an error escapes a route.
    """

    http_status = 500


class ConfigError(BackendError):
    """An environment variable has a bad value; the message names the variable."""


class BadRequest(BackendError):
    """The request body or parameters are malformed; the message says what was wrong."""

    http_status = 400


class Unauthorized(BackendError):
    """Basic auth is configured and the request did not carry the right credentials."""

    http_status = 401


class PayloadTooLarge(BackendError):
    """The request body is larger than MAX_REQUEST_BYTES."""

    http_status = 413


class QueueUnavailable(BackendError):
    """Redis cannot be reached, so nothing can be enqueued or read from the job state."""

    http_status = 503


class LabelStudioUnavailable(BackendError):
    """Label Studio cannot be reached (after retries) or rejected our credentials."""

    http_status = 502


class ProjectNotFound(BackendError):
    """Label Studio says the project does not exist (deleted, or a wrong id)."""

    http_status = 404


class LabelConfigError(BackendError):
    """The project's labeling config has no Image + Choices pair we can train on."""

    http_status = 422


class NotEnoughLabels(BackendError):
    """Training cannot start: no labels, or only one class labeled. The message says which."""

    http_status = 409


class ImageError(BackendError):
    """An image could not be fetched or decoded (unreachable, corrupt, too large)."""

    http_status = 422


class ModelNotReady(BackendError):
    """No trained model version exists yet for the project."""

    http_status = 409


class SelectionInputError(BackendError, ValueError):
    """Acquisition inputs are invalid (NaN probabilities, mismatched shapes, ...)."""

    http_status = 422
