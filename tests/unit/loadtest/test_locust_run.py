"""loadtest/locust_run.py: the command line, the Locust command it builds and the local catalog (no
processes started)."""

import hashlib
from pathlib import Path

import pytest

from loadtest import locust_run, locust_stack
from loadtest.locust_outcomes import DEFAULT_PATH, DEFAULT_QUOTA_PATH


def test_defaults_are_a_local_standalone_run_of_ten_users():
    args = locust_run.parse_args([])
    assert (args.host, args.apigee, args.users, args.duration) == (None, False, 10, 10.0)
    assert args.locust_args == []


def test_options_after_the_double_dash_go_to_locust():
    args = locust_run.parse_args(["--duration", "3", "--", "--authz-wrong-path", "/v1/items"])
    assert args.locust_args == ["--authz-wrong-path", "/v1/items"]
    argv = locust_run.locust_argv(args, "http://127.0.0.1:1", Path("/w/locust-stats.json"), Path("/w/t.json"))
    assert argv[-2:] == ["--authz-wrong-path", "/v1/items"]


@pytest.mark.parametrize(
    "argv",
    [
        ["--host", "http://x", "--apigee"],  # --apigee starts a local stack
        ["--host", "http://x", "--local"],
        ["--users", "0"],
        ["--duration", "0"],
        ["--authz-path", "/x"],  # a Locust option before --
    ],
)
def test_bad_command_lines_are_refused(argv):
    with pytest.raises(SystemExit) as exc:
        locust_run.parse_args(argv)
    assert exc.value.code == 2


def test_the_locust_command_is_headless_with_final_json_stats_and_the_tally_file():
    args = locust_run.parse_args(["--users", "20", "--spawn-rate", "5", "--duration", "2.5"])
    argv = locust_run.locust_argv(args, "http://h:8080", Path("/w/locust-stats.json"), Path("/w/tally.json"))
    assert Path(argv[0]).name == "locust"
    pairs = dict(zip(argv[1::2], argv[2::2], strict=False))
    assert "--headless" in argv
    assert pairs["-f"] == str(locust_run.LOCUSTFILE)
    assert argv[argv.index("--users") + 1] == "20"
    assert argv[argv.index("--spawn-rate") + 1] == "5"
    assert argv[argv.index("--run-time") + 1] == "3s"  # whole seconds, rounded up
    assert argv[argv.index("--host") + 1] == "http://h:8080"
    assert argv[argv.index("--json-file") + 1] == "/w/locust-stats"  # Locust adds .json
    assert argv[argv.index("--authz-outcomes-file") + 1] == "/w/tally.json"


def test_the_unique_token_pool_follows_users_and_duration_up_to_what_two_cores_can_send():
    small = locust_run.jwt_pool(locust_run.parse_args(["--users", "2", "--duration", "9"]))
    assert small == 2 * locust_run.TOKENS_PER_USER_SECOND * 10
    capped = locust_run.jwt_pool(locust_run.parse_args(["--users", "500", "--duration", "9"]))
    assert capped == locust_run.TOKENS_PER_SECOND_MAX * 10
    assert locust_run.jwt_pool(locust_run.parse_args(["--jwt-pool", "7"])) == 7


def test_a_deployment_target_takes_its_quota_from_the_flags():
    args = locust_run.parse_args(
        ["--host", "https://run.example/", "--quota-limit", "100", "--quota-slack", "3"]
    )
    target = locust_run.remote_target(args)
    assert (target.url, target.env) == ("https://run.example", {})
    assert (target.quota_limit, target.quota_window, target.quota_slack) == (100, 60.0, 3)
    unchecked = locust_run.remote_target(locust_run.parse_args(["--host", "https://run.example"]))
    assert unchecked.quota_limit is None


def test_the_local_catalog_grants_each_key_only_its_own_product():
    catalog = locust_stack.catalog("valid", "quota", quota_limit=7)
    products = {product["name"]: product for product in catalog["products"]}
    configs = {name: p["operationGroup"]["operationConfigs"][0] for name, p in products.items()}
    assert configs[locust_stack.PRODUCT]["operations"][0]["resource"] == DEFAULT_PATH
    assert "quota" not in configs[locust_stack.PRODUCT]
    assert configs[locust_stack.QUOTA_PRODUCT]["operations"][0]["resource"] == DEFAULT_QUOTA_PATH
    assert configs[locust_stack.QUOTA_PRODUCT]["quota"] == {
        "limit": "7",
        "interval": "1",
        "timeUnit": "minute",
    }
    apps = {app["name"]: app for app in catalog["developers"][0]["apps"]}
    assert apps["loadtest-app"]["products"] == [locust_stack.PRODUCT]
    assert apps["loadtest-quota-app"]["products"] == [locust_stack.QUOTA_PRODUCT]
    digest = apps["loadtest-app"]["credentials"][0]["key_sha256"]
    assert digest == hashlib.sha256(b"valid").hexdigest()  # the key itself is never written
    keys = {key.key: key.products for key in locust_stack.fake_keys("valid", "quota")}
    assert keys == {"valid": (locust_stack.PRODUCT,), "quota": (locust_stack.QUOTA_PRODUCT,)}


def fake_locust(tmp_path, monkeypatch, body):
    """Stand a shell script in for the locust executable."""
    script = tmp_path / "locust"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    monkeypatch.setattr(locust_run, "locust_binary", lambda: str(script))
    return locust_run.remote_target(locust_run.parse_args(["--host", "http://127.0.0.1:9"]))


def test_a_locust_that_overruns_is_stopped_by_pid_and_the_run_fails(tmp_path, monkeypatch):
    pid_file = tmp_path / "pid"
    target = fake_locust(tmp_path, monkeypatch, f"echo $$ > {pid_file}\nexec sleep 30")
    monkeypatch.setattr(locust_run, "LOCUST_EXTRA_TIME", 0.0)
    args = locust_run.parse_args(["--host", target.url, "--duration", "0.3"])
    with pytest.raises(locust_run.RunError, match="did not finish within"):
        locust_run.run_locust(args, target, tmp_path)
    pid = int(pid_file.read_text())
    assert not Path(f"/proc/{pid}").exists()  # stopped and reaped


def test_a_locust_that_fails_or_leaves_no_results_is_a_setup_error(tmp_path, monkeypatch):
    args = locust_run.parse_args(["--host", "http://127.0.0.1:9", "--duration", "5"])
    target = fake_locust(tmp_path, monkeypatch, "echo 'bad locustfile'\nexit 3")
    with pytest.raises(locust_run.RunError, match=r"exited with code 3(.|\n)*bad locustfile"):
        locust_run.run_locust(args, target, tmp_path)
    target = fake_locust(tmp_path, monkeypatch, "exit 1")  # failures, but no stats written
    with pytest.raises(locust_run.RunError, match="left no stats or tally"):
        locust_run.run_locust(args, target, tmp_path)
