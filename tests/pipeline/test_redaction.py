"""Redaction: secret values in mappings, URLs and log records never show."""

from __future__ import annotations

import logging

import pytest

from pipeline.redaction import SecretFilter, redact, redact_url, remember_secrets


def test_redact_replaces_secret_values_in_nested_copy() -> None:
    options = {
        "key": "AKIAEXAMPLE",
        "secret": "s3cr3t-value",
        "client_kwargs": {"endpoint_url": "http://h:1", "aws_session_token": "tok-123456"},
        "profiles": [{"password": "hunter2-long"}, {"name": "x"}],
        "token": None,
    }
    out = redact(options)
    assert out["key"] == out["secret"] == "***"
    assert out["client_kwargs"] == {"endpoint_url": "http://h:1", "aws_session_token": "***"}
    assert out["profiles"] == [{"password": "***"}, {"name": "x"}]
    assert out["token"] is None
    assert options["secret"] == "s3cr3t-value"  # the input is untouched


def test_redact_url_hides_userinfo_and_signatures() -> None:
    url = "https://user:pw@host/p/a.tar?X-Amz-Signature=abc&part=1"
    assert redact_url(url) == "https://***@host/p/a.tar?X-Amz-Signature=%2A%2A%2A&part=1"
    assert redact_url("s3://bucket/key") == "s3://bucket/key"


def test_secret_filter_scrubs_log_records(caplog: pytest.LogCaptureFixture) -> None:
    remember_secrets({"secret": "very-secret-string-1"})
    log = logging.getLogger("tests.storage.filter")
    secret_filter = SecretFilter(extra_secrets=["another-secret-2"])
    caplog.handler.addFilter(secret_filter)
    try:
        with caplog.at_level(logging.INFO, logger="tests.storage.filter"):
            log.info("using %s and %s", "very-secret-string-1", "another-secret-2")
    finally:
        caplog.handler.removeFilter(secret_filter)
    assert caplog.messages == ["using *** and ***"]
