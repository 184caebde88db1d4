import json
import logging

from authz import logs


def test_redact_masks_credentials_and_query_strings():
    headers = {
        "x-api-key": "k1",
        "Authorization": "Bearer t",
        "cookie": "c",
        "x-my-key": "k2",
        "x-refresh-token": "t2",
        ":path": "/v1/orders?x-api-key=k3",
        "user-agent": "curl",
    }
    redacted = logs.redact(headers, frozenset({"x-my-key"}))
    assert redacted == {
        "x-api-key": "***",
        "Authorization": "***",
        "cookie": "***",
        "x-my-key": "***",
        "x-refresh-token": "***",
        ":path": "/v1/orders?***",
        "user-agent": "curl",
    }


def test_json_formatter_writes_one_object_per_line():
    record = logging.LogRecord("authz.x", logging.INFO, __file__, 1, "denied: %s", ("unknown_key",), None)
    entry = json.loads(logs.JsonFormatter().format(record))
    assert (entry["level"], entry["logger"], entry["msg"]) == ("info", "authz.x", "denied: unknown_key")
    assert entry["severity"] == "INFO"  # what Cloud Logging reads


def test_json_severity_uses_cloud_loggings_names():
    for level, severity in ((logging.DEBUG, "DEBUG"), (logging.WARNING, "WARNING"), (logging.ERROR, "ERROR")):
        record = logging.LogRecord("authz.x", level, __file__, 1, "m", (), None)
        assert json.loads(logs.JsonFormatter().format(record))["severity"] == severity


def test_setup_configures_the_authz_logger_tree():
    logger = logging.getLogger("authz")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    try:
        logs.setup("debug", json_lines=True)
        assert logger.level == logging.DEBUG
        assert isinstance(logger.handlers[0].formatter, logs.JsonFormatter)
        assert logger.propagate is False
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved
