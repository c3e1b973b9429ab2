"""The one mapping from exceptions to API answers (``serve.ingress.errors``): statuses, codes, what a client is told,
and which failures the ingress retries, at any depth of a chain of deployment calls."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError
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


class _StalledS3:
    """An S3 client whose puts fail with ``error``; it records every call."""

    def __init__(self, error: BaseException) -> None:
        self.error = error
        self.calls: list[str] = []

    def put_object(self, **kwargs: object) -> None:
        self.calls.append("put")
        raise self.error

    def delete_object(self, **kwargs: object) -> None:
        self.calls.append("delete")


@pytest.mark.parametrize(
    ("error", "deletes"),
    [
        (ReadTimeoutError(endpoint_url="http://s3"), 0),
        (EndpointConnectionError(endpoint_url="http://s3"), 0),
        (
            ClientError({"Error": {"Code": "InternalError"}, "ResponseMetadata": {"HTTPStatusCode": 500}}, "PutObject"),
            1,
        ),
    ],
    ids=["stalled", "unreachable", "refused"],
)
def test_a_failed_upload_cleans_up_only_when_s3_answers(error: BaseException, deletes: int) -> None:
    """S3 that does not answer would make the cleanup wait out the same timeouts again before the client hears of
    the failure (a stall's 503 took 64-72 s): only an S3 that answered is asked to delete what was written."""
    import numpy as np

    from deployments.storage.generations import GenerationStore
    from deployments.storage.s3 import S3Settings

    client = _StalledS3(error)
    store = GenerationStore(client, S3Settings(bucket="stalled"))
    prepared = store.prepare("20261207T120000Z-0123456789abcdef", [np.zeros((8, 8, 3), np.uint8)], "png", 90, {})
    with pytest.raises(StorageError):
        store.upload(prepared)
    assert client.calls == ["put"] + ["delete"] * deletes
