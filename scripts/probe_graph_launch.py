#!/usr/bin/env python3
"""Host cost of launching a captured CUDA graph, by its number of kernel nodes.

The sparse passes run as replayed graphs of 30-120 kernels each, ~180 replays a step
(benchmarks/NOTES.md). If a replay's host time grows with its node count, fusing kernels cuts
the host time of a host-bound step as well as the GPU's; if it is flat, it does not. Each replay is
timed alone (the GPU drained before it), host side only; also the host time of a plain eager
launch and of a device-to-device copy of a [4096, 4096] bf16 tensor (a graph input's copy).

    python scripts/probe_graph_launch.py
"""

import statistics
import time

import torch


def host_us(fn, n: int = 200) -> float:
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return 1e6 * statistics.median(times)


def main() -> None:
    x = torch.zeros(1024, device="cuda")
    big = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(big)
    print(f"cuda {torch.version.cuda} torch {torch.__version__} {torch.cuda.get_device_name()}")
    print(f"eager add_ launch        {host_us(lambda: x.add_(1)):8.1f} us")
    print(f"copy_ [4096,4096] bf16   {host_us(lambda: dst.copy_(big)):8.1f} us")
    print(f"clone [4096,4096] bf16   {host_us(lambda: big.clone()):8.1f} us")
    for nodes in (1, 10, 30, 60, 120, 240):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        g = torch.cuda.CUDAGraph()
        with torch.cuda.stream(s):
            x.add_(1)                         # warm-up outside the capture
            g.capture_begin()
            for _ in range(nodes):
                x.add_(1)
            g.capture_end()
        torch.cuda.current_stream().wait_stream(s)
        g.replay()
        print(f"graph of {nodes:4d} kernels   {host_us(g.replay):8.1f} us per replay")
    # As the sparse passes: ~150 graphs in one memory pool, each of GEMMs, gathers and copies,
    # replayed in turn.
    pool = torch.cuda.graph_pool_handle()
    a = torch.randn(1024, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(256, 4096, device="cuda", dtype=torch.bfloat16)
    idx = torch.arange(0, 256, 2, device="cuda")
    (a @ w.t()).index_select(1, idx)           # cuBLAS' handle and workspace, outside any capture
    torch.cuda.synchronize()
    graphs = []
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(150):
            g = torch.cuda.CUDAGraph()
            g.capture_begin(pool=pool)
            y = a
            for _ in range(15):
                t = y @ w.t()
                t = t.index_select(1, idx)
                t = t.clone()
                t.mul_(0.5)
            g.capture_end()
            graphs.append(g)
    torch.cuda.current_stream().wait_stream(s)
    for g in graphs:
        g.replay()
    turn = iter(graphs * 2)
    print(f"150 graphs of 60 mixed kernels, in turn {host_us(lambda: next(turn).replay(), n=300):8.1f} us per replay")


if __name__ == "__main__":
    main()
