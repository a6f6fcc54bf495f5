"""The scheduler's side of its gateways: which gateway owns each request, the outputs
queued for each gateway until the loop sends them, and the heartbeats that show a
gateway is still there.

Every output goes to the gateway that sent the request. A gateway that sends heartbeats
is watched: any message it sends counts as a sign of life, and one silent for longer
than its timeout is reported by ``silent()`` so that the loop can end its requests.
Sends never block: a gateway that cannot take a message (gone, or not reading) is
reported to the caller, which forgets it. Decisions about requests (admission, aborts)
stay with the loop in ``scheduler/server.py``; this class only routes.
"""

from __future__ import annotations

import logging
import time

import zmq

from tessera.common.wire import encode
from tessera.proto.tessera.v1 import engine_pb2
from tessera.scheduler.messages import output_to_pb
from tessera.scheduler.outputs import RequestOutput

logger = logging.getLogger(__name__)

HEARTBEAT_TIMEOUT_S = (1.0, 3600.0)  # the range a gateway's heartbeat timeout is held to


class GatewaySessions:
    def __init__(self, socket: zmq.Socket) -> None:
        self.socket = socket  # ROUTER: GatewayMessage in, EngineOutputs out
        self.owners: dict[str, bytes] = {}  # request id -> identity of its gateway
        self.outbox: dict[bytes, engine_pb2.EngineOutputs] = {}
        # Gateways that send heartbeats: identity -> (timeout, when it was last heard).
        self.watched: dict[bytes, tuple[float, float]] = {}

    # -- who is there --------------------------------------------------------------

    def heard_from(self, gateway: bytes) -> None:
        if gateway in self.watched:  # any message at all is a sign of life
            self.watched[gateway] = (self.watched[gateway][0], time.monotonic())

    def watch(self, gateway: bytes, timeout_ms: int) -> None:
        """Heartbeats from this gateway: report it once it is silent that long (0: stop)."""
        if timeout_ms == 0:
            self.watched.pop(gateway, None)
            return
        low, high = HEARTBEAT_TIMEOUT_S
        self.watched[gateway] = (min(max(timeout_ms / 1000, low), high), time.monotonic())

    def silent(self) -> list[tuple[bytes, float, float]]:
        """(gateway, seconds silent, its timeout) for each watched gateway past its
        timeout; they are no longer watched."""
        now = time.monotonic()
        found = []
        for gateway, (timeout, last_heard) in list(self.watched.items()):
            if now - last_heard > timeout:
                del self.watched[gateway]
                found.append((gateway, now - last_heard, timeout))
        return found

    def drop(self, gateway: bytes) -> None:
        """Watch and queue nothing more for this gateway."""
        self.watched.pop(gateway, None)
        self.outbox.pop(gateway, None)

    # -- which requests are whose ------------------------------------------------------

    def own(self, request_id: str, gateway: bytes) -> None:
        self.owners[request_id] = gateway

    def requests_of(self, gateway: bytes) -> list[str]:
        return [rid for rid, owner in self.owners.items() if owner == gateway]

    # -- outputs ----------------------------------------------------------------------

    def route(self, output: RequestOutput, error: str = "", kind: str = "",
              queue_seconds: float = 0.0) -> None:
        """Queue one request's output for its gateway; forget the owner once finished."""
        if output.finished:
            gateway = self.owners.pop(output.request_id, None)
        else:
            gateway = self.owners.get(output.request_id)
        if gateway is None:
            return
        pb = output_to_pb(output, error, kind, queue_seconds)
        self.outbox.setdefault(gateway, engine_pb2.EngineOutputs()).outputs.append(pb)

    def reject(self, gateway: bytes, request_ids: list[str], kind: str, message: str) -> None:
        rejected = [
            engine_pb2.Rejection(request_id=rid, kind=kind, message=message) for rid in request_ids
        ]
        self.outbox.setdefault(gateway, engine_pb2.EngineOutputs()).rejected.extend(rejected)

    def send(self, gateway: bytes, outputs: engine_pb2.EngineOutputs, quiet: bool = False) -> bool:
        """Send now, without waiting; False if the gateway cannot be reached (logged
        unless ``quiet``: a gateway already given up on)."""
        try:
            self.socket.send_multipart([gateway, encode(outputs)], flags=zmq.NOBLOCK)
        except zmq.ZMQError as e:  # gone (EHOSTUNREACH) or not reading (EAGAIN)
            if not quiet:
                logger.warning("gateway %r cannot be reached (%s)", gateway, e.strerror)
            return False
        return True

    def take_outbox(self) -> dict[bytes, engine_pb2.EngineOutputs]:
        outbox, self.outbox = self.outbox, {}
        return outbox
