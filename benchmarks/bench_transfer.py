"""KV transfer throughput between two processes on this host.

The source (a KVServer) runs in a child process; this process pulls 1, 2, 4,
... blocks with a KVClient per transport and times gather + transport +
scatter end to end, against a single-threaded memcpy of the same bytes
measured in the same run. Usage:

    python benchmarks/bench_transfer.py --json out/bench_transfer.json

writes the JSON and a PNG plot beside it, and prints one summary line last.

With --device cuda it times, on one GPU, the two copy paths of the GPU
transports on vLLM-shaped caches ([2, num_blocks, block, heads, head] per
layer): "copy_blocks" (what ipc runs: block to block, one kernel) and
"gather+scatter" (what nccl runs around its send/recv: two kernels through a
staging buffer), each against a device-to-device copy of the same bytes
(CUDA events, same run). The 8B-model layout:

    python benchmarks/bench_transfer.py --device cuda --num-layers 32 --dtype bfloat16 --json out/bench_gpu.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from llumigrate.kv.layout import KVLayout
from llumigrate.transfer import Grant, KVClient, KVServer, PullRequest

SEED = 1234


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--num-kv-heads", type=int, default=8)
    p.add_argument("--head-size", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-blocks", type=int, default=512, help="largest pull (powers of two up to it)")
    p.add_argument("--repeats", type=int, default=7, help="timed pulls per point (median reported)")
    p.add_argument("--transports", default="pvm,shm,tcp")
    p.add_argument("--num-threads", type=int, default=1, help="copy threads on each side")
    p.add_argument("--chunk-bytes", type=int, default=4 << 20)
    p.add_argument("--json", type=Path, default=None, help="write results here (and a .png beside it)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: time the GPU copy paths")
    p.add_argument("--serve", default=None, help=argparse.SUPPRESS)  # internal: run the source
    return p.parse_args(argv)


def make_layers(args: argparse.Namespace, num_blocks: int, seed: int | None) -> list[torch.Tensor]:
    """One backing buffer viewed per layer, like vLLM's CPU KV cache."""
    shape = (args.num_layers, num_blocks, args.num_kv_heads, args.block_size, 2 * args.head_size)
    dtype = getattr(torch, args.dtype)
    if seed is None:
        backing = torch.zeros(shape, dtype=dtype)  # zeros touches every page
    else:
        backing = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return list(backing.unbind(0))


def source_ids(num_blocks: int, n: int) -> list[int]:
    return torch.randperm(num_blocks, generator=torch.Generator().manual_seed(SEED + 1))[:n].tolist()


def serve(args: argparse.Namespace) -> None:
    """Child process: serve random layers until stdin closes."""
    num_blocks = args.max_blocks + 8
    layers = make_layers(args, num_blocks, SEED)
    ids = source_ids(num_blocks, args.max_blocks)
    srv = KVServer(layers, lambda req: Grant(ids[:req.num_blocks]), num_threads=args.num_threads,
                   chunk_bytes=args.chunk_bytes)
    srv.start()
    print(json.dumps(srv.address), flush=True)
    sys.stdin.read()
    srv.close()


def start_source(args: argparse.Namespace) -> tuple[subprocess.Popen, tuple[str, int]]:
    """The source process, serving the same layout (its address is its first line)."""
    argv = [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in
            ("num_layers", "num_kv_heads", "head_size", "block_size", "dtype", "max_blocks", "num_threads",
             "chunk_bytes")]
    proc = subprocess.Popen([sys.executable, __file__, *argv, "--serve=1"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"source process exited with {proc.wait()}")
    host, port = json.loads(line)
    return proc, (host, port)


def time_point(cli: KVClient, address: tuple[str, int], n: int, dest: list[int], nbytes: int,
               repeats: int) -> tuple[list[float], list[float]]:
    """Seconds of each timed pull of `n` blocks and of each single-threaded
    memcpy of the same bytes, timed alternately so both see the same load."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.zeros(nbytes, dtype=torch.uint8)
    pulls, copies = [], []
    for i in range(repeats + 1):  # round 0 warms up (segment growth, staging, page faults)
        t0 = time.perf_counter()
        cli.pull(address, PullRequest("bench", 0, n), dest[:n])
        t1 = time.perf_counter()
        ctypes.memmove(dst.data_ptr(), src.data_ptr(), nbytes)
        t2 = time.perf_counter()
        if i:
            pulls.append(t1 - t0)
            copies.append(t2 - t1)
    return pulls, copies


def verify(args: argparse.Namespace, dst: list[torch.Tensor], dest: list[int]) -> None:
    """The last pull of max_blocks blocks landed bit for bit."""
    num_blocks = args.max_blocks + 8
    src = make_layers(args, num_blocks, SEED)
    ids = source_ids(num_blocks, args.max_blocks)
    for s, d in zip(src, dst):
        if not torch.equal(s[ids].view(torch.uint8), d[dest].view(torch.uint8)):
            raise SystemExit("pulled blocks differ from the source's")


def run(args: argparse.Namespace) -> dict:
    counts = [1 << i for i in range(args.max_blocks.bit_length()) if 1 << i <= args.max_blocks]
    transports = [t for t in args.transports.split(",") if t]
    num_blocks = args.max_blocks + 8
    dst = make_layers(args, num_blocks, None)
    layout = KVLayout.from_layers(dst)
    dest = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(SEED + 2))[:args.max_blocks].tolist()
    proc, address = start_source(args)
    results, total, done = [], len(counts) * len(transports), 0
    try:
        for transport in transports:
            cli = KVClient(dst, transport=transport, num_threads=args.num_threads)
            for n in counts:
                nbytes = n * layout.bytes_per_block
                pulls, copies = time_point(cli, address, n, dest, nbytes, args.repeats)
                pull_s, memcpy_s = statistics.median(pulls), statistics.median(copies)
                row = {"transport": transport, "num_blocks": n, "bytes": nbytes,
                       "pull_s": pull_s, "memcpy_s": memcpy_s, "gbps": nbytes / pull_s / 1e9,
                       "memcpy_gbps": nbytes / memcpy_s / 1e9, "ratio_vs_memcpy": memcpy_s / pull_s,
                       # best of the repeats: what the path does when nothing else competes for the cores
                       "ratio_vs_memcpy_best": min(copies) / min(pulls), "pull_times_s": pulls}
                results.append(row)
                done += 1
                print(f"[{done}/{total}] {transport:>4} {n:4d} blocks {nbytes / 2**20:8.1f} MiB: "
                      f"{row['gbps']:6.2f} GB/s, memcpy {row['memcpy_gbps']:6.2f} GB/s, "
                      f"ratio {row['ratio_vs_memcpy']:.2f}", flush=True)
            verify(args, dst, dest)
            cli.close()
    finally:
        proc.stdin.close()
        proc.wait(30)
    config = {k: v for k, v in vars(args).items() if k not in ("json", "serve")}
    config.update(bytes_per_block=layout.bytes_per_block, cpu_count=os.cpu_count(), torch=torch.__version__)
    return {"config": config, "results": results, "summary": summarize(results)}


def cuda_layers(args: argparse.Namespace, num_blocks: int, seed: int) -> list[torch.Tensor]:
    """vLLM flash-attention caches: [2, N, block, heads, head] per layer, seen block-first."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    shape = (args.num_layers, 2, num_blocks, args.block_size, args.num_kv_heads, args.head_size)
    backing = torch.randn(shape, generator=g, device="cuda").to(getattr(torch, args.dtype))
    return [t.transpose(0, 1) for t in backing.unbind(0)]


def cuda_time(fn, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls of `fn`, by CUDA events (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def run_cuda(args: argparse.Namespace) -> dict:
    from llumigrate.kv.ops import block_geometry, copy_blocks, gather_blocks, has_cuda_ops, layer_addresses, \
        scatter_blocks
    if not (torch.cuda.is_available() and has_cuda_ops()):
        raise SystemExit("--device cuda needs a GPU and a CUDA build of llumigrate._C")
    num_blocks = args.max_blocks + 8
    src, dst = cuda_layers(args, num_blocks, SEED), cuda_layers(args, num_blocks, SEED + 1)
    layout = KVLayout.from_layers(dst)
    src_ids, dst_ids = source_ids(num_blocks, args.max_blocks), source_ids(num_blocks, args.max_blocks)[::-1]
    staging = torch.empty(args.max_blocks * layout.bytes_per_block, dtype=torch.uint8, device="cuda")
    flat_src, flat_dst = torch.empty_like(staging), torch.empty_like(staging)
    addrs, geometry = layer_addresses(src), block_geometry(src)
    results = []
    for n in [1 << i for i in range(args.max_blocks.bit_length()) if 1 << i <= args.max_blocks]:
        nbytes = n * layout.bytes_per_block
        paths = {"copy_blocks": lambda: copy_blocks(addrs, geometry, src_ids[:n], dst_ids[:n], dst),
                 "gather+scatter": lambda: (gather_blocks(src, src_ids[:n], staging[:nbytes]),
                                            scatter_blocks(staging[:nbytes], dst_ids[:n], dst))}
        d2d = cuda_time(lambda: flat_dst[:nbytes].copy_(flat_src[:nbytes]), args.repeats)
        for name, fn in paths.items():
            t = cuda_time(fn, args.repeats)
            row = {"transport": name, "num_blocks": n, "bytes": nbytes, "pull_s": statistics.median(t),
                   "memcpy_s": statistics.median(d2d), "pull_times_s": t}
            row.update(gbps=nbytes / row["pull_s"] / 1e9, memcpy_gbps=nbytes / row["memcpy_s"] / 1e9,
                       ratio_vs_memcpy=row["memcpy_s"] / row["pull_s"], ratio_vs_memcpy_best=min(d2d) / min(t))
            results.append(row)
            print(f"{name:>14} {n:4d} blocks {nbytes / 2**20:8.1f} MiB: {row['gbps']:7.1f} GB/s, d2d "
                  f"{row['memcpy_gbps']:7.1f} GB/s, ratio {row['ratio_vs_memcpy']:.2f}", flush=True)
    torch.cuda.synchronize()
    for s, d in zip(src, dst):  # the last copy of max_blocks blocks landed bit for bit
        if not torch.equal(s[src_ids].view(torch.uint8), d[dst_ids].view(torch.uint8)):
            raise SystemExit("copied blocks differ from the source's")
    config = {k: v for k, v in vars(args).items() if k not in ("json", "serve")}
    config.update(bytes_per_block=layout.bytes_per_block, gpu=torch.cuda.get_device_name(), torch=torch.__version__)
    summary = summarize(results)
    summary["ratio_vs_d2d_64_blocks"] = summary.get("ratio_vs_memcpy_64_blocks")
    return {"config": config, "results": results, "summary": summary}


def summarize(results: list[dict]) -> dict:
    at64 = [r for r in results if r["num_blocks"] == 64]
    summary: dict = {"peak_gbps": {}, "gbps_64_blocks": {r["transport"]: r["gbps"] for r in at64}}
    for r in results:
        summary["peak_gbps"][r["transport"]] = max(summary["peak_gbps"].get(r["transport"], 0.0), r["gbps"])
    if at64:
        best = max(at64, key=lambda r: r["ratio_vs_memcpy"])
        summary.update(ratio_vs_memcpy_64_blocks=best["ratio_vs_memcpy"], best_transport_64_blocks=best["transport"],
                       memcpy_gbps_64_blocks=best["memcpy_gbps"],
                       ratio_vs_memcpy_best_64_blocks={r["transport"]: r["ratio_vs_memcpy_best"] for r in at64})
    summary["load_average"] = os.getloadavg()[0]
    return summary


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for transport in dict.fromkeys(r["transport"] for r in report["results"]):
        rows = [r for r in report["results"] if r["transport"] == transport]
        ax.plot([r["num_blocks"] for r in rows], [r["gbps"] for r in rows], marker="o", label=transport)
    rows = [r for r in report["results"] if r["transport"] == report["results"][0]["transport"]]
    c = report["config"]
    gpu = c.get("device") == "cuda"
    ax.plot([r["num_blocks"] for r in rows], [r["memcpy_gbps"] for r in rows], "k--",
            label="device-to-device copy" if gpu else "memcpy (1 thread)")
    ax.set(xscale="log", xlabel="blocks per pull", ylabel="GB/s",
           title=f"KV {'block copy on ' + c['gpu'] if gpu else 'pull between processes'} ({c['num_layers']} layers x "
                 f"{c['bytes_per_block'] // c['num_layers'] // 1024} KiB per block, {c['dtype']})")
    ax.set_xscale("log", base=2)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.serve:
        serve(args)
        return
    report = run_cuda(args) if args.device == "cuda" else run(args)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        plot(report, args.json.with_suffix(".png"))
    s = report["summary"]
    if args.device == "cuda":
        print(f"bench_transfer cuda: at 64 blocks {s.get('ratio_vs_d2d_64_blocks') or 0.0:.2f} x device-to-device "
              f"({s.get('best_transport_64_blocks', '-')}); GB/s at 64 blocks "
              f"{ {k: round(v, 1) for k, v in s['gbps_64_blocks'].items()} }")
        return
    print(f"bench_transfer: {s.get('best_transport_64_blocks', '-')} at 64 blocks "
          f"{s['gbps_64_blocks'].get(s.get('best_transport_64_blocks'), 0.0):.2f} GB/s = "
          f"{s.get('ratio_vs_memcpy_64_blocks', 0.0):.2f} x memcpy "
          f"({s.get('memcpy_gbps_64_blocks', 0.0):.2f} GB/s); best-of-repeats ratios at 64 blocks "
          f"{ {k: round(v, 2) for k, v in s.get('ratio_vs_memcpy_best_64_blocks', {}).items()} }; "
          f"peak GB/s { {k: round(v, 2) for k, v in s['peak_gbps'].items()} }; load average {s['load_average']:.1f}")


if __name__ == "__main__":
    main()
