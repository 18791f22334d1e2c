"""Token buckets, the circuit breaker and the priority gate, on a fake clock where timing matters."""
import asyncio
import math

import pytest

from ropd_jax.judge import limits


class Clock:
  def __init__(self):
    self.t = 100.0

  def __call__(self):
    return self.t


def test_token_bucket_rate_burst_and_oversized_requests():
  b = limits.TokenBucket(rate_per_s=2.0, capacity=4.0, now=0.0)
  assert b.wait_time(4, 0.0) == 0.0
  b.take(4, 0.0)
  assert b.wait_time(1, 0.0) == pytest.approx(0.5)                  # 1 token at 2/s
  assert b.wait_time(3, 1.0) == pytest.approx(0.5)                  # 2 refilled, 1 more needed
  b.take(10, 2.0)                                                    # oversized: waits for full, goes negative
  assert b.tokens == pytest.approx(-6.0)
  assert b.wait_time(1, 2.0) == pytest.approx(3.5)
  b.give_back(100)
  assert b.tokens == 4.0                                             # never above capacity


@pytest.mark.parametrize("quota, burst_s", [(600, 10.0), (60, 1.0), (1000, 30.0)])
def test_per_minute_bucket_never_exceeds_quota_in_any_minute(quota, burst_s):
  bucket = limits.per_minute_bucket(quota, burst_s, now=0.0)
  assert bucket.capacity == pytest.approx(max(1.0, quota * burst_s / 60))
  times, t = [], 0.0
  while t < 180.0:                                                   # a greedy client, polling every 10 ms
    while bucket.wait_time(1, t) == 0.0:
      bucket.take(1, t)
      times.append(t)
    t = round(t + 0.01, 2)
  for i, start in enumerate(times):
    in_window = sum(1 for x in times[i:] if x < start + 60.0)
    assert in_window <= quota
  # ...and the quota is used: the burst, then (60 - burst_s)/60 of the quota per minute.
  assert len(times) >= bucket.capacity + bucket.rate_per_s * 179.99 - 1


def test_breaker_opens_on_consecutive_errors_then_half_opens_and_closes():
  br = limits.CircuitBreaker(consecutive=3, window=10, error_rate=0.9, cooldown_s=5.0, probes=2)
  for _ in range(2):
    br.record(False, 0.0)
  br.record(True, 0.0)                                               # a success resets the run
  for _ in range(3):
    br.record(False, 1.0)
  assert br.state == "open" and br.opened_count == 1
  assert br.wait_time(3.0) == pytest.approx(3.0)
  assert br.wait_time(6.0) == 0.0 and br.state == "half_open"
  br.admitted(), br.admitted()
  assert math.isinf(br.wait_time(6.0))                               # both probes in flight
  br.record(True, 6.5)
  assert math.isinf(br.wait_time(6.5))                               # one success + one in flight = 2
  br.record(True, 6.6)
  assert br.state == "closed" and br.wait_time(6.6) == 0.0


def test_breaker_error_rate_window_and_failed_probe_reopens():
  br = limits.CircuitBreaker(consecutive=100, window=10, error_rate=0.5, cooldown_s=1.0)
  for i in range(10):
    br.record(i % 2 == 0, 0.0)                                       # 5 of 10 fail, never 2 in a row
  assert br.state == "open"
  br.wait_time(2.0)
  br.admitted()
  br.record(False, 2.0)
  assert br.state == "open" and br.opened_count == 2
  br.wait_time(3.5)
  br.admitted()
  br.record(None, 3.5)                                               # caller gave up: the probe slot returns
  assert br.state == "half_open" and br.wait_time(3.5) == 0.0


def test_gate_orders_by_priority_then_arrival():
  async def run():
    gate = limits.EndpointGate(concurrency=1, rpm=10**6, tpm=10**9,
                               breaker=limits.CircuitBreaker(10, 10, 1.0, 1.0))
    order = []
    await gate.acquire(1, 1)                                         # occupy the only slot

    async def request(name, priority):
      await gate.acquire(priority, 1)
      order.append(name)
      await asyncio.sleep(0)
      gate.release(True, 0.0)

    tasks = [asyncio.create_task(request(n, p)) for n, p in
             [("rubric-1", 1), ("rubric-2", 1), ("teacher", 2), ("verify-1", 0), ("verify-2", 0)]]
    await asyncio.sleep(0.01)
    assert gate.queued == 5
    gate.release(True, 0.0)
    await asyncio.gather(*tasks)
    return order, gate.max_in_flight_seen

  order, peak = asyncio.run(run())
  assert order == ["verify-1", "verify-2", "rubric-1", "rubric-2", "teacher"]
  assert peak == 1


def test_gate_cancelled_waiter_leaves_no_trace_and_rpm_waits():
  clock = Clock()

  async def run():
    gate = limits.EndpointGate(concurrency=5, rpm=60, tpm=10**9,     # burst 1, then 59/60 per s
                               breaker=limits.CircuitBreaker(10, 10, 1.0, 1.0), burst_s=1.0, clock=clock)
    await gate.acquire(0, 1)
    waiter = asyncio.create_task(gate.acquire(0, 1))
    await asyncio.sleep(0.01)
    assert not waiter.done() and gate.queued == 1                    # no token for ~1 s of fake time
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
      await waiter
    assert gate.queued == 0 and gate.in_flight == 1
    clock.t += 1.1
    await asyncio.wait_for(gate.acquire(0, 1), 1.0)                  # refilled: admitted at once
    return gate.in_flight

  assert asyncio.run(run()) == 2


def test_gate_holds_requests_while_breaker_open():
  clock = Clock()

  async def run():
    breaker = limits.CircuitBreaker(consecutive=1, window=10, error_rate=1.0, cooldown_s=30.0)
    gate = limits.EndpointGate(concurrency=5, rpm=10**6, tpm=10**9, breaker=breaker, clock=clock)
    await gate.acquire(0, 1)
    gate.release(False, 0.0)                                         # one transport error opens it
    assert breaker.state == "open"
    waiter = asyncio.create_task(gate.acquire(0, 1))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    clock.t += 31.0
    gate._pump()                                                     # the real timer would fire after 30 s
    await asyncio.wait_for(waiter, 1.0)
    return breaker.state

  assert asyncio.run(run()) == "half_open"
