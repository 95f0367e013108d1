"""The activation-statistics stage against one plain read of the same activations from the store.

Synthetic ReLU layers (widths 256, 512, 64 and 10-class logits ``head``, float32, labels of 10
classes, one binary group attribute) are committed to a fresh file store as a model's
activations, chunked by ``--chunk`` samples as extraction writes them. Then, best of
``--repeat`` after one untimed warm-up of both:

``read``    the reference: one pass over every layer's stored chunks with the reader the
            array stages use (``sim_stream.iter_row_blocks``: blocks of rows of all layers,
            read on a prefetch thread), doing nothing with them.
``stage``   ``run_statistics`` end to end: the streamed pass (sparsity, top-k, median
            histogram, covariance per layer; within-class scatter of the penultimate layer
            ``embed`` and of each group), NC4's second pass over ``embed``, and the commit.
            Each repeat uses a different ``top_k`` so that it is not a cache hit.

Reported: both times and their ratio (target ≤ 1.3), and the stage's ratio without the
spectrum (``max_spectrum_width=0``: no covariance GEMMs) and without the spectrum and neural
collapse (``nc_layers=[]``), to show where the time goes. ``memory`` runs the stage in a fresh
subprocess per ``--n`` and reports peak RSS (``ru_maxrss``) and the ratio between the largest
and the smallest N (target ≤ 1.2 at N × 10).

    .venv/bin/python benchmarks/bench_statistics.py speed --n 50000
    .venv/bin/python benchmarks/bench_statistics.py memory --n 20000 200000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

from zooaudit import layout
from zooaudit.analysis.sim_stream import block_rows, iter_row_blocks
from zooaudit.data.types import AuditDataset
from zooaudit.specs import DatasetSpec, StatisticsSpec
from zooaudit.stages import ActivationsRef, run_statistics
from zooaudit.stages.common import open_matrices
from zooaudit.store import Store, commit_metadata

WIDTHS = {"act1": 256, "act2": 512, "embed": 64}
CLASSES = 10


def make_store(url: str, n: int, chunk: int, seed: int = 0) -> ActivationsRef:
    """Commit synthetic activations of ``n`` samples; return the reference the stage takes."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, n)
    data = AuditDataset("bench", {"name": "bench", "n": n}, np.zeros((n, 1), np.float32), labels,
                        np.arange(n, dtype=np.int64), {"group": (rng.random(n) < 0.3).astype(np.int64)},
                        {"group": ["minority", "majority"]})
    centres = {name: rng.normal(size=(CLASSES, w)).astype(np.float32) for name, w in WIDTHS.items()}
    head_w = rng.normal(size=(WIDTHS["embed"], CLASSES)).astype(np.float32)
    shapes = {**{k: (w,) for k, w in WIDTHS.items()}, "head": (CLASSES,)}
    store = Store.open(url)

    def write(session):
        layout.create_activation_arrays(session.store, data, data.key, shapes, CLASSES, chunk)
        for s in range(0, n, chunk):
            y = labels[s:s + chunk]
            acts = {k: np.maximum(c[y] + rng.normal(size=(len(y), c.shape[1])).astype(np.float32) - 0.5, 0)
                    for k, c in centres.items()}
            acts["head"] = acts["embed"] @ head_w
            layout.write_shard(session.store, data.key, s, acts, acts["head"])

    snap = store.model_repository("bench").commit(write, message="activations",
                                                  metadata=commit_metadata("activations", f"acts-bench-{n}", {}))
    return ActivationsRef(store=store.url, model_uri="bench:model", model_key="bench", model_hash="0",
                          dataset=DatasetSpec(name="digits"), ds_key=data.key, ds_hash="0", snapshot=snap,
                          cache_key=f"acts-bench-{n}", layers=list(shapes), shapes=shapes, pooling="mean",
                          n_samples=n, n_outputs=CLASSES, has_groups=True)


def plain_read(ref: ActivationsRef) -> int:
    """One pass over every stored chunk of every layer with the array stages' reader."""
    arrays = list(open_matrices(ref).values())
    rows = block_rows(sum(int(np.prod(a.shape[1:])) for a in arrays), 4)
    total = 0
    for _, _, parts in iter_row_blocks(arrays, rows):
        total += sum(p.shape[0] for p in parts)
    return total


def _best(fn, repeat: int) -> float:
    best = np.inf
    for i in range(repeat):
        t = time.perf_counter()
        fn(i)
        best = min(best, time.perf_counter() - t)
    return best


def run_speed(args) -> None:
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        ref = make_store(f"file://{tmp}/store", args.n, args.chunk)
        plain_read(ref)                                                      # warm-up
        run_statistics(ref, StatisticsSpec(top_k=1))
        read = _best(lambda i: plain_read(ref), args.repeat)
        out = {"n": args.n, "chunk": args.chunk, "layers": {**WIDTHS, "head": CLASSES},
               "plain_read_s": round(read, 3), "target": 1.3}
        variants = {"stage": {}, "without_spectrum": {"max_spectrum_width": 0},
                    "without_spectrum_and_nc": {"max_spectrum_width": 0, "nc_layers": []}}
        for j, (name, kw) in enumerate(variants.items()):
            t = _best(lambda i: run_statistics(ref, StatisticsSpec(top_k=100 + 10 * j + i, **kw)), args.repeat)
            out[f"{name}_s"], out[f"{name}_ratio"] = round(t, 3), round(t / read, 3)
    print(json.dumps(out))


def _child() -> None:
    ref = json.loads(sys.stdin.read())
    ref["dataset"] = DatasetSpec(**ref["dataset"])
    r = ActivationsRef(**ref)
    t = time.perf_counter()
    run_statistics(r, StatisticsSpec(top_k=16))
    print(json.dumps({"seconds": time.perf_counter() - t,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def run_memory(args) -> None:
    out = {}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for n in args.n:
            ref = make_store(f"file://{tmp}/store-{n}", n, args.chunk, seed=n)
            payload = {**ref.__dict__, "dataset": ref.dataset.model_dump()}
            proc = subprocess.run([sys.executable, __file__, "_child"], input=json.dumps(payload), text=True,
                                  capture_output=True, check=True)
            out[n] = json.loads(proc.stdout.strip().splitlines()[-1])
    ns = sorted(out)
    print(json.dumps({"runs": out, "rss_ratio": round(out[ns[-1]]["peak_rss_mib"] / out[ns[0]]["peak_rss_mib"], 3),
                      "target": 1.2}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="?", default="speed", choices=["speed", "memory", "_child"])
    ap.add_argument("--n", type=int, nargs="+", default=[50_000])
    ap.add_argument("--chunk", type=int, default=2048, help="samples per stored chunk (the shard size)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tmp", default=None, help="folder for the temporary stores (default: $TMPDIR)")
    args = ap.parse_args()
    if args.what == "speed":
        args.n = args.n[0]
        run_speed(args)
    elif args.what == "memory":
        run_memory(args)
    else:
        _child()


if __name__ == "__main__":
    main()
