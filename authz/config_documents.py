"""The documents of a config file: plain YAML, or the Kubernetes stream that the CLI's provision prints.

Splits a stream into the adapter config mapping, the policy Secret (the provisioned signing key) and the
analytics Secret, decoding base64 and checking each entry's shape. Duplicate YAML keys are errors, as in
Go's yaml.v3. Imports only the standard library, ``yaml`` and ``authz.errors``.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import yaml

from authz.errors import ConfigError

_KINDS = {bool: "boolean", int: "integer", float: "number", str: "string", dict: "mapping", list: "list"}


def kind_name(value: object) -> str:
    """The YAML-ish name of a value's type, for error messages."""
    return "null" if value is None else _KINDS.get(type(value), type(value).__name__)


@dataclass(frozen=True)
class PolicySecret:
    """The provisioned signing key: ``kid`` from remote-service.properties, PEM key, JWKS JSON."""

    kid: str
    private_key_pem: str = field(repr=False)
    jwks: str = field(repr=False)


class _StrictLoader(yaml.SafeLoader):
    """A SafeLoader that rejects duplicate keys, as Go's yaml.v3 does (PyYAML keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key '{key_node.value}'", key_node.start_mark
                    )
                seen.add(key_node.value)
        return super().construct_mapping(node, deep)


def _parse_yaml(file: str, key: str, text: str) -> list[object]:
    try:
        return list(yaml.load_all(text, Loader=_StrictLoader))  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(file, key, f"invalid YAML{where}: {exc.problem or exc.context}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(file, key, f"invalid YAML: {exc}") from exc


_POLICY_ENTRIES = ("remote-service.crt", "remote-service.key", "remote-service.properties")


def split_documents(file: str, text: str) -> tuple[object, PolicySecret | None, str | None]:
    """Return (config mapping, policy secret, analytics JSON) from a plain or Kubernetes stream."""
    docs = [d for d in _parse_yaml(file, "", text) if d is not None]
    if not docs:
        raise ConfigError(file, "", "empty config file")
    k8s = [d for d in docs if isinstance(d, dict) and "kind" in d and "apiVersion" in d]
    if not k8s:
        if len(docs) > 1:
            raise ConfigError(file, "", f"{len(docs)} YAML documents but no Kubernetes ConfigMap")
        return docs[0], None, None
    configs: list[tuple[str, object]] = []
    policy: PolicySecret | None = None
    analytics: str | None = None
    for doc in k8s:
        metadata = doc.get("metadata")
        name = str(metadata.get("name", "")) if isinstance(metadata, dict) else ""
        where, data = f"{doc['kind']}/{name}", doc.get("data") or {}
        if doc["kind"] not in ("ConfigMap", "Secret"):
            continue
        if not isinstance(data, dict):
            raise ConfigError(file, f"{where} data", f"expected a mapping, got {kind_name(data)}")
        if doc["kind"] == "ConfigMap" and "config.yaml" in data:
            configs.append((f"{where} data.config.yaml", data["config.yaml"]))
        elif doc["kind"] == "Secret" and "policy" in name:
            policy = _policy_secret(file, where, data)
        elif doc["kind"] == "Secret" and "analytics" in name:
            analytics = _secret_text(file, where, data, ANALYTICS_ENTRY)
            _json_object(file, f"{where} data.{ANALYTICS_ENTRY}", analytics)
    if len(configs) != 1:
        raise ConfigError(file, "", f"expected one ConfigMap with data.config.yaml, found {len(configs)}")
    key, inner = configs[0]
    if not isinstance(inner, str):
        raise ConfigError(file, key, f"expected a string, got {kind_name(inner)}")
    inner_docs = [d for d in _parse_yaml(file, key, inner) if d is not None]
    if len(inner_docs) != 1:
        raise ConfigError(file, key, f"expected one YAML document, found {len(inner_docs)}")
    return inner_docs[0], policy, analytics


def _secret_text(file: str, where: str, data: dict[Any, Any], entry: str) -> str:
    key, value = f"{where} data.{entry}", data.get(entry)
    if not isinstance(value, str):
        raise ConfigError(file, key, f"expected a base64 string, got {kind_name(value)}")
    try:
        return base64.b64decode("".join(value.split()), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise ConfigError(file, key, "not valid base64-encoded UTF-8 text") from None


def _policy_secret(file: str, where: str, data: dict[Any, Any]) -> PolicySecret | None:
    missing = [e for e in _POLICY_ENTRIES if e not in data]
    if len(missing) == len(_POLICY_ENTRIES):
        return None
    if missing:
        needed = ", ".join(_POLICY_ENTRIES)
        raise ConfigError(file, f"{where} data", f"needs all of {needed}; missing {', '.join(missing)}")
    jwks, pem, properties = (_secret_text(file, where, data, e) for e in _POLICY_ENTRIES)
    return _checked_policy(file, f"{where} data.", jwks, pem, properties)


def policy_secret_dir(directory: str) -> PolicySecret | None:
    """The policy secret mounted as files (the Go adapter's ``--policy-secret``, default /policy-secret).

    None when the directory holds none of the files; a partial or malformed set is a ConfigError that names
    the file.
    """
    paths = [os.path.join(directory, entry) for entry in _POLICY_ENTRIES]
    present = [p for p in paths if os.path.isfile(p)]
    if not present:
        return None
    if len(present) < len(paths):
        missing = ", ".join(os.path.basename(p) for p in paths if p not in present)
        raise ConfigError(
            directory, "", f"policy secret needs all of {', '.join(_POLICY_ENTRIES)}; missing {missing}"
        )
    texts = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as stream:
                texts.append(stream.read())
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(path, "", f"cannot read: {getattr(exc, 'strerror', None) or exc}") from None
    jwks, pem, properties = texts
    return _checked_policy(directory, "", jwks, pem, properties, directory=True)


ANALYTICS_ENTRY = "client_secret.json"


def analytics_secret_dir(directory: str, required: bool) -> str | None:
    """The analytics service-account JSON mounted as ``{directory}/client_secret.json`` (the Go adapter's
    ``--analytics-secret``, default /analytics-secret).

    None when the file is absent and not ``required``; a missing required file, or one that is not a JSON
    object, is a ConfigError that names the file.
    """
    path = os.path.join(directory, ANALYTICS_ENTRY)
    if not os.path.isfile(path):
        if required:
            raise ConfigError(
                path, "", "not found (the --analytics-secret directory needs client_secret.json)"
            )
        return None
    try:
        with open(path, encoding="utf-8") as stream:
            text = stream.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(path, "", f"cannot read: {getattr(exc, 'strerror', None) or exc}") from None
    _json_object(path, "", text)
    return text


def _checked_policy(
    file: str, prefix: str, jwks: str, pem: str, properties: str, *, directory: bool = False
) -> PolicySecret:
    """Check the three entries; errors name ``{dir}/{entry}`` for a directory, else ``{prefix}{entry}``."""

    def at(entry: str) -> tuple[str, str]:
        return (os.path.join(file, entry), "") if directory else (file, f"{prefix}{entry}")

    kid = re.search(r"^[ \t]*kid[ \t]*[=:][ \t]*(\S+)", properties, re.MULTILINE)  # Java properties
    if kid is None:
        raise ConfigError(*at("remote-service.properties"), "no kid= entry")
    if "-----BEGIN" not in pem or "PRIVATE KEY-----" not in pem:
        raise ConfigError(*at("remote-service.key"), "not a PEM private key")
    if not isinstance(_json_object(*at("remote-service.crt"), jwks).get("keys"), list):
        raise ConfigError(*at("remote-service.crt"), 'not a JWKS (no "keys" list)')
    return PolicySecret(kid=kid[1], private_key_pem=pem, jwks=jwks)


def _json_object(file: str, key: str, text: str) -> dict[str, object]:
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise ConfigError(file, key, "not a JSON object")
    return value
