"""Optional Prometheus metrics: the text exposition format served by http.server, no extra package.

``render`` is pure (stats dict in, text out); :class:`MetricsServer` serves ``/metrics`` from a
snapshot callback on a local port in a daemon thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

logger = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}"


def _metric(lines: list[str], name: str, kind: str, help_text: str,
            samples: list[tuple[dict[str, str], float]]) -> None:
    lines.append(f"# HELP {name} {help_text}")
    lines.append(f"# TYPE {name} {kind}")
    for labels, value in samples:
        lines.append(f"{name}{_labels(labels)} {float(value):.6g}")


def render(stats: dict[str, Any]) -> str:
    """Prometheus text for the agent's stats snapshot (the same dict the stats topic carries)."""
    lines: list[str] = []
    device = {"device": str(stats.get("device", ""))}
    counters = [
        ("yugami_frames_total", "frames", "Frames inspected."),
        ("yugami_anomalies_total", "anomalies", "Frames judged anomalous."),
        ("yugami_frame_errors_total", "errors", "Bad frames (unreadable or failed to score)."),
        ("yugami_mqtt_reconnects_total", "reconnects", "Reconnections to the MQTT broker."),
    ]
    for name, key, text in counters:
        _metric(lines, name, "counter", text, [(device, stats.get(key, 0))])
    outbox = stats.get("outbox", {})
    _metric(lines, "yugami_outbox_depth", "gauge", "Verdicts stored but not yet acknowledged by the broker.",
            [(device, outbox.get("depth", 0))])
    _metric(lines, "yugami_outbox_dropped_total", "counter", "Verdicts dropped because the outbox was full.",
            [(device, outbox.get("dropped", 0))])
    _metric(lines, "yugami_outbox_degraded", "gauge", "1 while the disk refuses writes and verdicts wait in memory.",
            [(device, 1 if outbox.get("degraded") else 0)])
    _metric(lines, "yugami_outbox_memory", "gauge", "Verdicts waiting in memory because the disk refused them.",
            [(device, outbox.get("memory", 0))])
    _metric(lines, "yugami_outbox_held_total", "counter", "Verdicts that ever waited in memory (disk refused them).",
            [(device, outbox.get("held_total", 0))])
    _metric(lines, "yugami_outbox_disk_errors_total", "counter", "Outbox writes, reads or opens the disk refused.",
            [(device, outbox.get("disk_errors", 0))])
    evidence = stats.get("evidence", {})
    _metric(lines, "yugami_evidence_bytes", "gauge", "Bytes of saved evidence kept (pictures + JSON).",
            [(device, evidence.get("bytes", 0))])
    _metric(lines, "yugami_evidence_skipped_total", "counter",
            "Evidence not saved because free space was under storage.min_free_bytes.",
            [(device, evidence.get("skipped", 0))])
    _metric(lines, "yugami_fps", "gauge", "Frames inspected per second, recent.", [(device, stats.get("fps", 0))])
    latency = stats.get("latency_ms", {})
    _metric(lines, "yugami_latency_ms", "gauge", "Per-frame scoring latency, recent quantiles.",
            [({**device, "quantile": q}, latency.get(k) or 0.0) for q, k in (("0.5", "p50"), ("0.99", "p99"))])
    _metric(lines, "yugami_uptime_seconds", "gauge", "Seconds since the agent started.",
            [(device, stats.get("uptime_s", 0))])
    _metric(lines, "yugami_mqtt_connected", "gauge", "1 while connected to the broker.",
            [(device, 1 if stats.get("mqtt_connected") else 0)])
    source = stats.get("source", {})
    _metric(lines, "yugami_source_up", "gauge", "1 while the frame source is open.",
            [({**device, "kind": str(source.get("kind", ""))}, 1 if source.get("state") == "up" else 0)])
    model = stats.get("model", {})
    _metric(lines, "yugami_model_info", "gauge", "The loaded model bundle.",
            [({**device, "name": str(model.get("name", "")), "sha256": str(model.get("sha256", ""))}, 1)])
    return "\n".join(lines) + "\n"


class MetricsServer:
    def __init__(self, host: str, port: int, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.snapshot = snapshot
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] not in ("/metrics", "/"):
                    self.send_error(404, "only /metrics is served here")
                    return
                body = render(outer.snapshot()).encode("utf-8")
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                logger.debug("metrics %s: " + format, self.client_address[0], *args)

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, name="metrics", daemon=True)

    def start(self) -> None:
        self._thread.start()
        logger.info("Prometheus metrics on http://%s:%d/metrics", self.server.server_address[0], self.port)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
