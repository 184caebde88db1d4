import io
import logging
import re

import pytest

from authz import cli
from authz.decision.authorize import key_digest
from tests.support.catalogs import catalog_yaml, config_yaml


@pytest.fixture(autouse=True)
def restore_logging():
    """cli.main configures the authz logger; give it back as it was so caplog works in later tests."""
    logger = logging.getLogger("authz")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


def test_keys_new_prints_a_key_and_its_catalog_line(capsys):
    assert cli.main(["keys", "new"]) == 0
    out = capsys.readouterr().out
    key = re.search(r"it is not stored anywhere\): (\S+)", out).group(1)
    assert re.fullmatch(r"[A-Za-z0-9]{40}", key)
    assert f'- key_sha256: "{key_digest(key)}"' in out
    assert cli.new_key() != cli.new_key()


def test_keys_hash_reads_stdin(capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("abc\n\n"))
    assert cli.main(["keys", "hash"]) == 0
    assert capsys.readouterr().out == f'- key_sha256: "{key_digest("abc")}"\n'


def test_check_config_prints_effective_config(tmp_path, capsys):
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(catalog_yaml())
    config = tmp_path / "config.yaml"
    config.write_text(config_yaml(str(catalog)))
    assert cli.main(["check-config", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "# catalog: 2 products, 3 credentials" in out
    assert "org_name: org" in out


def test_check_config_bad_catalog_exits_2_naming_file_and_key(tmp_path, capsys):
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text("products: [{name: p, enviroments: [x]}]\n")
    config = tmp_path / "config.yaml"
    config.write_text(config_yaml(str(catalog)))
    assert cli.main(["check-config", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err == f"authz: {catalog}: products[0].enviroments: unknown key (did you mean 'environments'?)\n"


def test_serve_with_missing_config_exits_2(tmp_path, capsys):
    assert cli.main(["serve", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_check_config_reads_the_policy_secret_directory(tmp_path, capsys):
    from tests.support.apigee_config import apigee_config_yaml, write_policy_secret

    secret = write_policy_secret(tmp_path / "policy-secret")
    config = tmp_path / "config.yaml"
    config.write_text(apigee_config_yaml("https://apigee.example.com/remote-service", str(tmp_path)))
    assert cli.main(["check-config", "-c", str(config), "--policy-secret", str(secret.directory)]) == 0
    out = capsys.readouterr().out
    assert f"kid: '{secret.kid}'" in out
    assert "private_key_pem: '***'" in out
    assert "remote_token_jwks_url: https://apigee.example.com/remote-token/certs" in out
    assert "BEGIN PRIVATE KEY" not in out


def test_check_config_reads_the_analytics_secret_directory(tmp_path, capsys, monkeypatch):
    from tests.support.apigee_config import (
        apigee_config_yaml,
        new_service_account,
        write_analytics_secret,
        write_policy_secret,
    )

    secret = write_policy_secret(tmp_path / "policy-secret")
    account = new_service_account("https://oauth2.googleapis.com/token")
    analytics = write_analytics_secret(tmp_path / "analytics-secret", account).parent
    config = tmp_path / "config.yaml"
    config.write_text(apigee_config_yaml("https://apigee.example.com/remote-service", str(tmp_path)))
    argv = ["check-config", "-c", str(config), "-p", str(secret.directory)]
    assert cli.main([*argv, "--analytics-secret", str(analytics)]) == 0
    out = capsys.readouterr().out
    assert "analytics_secret: '***'" in out
    assert "management_api: https://apigee.googleapis.com" in out
    assert account.client_email not in out and "PRIVATE KEY" not in out
    monkeypatch.setenv("AUTHZ_ANALYTICS_SECRET", str(tmp_path / "absent"))
    assert cli.main(argv) == 2
    assert "absent/client_secret.json: not found" in capsys.readouterr().err


def test_check_config_without_policy_secret_exits_2(tmp_path, capsys, monkeypatch):
    from tests.support.apigee_config import apigee_config_yaml

    monkeypatch.delenv("AUTHZ_POLICY_SECRET", raising=False)
    config = tmp_path / "config.yaml"
    config.write_text(apigee_config_yaml("https://apigee.example.com/remote-service", str(tmp_path)))
    assert cli.main(["check-config", "-c", str(config), "-p", str(tmp_path / "absent")]) == 2
    assert "signed with the provisioned key" in capsys.readouterr().err
