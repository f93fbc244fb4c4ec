"""What llumigrate costs when nothing migrates: `vllm bench serve` against
`llumigrate serve` with one instance and against vLLM's own OpenAI server
(`python -m vllm.entrypoints.openai.api_server`), same model, same engine
arguments, same workload, in one run.

Both servers start at once and stay up; the benchmark client (vLLM's own,
`vllm.benchmarks.serve`, in a subprocess) then alternates between them round
by round (llumigrate first in odd rounds, vLLM first in even ones), each round
with its own random-dataset seed (the same for both servers), so neither
server's prefix cache ever sees a prompt twice and drift of the shared machine
falls on both. Ratios are of the medians over rounds.

It runs two model shapes, one after the other, each against both servers:

- "wide" (4 layers, hidden 512; the engine tests' model): a decode step of
  about 20 ms here, like a real model's on its hardware. The summary keys
  the issue names (`throughput_ratio_vs_vllm`, `p50_tpot_ratio_vs_vllm`) are
  this shape's: what an operator pays.
- "tiny" (the built-in model, 2 layers, hidden 128): a step of about 4 ms,
  so its ratios (`tiny_*`) show llumigrate's per-token cost (one more
  process hop, engine -> agent -> serve -> HTTP) magnified; on 2 shared
  cores that hop takes CPU the engine needs.

    python benchmarks/bench_overhead.py --json out/bench_overhead.json
    python benchmarks/bench_overhead.py --shapes tiny ...   # one shape only

Writes the JSON and a PNG beside it; prints a one-line summary last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import SERVED_NAME, Server, fmt, free_port, llumigrate_cmd, ratio, vllm_cmd, write_json

from llumigrate.model.tiny import TinyModelConfig, ensure_tiny_model

# Runs vllm.benchmarks.serve and prints its numeric results as one JSON line.
CLIENT = """
import argparse, json, sys
from vllm.benchmarks import serve
p = argparse.ArgumentParser()
serve.add_cli_args(p)
result = serve.main(p.parse_args(sys.argv[1:]))
print("RESULT " + json.dumps({k: v for k, v in result.items() if isinstance(v, (int, float))}))
"""

# Model shapes: layers, hidden, heads (half as many KV heads).
SHAPES = {"wide": (4, 512, 8), "tiny": (2, 128, 4)}
KEYS = ("completed", "failed", "duration", "request_throughput", "output_throughput",
        "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms", "median_e2el_ms", "p99_e2el_ms")


def engine_args(args: argparse.Namespace) -> list[str]:
    return ["--dtype", "float32", "--enforce-eager", "--kv-cache-memory-bytes", str(args.kv_mib << 20),
            "--max-model-len", str(args.input_len + args.output_len + 64)]


def client_args(args: argparse.Namespace, server: Server, model: str, seed: int) -> list[str]:
    return ["--backend", "openai", "--base-url", server.base_url, "--model", SERVED_NAME,
            "--tokenizer", model, "--dataset-name", "random", "--num-prompts", str(args.num_prompts),
            "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
            "--request-rate", str(args.request_rate), "--max-concurrency", str(args.max_concurrency),
            "--ignore-eos", "--disable-tqdm", "--seed", str(seed)]


def run_client(args: argparse.Namespace, server: Server, model: str, seed: int) -> dict:
    """One `vllm bench serve` run; its numeric results."""
    with tempfile.TemporaryDirectory() as cwd:
        out = subprocess.run([sys.executable, "-c", CLIENT, *client_args(args, server, model, seed)],
                             capture_output=True, text=True, timeout=1800, cwd=cwd)
    if out.returncode != 0:
        raise RuntimeError(f"vllm bench serve against {server.name} failed:\n{out.stderr[-3000:]}")
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


async def start_both(model: str, out_dir: Path, args: argparse.Namespace) -> dict[str, Server]:
    engine = engine_args(args)
    lport, cport, vport = free_port(), free_port(), free_port()
    servers = {
        "llumigrate": Server("llumigrate", llumigrate_cmd(model, lport, cport, 1, engine), lport,
                             out_dir / "bench_overhead.llumigrate.log"),
        "vllm": Server("vllm", vllm_cmd(model, vport, engine), vport, out_dir / "bench_overhead.vllm.log"),
    }
    for s in servers.values():
        s.start()
    print("starting llumigrate serve (1 instance) and vLLM's api_server ...", flush=True)
    await asyncio.gather(*(s.wait_ready() for s in servers.values()))
    return servers


def bench(args: argparse.Namespace, model: str, out_dir: Path) -> list[dict]:
    servers = asyncio.run(start_both(model, out_dir, args))
    rows: list[dict] = []
    t0 = time.monotonic()
    try:
        # Warm-up (not measured): first requests, and each new batch size, pay
        # one-off costs; two batches' worth reaches the full concurrency.
        warm = argparse.Namespace(**{**vars(args), "num_prompts": 2 * args.max_concurrency})
        for name in servers:
            run_client(warm, servers[name], model, 999)
        for rnd in range(args.rounds):
            order = list(servers) if rnd % 2 == 0 else list(servers)[::-1]
            for name in order:
                r = run_client(args, servers[name], model, seed=rnd)
                rows.append({"server": name, "round": rnd, **{k: r.get(k) for k in KEYS}})
                print(f"[{time.monotonic() - t0:5.0f}s round {rnd + 1}/{args.rounds} {name}] "
                      f"output {r['output_throughput']:.1f} tok/s  median TPOT {r['median_tpot_ms']:.2f} ms  "
                      f"median TTFT {r['median_ttft_ms']:.1f} ms  failed {r['failed']}", flush=True)
    finally:
        for s in servers.values():
            s.stop()
    return rows


def medians(rows: list[dict], server: str) -> dict:
    mine = [r for r in rows if r["server"] == server]
    return {k: statistics.median(r[k] for r in mine) for k in KEYS if all(r[k] is not None for r in mine)}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(len(shapes), 2, figsize=(11, 4 * len(shapes)), squeeze=False)
    for row_axes, shape in zip(axes, shapes):
        for ax, key, label in ((row_axes[0], "output_throughput", "output tokens/s"),
                               (row_axes[1], "median_tpot_ms", "median TPOT (ms)")):
            for server, marker in (("llumigrate", "o"), ("vllm", "s")):
                mine = [r for r in rows if r["server"] == server and r["shape"] == shape]
                ax.plot([r["round"] + 1 for r in mine], [r[key] for r in mine], marker=marker, label=server)
            ax.set(xlabel="round", ylabel=label, title=f"{shape} model: {label}")
            ax.set_ylim(bottom=0)
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default="out/bench_overhead.json")
    p.add_argument("--rounds", type=int, default=3, help="each round runs the client once per server")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--request-rate", type=float, default=float("inf"))
    p.add_argument("--max-concurrency", type=int, default=16)
    p.add_argument("--kv-mib", type=int, default=256, help="KV cache of each server (MiB)")
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES),
                   help="model shapes to run, each against both servers (see the module doc)")
    return p.parse_args()



def key_prefix(shape: str) -> str:
    """Summary keys of the "wide" shape are the issue's own; others carry the shape's name."""
    return "" if shape == "wide" else f"{shape}_"


def ratios(llum: dict, vllm: dict, prefix: str = "") -> dict:
    """llumigrate over vLLM, of their medians over rounds (`medians`)."""
    return {f"{prefix}throughput_ratio_vs_vllm": ratio(llum["output_throughput"], vllm["output_throughput"]),
            f"{prefix}p50_tpot_ratio_vs_vllm": ratio(llum["median_tpot_ms"], vllm["median_tpot_ms"]),
            f"{prefix}p50_ttft_ratio_vs_vllm": ratio(llum["median_ttft_ms"], vllm["median_ttft_ms"])}


def main() -> None:
    args = parse_args()
    out = Path(args.json)
    summary: dict = {}
    shapes: dict = {}
    all_rows: list[dict] = []
    for name in args.shapes:
        layers, hidden, heads = SHAPES[name]
        cfg = TinyModelConfig(num_layers=layers, hidden_size=hidden, num_heads=heads,
                              num_kv_heads=max(1, heads // 2))
        model = str(ensure_tiny_model(config=cfg))
        print(f"shape {name}: {cfg.describe()}", flush=True)
        rows = [{**r, "shape": name} for r in bench(args, model, out.parent)]
        all_rows += rows
        llum, vllm = medians(rows, "llumigrate"), medians(rows, "vllm")
        summary.update(ratios(llum, vllm, key_prefix(name)))
        shapes[name] = {"model": cfg.describe(), "llumigrate": llum, "vllm": vllm}
    write_json(out, {"summary": summary, "shapes": shapes, "runs": all_rows,
                     "args": {k: (str(v) if v == float("inf") else v) for k, v in vars(args).items()}})
    plot(all_rows, out.with_suffix(".png"))
    parts = []
    for name in args.shapes:
        pre = key_prefix(name)
        parts.append(f"{name}: throughput llumigrate/vLLM {fmt(summary[pre + 'throughput_ratio_vs_vllm'], '.3f')}"
                     f" (target >= 0.95), p50 TPOT {fmt(summary[pre + 'p50_tpot_ratio_vs_vllm'], '.3f')}"
                     " (target <= 1.05)")
    print(f"bench_overhead: {'; '.join(parts)} -> {out}")


if __name__ == "__main__":
    main()
