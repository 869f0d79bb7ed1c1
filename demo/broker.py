"""An embedded MQTT broker for the demo, used only when no broker is configured.

It is amqtt (pure Python, asyncio) run as a child process, ``python -m demo.broker --port N``, so the
demo can stop it cleanly with SIGTERM whatever state its event loop is in. It listens on one TCP port,
allows anonymous clients and keeps retained messages in memory: fine for a demo on one machine,
never a production broker (use mosquitto there; docs/DEMO.md says how).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

READY_LINE = "demo.broker ready"


class BrokerStartError(RuntimeError):
    """The embedded broker did not come up."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def broker_config(host: str, port: int) -> dict[str, Any]:
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}", "max_connections": 64}},
        # Only anonymous auth: amqtt's default plugin set also logs every packet and publishes $SYS
        # topics, which would only add noise to the demo.
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }


def _broker_class() -> type:
    """amqtt's Broker with retained messages sent only to the clients that subscribed to them.

    amqtt 0.12.1, at every CONNECT, replays retained messages for every topic filter that *any* client
    has subscribed to, so a client receives retained messages it never asked for (and, once it
    subscribes, duplicates). Retained messages are exactly what ``available`` and ``state`` rely on,
    so the demo filters that replay down to the connecting client's own subscriptions.
    """
    from amqtt.broker import Broker  # imported here so `--help` works without amqtt installed

    class DemoBroker(Broker):
        async def _publish_retained_messages_for_subscription(
            self, subscription: tuple[str, int], session: Any
        ) -> None:
            topic_filter = subscription[0]
            granted = [q for s, q in self._subscriptions.get(topic_filter, []) if s.client_id == session.client_id]
            if granted:
                await super()._publish_retained_messages_for_subscription((topic_filter, granted[0]), session)

    return DemoBroker


async def serve(host: str, port: int) -> None:
    """Run the broker until SIGTERM or SIGINT, then shut it down (clients see a clean close)."""
    broker = _broker_class()(broker_config(host, port))
    await broker.start()
    print(f"{READY_LINE} on {host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await broker.shutdown()


class EmbeddedBroker:
    """The broker as a child process: ``with EmbeddedBroker() as b: ... b.port``."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None, log_file: Path | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.log_file = log_file
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> EmbeddedBroker:
        out = open(self.log_file, "wb") if self.log_file else subprocess.DEVNULL  # noqa: SIM115 (closed in stop)
        cmd = [sys.executable, "-m", "demo.broker", "--host", self.host, "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        if out is not subprocess.DEVNULL:
            out.close()  # the child holds its own copy
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrokerStartError(
                    f"the embedded broker exited with status {self.proc.returncode} before listening on "
                    f"{self.host}:{self.port}; is amqtt installed (pip install 'yugami[demo]') and the port free?"
                    + (f" See {self.log_file}." if self.log_file else "")
                )
            if _accepts(self.host, self.port):
                logger.info("embedded broker (pid %d) listening on %s:%d", self.proc.pid, self.host, self.port)
                return self
            time.sleep(0.1)
        self.stop()
        raise BrokerStartError(f"the embedded broker did not listen on {self.host}:{self.port} within {timeout:.0f} s")

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait, and SIGKILL only if it hangs; returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "embedded broker (pid %d) ignored SIGTERM for %.0f s; killing it", self.proc.pid, timeout
                )
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _accepts(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m demo.broker",
        description=(
            "An embedded MQTT 3.1.1 broker (amqtt) for the yugami demo: anonymous, in memory, one TCP port. "
            f"Prints '{READY_LINE} on HOST:PORT' once listening; stops cleanly on SIGTERM or Ctrl-C. "
            "Not for production: use mosquitto there."
        ),
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=1883, help="TCP port (default 1883)")
    parser.add_argument("--verbose", action="store_true", help="log the broker's own messages")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        # amqtt logs a client's disconnect at ERROR level (e.g. a last will firing); that is normal here.
        logging.getLogger("amqtt").setLevel(logging.CRITICAL)
    try:
        asyncio.run(serve(args.host, args.port))
    except ImportError as exc:
        print(f"demo.broker: {exc}; install the demo extra: pip install 'yugami[demo]'", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"demo.broker: cannot listen on {args.host}:{args.port} ({exc}); pick another --port", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
