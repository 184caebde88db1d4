"""AccessLogServicer.StreamAccessLogs: Envoy's gRPC access log in, analytics records out, never blocking.

Each HTTP entry that carries this service's ``x-apigee-*`` metadata (an allowed request, or one let
through by ``allow_unauthorized``) becomes one analytics record, handed to the sink without waiting: the
sink refuses (and counts) what it cannot take, since Envoy drops logs itself when a receiver stalls.
Entries without our metadata are not ours (denied requests carry none: Check writes their records) and
are skipped. A stream ends after ``global.keep_alive_max_connection_age`` so that Envoy reconnects and
streams rebalance across replicas (Go adapter issue #77). No exception leaves the servicer.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any, Protocol

from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from authz.analytics.record import from_access, to_json_line, validate
from authz.clock import Clock
from authz.metrics import Metrics
from authz.server import accesslog_codec

log = logging.getLogger(__name__)

Tenant = tuple[str, str]  # (org, env)


class Sink(Protocol):
    def put(self, tenant: Tenant, line: bytes) -> bool: ...


class AccessLogServicer(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    def __init__(self, sink: Sink, metrics: Metrics, org: str, clock: Clock, max_age: float) -> None:
        self._sink = sink
        self._metrics = metrics
        self._org = org
        self._clock = clock
        self._max_age = max_age

    async def StreamAccessLogs(  # noqa: N802 (gRPC method name)
        self, request_iterator: AsyncIterator[Any], context: Any
    ) -> Any:
        started = self._clock.monotonic()
        try:
            async for message in request_iterator:
                try:
                    self.handle(message)
                except Exception:  # one bad message must not end the stream
                    log.exception("access-log message could not be read")
                    self._metrics.analytics_dropped.labels(self._org, "unreadable").inc()
                if self._clock.monotonic() - started >= self._max_age:
                    break  # Envoy opens a new stream, maybe to another replica
        except Exception:  # the stream broke (Envoy went away): nothing to answer
            log.info("access-log stream ended abnormally", exc_info=True)
        return als_pb2.StreamAccessLogsResponse()

    def handle(self, message: Any) -> None:
        """Turn one StreamAccessLogsMessage into records for the sink."""
        now_ms = int(self._clock.now() * 1000)
        for entry in accesslog_codec.entries(message):
            record = from_access(entry, str(uuid.uuid4()))
            if record is None:
                continue  # not authorized by this service (a deny: Check wrote its record)
            env = record.environment
            self._metrics.analytics_records.labels(self._org, env, "received").inc()
            problem = validate(record, now_ms)
            if problem is not None:
                self._metrics.analytics_dropped.labels(self._org, "invalid").inc()
                log.debug("analytics record dropped: %s", problem)
                continue
            self._sink.put((record.organization, env), to_json_line(record))
