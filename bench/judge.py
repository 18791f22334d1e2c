"""Judge throughput: 32 groups (4 teacher + 8 student answers each) against a local server with 2 s of
latency per call, our scheduling (32 requests in flight, verifier first) versus the official code's
effective 4 groups in flight. Both run the same client code; only the scheduling differs.

  python bench/judge.py [--groups=32] [--latency=2.0] [--json=out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

from judge_server import JudgeServer  # noqa: E402  (test helper, shared on purpose)

from ropd_jax import rewards  # noqa: E402
from ropd_jax.judge import client, config  # noqa: E402


def make_groups(n: int) -> list[rewards.Group]:
  bits = ["10111", "10000", "11111", "00000", "01010", "11100", "00111", "10101"]
  return [rewards.Group(f"Problem {i}: compute the total.", [f"teacher {k} VERDICT:11111" for k in range(4)],
                        [f"student {i}.{j} VERDICT:{b}" for j, b in enumerate(bits)]) for i in range(n)]


def run(label: str, srv: JudgeServer, groups, *, concurrency: int, groups_in_flight: int, verifier_first: bool):
  cfg = config.judge_config()
  cfg.cache_dir = ""
  cfg.max_groups_in_flight = groups_in_flight
  cfg.verifier_first = verifier_first
  for role in ("rubricator", "verifier"):
    cfg[role].backend, cfg[role].base_url, cfg[role].model = "openai", srv.url + "/v1", "bench-judge"
    cfg[role].concurrency = concurrency
    cfg[role].rpm = 100_000
  before = len(srv.records)
  srv.max_in_flight = 0
  t0 = time.monotonic()
  results = rewards.score_groups_sync(groups, client.Judge(cfg))
  wall = time.monotonic() - t0
  assert all(r.error is None for r in results), [r.error for r in results if r.error]
  return {"setting": label, "wall_s": round(wall, 2), "requests": len(srv.records) - before,
          "server_max_in_flight": srv.max_in_flight, "groups_per_s": round(len(groups) / wall, 2)}


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--groups", type=int, default=32)
  ap.add_argument("--latency", type=float, default=2.0)
  ap.add_argument("--json", default="")
  args = ap.parse_args()
  os.environ.setdefault("OPENAI_API_KEY", "bench")
  groups = make_groups(args.groups)
  with JudgeServer(latency=args.latency) as srv:
    ours = run("ropd_jax (32 requests in flight, verifier first)", srv, groups,
               concurrency=32, groups_in_flight=256, verifier_first=True)
    official = run("official-style (4 groups in flight)", srv, groups,
                   concurrency=32, groups_in_flight=4, verifier_first=False)
  report = {"groups": args.groups, "answers_per_group": "4 teacher + 8 student", "latency_s": args.latency,
            "runs": [ours, official], "speedup": round(official["wall_s"] / ours["wall_s"], 2)}
  print(json.dumps(report, indent=1))
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
  main()
