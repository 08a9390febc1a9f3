"""Redis persistence behind the session store: a log several server replicas share.

`RedisEventLog` is the `store.EventLog` for running more than one replica: every session and
event goes to one Redis (a single primary, or Sentinel; not Cluster: one commit touches keys of
several hash slots). As in store_sqlite, writes are queued and one writer task commits them in
groups, and an event becomes visible (`Session.committed`) only once Redis acknowledged it.

Keys (all under `key_prefix`, `{sid}` a session id):
  `s:{sid}`      hash: kind, model, created, state, body_digest, request (JSON), finish_reason,
                 usage (JSON), ended_at ("" for None), `next` (events stored = the next index),
                 `cancel` ("1" once any replica asked to cancel), `wt`/`ws` (the writer and
                 number of the last write applied: a retried write is recognized).
  `e:{sid}`      stream, one entry per event with the explicit id `{index}-1`: fields `d` data,
                 `e` SSE event name, `m` meta ("" for None both ways). Redis refuses an id not
                 above the last one, so an index can never be written twice.
  `active`       set of the sessions in state queued or in_progress.
  `lease:{sid}`  the id of the replica that owns (generates) the session; expires after
                 `lease_seconds` unless that replica renews it (every lease_seconds / 3).
  channel `cancel`: a session id, published when a cancel is requested.

The fence: a session's writes queued for one commit go in one Lua script call (one round
trip carries the calls of every session) that first checks `lease:{sid}` is still this
replica's and otherwise writes nothing (creating a session takes the lease in the same script,
and refuses an id that exists). A replica whose lease expired or was taken can therefore never
add to a session another replica now writes; it learns so through `on_lease_lost(sid)`.

Durability: an event is committed once Redis acknowledged it, and what survives a crash is
Redis's setting. With `appendonly yes` and `appendfsync always` every acknowledged event is on
disk. With `appendfsync everysec` (the usual setting) a crash of the Redis process alone
normally loses nothing (acknowledged writes are in the OS's cache), but a crash of its machine
can lose about the last second of acknowledged events (up to two if the disk is slow); without
the AOF, everything since the last snapshot. A
failover to a Redis replica can lose what was not yet replicated (replication is asynchronous).
A lost event that a client already saw breaks the promise that it never changes: pick the
settings to match it.

A partition: a replica cut off from Redis cannot commit, so its clients see nothing new
(`write_error` is set, new sessions get 503) and it cannot renew its leases. Once a lease
expires another replica can take the session over (`orphans()`, `claim()`); when the first
one reconnects, its pending writes to that session are refused by the fence.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from contextlib import suppress
from typing import Any, Callable
from urllib.parse import parse_qsl, urlencode, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from store import (TERMINAL_STATES, Event, EventsGone, Session, StoredRow,
                   StoreOpenError, StoreUnavailable, WriteQueue)
from store_sqlite import _json, _parse_row

log = logging.getLogger("resumable.store")

# How many queued writes one round trip may take; bounds the latency one commit adds.
_MAX_GROUP = 512
# Page size for replaying evicted events.
_REPLAY_PAGE = 256
# Seconds a command on the writer connection may take before it counts as failed: a silent
# partition must show in write_error, not hang the writer.
_COMMAND_TIMEOUT = 5.0

# ---------------------------------------------------------------------------------------------
# Scripts (each runs atomically in Redis)
# ---------------------------------------------------------------------------------------------

# KEYS: s:, e:, lease:, active. ARGV: replica, sid, lease_ms, mode (create|write|repair),
# state ("" if the group has no session fields), expire_ms ("0" unless the state is terminal),
# writer token, write number, number of field/value args, the fields, then 4 args per event:
# index, data, event, meta. Returns {"ok", events refused}, {"fenced", holder}, {"exists", ""}
# or {"gap", next}; it checks everything before its first write and writes only for "ok".
# The writer token and number (fields wt, ws) recognize a group applied before whose reply was
# lost: the retried batch then passes over it instead of being refused by its own effects
# (a terminal group deletes the lease, a create makes the id exist).
_GROUP_LUA = """
local me, sid, mode, state, expire = ARGV[1], ARGV[2], ARGV[4], ARGV[5], ARGV[6]
local first = 10 + tonumber(ARGV[9])
local h = redis.call('HMGET', KEYS[1], 'next', 'wt', 'ws')
if h[2] == ARGV[7] and tonumber(h[3]) >= tonumber(ARGV[8]) then return {'ok', 0} end
local nxt = tonumber(h[1] or '0')
local holder = redis.call('GET', KEYS[3])
if holder and holder ~= me then
  return {'fenced', holder}
elseif mode == 'create' then
  if redis.call('EXISTS', KEYS[1]) == 1 then return {'exists', ''} end
  redis.call('SET', KEYS[3], me, 'PX', ARGV[3])
elseif not holder and mode ~= 'repair' then
  return {'fenced', ''}
elseif redis.call('EXISTS', KEYS[1]) == 0 then
  return {'fenced', 'deleted'}
end
if first <= #ARGV and tonumber(ARGV[first]) > nxt then return {'gap', tostring(nxt)} end
local refused = 0
for i = first, #ARGV, 4 do
  local r = redis.pcall('XADD', KEYS[2], ARGV[i] .. '-1', 'd', ARGV[i+1], 'e', ARGV[i+2],
                        'm', ARGV[i+3])
  if type(r) == 'table' and r.err then refused = refused + 1 end
  nxt = math.max(nxt, tonumber(ARGV[i]) + 1)
end
if first > 10 then redis.call('HSET', KEYS[1], unpack(ARGV, 10, first - 1)) end
redis.call('HSET', KEYS[1], 'next', tostring(nxt), 'wt', ARGV[7], 'ws', ARGV[8])
if expire ~= '0' then
  redis.call('SREM', KEYS[4], sid)
  redis.call('PEXPIRE', KEYS[1], expire)
  redis.call('PEXPIRE', KEYS[2], expire)
  redis.call('DEL', KEYS[3])
elseif state ~= '' then
  redis.call('SADD', KEYS[4], sid)
end
return {'ok', refused}
"""
# KEYS: lease:. ARGV: replica, lease_ms. 1 if renewed, 0 if the lease is gone or another's.
_RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
# KEYS: lease:. ARGV: replica. Lets go of a lease only if it is still ours.
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# KEYS: s:. ARGV: channel, sid. Marks an existing session cancelled; announces it either way.
_CANCEL_LUA = """
local found = redis.call('EXISTS', KEYS[1])
if found == 1 then redis.call('HSET', KEYS[1], 'cancel', '1') end
redis.call('PUBLISH', ARGV[1], ARGV[2])
return found
"""

# ---------------------------------------------------------------------------------------------
# The log
# ---------------------------------------------------------------------------------------------


class RedisEventLog(WriteQueue):
    """Sessions and events in Redis, shared by replicas, written by one group-committing task.

    Implements `store.EventLog`. `open()` and `close()` must run on the event loop that uses
    it. `shared` is True: other replicas write the same log, so sessions are loaded on demand
    (`load`) rather than all at `open()`. The runtime sets `on_lease_lost(sid)` (this replica
    may no longer write the session) and `on_cancel(sid)` (a cancel was requested anywhere).
    """

    shared = True

    def __init__(self, url: str, *, replica_id: str, lease_seconds: float = 10.0,
                 key_prefix: str = "resumable:", ttl_seconds: float = 3600):
        self.url = url
        self.db_path = _redact(url)
        self.replica_id = replica_id
        self.lease_seconds = lease_seconds
        self.key_prefix = key_prefix
        self.ttl_seconds = ttl_seconds
        self._init_writes()
        self.commits = 0  # round trips committed; read by tests and the benchmark
        self.owned: set[str] = set()  # sessions whose lease this replica holds and renews
        self.on_lease_lost: Callable[[str], Any] = lambda sid: None
        self.on_cancel: Callable[[str], Any] = lambda sid: None
        self._r: aioredis.Redis | None = None  # commands; short timeout
        self._rb: aioredis.Redis | None = None  # blocking reads and pub/sub; no timeout
        self._tasks: list[asyncio.Task] = []
        self._io = asyncio.Lock()  # commits and lease renewals take turns (see _renew_loop)
        self._lost: set[str] = set()  # sessions on_lease_lost was called for
        self._sha: dict[str, str] = {}
        self._token = f"{replica_id}/{os.urandom(6).hex()}"  # this log's writes (script: wt)
        self._seq = 0  # numbers queued groups (script: ws)

    what = "session store Redis"

    def _writing(self) -> bool:
        return self._r is not None and self._writes is not None

    def _key(self, kind: str, sid: str = "") -> str:
        return f"{self.key_prefix}{kind}{sid}"

    # --- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> list[StoredRow]:
        """Connect, load the scripts, subscribe to cancels and start the writer and lease tasks.

        Returns [] (sessions are loaded on demand). Raises StoreOpenError if Redis cannot be
        reached or refuses the scripts; nothing stays open then.
        """
        self._writes = asyncio.Queue()
        self._r = aioredis.Redis.from_url(self.url, decode_responses=True,
                                          socket_timeout=_COMMAND_TIMEOUT,
                                          socket_connect_timeout=_COMMAND_TIMEOUT,
                                          retry=Retry(NoBackoff(), 1))  # we retry ourselves
        self._rb = aioredis.Redis.from_url(self.url, decode_responses=True, socket_timeout=None,
                                           socket_connect_timeout=_COMMAND_TIMEOUT,
                                           health_check_interval=15)
        pubsub = self._rb.pubsub()
        try:
            await self._r.ping()
            await self._load_scripts()
            await pubsub.subscribe(self._key("cancel"))
        except (RedisError, OSError) as e:
            await pubsub.aclose()
            await self._release()
            raise StoreOpenError(f"cannot reach the session store at Redis {self.db_path}: "
                                 f"{type(e).__name__}: {e} (check that Redis runs there and "
                                 f"the URL, password and network allow this server in)") from e
        self._tasks = [asyncio.create_task(self._write_loop(_MAX_GROUP), name="session-store-writer"),
                       asyncio.create_task(self._renew_loop(), name="session-store-leases"),
                       asyncio.create_task(self._cancel_loop(pubsub), name="session-store-cancel")]
        return []

    async def _load_scripts(self) -> None:
        for name, lua in (("group", _GROUP_LUA), ("renew", _RENEW_LUA),
                          ("release", _RELEASE_LUA), ("cancel", _CANCEL_LUA)):
            self._sha[name] = await self._r.script_load(lua)

    async def close(self) -> None:
        """Commit what is queued (15 s at most), let go of the leases still held, disconnect."""
        writer, others = (self._tasks[0], self._tasks[1:]) if self._tasks else (None, [])
        for task in others:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
        if writer is not None:
            try:
                await asyncio.wait_for(self.flush(), 15)
            except asyncio.TimeoutError:
                log.error("session store: writes still failing at shutdown; uncommitted events "
                          "are lost, as no client could have seen them")
            writer.cancel()
            with suppress(asyncio.CancelledError):
                await writer
            # Another replica may take these over now rather than once the lease expires.
            with suppress(RedisError, OSError):
                async with self._r.pipeline(transaction=False) as pipe:
                    for sid in self.owned:
                        pipe.evalsha(self._sha["release"], 1, self._key("lease:", sid),
                                     self.replica_id)
                    await pipe.execute()
        self._tasks, self.owned = [], set()
        await self._release()

    async def _release(self) -> None:
        for client in (self._r, self._rb):
            if client is not None:
                with suppress(Exception):
                    await client.aclose()
        self._r = self._rb = None

    # --- what the store writes (queued; committed by the writer) ----------------------------

    def put_session(self, s: Session) -> None:
        """Write the session's state fields; a fresh `queued` session is created (taking the
        lease; refused if the id exists). Raises TypeError/ValueError on a non-JSON request."""
        create = s.next_index == 0 and s.state == "queued"
        self._group(s, "create" if create else "write", _fields(s, full=create), [])

    def repair(self, s: Session) -> None:
        """Rewrite every field of a damaged session (refused only if another replica owns it)."""
        self._group(s, "repair", _fields(s, full=True), [])

    def put_events(self, s: Session, events: list[Event], with_session: bool = False) -> None:
        """Append `events` (and the session's state fields if `with_session`) atomically."""
        self._group(s, "write", _fields(s, full=False) if with_session else None, events)

    def delete(self, session_id: str) -> None:
        """Delete the session, its events and lease (not fenced: any replica may delete)."""
        self._writes.put_nowait(("delete", session_id))

    def _group(self, s: Session, mode: str, fields: dict[str, str] | None,
               events: list[Event]) -> None:
        self._seq += 1  # in queue order: what the scripts compare to spot a replayed group
        self._writes.put_nowait(("group", s, mode, fields, events, self._seq))

    # --- reading -----------------------------------------------------------------------------

    async def fetch(self, session_id: str, start: int, stop: int) -> list[Event]:
        """Committed events `start <= index < stop`, at most one page, in order.

        Raises EventsGone if none is stored, RedisError if Redis cannot be read."""
        entries = [] if stop <= start else await self._r.xrange(
            self._key("e:", session_id), f"{start}-1", f"{stop - 1}-1", count=_REPLAY_PAGE)
        if not entries:
            raise EventsGone(session_id, start, stop)
        return [Event(int(eid.split("-", 1)[0]), f.get("d", ""), f.get("e") or None,
                      f.get("m") or None) for eid, f in entries]

    async def load(self, session_id: str) -> StoredRow | None:
        """The stored session, or None if there is none; unreadable fields -> `damaged`.

        Raises StoreUnavailable (no address in its message: it reaches clients) if Redis cannot
        be read; the cause, with the address, goes to the log."""
        try:
            h = await self._r.hgetall(self._key("s:", session_id))
        except (RedisError, OSError) as e:
            log.warning("session %s: Redis at %s cannot be read: %s", session_id, self.db_path, e)
            raise StoreUnavailable("the shared session store (Redis) cannot be read") from e
        if not h:
            return None
        row = (session_id, h.get("kind"), h.get("model"), _number(h.get("created")),
               h.get("state"), h.get("body_digest"), h.get("request"),
               h.get("finish_reason") or None, h.get("usage") or None,
               _number(h.get("ended_at") or None))
        fields, problems = _parse_row(row)
        inputs = _json(h["inputs"]) if h.get("inputs") else None
        if isinstance(inputs, dict) and fields["state"] not in TERMINAL_STATES:
            fields["inputs"] = inputs
        try:
            next_index = int(h["next"])
        except (KeyError, ValueError):
            last = await self._r.xrevrange(self._key("e:", session_id), count=1)
            next_index = int(last[0][0].split("-", 1)[0]) + 1 if last else 0
            problems.append(f"next {h.get('next')!r:.80}")
        if problems:
            log.error("session %s in Redis %s has unreadable fields (%s); loaded as failed",
                      session_id, self.db_path, ", ".join(problems))
        return StoredRow(fields, next_index, bool(problems))

    async def wait(self, session_id: str, after: int, timeout: float) -> None:
        """Return once an event with index > `after` is stored, or after `timeout` seconds.

        Blocks on its own connection (XREAD BLOCK), so writes never queue behind it. Raises
        RedisError if Redis cannot be read."""
        since = f"{after}-1" if after >= 0 else "0-0"
        with suppress(asyncio.TimeoutError):  # a silent partition must not block forever
            await asyncio.wait_for(self._rb.xread({self._key("e:", session_id): since}, count=1,
                                                  block=max(1, int(timeout * 1000))),
                                   timeout + _COMMAND_TIMEOUT)

    async def cancel_requested(self, session_id: str) -> bool:
        """True once any replica asked to cancel the session. Raises RedisError."""
        return await self._r.hget(self._key("s:", session_id), "cancel") == "1"

    async def request_cancel(self, session_id: str) -> bool:
        """Mark the session cancelled and tell every replica (their `on_cancel`). Returns False
        if the session is not stored. Raises RedisError if Redis cannot be reached."""
        keys = (self._key("s:", session_id), self._key("cancel"), session_id)
        try:
            return bool(await self._r.evalsha(self._sha["cancel"], 1, *keys))
        except NoScriptError:  # Redis restarted and lost its script cache
            await self._load_scripts()
            return bool(await self._r.evalsha(self._sha["cancel"], 1, *keys))

    async def orphans(self) -> list[str]:
        """Active (queued/in_progress) sessions that no replica holds a lease on."""
        active = sorted(await self._r.smembers(self._key("active")))
        async with self._r.pipeline(transaction=False) as pipe:
            for sid in active:
                pipe.exists(self._key("lease:", sid))
            held = await pipe.execute()
        return [sid for sid, h in zip(active, held) if not h]

    async def claim(self, session_id: str) -> bool:
        """Take the session's lease if nobody holds it; True if this replica now owns it."""
        taken = await self._r.set(self._key("lease:", session_id), self.replica_id, nx=True,
                                  px=int(self.lease_seconds * 1000))
        if taken:
            self.owned.add(session_id)
            self._lost.discard(session_id)
        return bool(taken)

    # --- the writer (group commit) -----------------------------------------------------------

    async def _commit(self, batch: list[tuple]) -> None:
        """Send `batch` in one pipelined round trip, then make committed events visible.

        Failures (connection, timeout, a refused command) retry the whole batch with back-off
        up to 5 s until it succeeds, `write_error` saying why meanwhile. A retry is harmless: a
        call applied before (its reply lost) is recognized by its write number and passed
        over, a stored event is never rewritten. A fenced call is dropped, not retried.
        """
        plan, attempt = _plan(batch), 0
        while True:
            try:
                async with self._io:
                    outcome = self._settle(plan, await self._send(plan))
                break
            except Exception as e:  # noqa: BLE001 - a write error must not kill the writer task
                attempt += 1
                if isinstance(e, NoScriptError):  # Redis restarted and lost its script cache
                    with suppress(Exception):
                        await self._load_scripts()
                # the log line names the store (WriteQueue._write_failed), as SQLite's does
                self._write_failed(f"{type(e).__name__}: {e}", e, len(batch))
                await asyncio.sleep(min(5.0, 0.2 * attempt))
        self.commits += 1
        self._writes_succeed()
        visible, lost = outcome
        for sid in lost:
            log.warning("session store %s: session %s is no longer this replica's (%s); its "
                        "unwritten events are dropped", self.db_path, sid, lost[sid])
            _call(self.on_lease_lost, sid)
        for s, upto in visible.values():
            s.committed(upto)
        for op in batch:
            if op[0] == "flush" and not op[1].done():
                op[1].set_result(None)

    async def _send(self, plan: list[list]) -> list[Any]:
        """One pipeline: a group script call per entry of `plan`, DEL + SREM per delete."""
        now, me, lease_ms = time.time(), self.replica_id, str(int(self.lease_seconds * 1000))
        async with self._r.pipeline(transaction=False) as pipe:
            for call in plan:
                if call[0] == "delete":
                    pipe.delete(*(self._key(k, call[1]) for k in ("s:", "e:", "lease:")))
                    pipe.srem(self._key("active"), call[1])
                    continue
                _, s, mode, fields, events, seq = call
                state, expire = fields["state"] if fields else "", 0
                if state in TERMINAL_STATES:
                    ended = float(fields["ended_at"] or now)
                    expire = max(1, int((ended + self.ttl_seconds - now) * 1000))
                flat = [x for kv in (fields or {}).items() for x in kv]
                args = [me, s.id, lease_ms, mode, state, expire, self._token, seq, len(flat),
                        *flat]
                for ev in events:
                    args += [ev.index, ev.data, ev.event or "", ev.meta or ""]
                pipe.evalsha(self._sha["group"], 4, self._key("s:", s.id), self._key("e:", s.id),
                             self._key("lease:", s.id), self._key("active"), *args)
            return await pipe.execute(raise_on_error=False) if len(pipe) else []

    def _settle(self, plan: list[list], results: list[Any]) -> tuple:
        """Read the scripts' answers; raise the first error (the batch is then retried).

        Returns ({id(session): (session, visible)}, {fenced session id: why}). Runs before
        the renewal task can look at `owned` again (under `_io`).
        """
        for r in results:
            if isinstance(r, Exception):
                raise r
            if isinstance(r, list) and r[0] == "gap":
                raise StoreUnavailable(f"session store Redis {self.db_path}: an event would "
                                       f"leave a gap after index {r[1]}; retrying")
        visible: dict[int, tuple[Session, int]] = {}
        lost: dict[str, str] = {}
        refused: dict[str, int] = {}
        it = iter(results)
        for call in plan:
            if call[0] == "delete":
                next(it), next(it)
                self.owned.discard(call[1])
                continue
            _, s, mode, fields, events, _ = call
            status, detail = next(it)
            if status != "ok":
                self.owned.discard(s.id)
                if s.id not in self._lost:
                    self._lost.add(s.id)
                    lost[s.id] = {"exists": "the id exists already"}.get(status) or {
                        "": "its lease expired", "deleted": "it was deleted"}.get(
                        detail, f"replica {detail} holds its lease")
                continue
            if int(detail):
                refused[s.id] = refused.get(s.id, 0) + int(detail)
            if mode == "create":
                self.owned.add(s.id)
                self._lost.discard(s.id)
            if fields and fields["state"] in TERMINAL_STATES:
                self.owned.discard(s.id)
            if events:
                upto = events[-1].index + 1
                visible[id(s)] = (s, max(upto, visible.get(id(s), (s, 0))[1]))
        if refused:
            log.error("session store %s: refused an attempt to overwrite %d existing events "
                      "(sessions %s); this is a bug: an event index was written twice",
                      self.db_path, sum(refused.values()), ", ".join(sorted(refused)[:5]))
        return visible, lost

    # --- leases and cancels -----------------------------------------------------------------

    async def _renew_loop(self) -> None:
        """Renew every owned lease each lease_seconds / 3; report the ones found lost.

        Takes turns with commits (`_io`): a commit that ends a session deletes its lease and
        drops it from `owned` in one turn, so a renewal never mistakes that for a lost lease.
        """
        failing = False
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            lost = []
            try:
                async with self._io:
                    owned = sorted(self.owned)
                    async with self._r.pipeline(transaction=False) as pipe:
                        for sid in owned:
                            pipe.evalsha(self._sha["renew"], 1, self._key("lease:", sid),
                                         self.replica_id, int(self.lease_seconds * 1000))
                        renewed = await pipe.execute() if owned else []
                    for sid, ok in zip(owned, renewed):
                        if not ok and sid in self.owned:
                            self.owned.discard(sid)
                            self._lost.add(sid)
                            lost.append(sid)
                failing = False
            except Exception as e:  # noqa: BLE001 - retried next round; the writer reports
                if isinstance(e, NoScriptError):
                    with suppress(Exception):
                        await self._load_scripts()
                if not failing:
                    log.warning("session store %s: renewing leases failed: %s: %s",
                                self.db_path, type(e).__name__, e)
                failing = True
            for sid in lost:
                log.warning("session store %s: the lease on session %s expired or was taken; "
                            "this replica stops writing it", self.db_path, sid)
                _call(self.on_lease_lost, sid)

    async def _cancel_loop(self, pubsub) -> None:
        """Call `on_cancel(sid)` for each message on the cancel channel; resubscribe after a
        lost connection (a cancel missed meanwhile is still in the hash: cancel_requested)."""
        while True:
            try:
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if msg and msg.get("type") == "message":
                    _call(self.on_cancel, msg["data"])
            except asyncio.CancelledError:
                await pubsub.aclose()
                raise
            except Exception as e:  # noqa: BLE001 - keep listening once Redis is back
                log.warning("session store %s: cancel subscription lost: %s: %s",
                            self.db_path, type(e).__name__, e)
                await asyncio.sleep(1.0)
                with suppress(Exception):
                    await pubsub.aclose()
                    pubsub = self._rb.pubsub()
                    await pubsub.subscribe(self._key("cancel"))


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _fields(s: Session, full: bool) -> dict[str, str]:
    """The session's hash fields as they are now; `full` adds those written once (create)."""
    out = {"state": s.state, "finish_reason": s.finish_reason or "",
           "usage": json.dumps(s.usage) if s.usage is not None else "",
           "ended_at": repr(s.ended_at) if s.ended_at is not None else ""}
    if full:
        out.update(kind=s.kind, model=s.model, created=repr(s.created),
                   body_digest=s.body_digest,
                   request=json.dumps(s.request, separators=(",", ":")))
        if s.inputs is not None:
            out["inputs"] = json.dumps(s.inputs, separators=(",", ":"))
    if s.state in TERMINAL_STATES:
        out["inputs"] = ""  # media kept only while the session runs
    return out


def _plan(batch: list[tuple]) -> list[list]:
    """The batch's writes as pipeline calls: ["delete", sid] or ["group", session, mode,
    fields, events, write number], where one group call carries a session's consecutive
    queued groups (fewer, larger script calls: the per-token cost). A run of groups ends at a
    terminal state, and at a create, repair or delete of that id; order between sessions does
    not matter (a script call is atomic per session), so the calls keep their first place."""
    plan, runs = [], {}
    for op in batch:
        if op[0] == "delete":
            runs.pop(op[1], None)
            plan.append(["delete", op[1]])
        elif op[0] == "group":
            _, s, mode, fields, events, seq = op
            run = runs.get(s.id)
            if run is not None and mode == "write" and run[1] is s:
                if fields:
                    run[3] = {**(run[3] or {}), **fields}
                run[4], run[5] = run[4] + events, seq
            else:
                run = ["group", s, mode, fields, list(events), seq]
                plan.append(run)
                runs[s.id] = run
            if run[3] and run[3]["state"] in TERMINAL_STATES:
                del runs[s.id]
    return plan


def _number(text: str | None) -> Any:
    """A stored number as float; unparsable text stays text (so _parse_row flags it)."""
    try:
        return float(text) if text is not None else None
    except ValueError:
        return text


def _call(callback: Callable[[str], Any], sid: str) -> None:
    try:
        callback(sid)
    except Exception:  # noqa: BLE001 - a runtime callback must not stop the log's tasks
        log.exception("session store: callback %r failed for session %s", callback, sid)


def _redact(url: str) -> str:
    """The URL without its password (user info or `password=` query), for logs and errors."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = (f"{parts.username}@" if parts.username else "") + netloc.rsplit("@", 1)[1]
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    kept = [(k, v) for k, v in pairs if k != "password"]
    if netloc == parts.netloc and kept == pairs:
        return url
    return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{urlencode(kept)}" if kept else "")
