"""Standalone analytics to ``analytics.endpoint``: a denied Check's record reaches a real HTTP receiver on
loopback, POSTed as the staged gzip NDJSON file with its org and env in headers; a receiver that fails
first loses nothing, and the file keeps its name across the retry so a receiver can dedupe it."""

from __future__ import annotations

import asyncio
import gzip
import json
from dataclasses import dataclass, field

import grpc
import httpx
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc

from authz.app import Service
from authz.config import load_config
from tests.fakes.http_server import LoopbackServer
from tests.support.catalogs import catalog_yaml, config_yaml
from tests.support.check_requests import check_request

pytestmark = pytest.mark.integration


@dataclass
class Receiver:
    """A user's analytics collector: answers ``statuses`` in turn (then 200); keeps each confirmed file's
    records once per (org, env, file name), as a receiver deduping retries would."""

    statuses: list[int] = field(default_factory=list)
    attempts: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    files: dict[tuple[str, str, str], list[dict]] = field(default_factory=dict)

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        status = self.statuses.pop(0) if self.statuses else 200
        self.attempts.append((status, dict(request.headers)))
        if status == 200:
            h = request.headers
            assert (request.method, request.url.path, h["content-encoding"]) == ("POST", "/analytics", "gzip")
            lines = gzip.decompress(request.content).splitlines()
            key = (h["x-apigee-organization"], h["x-apigee-environment"], h["x-analytics-file"])
            self.files[key] = [json.loads(line) for line in lines if line.strip()]
        return httpx.Response(status)

    @property
    def records(self) -> list[dict]:
        return [record for records in self.files.values() for record in records]


@pytest.fixture
async def standalone(tmp_path):
    """(service, receiver): standalone, analytics.endpoint = the receiver on 127.0.0.1."""
    receiver = Receiver()
    async with await LoopbackServer.start(receiver) as server:
        catalog = tmp_path / "catalog.yaml"
        catalog.write_text(catalog_yaml())
        config = tmp_path / "config.yaml"
        analytics = f"analytics:\n  endpoint: {server.base_url}/analytics\n  collection_interval: 1s\n"
        config.write_text(config_yaml(str(catalog)) + analytics)
        service = Service(load_config(config))
        await service.start()
        yield service, receiver
        await service.stop()


async def deny(service: Service, times: int = 1) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        for _ in range(times):
            response = await stub.Check(check_request(), timeout=5)
            assert response.denied_response.status.code == 401


async def uploaded(service: Service, receiver: Receiver, records: int) -> None:
    """Drain until the receiver has ``records`` (the uploader's own loop may take a file first)."""
    assert service.analytics.uploader is not None
    async with asyncio.timeout(10):
        while len(receiver.records) < records:
            await service.analytics.uploader.drain()
            await asyncio.sleep(0.05)


async def test_a_denied_check_reaches_the_endpoint(standalone):
    service, receiver = standalone
    await deny(service)
    await service.analytics.buffer.rotate()  # stage now instead of after collection_interval
    assert service.analytics.uploader is not None
    await service.analytics.uploader.drain()
    await uploaded(service, receiver, 1)
    [((org, env, name), [record])] = receiver.files.items()
    assert (org, env) == ("org", "test")
    assert (record["organization"], record["environment"], record["response_status_code"]) == (
        "org",
        "test",
        401,
    )
    [(status, headers)] = receiver.attempts
    assert status == 200
    assert headers["content-type"] == "application/x-ndjson"
    assert "authorization" not in headers
    assert name.endswith(".gz") and "/" not in name
    assert service.analytics.buffer.staged() == []  # deleted once the endpoint confirmed


async def test_a_failing_endpoint_loses_nothing(standalone):
    service, receiver = standalone
    receiver.statuses = [503]
    await deny(service, times=3)
    await service.analytics.buffer.rotate()
    await uploaded(service, receiver, 3)
    # Usually one file; two if the buffer's own 1 s rotation fell between the denies.
    statuses = [status for status, _ in receiver.attempts]
    assert statuses[0] == 503 and set(statuses[1:]) == {200}
    refused = receiver.attempts[0][1]["x-analytics-file"]
    assert refused in {name for _, _, name in receiver.files}  # retried under the same name: dedupable
    assert [r["response_status_code"] for r in receiver.records] == [401, 401, 401]
    assert service.analytics.buffer.staged() == []
    uploads = service.metrics.registry.get_sample_value
    assert uploads("analytics_uploads_total", {"org": "org", "env": "test", "result": "transient_error"}) == 1
    assert uploads("analytics_uploads_total", {"org": "org", "env": "test", "result": "ok"}) == len(
        receiver.files
    )


async def test_records_still_open_at_shutdown_are_posted(standalone):
    service, receiver = standalone
    await deny(service)
    await service.stop()  # stages the open file and makes one upload attempt before closing the client
    assert len(receiver.records) == 1
