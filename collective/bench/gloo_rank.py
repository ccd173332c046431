#!/usr/bin/env python3
"""One rank of the Gloo baseline (bench-baselines/allreduce_bench.py's own `worker`, same
sizes, iteration rules and result check) joining its peers at MASTER_ADDR over the given
interface instead of loopback, so that ranks can run in separate network namespaces.
Rank 0 prints one JSON object per size (the baseline's --json fields).

  gloo_rank.py BASELINES --rank R --world N --master ADDR --port P --ifname IF [--max-bytes B]
"""
import argparse
import json
import os
import sys


def main():
    baselines = sys.argv[1]
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--master", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--ifname", required=True)
    ap.add_argument("--min-bytes", type=int, default=1 << 10)
    ap.add_argument("--max-bytes", type=int, default=256 << 20)
    ap.add_argument("--factor", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--min-iters", type=int, default=10)
    ap.add_argument("--max-iters", type=int, default=200)
    ap.add_argument("--target-s", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(sys.argv[2:])
    sys.path.insert(0, baselines)
    import allreduce_bench
    import torch.distributed as dist

    real_init = dist.init_process_group

    def init_over_interface(backend, init_method, rank, world_size):
        # The worker pins loopback; these ranks meet over the namespace's interface.
        os.environ["GLOO_SOCKET_IFNAME"] = args.ifname
        return real_init(backend, init_method=f"tcp://{args.master}:{args.port}", rank=rank,
                         world_size=world_size)

    dist.init_process_group = init_over_interface
    sizes = []
    s = args.min_bytes
    while s <= args.max_bytes:
        sizes.append(s)
        s *= args.factor

    class Rows:
        def put(self, row):
            nbytes, iters, times, ok = row
            times = sorted(times)
            median = times[len(times) // 2] if len(times) % 2 else sum(times[len(times) // 2 - 1:len(times) // 2 + 1]) / 2
            print(json.dumps({"world_size": args.world, "bytes": nbytes, "iters": iters,
                              "median_s": median, "min_s": times[0], "correct": ok}), flush=True)

    allreduce_bench.worker(args.rank, args.world, args.port, sizes, args, Rows())


if __name__ == "__main__":
    main()
