"""The one mapping from exceptions to API answers (``serve.ingress.errors``): statuses, codes, what a client is told,
and which failures the ingress retries, at any depth of a chain of deployment calls."""

from __future__ import annotations

import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError
from ray.serve.exceptions import BackPressureError

from deployments.instantid.errors import InvalidParameterError, NoFaceError
from deployments.storage.generations import StorageError
from deployments.storage.spool import SpooledError
from serve.ingress.errors import classify_error, replica_gone


def raised_in(function: str, cause: BaseException) -> BaseException:
    """``cause`` as it reaches a caller from another deployment: wrapped in Ray's task error (as an instance of
    the cause's class too, as Ray delivers it)."""
    try:
        raise cause
    except BaseException as exc:
        return RayTaskError(function, "traceback", exc).as_instanceof_cause()


def test_a_replica_death_is_retried_wherever_it_sits_in_the_chain() -> None:
    """The Denoiser's death reaches the ingress inside the ResultStore's error (the Denoiser's response was an
    argument of the store call): the retry must look down the chain, as the error mapping does."""
    assert replica_gone(ActorDiedError())
    assert replica_gone(raised_in("ResultStore.save", ActorDiedError()))
    assert replica_gone(
        raised_in(
            "ResultStore.save", raised_in("Denoiser.generate", ActorUnavailableError("the replica is restarting", None))
        )
    )
    assert classify_error(raised_in("ResultStore.save", ActorDiedError())).code == "replica_unavailable"


@pytest.mark.parametrize(
    "error",
    [
        NoFaceError("no face detected"),
        InvalidParameterError("bad"),
        BackPressureError(num_queued_requests=1, max_queued_requests=1),
        RuntimeError("x"),
    ],
    ids=["no-face", "invalid", "back-pressure", "a-bug"],
)
def test_the_requests_own_failures_are_not_retried(error: BaseException) -> None:
    assert not replica_gone(error)
    assert not replica_gone(raised_in("ResultStore.save", error))


def test_storage_failures_tell_clients_no_s3_internals() -> None:
    """S3's own message names the endpoint, the bucket and keys: a 503 body carries a fixed sentence instead (the
    detail stays in the service's log); a spooled generation keeps its id and URL, which the store wrote itself."""
    leaky = StorageError(
        "could not store generation 20261207T120000Z-0123456789abcdef: EndpointConnectionError: Could not connect to "
        "the endpoint URL: http://10.0.0.7:8333/results-bucket/generations/2026/12/07/x/image-0.png"
    )
    info = classify_error(raised_in("ResultStore.save", leaky))
    assert (info.status, info.code) == (503, "storage_unavailable")
    assert info.message == "storage is unavailable; retry shortly"
    assert "8333" not in info.message and "bucket" not in info.message
    spooled = SpooledError("storage is unavailable; generation G is kept (GET /v1/generations/G)", "G")
    info = classify_error(raised_in("ResultStore.save", spooled))
    assert info.message == spooled.message and info.generation_id == "G"
