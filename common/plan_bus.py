"""The step plans of a tensor-parallel engine: one send that every rank reads.

    scheduler (or the offline LLM)            ranks 0 .. N-1
        XPUB bind  ── [topic, StepPlan] ──>   SUB connect, subscribed to the topic

A ZeroMQ PUB copies each message to its subscribers in its I/O thread, so the
scheduler encodes and sends a plan once whatever N is (benchmarks/tensor_parallel.py
measures it). A PUB drops what it sends before a subscription has arrived, so the
publisher is an XPUB that sees each rank's subscription: the engine counts N of them
before it sends the first plan.

The topic is drawn afresh for every start of the group: only the ranks started with
it read the plans, and a rank of an older group, or any other process that connects,
subscribes to another topic and gets nothing. (Ranks started elsewhere, which cannot
know a drawn topic, use the empty one.) Torch-free.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import zmq

from tessera.common.curve import ClientKeys, ServerKeys
from tessera.common.wire import WireError

_SUBSCRIBE = b"\x01"


def new_topic() -> str:
    return secrets.token_hex(8)


class PlanPublisher:
    """The sending end: bound once, outlives the groups it feeds."""

    def __init__(self, ctx: zmq.Context, address: str, keys: ServerKeys | None = None) -> None:
        self.socket = ctx.socket(zmq.XPUB)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.XPUB_VERBOSE, 1)  # every rank's subscription, not the first
        if address.startswith("ipc://"):
            Path(address.removeprefix("ipc://")).parent.mkdir(parents=True, exist_ok=True)
        if keys is not None:
            keys.secure(self.socket, address)
        try:
            self.socket.bind(address)
        except zmq.ZMQError as e:
            raise OSError(f"cannot bind {address}: {e.strerror}") from e
        self.address = address
        self.topic = b""
        self.num_subscribed = 0

    def expect(self, topic: str) -> None:
        """A new group will subscribe to ``topic``: count its ranks from zero."""
        self.poll_subscriptions()  # what older groups sent is read and forgotten
        self.topic = topic.encode()
        self.num_subscribed = 0

    def poll_subscriptions(self) -> int:
        """Ranks subscribed to the current topic so far (reads what has arrived)."""
        while self.socket.poll(0):
            if self.socket.recv() == _SUBSCRIBE + self.topic:
                self.num_subscribed += 1
        return self.num_subscribed

    def publish(self, data: bytes) -> None:
        self.socket.send_multipart([self.topic, data])

    def close(self) -> None:
        self.socket.close()


class PlanSubscriber:
    """A rank's receiving end."""

    def __init__(
        self, ctx: zmq.Context, address: str, topic: str, keys: ClientKeys | None = None
    ) -> None:
        self.socket = ctx.socket(zmq.SUB)
        self.socket.setsockopt(zmq.LINGER, 0)
        if keys is not None:
            keys.secure(self.socket, address)
        self.topic = topic.encode()
        self.socket.setsockopt(zmq.SUBSCRIBE, self.topic)
        self.socket.connect(address)

    def recv(self) -> bytes:
        """The next plan's bytes; WireError for a message of another shape."""
        frames = self.socket.recv_multipart()
        if len(frames) != 2 or frames[0] != self.topic:
            raise WireError(f"{len(frames)} frames, not [topic, plan]")
        return frames[1]

    def close(self) -> None:
        self.socket.close()
