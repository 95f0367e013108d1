"""The extraction writer alone: CPU and wall time to write and commit one shard.

A ResNet-18 plan (random init, 3×32×32 inputs, ``layer1…layer4`` spatial means + logits;
1024-sample shards, ≈ 3.9 MB of float32 a shard) is staged in a local Icechunk repository;
one shard is computed once and its activations are committed as every shard of the plan,
one commit each, through the writer's own function (``extraction._commit_shards``).
Reported per shard: process CPU time (all threads: Zarr's event loop, the codec threads,
Icechunk's runtime) and wall time, median over the shards. Beside it, the activation codec
against the alternatives on the same activations (encode / decode CPU, compression ratio)::

    flock /tmp/heavy.lock .venv/bin/python benchmarks/bench_writer.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from numcodecs import Blosc, Zstd

from zooaudit import layout, stages
from zooaudit.specs import AuditModelSpec, DatasetSpec
from zooaudit.stages import activations as extraction

CODECS = {
    "zstd-1": Zstd(level=1),
    "blosc-lz4-bitshuffle (stored)": Blosc(cname="lz4", clevel=5, shuffle=Blosc.BITSHUFFLE),
    "blosc-lz4-shuffle": Blosc(cname="lz4", clevel=5, shuffle=Blosc.SHUFFLE),
}


def codec_table(acts: dict[str, np.ndarray], repeats: int = 5) -> dict[str, dict]:
    """Encode / decode CPU (best of ``repeats``, ms) and compression ratio of each codec."""
    raw = sum(a.nbytes for a in acts.values())
    out = {}
    for name, codec in CODECS.items():
        enc = dec = float("inf")
        for _ in range(repeats):
            t = time.process_time()
            blobs = [codec.encode(np.ascontiguousarray(a)) for a in acts.values()]
            enc = min(enc, time.process_time() - t)
            t = time.process_time()
            for b in blobs:
                codec.decode(b)
            dec = min(dec, time.process_time() - t)
        out[name] = {"encode_ms": round(enc * 1e3, 2), "decode_ms": round(dec * 1e3, 2),
                     "ratio": round(raw / sum(len(b) for b in blobs), 3)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--shard-size", type=int, default=1024)
    p.add_argument("--tmp", help="folder of the store (default: the system's temp folder)")
    args = p.parse_args()
    uri = "torchvision:resnet18?num_classes=10&input_shape=3x32x32&seed=0"
    n = args.shards * args.shard_size
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        tmp = Path(tmp)
        x = np.random.default_rng(0).standard_normal((n, 3, 32, 32), dtype=np.float32)
        np.save(tmp / "x.npy", x)
        ds_spec = DatasetSpec(name="arrays", path=str(tmp / "x.npy"))
        spec = AuditModelSpec(model=uri, store="file://" + str(tmp / "store"), datasets=[ds_spec],
                              layers=["layer1", "layer2", "layer3", "layer4"], pooling="mean",
                              shard_size=args.shard_size, task_runner="threads")
        plan = stages.plan_extraction(spec, ds_spec)
        staging = extraction.begin_activations(plan)
        acts, logits = extraction.compute_shard(plan, plan.shards[0])
        _, _, repo = stages.common._repo(plan)
        arrays = layout.ArrayCache()
        cpu, wall = [], []
        for shard in plan.shards:
            w, c = time.perf_counter(), time.process_time()
            extraction._commit_shards(plan, staging.branch, [(shard, acts, logits)], repo=repo, arrays=arrays)
            cpu.append(time.process_time() - c)
            wall.append(time.perf_counter() - w)
    print(json.dumps({
        "model": uri, "shard_size": args.shard_size, "shards": args.shards,
        "shard_mb": round((sum(a.nbytes for a in acts.values()) + logits.nbytes) / 1e6, 2),
        "codec": {k: str(getattr(v, "value", v)) for k, v in layout.ACTIVATION_COMPRESSORS[0].to_dict()["configuration"].items()
                  if k in ("cname", "clevel", "shuffle")},
        "writer_per_shard_ms": {"cpu_median": round(statistics.median(cpu) * 1e3, 1),
                                "wall_median": round(statistics.median(wall) * 1e3, 1),
                                "first_cpu": round(cpu[0] * 1e3, 1)},
        "codecs": codec_table(acts),
    }, indent=2))


if __name__ == "__main__":
    main()
