"""Prometheus metrics of the service, on their own registry (several servers per process in
tests), served over HTTP on --metrics-port."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.time_to_first_audio = Histogram(
            "miotts_time_to_first_audio_seconds",
            "From the request message that completed the first segment to its first audio",
            buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10),
            registry=self.registry,
        )
        self.active_streams = Gauge(
            "miotts_active_streams", "Synthesis streams open now", registry=self.registry
        )
        self.generated_tokens = Counter(
            "miotts_generated_tokens", "Speech tokens generated", registry=self.registry
        )
        self.audio_seconds = Counter(
            "miotts_audio_seconds", "Seconds of audio sent", registry=self.registry
        )
        self.requests = Counter(
            "miotts_requests",
            "Finished RPCs by method and gRPC status code",
            ["method", "code"],
            registry=self.registry,
        )
        self.event_loop_lag = Histogram(
            "miotts_event_loop_lag_seconds",
            "How late the event loop ran a timer (sampled every 20 ms): time the loop was busy",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2),
            registry=self.registry,
        )
        self.decode_steps = Gauge(
            "miotts_decode_steps", "Batched decode steps run (a counter)", registry=self.registry
        )
        self.decode_windows = Gauge(
            "miotts_decode_windows",
            "Stream windows decoded in those steps (a counter)",
            registry=self.registry,
        )
        self.engine_restarts = Counter(
            "miotts_engine_restarts",
            "Times the in-process speech engine was started again after its core died",
            registry=self.registry,
        )
        self.requests_by_key = Counter(
            "miotts_requests_by_key",
            "Finished RPCs by API key name (never the key) and gRPC status code",
            ["key", "code"],
            registry=self.registry,
        )
        self.http_connections = Gauge(
            "miotts_http_connections", "Connections open on the HTTP port", registry=self.registry
        )
        self.http_connections_closed = Counter(
            "miotts_http_connections_closed",
            "HTTP connections the server closed for a time limit or over its connection cap",
            ["reason"],
            registry=self.registry,
        )
        self._http = None

    def watch_decoder(self, scheduler) -> None:
        """Export the decode loop's own counters."""
        self.decode_steps.set_function(lambda: scheduler.steps)
        self.decode_windows.set_function(lambda: scheduler.windows_decoded)

    def watch_llm_servers(self, servers: list) -> None:
        """Export the state of each LLM server behind a router (`LLMRouter.servers`), labelled
        by its URL: up, requests in flight, requests sent and failures."""
        self.registry.register(_LLMServerCollector(servers))

    async def watch_event_loop(self, period_s: float = 0.02) -> None:
        """Runs forever: records how late each timer fires (the loop's lag)."""
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + period_s
            await asyncio.sleep(period_s)
            self.event_loop_lag.observe(max(0.0, loop.time() - due))

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Start the /metrics endpoint; returns the bound port (0 picks a free one)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return server.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _LLMServerCollector(Collector):
    """Reads the router's per-server fields at scrape time (nothing to keep in step)."""

    def __init__(self, servers: list) -> None:
        self.servers = servers

    def collect(self):
        up = GaugeMetricFamily(
            "miotts_llm_server_up", "1 while the LLM server is in service", labels=["server"]
        )
        in_flight = GaugeMetricFamily(
            "miotts_llm_server_in_flight", "Requests on the LLM server now", labels=["server"]
        )
        requests = CounterMetricFamily(
            "miotts_llm_server_requests", "Requests sent to the LLM server", labels=["server"]
        )
        failures = CounterMetricFamily(
            "miotts_llm_server_failures",
            "Failed requests and health checks of the LLM server",
            labels=["server"],
        )
        for server in self.servers:
            up.add_metric([server.url], 1.0 if server.up else 0.0)
            in_flight.add_metric([server.url], server.in_flight)
            requests.add_metric([server.url], server.requests)
            failures.add_metric([server.url], server.failures)
        yield from (up, in_flight, requests, failures)
