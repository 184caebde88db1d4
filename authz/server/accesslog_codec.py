"""Protobuf in: Envoy's ``StreamAccessLogsMessage`` (access-log service v3) -> plain ``AccessEntry`` values.

With ``codec.py``, the only module that touches Envoy's protobuf messages (from xds-protos, upb-backed),
so the analytics code stays pure and typed. Only HTTP entries are decoded; TCP entries are ignored, as
the Go adapter does (``server/accesslog.go``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Final

from envoy.config.core.v3 import base_pb2

from authz.analytics.record import AccessEntry, AttributeValue

EXT_AUTHZ: Final = "envoy.filters.http.ext_authz"  # where Envoy files the dynamic metadata Check returns
DATA_CAPTURE: Final = "envoy.filters.http.apigee.datacapture"  # the Go adapter's custom-attribute namespace

# RequestMethod enum number -> name; METHOD_UNSPECIFIED (0) and numbers this build does not know -> "".
_METHODS: Final[dict[int, str]] = {number: name for name, number in base_pb2.RequestMethod.items() if number}
_MAX_EXACT_INT: Final = 2**53  # larger doubles are kept as floats, as Go's float64 attribute would print


def log_name(message: Any) -> str:
    """``identifier.log_name``: the access logger's name from the Envoy config.

    Envoy sends ``identifier`` only in the first message of a stream, so later messages give ``""``.
    """
    name: str = message.identifier.log_name
    return name


def entries(message: Any) -> Iterator[AccessEntry]:
    """One ``AccessEntry`` per HTTP log entry of an ``als_pb2.StreamAccessLogsMessage``
    (``envoy.service.accesslog.v3``); TCP logs yield nothing."""
    if message.WhichOneof("log_entries") != "http_logs":
        return
    for entry in message.http_logs.log_entry:
        yield _entry(entry)


def _entry(entry: Any) -> AccessEntry:
    common = entry.common_properties
    request = entry.request
    filter_metadata = common.metadata.filter_metadata
    return AccessEntry(
        start_ms=common.start_time.ToMilliseconds(),  # 0 when absent: validation drops the record
        last_rx_ms=_ms(common, "time_to_last_rx_byte"),
        first_upstream_tx_ms=_ms(common, "time_to_first_upstream_tx_byte"),
        last_upstream_tx_ms=_ms(common, "time_to_last_upstream_tx_byte"),
        first_upstream_rx_ms=_ms(common, "time_to_first_upstream_rx_byte"),
        last_upstream_rx_ms=_ms(common, "time_to_last_upstream_rx_byte"),
        first_downstream_tx_ms=_ms(common, "time_to_first_downstream_tx_byte"),
        last_downstream_tx_ms=_ms(common, "time_to_last_downstream_tx_byte"),
        method=_METHODS.get(request.request_method, ""),
        path=request.path,
        user_agent=request.user_agent,
        forwarded_for=request.forwarded_for,
        status=entry.response.response_code.value,  # a UInt32Value; 0 when Envoy sent none
        authz=_strings(filter_metadata[EXT_AUTHZ]) if EXT_AUTHZ in filter_metadata else {},
        data_capture=_values(filter_metadata[DATA_CAPTURE]) if DATA_CAPTURE in filter_metadata else {},
        request_headers={name.lower(): value for name, value in request.request_headers.items()},
        downstream_ip=common.downstream_remote_address.socket_address.address,
    )


def _ms(common: Any, name: str) -> int | None:
    if not common.HasField(name):
        return None
    duration = getattr(common, name)
    ms: int = duration.seconds * 1000 + duration.nanos // 1_000_000  # ToMilliseconds, without its checks
    return ms


def _strings(struct: Any) -> dict[str, str]:
    """The non-empty string fields of a Struct (our x-apigee-* values are all strings; a field of another
    kind reads as "" and is left out, as an empty one is). Reading string_value directly is about twice as
    fast as asking each value for its kind first."""
    return {key: text for key, value in struct.fields.items() if (text := value.string_value)}


def _values(struct: Any) -> dict[str, AttributeValue]:
    """The string, number and bool fields of a Struct; integral numbers become ints (JSON ``5``, not
    ``5.0``). Null, list and struct values are dropped, as the Go adapter drops them."""
    out: dict[str, AttributeValue] = {}
    for key, value in struct.fields.items():
        kind = value.WhichOneof("kind")
        if kind == "string_value":
            out[key] = value.string_value
        elif kind == "bool_value":
            out[key] = value.bool_value
        elif kind == "number_value":
            number: float = value.number_value
            exact = number.is_integer() and abs(number) <= _MAX_EXACT_INT
            out[key] = int(number) if exact else number
    return out
