"""The gateway's engine replicas: one ``EngineClient`` link per replica, a router that
picks one per request, and streams resumed elsewhere when their replica is lost.

    ServingCore ── EnginePool ─┬─ EngineClient ── replica 0 (scheduler + executors)
                      │        ├─ EngineClient ── replica 1
                      Router   └─ ...             (services.routing picks)

The pool has the interface the core uses of one ``EngineClient`` (open, add, abort,
status, lost_reason, ...), so that one replica behaves as one engine always did.

Addresses: ``--scheduler-address`` is a comma-separated list; an entry
``dns://NAME:PORT`` stands for every address NAME resolves to (``tcp://IP:PORT`` each:
a Kubernetes headless Service, compose ``--scale``), looked up again every
``resolve_interval`` seconds so that new replicas join. An entry ``file:PATH`` stands for
the addresses listed in that file, one a line (``tessera serve --cluster ray`` writes it
as its replicas come and go), read again every second; the file is the whole truth, so a
replica it no longer lists is retired (it takes no requests, its link is closed), and
its open streams are resumed elsewhere as for a lost one. An address read from a file
that other machines can reach is used only with CURVE keys (common.curve.check_link).

Resume. Each sequence's outputs pass through a tap that counts the tokens streamed.
When the replica running it is lost (silent for the scheduler timeout, or restarted),
or ends it as "unavailable" (no executor could be started), the sequence is sent to
another serving replica with the tokens already streamed
(``AddSequence.resume_output_token_ids``): that scheduler recomputes their K/V as after
a preemption and generates from there, counting them as outputs for max_tokens,
penalties and the seeded sampler's step. So the stream goes on with no token lost or
repeated, greedy and seeded alike, as within one engine when its executor dies. With no
other replica serving, the failure reaches the client as before (UNAVAILABLE).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import uuid
from dataclasses import dataclass
from typing import Any

from tessera.common.curve import ClientKeys, check_link
from tessera.common.wire import OutputRow
from tessera.proto.tessera.v1 import engine_pb2
from tessera.services.engine_client import EngineClient, EngineUnavailable
from tessera.services.routing import Load, Router, RoutingPolicy

logger = logging.getLogger(__name__)

DNS_PREFIX = "dns://"
FILE_PREFIX = "file:"
RESOLVE_INTERVAL_S = 10.0
FILE_INTERVAL_S = 1.0  # a replica list in a file is cheap to read: every second


def split_addresses(spec: str) -> list[str]:
    """The comma-separated entries of ``--scheduler-address``; ValueError if none."""
    entries = [a.strip() for a in spec.split(",") if a.strip()]
    if not entries:
        raise ValueError("scheduler_address names no scheduler")
    return entries


def link_address(entry: str) -> str:
    """The ZeroMQ form of an entry, for the CURVE check: dns://NAME:PORT is tcp://; a
    file's addresses are checked as they are read (a file:PATH counts as local here)."""
    if entry.startswith(DNS_PREFIX):
        return "tcp://" + entry.removeprefix(DNS_PREFIX).lstrip("/")
    if entry.startswith(FILE_PREFIX):
        return "ipc://" + entry.removeprefix(FILE_PREFIX)
    return entry


def read_address_file(path: str) -> list[str]:
    """The addresses a file lists, one a line (blank lines and # comments skipped); a
    file that does not exist (yet) lists none."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    except OSError as e:
        logger.warning("cannot read the replica list %s: %s", path, e)
        return []
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


async def resolve(entries: list[str]) -> list[str]:
    """Every ZeroMQ address the entries stand for, in order, without repeats; a name
    that does not resolve (yet) stands for none."""
    loop = asyncio.get_running_loop()
    out: list[str] = []
    for entry in entries:
        if entry.startswith(FILE_PREFIX):
            found = read_address_file(entry.removeprefix(FILE_PREFIX))
        elif not entry.startswith(DNS_PREFIX):
            found = [entry]
        else:
            host, _, port = entry.removeprefix(DNS_PREFIX).lstrip("/").rpartition(":")
            try:
                infos = await loop.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
            except (OSError, ValueError) as e:
                logger.warning("cannot resolve %s: %s", entry, e)
                infos = []
            ips = sorted({info[4][0] for info in infos})
            found = [f"tcp://[{ip}]:{port}" if ":" in ip else f"tcp://{ip}:{port}" for ip in ips]
        out.extend(a for a in found if a not in out)
    return out


@dataclass(slots=True)
class _Flight:
    """One open sequence: what it was sent as, where it runs, what it streamed."""

    sequence: engine_pb2.AddSequence
    queue: asyncio.Queue  # its request's (Generation)
    replica: int
    streamed: list[int]


@dataclass(slots=True)
class ReplicaView:
    """One replica as GetLoad and /metrics show it."""

    address: str
    serving: bool
    reason: str
    status: engine_pb2.StatusReply | None
    num_open: int
    num_routed: int
    num_resumed: int


class _Tap:
    """What a replica's client delivers for one sequence: counted, then passed on, or
    turned into a resume when the replica cannot run it."""

    __slots__ = ("pool", "sid", "replica")

    def __init__(self, pool: EnginePool, sid: str, replica: int) -> None:
        self.pool, self.sid, self.replica = pool, sid, replica

    def put_nowait(self, item: Any) -> None:
        self.pool._deliver(self.sid, self.replica, item)


class EnginePool:
    def __init__(
        self,
        scheduler_address: str,
        policy: RoutingPolicy = RoutingPolicy.CACHE_AWARE,
        load_threshold: int | None = None,
        curve: ClientKeys | None = None,
        resolve_interval: float = RESOLVE_INTERVAL_S,
        **client_options: Any,
    ) -> None:
        self.identity = f"gw-{uuid.uuid4().hex[:12]}"
        self._entries = split_addresses(scheduler_address)
        self._curve = curve
        self._client_options = client_options
        self._has_file = any(e.startswith(FILE_PREFIX) for e in self._entries)
        self._resolve_interval = FILE_INTERVAL_S if self._has_file else resolve_interval
        options = {} if load_threshold is None else {"load_threshold": load_threshold}
        self.router = Router(0, policy, **options)
        self.clients: list[EngineClient] = []
        self.addresses: list[str] = []
        self._instance_ids: list[str] = []
        self._routed: list[int] = []
        self._resumed: list[int] = []
        self._retired: set[int] = set()  # replicas a file stopped listing
        self._file_listed: set[str] = set()  # addresses a file ever listed
        self._refused: set[str] = set()  # beyond loopback without keys: said once
        self._queues: dict[str, asyncio.Queue] = {}  # sequence id -> its request's queue
        self._flights: dict[str, _Flight] = {}
        self._tasks: set[asyncio.Task] = set()
        self._resolver: asyncio.Task | None = None
        self.last_status: engine_pb2.StatusReply | None = None

    # -- life ------------------------------------------------------------------------

    async def start(self) -> None:
        addresses = await resolve(self._entries)
        self._note_file_listed()
        self._add_replicas(addresses)
        if any(e.startswith((DNS_PREFIX, FILE_PREFIX)) for e in self._entries):
            self._resolver = asyncio.get_running_loop().create_task(self._resolve_loop())

    async def close(self) -> None:
        for task in (self._resolver, *self._tasks):
            if task is not None:
                task.cancel()
        await asyncio.gather(*(c.close() for i, c in enumerate(self.clients)
                               if i not in self._retired))  # a retired one is closed

    def _add_replicas(self, addresses: list[str]) -> None:
        live = {a for i, a in enumerate(self.addresses) if i not in self._retired}
        for address in addresses:
            if address in live:
                continue
            try:
                check_link(address, self._curve is not None,
                           "--curve-secret-key-file and --curve-server-key-file")
            except ValueError as e:
                if address not in self._refused:
                    self._refused.add(address)
                    logger.error("engine replica %s skipped: %s", address, e)
                continue
            live.add(address)
            client = EngineClient(address, curve=self._curve, **self._client_options)
            client.start()
            self.clients.append(client)
            self.addresses.append(address)
            self._instance_ids.append("")
            self._routed.append(0)
            self._resumed.append(0)
            self.router.add_replica()
            if len(self.clients) > 1:
                logger.info("engine replica %d: %s", len(self.clients) - 1, address)

    async def _resolve_loop(self) -> None:
        while True:
            await asyncio.sleep(self._resolve_interval)
            addresses = await resolve(self._entries)
            self._add_replicas(addresses)
            if self._has_file:  # a file is the whole truth: retire what left it
                self._note_file_listed()
                self._retire([i for i, a in enumerate(self.addresses) if a not in addresses
                              and a in self._file_listed and i not in self._retired])

    def _note_file_listed(self) -> None:
        """Remember what the files list: only such an address is retired when it leaves
        (one named on the command line, or a DNS name's, never is)."""
        for entry in self._entries:
            if entry.startswith(FILE_PREFIX):
                self._file_listed.update(read_address_file(entry.removeprefix(FILE_PREFIX)))

    def _retire(self, indices: list[int]) -> None:
        """Replicas no longer listed: no new requests; their open sequences are resumed
        on another replica (with the tokens streamed so far); their links close."""
        for i in indices:
            logger.warning("engine replica %s is no longer listed; retiring it",
                           self.addresses[i])
            self._retired.add(i)
            self.router.set_health(i, False, False)
            for flight in [f for f in self._flights.values() if f.replica == i]:
                self._resume(flight)  # ends as unavailable if no other replica can
            client = self.clients[i]
            task = asyncio.get_running_loop().create_task(client.close())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    # -- the EngineClient interface ------------------------------------------------------

    @property
    def lost_reason(self) -> str | None:
        """None while some replica answers (new requests can be placed); else why not."""
        self._refresh()
        clients = [c for i, c in enumerate(self.clients) if i not in self._retired]
        if any(c.lost_reason is None and c.last_status is not None for c in clients):
            return None
        if not clients:
            return "no engine replica resolved yet"
        reasons = {c.lost_reason or "it has not answered yet" for c in clients}
        return "; ".join(sorted(reasons))

    @property
    def serving(self) -> bool:
        return any(c.serving for i, c in enumerate(self.clients) if i not in self._retired)

    def open(self, request_ids: list[str]) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        for sid in request_ids:
            self._queues[sid] = queue
        return queue

    def queue_for(self, request_id: str) -> asyncio.Queue | None:
        return self._queues.get(request_id)

    def close_ids(self, request_ids: list[str]) -> None:
        for sid in request_ids:
            self._queues.pop(sid, None)
            flight = self._flights.pop(sid, None)
            if flight is not None:
                self._leave(flight)

    async def add(self, sequences: list[engine_pb2.AddSequence]) -> None:
        """Route the sequences of one request (they share the prompt) to one replica;
        EngineUnavailable if none can take them."""
        first = sequences[0]
        prompt = list(first.prompt_token_ids)
        tried: list[int] = []
        while True:
            self._refresh()
            index = self.router.choose(prompt, first.cache_salt, exclude=tried)
            if index is None:
                raise EngineUnavailable(
                    "the engine is unavailable: " + (self.lost_reason or "no replica can take it")
                )
            try:
                await self._send(index, sequences, [[] for _ in sequences])
            except EngineUnavailable as e:  # not connected after all: the next one
                logger.warning("engine replica %s: %s", self.addresses[index], e)
                tried.append(index)
                continue
            self._routed[index] += 1
            return

    async def abort(self, request_ids: list[str]) -> None:
        by_replica: dict[int, list[str]] = {}
        unknown = []
        for sid in request_ids:
            flight = self._flights.get(sid)
            if flight is None:
                unknown.append(sid)  # closed already (the core closes, then aborts)
            else:
                by_replica.setdefault(flight.replica, []).append(sid)
        if unknown:  # a scheduler skips ids it does not know: ask them all
            for i in range(len(self.clients)):
                by_replica.setdefault(i, []).extend(unknown)
        for i, ids in by_replica.items():
            if i not in self._retired:
                await self.clients[i].abort(ids)

    async def status(
        self, timeout: float | None = None, reset_prefix_cache: bool = False
    ) -> engine_pb2.StatusReply:
        """One replica's reply as it is; several replies summed (load, counters), with
        the state of the best one. EngineUnavailable if none answers."""
        live = [i for i in range(len(self.clients)) if i not in self._retired]
        replies = await asyncio.gather(
            *(self.clients[i].status(timeout, reset_prefix_cache) for i in live),
            return_exceptions=True,
        )
        answered = [r for r in replies if isinstance(r, engine_pb2.StatusReply)]
        if reset_prefix_cache:
            for i, r in zip(live, replies, strict=True):
                if isinstance(r, engine_pb2.StatusReply):
                    self.router.forget_cache(i)
        if not answered:
            errors = [r for r in replies if isinstance(r, BaseException)]
            if errors and not isinstance(errors[0], EngineUnavailable):
                raise errors[0]
            raise EngineUnavailable(
                str(errors[0]) if errors else "the engine is unavailable: no replica"
            )
        if len(answered) == 1:
            self.last_status = answered[0]
            return answered[0]
        merged = merge_status(answered)
        self.last_status = merged
        return merged

    # -- views ---------------------------------------------------------------------------

    def replicas(self) -> list[ReplicaView]:
        self._refresh()
        return [
            ReplicaView(
                address=address,
                serving=client.serving,
                reason=_reason(client),
                status=client.last_status,
                num_open=self.router.replicas[i].num_open,
                num_routed=self._routed[i],
                num_resumed=self._resumed[i],
            )
            for i, (address, client) in enumerate(zip(self.addresses, self.clients, strict=True))
            if i not in self._retired
        ]

    # -- inside ----------------------------------------------------------------------------

    def _refresh(self) -> None:
        """The router's view of each replica, from its client's pulse."""
        for i, client in enumerate(self.clients):
            if i in self._retired:
                self.router.set_health(i, False, False)
                continue
            status = client.last_status
            reachable = client.lost_reason is None and status is not None
            self.router.set_health(i, client.serving, reachable)
            if status is None:
                continue
            replica = self.router.replicas[i]
            replica.load = Load(
                status.load.num_running, status.load.num_waiting, status.load.num_waiting_tokens
            )
            replica.capacity = max(status.info.num_kv_blocks, 1)
            self.router.block_size = status.info.block_size or self.router.block_size
            if client.instance_id != self._instance_ids[i]:  # restarted: its cache is gone
                self.router.forget_cache(i)
                self._instance_ids[i] = client.instance_id

    async def _send(
        self, index: int, sequences: list[engine_pb2.AddSequence], streamed: list[list[int]]
    ) -> None:
        client = self.clients[index]
        ids = [s.request_id for s in sequences]
        flights = []
        for seq, done in zip(sequences, streamed, strict=True):
            queue = self._queues.get(seq.request_id)
            if queue is None:  # closed meanwhile
                continue
            flight = _Flight(seq, queue, index, done)
            flights.append(flight)
            self._flights[seq.request_id] = flight
            client.open([seq.request_id], _Tap(self, seq.request_id, index))
            self.router.replicas[index].num_open += 1
        if not flights:
            return
        if any(streamed):
            sent = []
            for f in flights:
                seq = engine_pb2.AddSequence()
                seq.CopyFrom(f.sequence)
                seq.resume_output_token_ids.extend(f.streamed)
                sent.append(seq)
        else:
            sent = [f.sequence for f in flights]
        try:
            await client.add(sent)
        except BaseException:
            for f in flights:
                if self._flights.get(f.sequence.request_id) is f:
                    del self._flights[f.sequence.request_id]
                    self._leave(f)
            client.close_ids(ids)
            raise

    def _leave(self, flight: _Flight) -> None:
        self.router.replicas[flight.replica].num_open -= 1
        self.clients[flight.replica].close_ids([flight.sequence.request_id])

    def _deliver(self, sid: str, replica: int, item: Any) -> None:
        flight = self._flights.get(sid)
        if flight is None or flight.replica != replica:
            return  # closed, or moved to another replica: a late word from the old one
        if isinstance(item, engine_pb2.Rejection):
            if item.kind == "unavailable" and self._can_resume(replica):
                self._resume(flight)
                return
        elif item.finished and item.finish_reason == "error" and item.error_kind == "unavailable":
            if self._can_resume(replica):
                self._resume(flight)
                return
        else:
            flight.streamed.extend(item.new_token_ids)
        if isinstance(item, engine_pb2.Rejection) or item.finished:
            del self._flights[sid]
            self._leave(flight)
        flight.queue.put_nowait(item)

    def _can_resume(self, lost: int) -> bool:
        self._refresh()
        return any(r.serving for i, r in enumerate(self.router.replicas) if i != lost)

    def _resume(self, flight: _Flight) -> None:
        """Take the sequence off its replica; send it with its streamed tokens to another
        (a task: this runs inside the old client's delivery)."""
        sid = flight.sequence.request_id
        del self._flights[sid]
        self._leave(flight)
        task = asyncio.get_running_loop().create_task(self._resume_elsewhere(flight))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resume_elsewhere(self, flight: _Flight) -> None:
        seq, lost = flight.sequence, flight.replica
        tried = [lost]
        while seq.request_id in self._queues:  # until the client goes away
            self._refresh()
            context = [*seq.prompt_token_ids, *flight.streamed]
            index = self.router.choose(context, seq.cache_salt, exclude=tried)
            if index is None:
                break
            try:
                await self._send(index, [seq], [flight.streamed])
            except EngineUnavailable:
                tried.append(index)
                continue
            self._resumed[index] += 1
            logger.warning(
                "sequence %s resumed on %s after %d tokens (%s lost it)",
                seq.request_id, self.addresses[index], len(flight.streamed), self.addresses[lost],
            )  # fmt: skip
            return
        if seq.request_id in self._queues:
            flight.queue.put_nowait(
                OutputRow(
                    seq.request_id,
                    [],
                    finished=True,
                    finish_reason="error",
                    error="the engine is unavailable: its replica was lost and no other "
                    "replica could take the sequence",
                    error_kind="unavailable",
                )
            )


def _reason(client: EngineClient) -> str:
    if client.lost_reason is not None:
        return client.lost_reason
    status = client.last_status
    if status is None:
        return "it has not answered yet"
    return status.state_reason


def merge_status(replies: list[engine_pb2.StatusReply]) -> engine_pb2.StatusReply:
    """Several replicas' replies as one engine's: loads and counters summed, the
    model info of the first, the best state (SERVING if any serves)."""
    merged = engine_pb2.StatusReply()
    merged.CopyFrom(replies[0])
    for field in ("load", "counters"):
        total = getattr(merged, field)
        for reply in replies[1:]:
            part = getattr(reply, field)
            for desc in part.DESCRIPTOR.fields:
                name = desc.name
                setattr(total, name, getattr(total, name) + getattr(part, name))
    merged.info.num_kv_blocks = sum(r.info.num_kv_blocks for r in replies)
    merged.num_prefix_cache_blocks_dropped = sum(
        r.num_prefix_cache_blocks_dropped for r in replies
    )
    serving = [r for r in replies if r.state == engine_pb2.ENGINE_STATE_SERVING]
    if serving:
        merged.state = engine_pb2.ENGINE_STATE_SERVING
        merged.state_reason = ""
    return merged
