"""``authz render envoy``: every flag value checked (exit 2 naming the flag), output that YAML reads as
meant, atomic ``--output``; and the template filling shared with devstack. Envoy itself validates the
rendered configs in tests/e2e/test_envoy_configs.py."""

from __future__ import annotations

import os
from typing import Any

import pytest
import yaml

from authz import cli
from authz.render import templates, values
from authz.render.templates import TemplateError, fill

HOSTILE = [
    'a"b',
    "a b",
    "a\nb",
    "{x}",
    "[x]",
    "x: y",
    "#x",
    "x,y",
    "a'b",
    "a\\b",
    "${X}",
    "*alias",
    "&anchor",
    "",
]


def render(*argv: str) -> str:
    """Run the CLI in-process, return stdout; the exit code must be 0."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["render", "envoy", *argv]) == 0
    return out.getvalue()


def config(*argv: str) -> dict[str, Any]:
    return yaml.safe_load(render(*argv))


def cluster(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in doc["static_resources"]["clusters"] if c["name"] == name)


def endpoint(c: dict[str, Any]) -> dict[str, Any]:
    return c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]


def hcm(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def refused(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """The CLI must refuse ``argv`` with exit code 2; returns its stderr."""
    try:
        code = cli.main(["render", "envoy", *argv])
    except SystemExit as exc:  # argparse refuses a bad value itself
        code = exc.code
    assert code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    return captured.err


# -- values -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["0", "65536", "-1", "abc", " 80", "80 ", "", "1e3", "٣"])
def test_bad_ports_are_refused(text):
    with pytest.raises(ValueError, match="is not a port"):
        values.port(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("250ms", "0.25s"),
        ("1s", "1s"),
        ("1.5s", "1.5s"),
        ("2m", "120s"),
        ("0.001s", "0.001s"),
        ("60m", "3600s"),
    ],
)
def test_durations_become_protobuf_durations(text, expected):
    assert values.duration(text) == expected


@pytest.mark.parametrize(
    "text", ["250", "0s", "0ms", "61m", "1h", "1e3s", "-1s", "1 s", "s", "1.5ms.", "0.0000000001s", "٣s"]
)
def test_bad_durations_are_refused(text):
    with pytest.raises(ValueError):
        values.duration(text)


@pytest.mark.parametrize(
    "text", [*HOSTILE, "-bad.example", "bad-.example", "a..b", "x" * 64, "a." * 127 + "b", "::1"]
)
def test_hostile_or_malformed_hosts_are_refused(text):
    with pytest.raises(ValueError):
        values.host_port(f"{text}:5000")


@pytest.mark.parametrize(
    ("text", "host", "port", "cluster_type"),
    [
        ("10.0.0.5:5000", "10.0.0.5", 5000, "STATIC"),
        ("[fd00::5]:5000", "fd00::5", 5000, "STATIC"),
        (
            "apigee-authz.apigee.svc.cluster.local:5000",
            "apigee-authz.apigee.svc.cluster.local",
            5000,
            "STRICT_DNS",
        ),
        ("localhost:1", "localhost", 1, "STRICT_DNS"),
    ],
)
def test_host_ports_pick_the_cluster_type(text, host, port, cluster_type):
    parsed = values.host_port(text)
    assert (parsed.host, parsed.port, parsed.cluster_type) == (host, port, cluster_type)
    assert str(parsed) == text


def test_ipv6_needs_brackets_and_binds_need_ips():
    with pytest.raises(ValueError, match="brackets"):
        values.host_port("fd00::5:5000")
    with pytest.raises(ValueError, match="not an IP address"):
        values.ip_port("envoy.local:8080")
    with pytest.raises(ValueError, match="not an IPv6 address"):
        values.host_port("[10.0.0.1]:80")


@pytest.mark.parametrize("text", [*HOSTILE, "a@b", "a=b", "-x", "x" * 256, "a/b", "é"])
def test_hostile_api_names_are_refused(text):
    with pytest.raises(ValueError, match="not an API name"):
        values.api_name(text)


@pytest.mark.parametrize("text", ["orders-api", "httpbin.org", "a", "Orders_API.v2:1~x"])
def test_api_names_of_apigee_and_targets_pass(text):
    assert values.api_name(text) == text


@pytest.mark.parametrize(
    "text", [*HOSTILE, "orders", "/a?b", "/a#b", "/a//b", "/a=b", "/a b", "/%zz", "/" + "a" * 1024]
)
def test_hostile_paths_are_refused(text):
    with pytest.raises(ValueError, match="not a path"):
        values.path(text)


@pytest.mark.parametrize(("text", "expected"), [("/orders", "/orders"), ("/orders/", "/orders"), ("/", "/")])
def test_prefixes_drop_a_trailing_slash(text, expected):
    assert values.prefix(text) == expected


@pytest.mark.parametrize("text", ["/a", "/a=b", "/a=b@", "a=b@h:1", "/a=b c@h:1", "/a=b@h", "=b@h:1"])
def test_malformed_routes_are_refused(text):
    with pytest.raises(ValueError):
        values.route(text)


@pytest.mark.parametrize(
    "text",
    ['https://a"b/x', "ftp://h/x", "javascript:alert(1)", "https:///x", "https://u:p@h/x", "https://h:99999/x",
     "https://h/x y", "https://h/{x}", "https://h/\\x", "h/x", ""],
)  # fmt: skip
def test_bad_urls_are_refused(text):
    with pytest.raises(ValueError):
        values.url(text)


def test_urls_give_the_cluster_host_port_and_tls():
    parsed = values.url("https://api.example.com/remote-token/certs")
    assert (parsed.https, parsed.upstream.host, parsed.upstream.port) == (True, "api.example.com", 443)
    assert values.url("http://127.0.0.1:9000/certs").upstream == values.HostPort("127.0.0.1", 9000)


# -- the CLI refuses with exit 2 and the flag's name ---------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--authz", "10.0.0.5:0"),
        ("--authz", 'evil"host:5000'),
        ("--authz", "a\nb:5000"),
        ("--upstream", "x y:80"),
        ("--listen", "envoy.local:8080"),
        ("--admin", "127.0.0.1:70000"),
        ("--timeout", "250"),
        ("--timeout", "0s"),
        ("--health-interval", "soon"),
        ("--max-concurrent-streams", "0"),
        ("--max-concurrent-streams", str(2**31)),
        ("--api", "orders}\n  evil: true"),
        ("--route", "/a=b"),
        ("--health-path", "/x\ny"),
        ("--jwt-issuer", 'https://h/"x'),
        ("--jwks-uri", "file:///etc/passwd"),
        ("--metrics-port", "0"),
        ("--ca-file", "relative.pem"),
    ],
)
def test_bad_values_exit_2_naming_the_flag(capsys, flag, value):
    err = refused(capsys, flag, value)
    assert f"argument {flag}:" in err


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--route", "/a=x@h:1"], "--route"),
        (["--variant", "gateway"], "--route"),
        (["--variant", "gateway", "--route", "/a=x@h:1", "--route", "/a/=y@h:2"], "--route"),
        (["--variant", "gateway", "--route", "/a=x@h:1", "--api", "y"], "--api"),
        (["--variant", "gateway", "--route", "/a=x@h:1", "--upstream", "h:2"], "--upstream"),
        (["--health-path", "/up"], "--health-path"),
        (["--variant", "sidecar-http"], "--authz-http"),
        (["--authz-http", "h:5002"], "--authz-http"),
        (["--metadata-headers"], "--metadata-headers"),
        (["--variant", "jwt-authn"], "--jwt-issuer"),
        (["--variant", "jwt-authn", "--jwt-issuer", "https://h/t"], "--jwks-uri"),
        (
            ["--variant", "jwt-authn", "--apigee-runtime", "https://h", "--jwks-uri", "https://h/c"],
            "--apigee-runtime",
        ),
        (["--apigee-runtime", "https://h"], "--apigee-runtime"),
    ],
)
def test_flags_that_do_not_fit_the_variant_exit_2_naming_the_flag(capsys, argv, flag):
    err = refused(capsys, *argv)
    assert err.startswith(f"authz render envoy: error: {flag}: ")


# -- what the output means ---------------------------------------------------------------------------


def test_the_default_sidecar_is_for_cloud_run():
    doc = config("--authz", "10.128.0.50:5000", "--api", "orders-api")
    listener = doc["static_resources"]["listeners"][0]["address"]["socket_address"]
    assert listener == {"address": "0.0.0.0", "port_value": 8080}
    assert doc["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 9901}
    authz = cluster(doc, "authz")
    assert authz["type"] == "STATIC"
    assert endpoint(authz) == {"address": "10.128.0.50", "port_value": 5000}
    assert endpoint(cluster(doc, "upstream")) == {"address": "127.0.0.1", "port_value": 8888}
    options = authz["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    assert options["explicit_http_config"]["http2_protocol_options"] == {"max_concurrent_streams": 100}
    assert authz["health_checks"][0]["interval"] == "5s"
    thresholds = authz["circuit_breakers"]["thresholds"][0]
    assert thresholds["max_requests"] == 1000 and thresholds["max_pending_requests"] == 1000
    # /v1/orders/../admin must not be checked as /v1/orders/** and then reach /v1/admin
    assert hcm(doc)["normalize_path"] is True and hcm(doc)["merge_slashes"] is True
    assert hcm(doc)["path_with_escaped_slashes_action"] == "UNESCAPE_AND_REDIRECT"
    ext_authz = hcm(doc)["http_filters"][0]["typed_config"]
    assert ext_authz["failure_mode_allow"] is False
    assert ext_authz["status_on_error"] == {"code": 503}
    assert ext_authz["grpc_service"]["timeout"] == "1s"
    per_route = hcm(doc)["route_config"]["virtual_hosts"][0]["routes"][0]["typed_per_filter_config"]
    settings = per_route["envoy.filters.http.ext_authz"]["check_settings"]
    assert settings == {"context_extensions": {"apigee_api": "orders-api"}}


def test_dns_names_get_strict_dns_clusters():
    doc = config(
        "--authz",
        "apigee-authz.apigee.svc.cluster.local:5000",
        "--upstream",
        "app:8080",
        "--timeout",
        "250ms",
    )
    assert cluster(doc, "authz")["type"] == "STRICT_DNS"
    assert endpoint(cluster(doc, "authz"))["address"] == "apigee-authz.apigee.svc.cluster.local"
    assert cluster(doc, "upstream")["type"] == "STRICT_DNS"
    assert hcm(doc)["http_filters"][0]["typed_config"]["grpc_service"]["timeout"] == "0.25s"


def test_ipv6_addresses_stay_strings():
    doc = config("--listen", "[::]:8080", "--authz", "[fd00::5]:5000")
    assert doc["static_resources"]["listeners"][0]["address"]["socket_address"]["address"] == "::"
    assert endpoint(cluster(doc, "authz"))["address"] == "fd00::5"


def test_gateway_routes_prefixes_to_upstreams_with_their_api():
    doc = config(
        "--variant", "gateway",
        "--route", "/orders=orders-api@orders.internal:8080",
        "--route", "/orders/v2/=orders-v2@orders.internal:8080",
        "--route", "/=web@127.0.0.1:8888",
        "--health-path", "/up",
    )  # fmt: skip
    routes = hcm(doc)["route_config"]["virtual_hosts"][0]["routes"]
    health = routes[0]
    assert health["match"] == {"path": "/up"}
    assert health["typed_per_filter_config"]["envoy.filters.http.ext_authz"]["disabled"] is True
    assert health["direct_response"]["status"] == 200
    table = [
        (
            r["match"],
            r["route"]["cluster"],
            r["typed_per_filter_config"]["envoy.filters.http.ext_authz"]["check_settings"][
                "context_extensions"
            ],
        )
        for r in routes[1:]
    ]
    assert table == [  # longest prefix first; one cluster per distinct upstream
        (
            {"path_separated_prefix": "/orders/v2"},
            "upstream_orders_internal_8080",
            {"apigee_api": "orders-v2"},
        ),
        ({"path_separated_prefix": "/orders"}, "upstream_orders_internal_8080", {"apigee_api": "orders-api"}),
        ({"prefix": "/"}, "upstream_127_0_0_1_8888", {"apigee_api": "web"}),
    ]
    names = [c["name"] for c in doc["static_resources"]["clusters"]]
    assert names == ["authz", "upstream_orders_internal_8080", "upstream_127_0_0_1_8888"]
    assert cluster(doc, "upstream_orders_internal_8080")["type"] == "STRICT_DNS"
    assert cluster(doc, "upstream_127_0_0_1_8888")["type"] == "STATIC"
    assert hcm(doc)["normalize_path"] is True and hcm(doc)["merge_slashes"] is True


def test_sidecar_http_checks_over_http_and_copies_the_context_only_when_asked():
    doc = config("--variant", "sidecar-http", "--authz", "authz.internal:5000", "--authz-http", "10.0.0.5:5002",
                 "--api", "orders-api")  # fmt: skip
    assert endpoint(cluster(doc, "authz_http")) == {"address": "10.0.0.5", "port_value": 5002}
    assert cluster(doc, "authz_http")["type"] == "STATIC"
    assert cluster(doc, "authz")["type"] == "STRICT_DNS"
    health_port = cluster(doc, "authz_http")["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert health_port["health_check_config"] == {"port_value": 5001}
    http_service = hcm(doc)["http_filters"][0]["typed_config"]["http_service"]
    assert http_service["authorization_request"]["headers_to_add"] == [
        {"key": "x-authz-context-apigee-api", "value": "orders-api"}
    ]
    copied = http_service["authorization_response"]["allowed_upstream_headers"]["patterns"]
    assert copied == [{"exact": "x-authz-copy-nothing"}]
    with_headers = config("--variant", "sidecar-http", "--authz-http", "10.0.0.5:5002", "--metadata-headers")
    response = hcm(with_headers)["http_filters"][0]["typed_config"]["http_service"]["authorization_response"]
    names = {p["exact"] for p in response["allowed_upstream_headers"]["patterns"]}
    assert "x-apigee-api" in names and "x-apigee-clientid" in names
    assert "x-apigee-accesstoken" not in names  # never upstream (Go adapter issue #376)


def test_jwt_authn_for_apigee_fetches_the_jwks_over_checked_tls():
    doc = config("--variant", "jwt-authn", "--apigee-runtime", "https://api.example.com/")
    jwt_authn = hcm(doc)["http_filters"][0]["typed_config"]
    issuer = "https://api.example.com/remote-token/token"
    provider = jwt_authn["providers"][issuer]  # the provider key is what `provision` sets jwt_provider_key to
    assert provider["issuer"] == issuer
    assert provider["payload_in_metadata"] == issuer
    assert provider["audiences"] == ["remote-service-client"]
    assert provider["remote_jwks"]["http_uri"]["uri"] == "https://api.example.com/remote-token/certs"
    jwks = cluster(doc, "jwks")
    assert jwks["type"] == "STRICT_DNS"
    assert endpoint(jwks) == {"address": "api.example.com", "port_value": 443}
    tls = jwks["transport_socket"]["typed_config"]
    assert tls["sni"] == "api.example.com"
    validation = tls["common_tls_context"]["validation_context"]
    assert validation["trusted_ca"] == {"filename": "/etc/ssl/certs/ca-certificates.crt"}
    assert validation["match_typed_subject_alt_names"] == [
        {"san_type": "DNS", "matcher": {"exact": "api.example.com"}}
    ]


def test_jwt_authn_with_a_local_http_jwks():
    doc = config("--variant", "jwt-authn", "--jwt-issuer", "http://127.0.0.1:9000/token",
                 "--jwks-uri", "http://127.0.0.1:9000/certs", "--jwt-provider", "apigee")  # fmt: skip
    assert "apigee" in hcm(doc)["http_filters"][0]["typed_config"]["providers"]
    jwks = cluster(doc, "jwks")
    assert jwks["type"] == "STATIC"
    assert jwks["transport_socket"]["name"] == "envoy.transport_sockets.raw_buffer"


# -- --output and --templates --------------------------------------------------------------------------


def test_output_is_written_atomically(tmp_path, capsys):
    out = tmp_path / "envoy.yaml"
    out.write_text("old config\n")
    assert cli.main(["render", "envoy", "--api", "orders-api", "--output", str(out)]) == 0
    assert capsys.readouterr().out == ""
    assert yaml.safe_load(out.read_text())["admin"]
    assert os.stat(out).st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["envoy.yaml"]  # no temporary file left


def test_output_into_a_missing_directory_exits_2(tmp_path, capsys):
    err = refused(capsys, "--output", str(tmp_path / "missing" / "envoy.yaml"))
    assert err.startswith("authz render envoy: error: --output: ")
    assert not (tmp_path / "missing").exists()


def test_a_bad_value_leaves_the_existing_output_alone(tmp_path, capsys):
    out = tmp_path / "envoy.yaml"
    out.write_text("old config\n")
    refused(capsys, "--variant", "gateway", "--output", str(out))
    assert out.read_text() == "old config\n"


def test_templates_come_from_the_environment(tmp_path, monkeypatch, capsys):
    (tmp_path / "sidecar.yaml").write_text("listen: ${LISTEN_ADDRESS}:${LISTEN_PORT}\n")
    monkeypatch.setenv("AUTHZ_ENVOY_TEMPLATES", str(tmp_path))
    assert render("--listen", "10.0.0.1:80").endswith("listen: 10.0.0.1:80\n")
    err = refused(capsys, "--variant", "gateway", "--route", "/a=x@h:1")
    assert err.startswith("authz render envoy: error: --templates: cannot read gateway.yaml")


def test_a_template_with_an_unknown_placeholder_exits_2(tmp_path, monkeypatch, capsys):
    (tmp_path / "sidecar.yaml").write_text("x: ${NOT_A_VARIABLE}\n")
    err = refused(capsys, "--templates", str(tmp_path))
    assert "no value for ${NOT_A_VARIABLE}" in err


# -- fill ------------------------------------------------------------------------------------------------


def test_fill_indents_a_block_value_to_its_line():
    text = "routes:\n  - first\n  ${ROUTES}\nend: ${END}\n"
    assert fill(text, {"ROUTES": "- a\n- b", "END": "x"}) == "routes:\n  - first\n  - a\n  - b\nend: x\n"


def test_fill_keeps_dollars_in_values_literal():
    assert fill("a: ${A}\n  ${B}\n", {"A": "$B", "B": "- $A\n- ${A}"}) == "a: $B\n  - $A\n  - ${A}\n"


def test_fill_names_the_missing_placeholder():
    with pytest.raises(TemplateError, match=r"t.yaml: no value for \$\{B\}") as caught:
        fill("a: ${A}\nb: $B\n", {"A": "1"}, "t.yaml")
    assert isinstance(caught.value, KeyError)  # devstack's callers catch KeyError


def test_per_route_and_context_values_quote_whatever_they_get():
    hostile = 'x", "evil": {"a'
    per_route = yaml.safe_load(templates.per_route_authz(hostile))
    assert per_route["envoy.filters.http.ext_authz"]["check_settings"]["context_extensions"] == {
        "apigee_api": hostile
    }
    assert yaml.safe_load(templates.context_headers(hostile)) == [
        {"key": "x-authz-context-apigee-api", "value": hostile}
    ]
    assert templates.per_route_authz(None) == "{}" and templates.context_headers(None) == "[]"
