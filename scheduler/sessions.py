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

from tessera.common.wire import TokenColumnsBuilder, encode
from tessera.proto.tessera.v1 import engine_pb2
from tessera.scheduler.outputs import RequestOutput, TokenRow

logger = logging.getLogger(__name__)

HEARTBEAT_TIMEOUT_S = (1.0, 3600.0)  # the range a gateway's heartbeat timeout is held to


class GatewaySessions:
    def __init__(self, socket: zmq.Socket) -> None:
        self.socket = socket  # ROUTER: GatewayMessage in, EngineOutputs out
        self.owners: dict[str, bytes] = {}  # request id -> identity of its gateway
        self.outbox: dict[bytes, Outgoing] = {}  # built into EngineOutputs when sent
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
        outgoing = self._outgoing(gateway)
        finish_reason = output.finish_reason or ""
        if error and output.finished:  # failed requests leave the scheduler as aborted ones
            finish_reason = "error"
        outgoing.columns.add(
            output.request_id,
            output.new_token_ids,
            finish_reason,
            output.num_prompt_tokens,
            output.num_output_tokens,
            output.num_cached_tokens,
            output.stop_token_id,
            queue_seconds,
            error,
            kind,
            output.new_logprobs,
            output.embedding if finish_reason == "stop" else None,
        )

    def route_token_rows(
        self, rows: dict[str, TokenRow], queue_seconds: dict[str, float]
    ) -> None:
        """route() for a step's running rows (Scheduler.update_from_result's
        token_rows: nearly every output of a step), queued whole when one gateway owns
        them all (the usual case), split by owner otherwise. A request whose queue time
        is in ``queue_seconds`` (its first output) is popped from both and routed as a
        row of its own. Rows whose owner is gone are dropped. Takes ``rows`` over: the
        caller leaves it alone from now on."""
        owners = self.owners
        if queue_seconds:  # the few requests admitted lately
            for request_id in [rid for rid in queue_seconds if rid in rows]:
                gateway = owners.get(request_id)
                if gateway is None:
                    continue
                token_id, num_prompt, num_output, num_cached = rows.pop(request_id)
                self._outgoing(gateway).columns.add(
                    request_id, [token_id], "", num_prompt, num_output, num_cached,
                    queue_seconds=queue_seconds.pop(request_id),
                )  # fmt: skip
        if not rows:
            return
        gateways = list(map(owners.get, rows))
        first = gateways[0]
        if first is not None and gateways.count(first) == len(gateways):
            self._outgoing(first).columns.add_token_rows(rows)
            return
        split: dict[bytes, dict[str, TokenRow]] = {}
        for (request_id, row), gateway in zip(rows.items(), gateways, strict=True):
            if gateway is not None:
                split.setdefault(gateway, {})[request_id] = row
        for gateway, part in split.items():
            self._outgoing(gateway).columns.add_token_rows(part)

    def reject(self, gateway: bytes, request_ids: list[str], kind: str, message: str) -> None:
        rejected = [
            engine_pb2.Rejection(request_id=rid, kind=kind, message=message) for rid in request_ids
        ]
        self._outgoing(gateway).rejected += rejected

    def _outgoing(self, gateway: bytes) -> Outgoing:
        """What is queued for this gateway, created empty if nothing is."""
        outgoing = self.outbox.get(gateway)
        if outgoing is None:
            outgoing = self.outbox[gateway] = Outgoing()
        return outgoing

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
        """Everything queued, as one message per gateway; the outbox is empty after."""
        outbox, self.outbox = self.outbox, {}
        return {gateway: outgoing.to_pb() for gateway, outgoing in outbox.items()}

    def take(self, gateway: bytes) -> engine_pb2.EngineOutputs | None:
        """What is queued for one gateway, as one message (None if nothing is)."""
        outgoing = self.outbox.pop(gateway, None)
        return None if outgoing is None else outgoing.to_pb()


class Outgoing:
    """The outputs and rejections queued for one gateway: a row each, until sent."""

    __slots__ = ("columns", "rejected")

    def __init__(self) -> None:
        self.columns = TokenColumnsBuilder()
        self.rejected: list[engine_pb2.Rejection] = []

    def to_pb(self) -> engine_pb2.EngineOutputs:
        if not self.columns:
            return engine_pb2.EngineOutputs(rejected=self.rejected)
        return engine_pb2.EngineOutputs(rejected=self.rejected, tokens=self.columns.fields())
