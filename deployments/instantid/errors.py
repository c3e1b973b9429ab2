"""Errors the model code raises, each with a stable ``code`` the HTTP layer maps to a status.

They carry only plain attributes so they pickle across Ray processes unchanged.
"""

from __future__ import annotations


class InstantIDError(Exception):
    """Base class. ``code`` is a short machine-readable identifier, ``status`` the HTTP status."""

    code = "internal_error"
    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __reduce__(self):  # keep the subclass and message across pickling (Ray)
        return (type(self), (self.message,))

    @property
    def public_message(self) -> str:
        """What a client is told; the message itself unless it holds internals (see StorageError)."""
        return self.message


class InvalidImageError(InstantIDError):
    """The bytes are not a decodable image (truncated, corrupt, unknown format)."""

    code = "invalid_image"
    status = 400


class UnsupportedImageTypeError(InstantIDError):
    """The bytes are an image format we refuse (not PNG/JPEG/WebP), or a content type we refuse."""

    code = "unsupported_media_type"
    status = 415


class ImageTooLargeError(InstantIDError):
    """Too many bytes or too many pixels (decompression-bomb guard), refused before decoding."""

    code = "image_too_large"
    status = 413


class NoFaceError(InstantIDError):
    """No face was detected in an image that needs one."""

    code = "no_face"
    status = 422


class FaceTooSmallError(NoFaceError):
    """The largest face is too small to carry an identity (a few pixels across)."""

    code = "face_too_small"


class InvalidParameterError(InstantIDError):
    """A parameter is out of range or inconsistent with another."""

    code = "invalid_parameter"
    status = 422


class GenerationCancelled(InstantIDError):
    """The job was cancelled by its owner; the denoiser dropped it at a step boundary."""

    code = "cancelled"
    status = 409


class WeightsError(InstantIDError):
    """Model weights are missing, misplaced or do not match the expected format."""

    code = "weights_error"
    status = 500


class ModelUnavailableError(InstantIDError):
    """A model the request chose could not be loaded on this replica (the others still serve); retry later."""

    code = "model_unavailable"
    status = 503


class DeviceOutOfMemoryError(InstantIDError):
    """The accelerator ran out of memory for this batch; the replica is fine, the client may retry."""

    code = "overloaded"
    status = 503


class ContentRefusedError(InstantIDError):
    """The safety check refused every image of a generation (policy ``refuse``): nothing was stored. A 422, not a
    retryable error: the same request and seed make the same images; another prompt or seed may not."""

    code = "content_refused"
    status = 422


class LicenseNotAccepted(InstantIDError):
    """The deployment would load weights whose licence does not allow commercial use (or does not say), and its
    config does not accept that (``licenses.accept_noncommercial``). Raised when the app is built."""

    code = "license_not_accepted"
