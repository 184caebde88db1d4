"""The supervisor's HTTP port with ``authz serve --workers N``: one /metrics, /readyz and /livez for all.

Each worker serves its own ``HttpEndpoints`` on a private unix socket (in a 0700 directory); only the
supervisor listens on ``global.metrics_address``. Workers do not share that port with SO_REUSEPORT: a
scrape or a probe would reach one random worker.

* ``/metrics``: every worker's exposition, parsed with prometheus_client's parser and re-exposed through a
  Collector on the supervisor's registry with a ``worker="k"`` label added to each sample (HELP and TYPE
  once per family), next to the supervisor's own ``workers``, ``worker_up`` and ``worker_restarts_total``.
  A worker that does not answer is left out of that scrape and shows as ``worker_up{worker="k"} 0``. A
  restarted worker's counters start again at 0: one series per worker, so ``rate()`` sees a counter reset.
* ``/readyz`` (and ``/healthz``): 200 only when the supervisor is not draining and every worker answers
  its own ``/readyz`` with 200; the body has each worker's components (null for one that did not answer).
* ``/livez``: 200 when every worker answers its ``/livez``; a worker that is down or hung makes it 503, so
  Kubernetes restarts the pod if the supervisor cannot bring the worker back (its liveness backstop).

No httpx here (only ``apigee/`` makes outbound HTTP): a GET to a worker is a few lines over asyncio streams.
No grpc either: the supervisor does not import it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from authz.metrics import SupervisorMetrics
from authz.server.http import NOT_FOUND, READY_PATHS, Answer, HttpPort

log = logging.getLogger(__name__)

ASK_TIMEOUT = 2.0  # seconds a worker gets to answer one GET
MAX_RESPONSE_BYTES = 64 << 20
WORKER_LABEL = "worker"


async def get(socket_path: str, path: str) -> tuple[int, bytes]:
    """GET ``path`` from an ``HttpPort`` on a unix socket: (status, body), within ASK_TIMEOUT.

    Raises:
        OSError: no such socket, refused, reset.
        TimeoutError: no whole answer within ASK_TIMEOUT.
        ValueError: not an HTTP answer, or over MAX_RESPONSE_BYTES.
    """
    async with asyncio.timeout(ASK_TIMEOUT):
        reader, writer = await asyncio.open_unix_connection(socket_path)
        try:
            writer.write(f"GET {path} HTTP/1.0\r\nHost: worker\r\n\r\n".encode())
            await writer.drain()
            data = bytearray()
            while chunk := await reader.read(65536):  # the port closes after one answer
                data += chunk
                if len(data) > MAX_RESPONSE_BYTES:
                    raise ValueError(f"answer over {MAX_RESPONSE_BYTES} bytes")
        finally:
            writer.close()
    head, sep, body = bytes(data).partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    if not sep or len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
        raise ValueError("not an HTTP answer")
    return int(parts[1]), body


def parse(text: str) -> list[Metric]:
    """The families of one text exposition.

    Raises:
        ValueError: it does not parse.
    """
    return list(text_string_to_metric_families(text))


def merge(workers: Sequence[tuple[int, Sequence[Metric]]]) -> list[Metric]:
    """One family per name from several workers' families, each sample labelled with its worker's index;
    HELP and TYPE from the first worker that has the family."""
    families: dict[str, Metric] = {}
    for index, parsed in workers:
        worker = str(index)
        for family in parsed:
            merged = families.get(family.name)
            if merged is None:
                merged = Metric(family.name, family.documentation, family.type, family.unit)
                families[family.name] = merged
            merged.samples.extend(
                sample._replace(labels={**sample.labels, WORKER_LABEL: worker}) for sample in family.samples
            )
    return list(families.values())


class _Merged(Collector):
    """The families of the scrape being answered (set just before ``generate_latest``, no await between)."""

    def __init__(self) -> None:
        self.families: list[Metric] = []

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


class Fleet(HttpPort):
    """/metrics, /readyz, /healthz and /livez of the whole pod, from each worker's own answers."""

    def __init__(
        self,
        sockets: Sequence[str],
        metrics: SupervisorMetrics,
        draining: Callable[[], bool],
        answered: Callable[[int], None] = lambda index: None,
    ) -> None:
        """``answered(k)`` is told each time worker k answers (the supervisor learns it has started)."""
        self._sockets = list(sockets)
        self._answered = answered
        self._metrics = metrics
        self._draining = draining
        self._merged = _Merged()
        metrics.registry.register(self._merged)
        metrics.workers.set(len(self._sockets))

    async def answer(self, method: str, path: str) -> Answer:
        if path == "/metrics":
            return await self._metrics_page()
        if path == "/livez":
            return await self._livez()
        if path in READY_PATHS:
            return await self._readyz()
        return NOT_FOUND

    async def ask(self, path: str) -> list[tuple[int, bytes] | None]:
        """Every worker's answer to ``path``, in order; None for a worker that did not answer."""
        return list(await asyncio.gather(*(self._ask_one(k, path) for k in range(len(self._sockets)))))

    async def _ask_one(self, index: int, path: str) -> tuple[int, bytes] | None:
        try:
            answer = await get(self._sockets[index], path)
        except (OSError, TimeoutError, ValueError) as exc:
            log.debug("worker %d did not answer %s: %r", index, path, exc)
            return None
        self._answered(index)
        return answer

    async def _metrics_page(self) -> Answer:
        parsed: list[tuple[int, list[Metric]]] = []
        for index, answer in enumerate(await self.ask("/metrics")):
            up = answer is not None and answer[0] == 200
            if answer is not None and up:
                try:
                    parsed.append((index, parse(answer[1].decode("utf-8", "replace"))))
                except ValueError:
                    log.exception("worker %d: its /metrics does not parse", index)
                    up = False
            self._metrics.worker_up.labels(str(index)).set(1 if up else 0)
        self._merged.families = merge(parsed)
        try:
            return 200, CONTENT_TYPE_LATEST, generate_latest(self._metrics.registry)
        finally:
            self._merged.families = []

    async def _readyz(self) -> Answer:
        if self._draining():
            return 503, "application/json", b'{"not_draining": false}\n'
        answers = await self.ask("/readyz")
        workers: dict[str, object] = {}
        for index, answer in enumerate(answers):
            try:
                workers[str(index)] = json.loads(answer[1]) if answer is not None else None
            except ValueError:
                workers[str(index)] = None
        ready = sum(1 for answer in answers if answer is not None and answer[0] == 200)
        body = {"not_draining": True, "workers_ready": ready, "workers": workers}
        status = 200 if ready == len(answers) else 503
        return status, "application/json", json.dumps(body).encode() + b"\n"

    async def _livez(self) -> Answer:
        answers = await self.ask("/livez")
        silent = [str(i) for i, answer in enumerate(answers) if answer is None or answer[0] != 200]
        if not silent:
            return 200, "text/plain", b"ok\n"
        return 503, "text/plain", f"workers not answering: {', '.join(silent)}\n".encode()
