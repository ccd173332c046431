"""The PyTorch side of `ringmaster bench optimizer`: AdamW steps over MiniLM-L6's
parameter shapes. Prints one JSON line per variant with the median milliseconds per step.
Usage: python adamw_torch.py --threads N --iters K   (torch in a throwaway venv, never CI)"""
import argparse
import json
import statistics
import time

import torch


def minilm_shapes():
    h, inter, vocab = 384, 1536, 30522
    shapes = [(vocab, h), (512, h), (2, h), (h,), (h,)]
    for _ in range(6):
        shapes += [(h, h), (h,)] * 4 + [(h,), (h,)]
        shapes += [(inter, h), (inter,), (h, inter), (h,), (h,), (h,)]
    return shapes + [(h, h), (h,)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iters", type=int, default=10)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    for variant, kw in [("torch-foreach", {"foreach": True}), ("torch-fused", {"fused": True}), ("torch-for-loop", {"foreach": False})]:
        params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in minilm_shapes()]
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, **kw)
        times = []
        for _ in range(a.iters + 1):
            t = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t)
        n = sum(p.numel() for p in params)
        print(json.dumps({"variant": variant, "params": n, "ms": 1e3 * statistics.median(times[1:])}))


if __name__ == "__main__":
    main()
