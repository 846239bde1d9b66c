"""A load-generator process: datanode heartbeat streams over real gRPC (grpc.aio), driven by commands.

One process runs many datanodes on one asyncio loop, one `SendHeartbeat` bidi
stream per datanode, spread over a few HTTP/2 connections. By default every
heartbeat is what a real datanode sends: `timestamp_millis` from the
generator's wall clock on each message, a `node_epoch` (the stream's start
time), a `peer_addr`; so no two messages of a stream are the same bytes. The
fields that do not change are serialized once per datanode and the stamp is
spliced in between (field order as protobuf writes it), so the generator's CPU
goes to gRPC, not to protobuf. `stamped=False` sends the same bytes every time
(no timestamp): the best case of the edge's fastest path, for a labelled row.

The parent talks to it over a `multiprocessing` pipe; every command is a
tuple and gets one reply (a dict):

- `("fleet", ids, regions, period_s)`: start one stream per datanode id,
  heartbeating every `period_s` seconds, phases spread over the period;
- `("flood", seconds, window, stamped=True, change_every=0)`: every fleet stream
  sends as fast as answers come back (`window` requests outstanding) for
  `seconds`, then resumes its period; replies when done. With `change_every`,
  the region set changes every that many messages (`ChangingHeartbeats`);
- `("extra", addr, ids, regions, seconds, window, stamped=True, ramp=False, change_every=0, tls=None)`:
  open extra streams (to `addr`, or the service when empty) and flood them for
  `seconds`, then close them; replies when done. With `ramp`, each stream
  first sends `regions` messages naming regions 0..k (k = 0, 1, ...), so each
  region index joins at a different moment (churned histories), and the
  `seconds` are measured after that; `tls` (a `ClientTLS`): over TLS;
- `("stop", id)` / `("start", id)`: end one fleet datanode's stream (it
  goes silent) / start it again;
- `("dump", page_size)`: read a Dump of every detector and time it;
- `("fleet_stop",)`: end every fleet stream;
- `("stats",)`: counters and this process's CPU time;
- `("quit",)`.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
import traceback
from dataclasses import dataclass, field

import grpc

from supervisor_service.proto import pb, pb_grpc
from supervisor_service.security.tls import ClientTLS, aio_channel

METHOD = "/supervisor.v1.RegionSupervisor/SendHeartbeat"
_REJECTED = bytes([6 << 3, 1])  # HeartbeatResponse.rejected = true on the wire
CHANNEL_OPTIONS = [
    ("grpc.use_local_subchannel_pool", 1),  # a connection per channel, not one shared by all
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]


def region_ids_of(datanode_id: int, regions: int) -> list[int]:
    """A datanode's region ids: table id = the datanode id, region numbers 0..n-1 (sorted, unique)."""
    return [(datanode_id << 32) | n for n in range(regions)]


def peer_addr_of(datanode_id: int) -> str:
    return f"10.{(datanode_id >> 16) & 255}.{(datanode_id >> 8) & 255}.{datanode_id & 255}:4001"


def heartbeat_bytes(datanode_id: int, regions: int, node_epoch: int = 0) -> bytes:
    """The heartbeat without a timestamp: the same bytes every time (the best case)."""
    return pb.HeartbeatRequest(
        datanode_id=datanode_id, region_ids=region_ids_of(datanode_id, regions),
        peer_addr=peer_addr_of(datanode_id), node_epoch=node_epoch,
    ).SerializeToString()


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_TIMESTAMP_TAG = bytes([2 << 3])  # HeartbeatRequest.timestamp_millis, varint


class Heartbeats:
    """One datanode's heartbeat bytes: `next()` stamps `timestamp_millis` with the wall clock, or
    (not `stamped`) returns the same bytes every time.

    The serialized message is split around field 2 (the stamp): field 1 before it, fields 3 to 5
    after, as protobuf itself writes them, so a stamped message is byte for byte what
    `SerializeToString()` of the whole request would give."""

    __slots__ = ("head", "tail", "fixed", "stamped", "node_epoch")

    def __init__(self, datanode_id: int, region_ids: list[int], node_epoch: int, stamped: bool = True) -> None:
        self.node_epoch = node_epoch
        self.head = pb.HeartbeatRequest(datanode_id=datanode_id).SerializeToString()
        self.tail = pb.HeartbeatRequest(region_ids=region_ids, peer_addr=peer_addr_of(datanode_id),
                                        node_epoch=node_epoch).SerializeToString()
        self.fixed = self.head + self.tail
        self.stamped = stamped

    def next(self, stamped: bool | None = None) -> bytes:
        if not (self.stamped if stamped is None else stamped):
            return self.fixed
        return b"".join((self.head, _TIMESTAMP_TAG, _varint(time.time_ns() // 1_000_000), self.tail))


class ChangingHeartbeats:
    """A datanode's heartbeats whose region set changes every `every`-th message: in turn one of its
    regions is left out (the next one each time round) and put back, so the set is never one the
    service has not seen and no detector is created. Same `next()` as `Heartbeats`; the changed
    message is serialized when it is first needed (once per `every` messages)."""

    __slots__ = ("datanode_id", "regions", "every", "full", "current", "sent", "changes")

    def __init__(self, full: Heartbeats, datanode_id: int, regions: int, every: int) -> None:
        self.datanode_id = datanode_id
        self.regions = regions
        self.every = every
        self.full = self.current = full
        self.sent = 0
        self.changes = 0

    def next(self, stamped: bool | None = None) -> bytes:
        self.sent += 1
        if self.regions > 1 and self.sent % self.every == 0:
            self.changes += 1
            if self.changes % 2:  # leave one out
                ids = region_ids_of(self.datanode_id, self.regions)
                del ids[(self.changes // 2) % self.regions]
                self.current = Heartbeats(self.datanode_id, ids, self.full.node_epoch, self.full.stamped)
            else:  # and put it back
                self.current = self.full
        return self.current.next(stamped)


def heartbeats_of(datanode_id: int, regions: int, stamped: bool = True) -> Heartbeats:
    """A datanode's heartbeats, its epoch its start time (wall ms: a restart gets a newer one)."""
    return Heartbeats(datanode_id, region_ids_of(datanode_id, regions), time.time_ns() // 1_000_000, stamped)


@dataclass
class Counters:
    sent: int = 0  # requests written
    acked: int = 0  # answers read, not rejected
    rejected: int = 0  # answers with rejected=true
    errors: int = 0  # streams that ended with an error
    reasons: dict[str, int] = field(default_factory=dict)

    def add_answer(self, raw: bytes) -> None:
        # Parse only what may be a rejection (field 6 `rejected` = true is the bytes 0x30 0x01):
        # the generator's CPU should go to gRPC, and the service counts accepted regions itself.
        if _REJECTED in raw:
            answer = pb.HeartbeatResponse.FromString(raw)
            if answer.rejected:
                self.rejected += 1
                key = answer.reason[:60]
                self.reasons[key] = self.reasons.get(key, 0) + 1
                return
        self.acked += 1

    def as_dict(self) -> dict:
        return {
            "sent": self.sent, "acked": self.acked, "rejected": self.rejected,
            "errors": self.errors, "reasons": dict(self.reasons),
        }


class _Stream:
    """One datanode's stream, periodic or flooding."""

    def __init__(self, gen: LoadGenerator, datanode_id: int, payload: Heartbeats | ChangingHeartbeats, period: float,
                 phase: float, ramp: list[Heartbeats] | None = None) -> None:
        self.gen = gen
        self.datanode_id = datanode_id
        self.payload = payload
        self.ramp = ramp or []  # sent first, one after the other (the region set growing)
        self.period = period
        self.phase = phase
        self.stopped = False
        self.task: asyncio.Task | None = None

    async def run(self, method, counters: Counters, flood_until=None) -> None:
        """Heartbeat until stopped. `flood_until`: a callable giving the end of the current flood."""
        loop = asyncio.get_running_loop()
        gen = self.gen
        flood_until = flood_until or (lambda: gen.flood_until)
        call = method()
        pending = 0
        next_due = loop.time() + self.phase
        try:
            for step in self.ramp:
                await call.write(step.next())
                raw = await call.read()
                if raw is grpc.aio.EOF:
                    raise RuntimeError("stream ended")
                counters.add_answer(raw)
            self.ramp = []
            while not self.stopped:
                if loop.time() < flood_until():
                    while pending < gen.window:
                        await call.write(self.payload.next(gen.flood_stamped))
                        counters.sent += 1
                        pending += 1
                    raw = await call.read()
                    if raw is grpc.aio.EOF:
                        raise RuntimeError("stream ended")
                    pending -= 1
                    counters.add_answer(raw)
                    next_due = loop.time() + self.phase
                    continue
                while pending:
                    raw = await call.read()
                    if raw is grpc.aio.EOF:
                        raise RuntimeError("stream ended")
                    pending -= 1
                    counters.add_answer(raw)
                delay = next_due - loop.time()
                if delay > 0:
                    changed = gen.changed
                    try:
                        await asyncio.wait_for(changed.wait(), delay)
                    except TimeoutError:
                        pass
                    continue
                next_due += self.period
                if next_due < loop.time():  # fell behind (a flood ended): keep the phase, skip the missed
                    next_due = loop.time() + self.period
                await call.write(self.payload.next())
                counters.sent += 1
                pending += 1
            while pending:
                raw = await call.read()
                if raw is grpc.aio.EOF:
                    break
                pending -= 1
                counters.add_answer(raw)
            await call.done_writing()
            await call.read()
        except asyncio.CancelledError:
            call.cancel()
            raise
        except Exception:  # noqa: BLE001 - counted and reported, the others go on
            counters.errors += 1
            call.cancel()


class LoadGenerator:
    def __init__(self, addr: str, channels: int) -> None:
        self.addr = addr
        self.channels = [grpc.aio.insecure_channel(addr, options=CHANNEL_OPTIONS) for _ in range(channels)]
        self.methods = [
            c.stream_stream(METHOD, request_serializer=None, response_deserializer=None) for c in self.channels
        ]
        self.fleet: dict[int, _Stream] = {}
        self.counters = Counters()
        self.flood_until = 0.0
        self.window = 1
        self.changed = asyncio.Event()
        self.regions = 0
        self.period = 1.0
        self.flood_stamped: bool | None = None  # a flood's stamping, when it overrides the streams'

    def _wake(self) -> None:
        """Wake every sleeping periodic stream (a flood starts or a datanode restarts)."""
        self.changed.set()
        self.changed = asyncio.Event()

    def _start_fleet_stream(self, datanode_id: int, phase: float) -> None:
        stream = _Stream(self, datanode_id, heartbeats_of(datanode_id, self.regions), self.period, phase)
        self.fleet[datanode_id] = stream
        method = self.methods[datanode_id % len(self.methods)]
        stream.task = asyncio.ensure_future(stream.run(method, self.counters))

    async def fleet_start(self, ids: list[int], regions: int, period: float) -> dict:
        self.regions, self.period = regions, period
        n = max(1, len(ids))
        for i, datanode_id in enumerate(ids):
            # Phases spread evenly over the period, interleaved across processes by id.
            self._start_fleet_stream(datanode_id, period * ((i + 0.5) / n))
        return {"streams": len(self.fleet)}

    async def flood(self, seconds: float, window: int, stamped: bool = True, change_every: int = 0) -> dict:
        loop = asyncio.get_running_loop()
        plain = {d: s.payload for d, s in self.fleet.items()}
        if change_every:  # for the flood only: the periodic heartbeats after it name every region again
            for d, stream in self.fleet.items():
                stream.payload = ChangingHeartbeats(stream.payload, d, self.regions, change_every)
        before = self.counters.as_dict()
        cpu0, t0 = time.process_time(), loop.time()
        self.window = window
        self.flood_stamped = stamped
        self.flood_until = t0 + seconds
        self._wake()
        await asyncio.sleep(seconds)
        elapsed = loop.time() - t0
        self.flood_stamped = None
        for d, payload in plain.items():
            if d in self.fleet:
                self.fleet[d].payload = payload
        after = self.counters.as_dict()
        return {
            "elapsed": elapsed, "cpu": time.process_time() - cpu0,
            **{k: after[k] - before[k] for k in ("sent", "acked", "rejected", "errors")},
        }

    async def extra(self, addr: str, ids: list[int], regions: int, seconds: float, window: int,
                    stamped: bool = True, ramp: bool = False, change_every: int = 0,
                    tls: ClientTLS | None = None) -> dict:
        loop = asyncio.get_running_loop()
        channels = [aio_channel(addr or self.addr, tls, CHANNEL_OPTIONS) for _ in range(len(self.channels))]
        methods = [c.stream_stream(METHOD, request_serializer=None, response_deserializer=None) for c in channels]
        counters = Counters()
        self.window = window
        streams = []
        for d in ids:
            epoch = time.time_ns() // 1_000_000
            steps = [Heartbeats(d, region_ids_of(d, k), epoch, stamped) for k in range(1, regions)] if ramp else []
            payload = Heartbeats(d, region_ids_of(d, regions), epoch, stamped)
            if change_every:
                payload = ChangingHeartbeats(payload, d, regions, change_every)
            streams.append(_Stream(self, d, payload, 1.0, 0.0, steps))
        until = math.inf if ramp else loop.time() + seconds
        tasks = [asyncio.ensure_future(s.run(methods[i % len(methods)], counters, lambda: until))
                 for i, s in enumerate(streams)]
        ramp_s = 0.0
        if ramp:  # every stream ramps at its own pace (flat out); the window starts once all are through
            r0 = loop.time()
            while not all(not s.ramp or t.done() for s, t in zip(streams, tasks)):
                await asyncio.sleep(0.05)
            ramp_s = loop.time() - r0
            until = loop.time() + seconds
        base = counters.as_dict()  # the ramp's messages are not the window's
        cpu0, t0 = time.process_time(), loop.time()
        await asyncio.sleep(seconds)
        for s in streams:
            s.stopped = True
        elapsed = loop.time() - t0
        cpu = time.process_time() - cpu0
        done, late = await asyncio.wait(tasks, timeout=10)
        for task in late:
            task.cancel()
        for c in channels:
            await c.close()
        after = counters.as_dict()
        window_counts = {k: after[k] - base[k] for k in ("sent", "acked", "rejected", "errors")}
        return {"elapsed": elapsed, "cpu": cpu, "ramp_s": ramp_s, "reasons": after["reasons"], **window_counts}

    async def stop_one(self, datanode_id: int) -> dict:
        stream = self.fleet.pop(datanode_id)
        stream.stopped = True
        self._wake()
        await asyncio.wait_for(stream.task, 10)
        return {"stopped": datanode_id, "monotonic": time.monotonic()}

    async def start_one(self, datanode_id: int) -> dict:
        self._start_fleet_stream(datanode_id, 0.0)
        return {"started": datanode_id}

    async def dump(self, page_size: int) -> dict:
        channel = grpc.aio.insecure_channel(self.addr, options=CHANNEL_OPTIONS)
        stub = pb_grpc.RegionSupervisorStub(channel)
        t0 = time.monotonic()
        cpu0 = time.process_time()
        rows = pages = size = 0
        first = None
        try:
            async for page in stub.Dump(pb.DumpRequest(page_size=page_size), timeout=120):
                if first is None:
                    first = time.monotonic() - t0
                pages += 1
                rows += len(page.detectors)
                size += page.ByteSize()
        finally:
            await channel.close()
        return {"seconds": time.monotonic() - t0, "first_page_s": first or 0.0, "rows": rows, "pages": pages,
                "bytes": size, "cpu": time.process_time() - cpu0}

    async def fleet_stop(self) -> dict:
        streams = list(self.fleet.values())
        self.fleet.clear()
        for stream in streams:
            stream.stopped = True
        self._wake()
        tasks = [s.task for s in streams if s.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=10)
        return {"stopped": len(streams)}

    async def stats(self) -> dict:
        return {"cpu": time.process_time(), "monotonic": time.monotonic(), **self.counters.as_dict()}

    async def close(self) -> None:
        for stream in self.fleet.values():
            stream.stopped = True
        self._wake()
        tasks = [s.task for s in self.fleet.values() if s.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=10)
        for c in self.channels:
            await c.close()


def pipe_commands(conn) -> asyncio.Queue:
    """The commands arriving on the parent's pipe, as a queue of the running loop; ("quit",) when it closes."""
    loop = asyncio.get_running_loop()
    commands: asyncio.Queue = asyncio.Queue()

    def readable() -> None:
        try:
            while conn.poll():
                commands.put_nowait(conn.recv())
        except EOFError:
            commands.put_nowait(("quit",))
            loop.remove_reader(conn.fileno())

    loop.add_reader(conn.fileno(), readable)
    return commands


async def _serve(conn, addr: str, channels: int) -> None:
    loop = asyncio.get_running_loop()
    gen = LoadGenerator(addr, channels)
    commands = pipe_commands(conn)

    async def answer(coro) -> None:
        try:
            conn.send(await coro)
        except Exception as exc:  # noqa: BLE001 - the parent gets the error as the reply
            conn.send({"error": f"{exc!r}\n{traceback.format_exc()}"})

    handlers = {
        "fleet": gen.fleet_start, "flood": gen.flood, "extra": gen.extra, "stop": gen.stop_one,
        "start": gen.start_one, "dump": gen.dump, "stats": gen.stats, "fleet_stop": gen.fleet_stop,
    }
    background: set[asyncio.Task] = set()
    while True:
        command = await commands.get()
        name, args = command[0], command[1:]
        if name == "quit":
            break
        task = asyncio.ensure_future(answer(handlers[name](*args)))
        background.add(task)
        task.add_done_callback(background.discard)
    loop.remove_reader(conn.fileno())
    await gen.close()
    conn.send({"quit": True})


def main(conn, addr: str, channels: int = 4) -> None:
    """Entry point of the process (`multiprocessing`, spawn start method)."""
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
    asyncio.run(_serve(conn, addr, channels))
