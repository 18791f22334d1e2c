"""Per-endpoint admission: a priority queue in front of a concurrency cap, requests/min and tokens/min
buckets and a circuit breaker.

One `EndpointGate` per (backend, base_url, model). A request waits in ONE queue ordered by (priority,
arrival) until all four gates let it through, so priority holds whichever limit binds: verifier requests
(priority 0), which finish groups, go before new rubric requests (1) and teacher requests (2).
All waiting is bounded by the caller's deadline (cancellation removes the waiter).
"""
from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
import math
import time
from typing import Callable

PRIORITY = {"verifier": 0, "rubricator": 1, "teacher": 2}


class TokenBucket:
  """Holds up to `capacity` tokens, refilled at `rate_per_s`. An oversized request waits for a full bucket
  and then drives it negative, so the long-run rate still holds."""

  def __init__(self, rate_per_s: float, capacity: float, now: float):
    self.rate_per_s = float(rate_per_s)
    self.capacity = float(capacity)
    self.tokens = float(capacity)
    self._stamp = now

  def _refill(self, now: float) -> None:
    self.tokens = min(self.capacity, self.tokens + (now - self._stamp) * self.rate_per_s)
    self._stamp = now

  def wait_time(self, amount: float, now: float) -> float:
    self._refill(now)
    need = min(amount, self.capacity)
    return 0.0 if self.tokens >= need else (need - self.tokens) / self.rate_per_s

  def take(self, amount: float, now: float) -> None:
    self._refill(now)
    self.tokens -= amount

  def give_back(self, amount: float) -> None:
    """Correct an estimate after the fact (negative `amount` charges more)."""
    self.tokens = min(self.capacity, self.tokens + amount)


def per_minute_bucket(per_minute: float, burst_s: float, now: float) -> TokenBucket:
  """A bucket that never lets more than `per_minute` through in any 60 s window: a burst of `burst_s`
  seconds' worth up front, and the rest of the quota refilled evenly over the minute."""
  capacity = max(1.0, per_minute * min(burst_s, 59.0) / 60.0)
  return TokenBucket(max(per_minute - capacity, 1e-9) / 60.0, capacity, now)


class CircuitBreaker:
  """closed -> open after `consecutive` transport errors in a row or an error fraction >= `error_rate`
  over the last `window` outcomes; open -> half_open after `cooldown_s`; half_open admits `probes`
  requests: all succeed -> closed, any fails -> open again."""

  def __init__(self, consecutive: int, window: int, error_rate: float, cooldown_s: float, probes: int = 2):
    self.consecutive, self.window, self.error_rate = consecutive, window, error_rate
    self.cooldown_s, self.probes = cooldown_s, probes
    self.state = "closed"
    self.opened_count = 0
    self._outcomes: collections.deque[bool] = collections.deque(maxlen=window)
    self._run = 0
    self._opened_at = 0.0
    self._probes_in_flight = 0
    self._probe_successes = 0

  def wait_time(self, now: float) -> float:
    """Seconds until a request may be admitted (inf: until an in-flight probe finishes)."""
    if self.state == "open":
      remaining = self._opened_at + self.cooldown_s - now
      if remaining > 0:
        return remaining
      self.state, self._probes_in_flight, self._probe_successes = "half_open", 0, 0
    if self.state == "half_open":
      return 0.0 if self._probes_in_flight + self._probe_successes < self.probes else math.inf
    return 0.0

  def admitted(self) -> None:
    if self.state == "half_open":
      self._probes_in_flight += 1

  def record(self, ok: bool | None, now: float) -> None:
    """ok: the endpoint answered (True), a retriable transport failure (False), or no outcome (None:
    the caller gave up first)."""
    if self.state == "half_open":
      self._probes_in_flight = max(0, self._probes_in_flight - 1)
      if ok is False:
        self._open(now)
      elif ok:
        self._probe_successes += 1
        if self._probe_successes >= self.probes:
          self.state, self._run = "closed", 0
          self._outcomes.clear()
      return
    if ok is None or self.state == "open":
      return
    self._outcomes.append(ok)
    self._run = 0 if ok else self._run + 1
    errors = sum(1 for o in self._outcomes if not o)
    full = len(self._outcomes) == self.window
    if self._run >= self.consecutive or (full and errors >= self.error_rate * self.window):
      self._open(now)

  def _open(self, now: float) -> None:
    self.state, self._opened_at, self._run = "open", now, 0
    self._outcomes.clear()
    self.opened_count += 1


class EndpointGate:
  """Admits requests in (priority, arrival) order when concurrency, rpm, tpm and the breaker all allow."""

  def __init__(self, *, concurrency: int, rpm: float, tpm: float, breaker: CircuitBreaker,
               burst_s: float = 5.0, clock: Callable[[], float] = time.monotonic):
    self.concurrency = int(concurrency)
    self.clock = clock
    now = clock()
    self.rpm = per_minute_bucket(rpm, burst_s, now)
    self.tpm = per_minute_bucket(tpm, burst_s, now)
    self.breaker = breaker
    self.in_flight = 0
    self.max_in_flight_seen = 0
    self._heap: list = []
    self._seq = itertools.count()
    self._timer: asyncio.TimerHandle | None = None
    self._timer_at = math.inf

  @property
  def queued(self) -> int:
    return sum(1 for *_, fut in self._heap if not fut.done())

  async def acquire(self, priority: int, tokens: float) -> None:
    fut = asyncio.get_running_loop().create_future()
    heapq.heappush(self._heap, (priority, next(self._seq), tokens, fut))
    self._pump()
    try:
      await fut
    except asyncio.CancelledError:
      if fut.done() and not fut.cancelled():
        # Admitted at the same moment we were cancelled: hand the slot back.
        self.release(None, 0.0)
      raise

  def release(self, ok: bool | None, token_correction: float) -> None:
    """Free a slot. ok: the breaker outcome; token_correction: estimated minus actual tokens."""
    self.in_flight -= 1
    self.breaker.record(ok, self.clock())
    if token_correction:
      self.tpm.give_back(token_correction)
    self._pump()

  def _pump(self) -> None:
    now = self.clock()
    while self._heap:
      _, _, tokens, fut = self._heap[0]
      if fut.done():
        heapq.heappop(self._heap)
        continue
      if self.in_flight >= self.concurrency:
        return  # release() pumps again
      wait = max(self.breaker.wait_time(now), self.rpm.wait_time(1, now), self.tpm.wait_time(tokens, now))
      if wait > 0:
        if math.isfinite(wait):
          self._schedule(now + wait)
        return
      heapq.heappop(self._heap)
      self.rpm.take(1, now)
      self.tpm.take(tokens, now)
      self.breaker.admitted()
      self.in_flight += 1
      self.max_in_flight_seen = max(self.max_in_flight_seen, self.in_flight)
      fut.set_result(None)

  def _schedule(self, at: float) -> None:
    if self._timer is not None and self._timer_at <= at:
      return
    if self._timer is not None:
      self._timer.cancel()
    loop = asyncio.get_running_loop()
    self._timer_at = at
    self._timer = loop.call_later(max(0.0, at - self.clock()) + 1e-4, self._on_timer)

  def _on_timer(self) -> None:
    self._timer, self._timer_at = None, math.inf
    self._pump()
