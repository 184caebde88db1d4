"""Apigee analytics records: built from an access-log entry or a denied Check, validated, written as NDJSON.

Field names, units and rules are the Go adapter's (golib ``analytics/record.go``, envoy
``server/accesslog.go``; reference ``apigee-adapter.md`` §3.4 and §6): timestamps are int epoch ms, the
``*`` fields are omitted when empty, custom attributes are ``dc.*``, and a record is one JSON object per
line with its keys in alphabetical order (the Go adapter marshals a map).

Pure: the standard library and the x-apigee-* key names of ``authz.decision.dynamic_metadata``. No
protobuf here; ``server/accesslog_codec.py`` turns Envoy's ``HTTPAccessLogEntry`` into the plain
``AccessEntry`` below. Callers supply the flow id (a UUIDv4) and the clock, so everything here is
deterministic.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from authz.decision.dynamic_metadata import (  # the x-apigee-* keys Check writes (stdlib-only module)
    ACCESS_TOKEN,
    ANALYTICS_PRODUCT,
    API,
    APPLICATION,
    CLIENT_ID,
    DEVELOPER_EMAIL,
    ENVIRONMENT,
    ORGANIZATION,
)

RECORD_TYPE: Final = "APIAnalytics"
API_PROXY_REVISION: Final = 0
GATEWAY_SOURCE: Final = "envoy"

ATTRIBUTE_PREFIX: Final = "dc."
MAX_ATTRIBUTES: Final = 100
MAX_ATTRIBUTE_BYTES: Final = 400

FUTURE_TOLERANCE_MS: Final = 60_000  # golib: "allow a minute of tolerance"
MAX_AGE_MS: Final = 90 * 24 * 3600 * 1000  # golib: "cannot be more than 90 days old"

# What validate() returns; bounded, so usable as a metrics ``reason`` label.
MISSING_ORG: Final = "missing_org"
MISSING_ENV: Final = "missing_env"
MISSING_FLOW_ID: Final = "missing_flow_id"
MISSING_TIMESTAMP: Final = "missing_timestamp"
BAD_TIMESTAMPS: Final = "bad_timestamps"
IN_FUTURE: Final = "in_future"
TOO_OLD: Final = "too_old"
INVALID_REASONS: Final = (
    MISSING_ORG,
    MISSING_ENV,
    MISSING_FLOW_ID,
    MISSING_TIMESTAMP,
    BAD_TIMESTAMPS,
    IN_FUTURE,
    TOO_OLD,
)

AttributeValue = str | int | float | bool


@dataclass(slots=True, kw_only=True)  # not frozen: a frozen __init__ costs about 1.5 µs per record here
class AccessEntry:
    """What one Envoy HTTP access-log entry tells us, in plain Python types.

    Durations are ms after ``start_ms`` and ``None`` when Envoy did not set them (no upstream was
    contacted, or the response was never sent). ``authz`` holds the string fields of the filter metadata
    ``envoy.filters.http.ext_authz`` (our ``x-apigee-*`` keys); ``data_capture`` the fields of
    ``envoy.filters.http.apigee.datacapture``. ``request_headers`` are the headers Envoy was configured to
    log (``additional_request_headers_to_log``), with lowercase names.
    """

    start_ms: int
    last_rx_ms: int | None = None
    first_upstream_tx_ms: int | None = None
    last_upstream_tx_ms: int | None = None
    first_upstream_rx_ms: int | None = None
    last_upstream_rx_ms: int | None = None
    first_downstream_tx_ms: int | None = None
    last_downstream_tx_ms: int | None = None
    method: str = ""
    path: str = ""  # with the query
    user_agent: str = ""
    forwarded_for: str = ""  # the x-forwarded-for header as Envoy logged it
    status: int = 0
    authz: Mapping[str, str] = field(default_factory=dict)
    data_capture: Mapping[str, AttributeValue] = field(default_factory=dict)
    request_headers: Mapping[str, str] = field(default_factory=dict)
    downstream_ip: str = ""


@dataclass(slots=True, kw_only=True)  # not frozen: a frozen __init__ costs about 1.5 µs per record here
class Record:
    """One Apigee analytics record, with the Go adapter's JSON field names.

    ``recordType``, ``apiproxy_revision`` and ``gateway_source`` are constants added by ``to_json_line``.
    Fields with a default are the Go adapter's ``omitempty`` ones (target timestamps: 0 when no upstream
    was contacted). ``attributes`` are the data-capture values; ``to_json_line`` prefixes, caps and
    filters them.
    """

    client_received_start_timestamp: int
    client_received_end_timestamp: int
    target_sent_start_timestamp: int = 0
    target_sent_end_timestamp: int = 0
    target_received_start_timestamp: int = 0
    target_received_end_timestamp: int = 0
    client_sent_start_timestamp: int
    client_sent_end_timestamp: int
    apiproxy: str
    request_uri: str
    request_path: str
    request_verb: str
    client_ip: str = ""
    useragent: str
    response_status_code: int
    developer_email: str = ""
    developer_app: str = ""
    access_token: str = ""
    client_id: str = ""
    api_product: str = ""
    organization: str
    environment: str
    gateway_flow_id: str
    attributes: Mapping[str, object] = field(default_factory=dict)


def first_forwarded_for(value: str) -> str:
    """The first (client-most) address of an ``x-forwarded-for`` value; ``""`` when there is none."""
    return value.partition(",")[0].strip()


def from_access(entry: AccessEntry, flow_id: str) -> Record | None:
    """The record for an access-log entry, or ``None`` when the entry is not ours.

    An entry is ours when it carries ``x-apigee-organization`` in the ext_authz metadata: our Check puts
    it on every allowed request. Denied requests carry none (Envoy drops a deny's dynamic metadata,
    Envoy #15031), so they are skipped here and recorded by Check itself (``denied``): no double count.

    Args:
        entry: the decoded access-log entry.
        flow_id: a fresh UUIDv4 string, the record's ``gateway_flow_id``.

    Returns:
        The record (not yet validated), or ``None``.
    """
    meta = entry.authz
    org = meta.get(ORGANIZATION)
    if org is None:
        return None
    start = entry.start_ms
    return Record(
        client_received_start_timestamp=start,
        client_received_end_timestamp=start + (entry.last_rx_ms or 0),
        target_sent_start_timestamp=_after(start, entry.first_upstream_tx_ms),
        target_sent_end_timestamp=_after(start, entry.last_upstream_tx_ms),
        target_received_start_timestamp=_after(start, entry.first_upstream_rx_ms),
        target_received_end_timestamp=_after(start, entry.last_upstream_rx_ms),
        client_sent_start_timestamp=start + (entry.first_downstream_tx_ms or 0),
        client_sent_end_timestamp=start + (entry.last_downstream_tx_ms or 0),
        apiproxy=meta.get(API, ""),
        request_uri=entry.path,
        request_path=entry.path.partition("?")[0],  # Apigee wants no query in request_path
        request_verb=entry.method,
        client_ip=first_forwarded_for(entry.forwarded_for) or entry.downstream_ip,
        useragent=entry.user_agent,
        response_status_code=entry.status,
        developer_email=meta.get(DEVELOPER_EMAIL, ""),
        developer_app=meta.get(APPLICATION, ""),
        access_token=meta.get(ACCESS_TOKEN, ""),
        client_id=meta.get(CLIENT_ID, ""),
        api_product=meta.get(ANALYTICS_PRODUCT, ""),
        organization=org,
        environment=meta.get(ENVIRONMENT, ""),
        gateway_flow_id=flow_id,
        attributes=dict(entry.data_capture),
    )


def _after(start: int, offset: int | None) -> int:
    # The Go adapter adds a missing duration as 0 and so reports a target it never called at the start
    # time; 0 omits the field instead.
    return 0 if offset is None else start + offset


def denied(
    *,
    flow_id: str,
    org: str,
    env: str,
    api: str,
    request_ms: int,
    method: str,
    path: str,
    user_agent: str,
    client_ip: str,
    status: int,
    developer_email: str = "",
    app: str = "",
    client_id: str = "",
    api_product: str = "",
    access_token: str = "",
) -> Record:
    """The record for a request that Check denied (Envoy logs a deny without our metadata).

    All four client timestamps are the request time: nothing was sent to a target, and the deny is
    answered at once. (The Go adapter adds whole seconds to the sent timestamps, a unit bug; not here.)

    Args:
        flow_id: a fresh UUIDv4 string.
        org: the organization. env: the environment. api: the API (may be empty when not resolved).
        request_ms: the request time, epoch ms.
        method: the HTTP method. path: the path with its query.
        user_agent: the ``user-agent`` header (Envoy lowercases header names; the Go adapter looked up
            ``User-Agent`` and always got nothing).
        client_ip: the first ``x-forwarded-for`` address (``first_forwarded_for``), else the peer.
        status: the HTTP status actually returned (401, 403, 429, 503).
        developer_email, app, client_id, api_product, access_token: from the auth context, when known.

    Returns:
        The record (not yet validated).
    """
    return Record(
        client_received_start_timestamp=request_ms,
        client_received_end_timestamp=request_ms,
        client_sent_start_timestamp=request_ms,
        client_sent_end_timestamp=request_ms,
        apiproxy=api,
        request_uri=path,
        request_path=path.partition("?")[0],
        request_verb=method,
        client_ip=client_ip,
        useragent=user_agent,
        response_status_code=status,
        developer_email=developer_email,
        developer_app=app,
        access_token=access_token,
        client_id=client_id,
        api_product=api_product,
        organization=org,
        environment=env,
        gateway_flow_id=flow_id,
    )


def validate(record: Record, now_ms: int) -> str | None:
    """The first reason (one of ``INVALID_REASONS``) this record must be dropped, or ``None`` if valid.

    The Go adapter's rules: organization, environment and flow id present; the client timestamps set and
    ordered; the start no more than a minute in the future nor more than 90 days in the past.
    """
    if not record.organization:
        return MISSING_ORG
    if not record.environment:
        return MISSING_ENV
    if not record.gateway_flow_id:
        return MISSING_FLOW_ID
    start = record.client_received_start_timestamp
    received_end = record.client_received_end_timestamp
    sent_end = record.client_sent_end_timestamp
    if not (start and received_end and sent_end):
        return MISSING_TIMESTAMP
    if start > received_end or start > sent_end:
        return BAD_TIMESTAMPS
    if start > now_ms + FUTURE_TOLERANCE_MS:
        return IN_FUTURE
    if start < now_ms - MAX_AGE_MS:
        return TOO_OLD
    return None


# One encoder for every line: json.dumps with options builds a new one per call (about 2 µs).
_ENCODER: Final = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), sort_keys=True)


def to_json_line(record: Record) -> bytes:
    """The record as one line of NDJSON: a compact JSON object, keys sorted, raw UTF-8, then ``\\n``."""
    fields: dict[str, object] = {
        "apiproxy": record.apiproxy,
        "apiproxy_revision": API_PROXY_REVISION,
        "client_received_end_timestamp": record.client_received_end_timestamp,
        "client_received_start_timestamp": record.client_received_start_timestamp,
        "client_sent_end_timestamp": record.client_sent_end_timestamp,
        "client_sent_start_timestamp": record.client_sent_start_timestamp,
        "environment": record.environment,
        "gateway_flow_id": record.gateway_flow_id,
        "gateway_source": GATEWAY_SOURCE,
        "organization": record.organization,
        "recordType": RECORD_TYPE,
        "request_path": record.request_path,
        "request_uri": record.request_uri,
        "request_verb": record.request_verb,
        "response_status_code": record.response_status_code,
        "useragent": record.useragent,
    }
    omit_empty: tuple[tuple[str, object], ...] = (
        ("access_token", record.access_token),
        ("api_product", record.api_product),
        ("client_id", record.client_id),
        ("client_ip", record.client_ip),
        ("developer_app", record.developer_app),
        ("developer_email", record.developer_email),
        ("target_received_end_timestamp", record.target_received_end_timestamp),
        ("target_received_start_timestamp", record.target_received_start_timestamp),
        ("target_sent_end_timestamp", record.target_sent_end_timestamp),
        ("target_sent_start_timestamp", record.target_sent_start_timestamp),
    )
    for name, value in omit_empty:
        if value:
            fields[name] = value
    fields.update(attributes(record.attributes))
    text = _ENCODER.encode(fields)
    # "replace" only matters for a lone surrogate, which no protobuf string can hold.
    return (text + "\n").encode("utf-8", "replace")


def attributes(values: Mapping[str, object]) -> dict[str, AttributeValue]:
    """The ``dc.*`` fields for data-capture values: the first ``MAX_ATTRIBUTES`` usable ones.

    Names get the ``dc.`` prefix when they lack it; strings are cut to ``MAX_ATTRIBUTE_BYTES`` of UTF-8
    at a character boundary; only str, int, float and bool values are kept (a non-finite float, which
    JSON cannot carry, is dropped too). golib counts the 100 before dropping unusable values; this counts
    after, so a bad value never pushes out a good one.
    """
    out: dict[str, AttributeValue] = {}
    for name, value in values.items():
        if len(out) == MAX_ATTRIBUTES:
            break
        usable: AttributeValue
        if isinstance(value, str):
            usable = truncate_utf8(value, MAX_ATTRIBUTE_BYTES)
        elif isinstance(value, int) or (isinstance(value, float) and math.isfinite(value)):
            usable = value  # bool is an int
        else:
            continue
        key = name if name.startswith(ATTRIBUTE_PREFIX) else ATTRIBUTE_PREFIX + name
        out[key] = usable
    return out


def truncate_utf8(value: str, limit: int) -> str:
    """``value`` cut to at most ``limit`` bytes of UTF-8, never inside a character."""
    if len(value) * 4 <= limit:  # a character is at most 4 bytes: short enough without encoding
        return value
    data = value.encode("utf-8", "replace")
    if len(data) <= limit:
        return value
    return data[:limit].decode("utf-8", "ignore")  # drops only the cut character's leading bytes
