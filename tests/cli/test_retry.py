"""Which failures are retried: connection trouble and 5xx yes; bad input and a server's refusal never."""

from __future__ import annotations

from types import SimpleNamespace

import httpx
import pytest
from mlflow.exceptions import MlflowException, RestException
from mlflow.protos.databricks_pb2 import ErrorCode

from torchcycle.errors import DataError
from torchcycle.retry import is_transient, server_refusal


def _state(err: BaseException) -> SimpleNamespace:
    def result():
        raise err

    return SimpleNamespace(result=result)


def _httpx_error(status: int, text: str) -> httpx.HTTPStatusError:
    request = httpx.Request("GET", "http://prefect-server:4200/api/flows")
    return httpx.HTTPStatusError(
        "refused", request=request, response=httpx.Response(status, text=text, request=request)
    )


# MLflow's client turns a non-JSON answer into this message (mlflow.utils.rest_utils.verify_rest_response)
HOST_403 = MlflowException(
    "API request to endpoint /api/2.0/mlflow/runs/create failed with error code 403 != 200. "
    "Response body: 'Invalid Host header - possible DNS rebinding attack detected'",
    error_code=ErrorCode.Value("PERMISSION_DENIED"),
)


@pytest.mark.parametrize(
    ("err", "refusal"),
    [
        (HOST_403, "403: Invalid Host header - possible DNS rebinding attack detected"),
        (
            RestException({"error_code": "UNAUTHENTICATED", "message": "You are not authenticated."}),
            "401: UNAUTHENTICATED: You are not authenticated.",
        ),
        (_httpx_error(401, '{"exception_message":"Unauthorized"}'), '401: {"exception_message":"Unauthorized"}'),
        (_httpx_error(503, "down for maintenance"), None),
        (_httpx_error(429, "slow down"), None),
        (MlflowException("API request to endpoint /x failed with exception Max retries exceeded"), None),  # 500
        (ConnectionError("refused"), None),
    ],
)
def test_refusals_are_told_apart_from_transient_trouble(err: BaseException, refusal: str | None) -> None:
    assert server_refusal(err) == refusal
    assert is_transient(None, None, _state(err)) is (refusal is None)


def test_bad_input_is_never_retried() -> None:
    assert is_transient(None, None, _state(DataError("bad column"))) is False
    assert is_transient(None, None, _state(FileNotFoundError("x"))) is False


def test_cli_exit_codes_for_prefect_answers() -> None:
    from torchcycle.cli import _tracking_failure

    assert _tracking_failure(_httpx_error(401, "Unauthorized"))[1] == 2
    assert _tracking_failure(_httpx_error(500, "Internal Server Error")) == (
        "the Prefect server failed (500); try again later",
        3,
    )
    down = httpx.ConnectError("connection refused")
    assert _tracking_failure(down)[1] == 3
