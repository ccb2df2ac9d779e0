"""Text -> region search on a generated dataset's split, with the index built and queried in PostgreSQL (pgvector).

    python -m bench.search_eval --data data/synth --split test --limit 300 --out bench/results/search_eval_builtin_cpu.json

Every object region of the split's first `--limit` images is embedded (osprey.embedding) and stored by
`osprey.region_index.add_regions` (the code path of `osprey index add`) in an index of the database (`--db`; default
a fresh embedded PostgreSQL in a temporary folder). Then two kinds of text queries, each worded by `--template`:

- category queries, one per category ("circle"): precision@10 of the HNSW search (`RegionIndex.search`, what a
  user gets), and average precision over the exact full ranking (a sequential scan in PostgreSQL), averaged: mAP;
- attribute queries, one per (colour, category) pair present ("red circle"): the same, with precision@10 counted
  over min(10, relevant regions) (a pair with 3 regions can have at most 3 right in its top 10), and the share of
  queries whose first result is right.

A region is relevant to a category query when its category is the query's, to an attribute query when its colour
and category both are (colour as the dataset's referring phrase names it). The HNSW top 10 is also compared with
the exact top 10 (recall of the approximate search). Several `--template`s are scored on one index: choose on val,
report test.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bench.eval_all import write_atomic


@dataclass(frozen=True)
class Truth:
    category: str
    colour: str | None


def _colour(phrase: str | None) -> str | None:
    from data_tools.synth.vocab import COLORS

    words = (phrase or "").split(" in the ")[0].split()
    return words[1] if len(words) >= 3 and words[1] in COLORS else None


def build_index(index, embedder, data: Path, split: str, limit: int) -> tuple[dict[tuple[str, int], Truth], np.ndarray]:
    """Store the split's object regions; returns each stored region's truth by (image path, region number) and
    their vectors, in the same order."""
    from osprey import region_index
    from osprey.data.dataset import manifest_subsets
    from osprey.data.records import iter_records, record_masks
    from osprey.data.samples import region_descriptions

    specs = {s.kind: s for s in manifest_subsets(data, split, stages=[2])}
    phrases = {r.file_name: (r.annotation, dict(region_descriptions(r)))
               for _, r in iter_records(specs["referring"].path)}
    truth: dict[tuple[str, int], Truth] = {}
    vectors = []
    records = [r for _, (_, r) in zip(range(limit), iter_records(specs["categories"].path))]
    for record in tqdm(records, desc=f"indexing {split}", unit="image"):
        path = specs["categories"].image_root / record.file_name
        annotation, described = phrases.get(record.file_name, (None, {}))
        texts = [described.get(k) if annotation == record.annotation else None
                 for k in range(1, len(record.annotation) + 1)]
        labels = [a.category_name for a in record.annotation]
        vectors.append(region_index.add_regions(index, embedder, path, record_masks(record), labels, texts))
        for q, (label, text) in enumerate(zip(labels, texts, strict=True)):
            truth[(str(path.resolve()), q)] = Truth(label, _colour(text))
    return truth, np.concatenate(vectors)


def cosine_figures(truth: dict[tuple[str, int], Truth], vectors: np.ndarray) -> dict[str, float]:
    """Mean cosine between region vectors: two crosses, a cross and a diamond (the issue's sanity pair), and any
    two regions of one category against two of different categories."""
    categories = np.array([t.category for t in truth.values()])
    similarity = vectors @ vectors.T
    off_diagonal = ~np.eye(len(vectors), dtype=bool)
    same = (categories[:, None] == categories[None]) & off_diagonal

    def mean(a: str, b: str) -> float:
        pairs = (categories[:, None] == a) & (categories[None] == b) & off_diagonal
        return float(similarity[pairs].mean())

    return {"cross_cross": mean("cross", "cross"), "cross_diamond": mean("cross", "diamond"),
            "same_category": float(similarity[same].mean()),
            "different_category": float(similarity[~same & off_diagonal].mean())}


def average_precision(relevant: list[bool], total_relevant: int) -> float:
    hits, total = 0, 0.0
    for rank, is_relevant in enumerate(relevant, start=1):
        if is_relevant:
            hits += 1
            total += hits / rank
    return total / total_relevant if total_relevant else 0.0


def score_queries(index, embedder, truth: dict[tuple[str, int], Truth], queries: dict[str, callable],
                  template: str, k: int = 10) -> dict:
    """Per query text: precision@k (HNSW), AP (exact ranking), first hit, HNSW/exact top-k overlap."""
    rows = {}
    total = len(truth)
    for text, is_relevant in queries.items():
        n_relevant = sum(is_relevant(t) for t in truth.values())
        vector = embedder.embed_texts([template.format(text)])[0]
        approx = index.search(vector, k)
        exact = index.search(vector, total, exact=True)
        approx_rel = [is_relevant(truth[(h.image, h.region)]) for h in approx]
        exact_rel = [is_relevant(truth[(h.image, h.region)]) for h in exact]
        exact_top = {(h.image, h.region) for h in exact[:k]}
        rows[text] = {"relevant": n_relevant, "precision_at_k": sum(approx_rel) / min(k, n_relevant),
                      "average_precision": average_precision(exact_rel, n_relevant), "first_right": approx_rel[0],
                      "hnsw_recall_at_k": len(exact_top & {(h.image, h.region) for h in approx}) / len(exact_top)}
    return {"queries": len(rows), **{f"mean_{m}": float(np.mean([r[m] for r in rows.values()]))
                                     for m in ("precision_at_k", "average_precision", "first_right",
                                               "hnsw_recall_at_k")}, "per_query": rows}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="osprey bench search-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a generated dataset (osprey data synth --n 20000)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=300, help="first images of the split")
    parser.add_argument("--model", default=None, help="model folder (default: the built-in model)")
    parser.add_argument("--clip-weights", default=None, help="open_clip file with a text tower (official models)")
    parser.add_argument("--db", default=None, help="postgresql:// URL or folder (default: a temporary embedded one)")
    parser.add_argument("--template", nargs="+", default=["{}"],
                        help="query wordings, e.g. '{}' 'a {}' (each scored on the same index; choose on val)")
    parser.add_argument("--min-relevant", type=int, default=1, help="attribute queries with at least this many regions")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: on a loaded machine, 2 were slower)")
    parser.add_argument("--out", default=None, help="JSON report")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)

    from osprey import default_model_path, region_index
    from osprey.embedding import RegionTextEmbedder

    model = args.model or str(default_model_path())
    embedder = RegionTextEmbedder.from_pretrained(model, args.clip_weights)
    # the embedded server still runs while the folder goes (it stops when this process exits): ignore what it holds
    with tempfile.TemporaryDirectory(prefix="osprey-search-eval-", ignore_cleanup_errors=True) as scratch:
        conn = region_index.connect(args.db or str(Path(scratch) / "db"))
        name = f"eval_{args.split}_{int(time.time())}"
        index = region_index.RegionIndex.create(conn, embedder.space, embedder.dim, name)
        start = time.perf_counter()
        truth, vectors = build_index(index, embedder, Path(args.data), args.split, args.limit)
        index_seconds = time.perf_counter() - start
        categories = sorted({t.category for t in truth.values()})
        pairs = defaultdict(int)
        for t in truth.values():
            if t.colour is not None:
                pairs[(t.colour, t.category)] += 1
        category_queries = {c: (lambda t, c=c: t.category == c) for c in categories}
        attribute_queries = {f"{colour} {category}": (lambda t, c=category, o=colour: t.category == c and t.colour == o)
                             for (colour, category), n in sorted(pairs.items()) if n >= args.min_relevant}
        report = {
            "model": model, "space": embedder.space, "dim": embedder.dim, "data": str(args.data), "split": args.split,
            "images": args.limit, "regions": len(truth), "index_hnsw": index.uses_hnsw(),
            "index_seconds": round(index_seconds, 1), "cosine": cosine_figures(truth, vectors),
            "templates": {template: {
                "category": score_queries(index, embedder, truth, category_queries, template),
                "attribute": score_queries(index, embedder, truth, attribute_queries, template)}
                for template in args.template},
        }
        conn.execute(f"DROP TABLE {index.table}")
        conn.execute("DELETE FROM osprey_indexes WHERE name = %s", (name,))
        conn.commit()
        conn.close()
        report_and_write(report, args.out)
    return report


def report_and_write(report: dict, out: str | None) -> None:
    for template, scores in report["templates"].items():
        for kind, r in scores.items():
            print(f"{template!r} {kind}: {r['queries']} queries, precision@10 {r['mean_precision_at_k']:.3f}, "
                  f"mAP {r['mean_average_precision']:.3f}, first right {r['mean_first_right']:.3f}, "
                  f"HNSW recall@10 {r['mean_hnsw_recall_at_k']:.3f}", file=sys.stderr)
    print("mean cosine: " + ", ".join(f"{k} {v:.3f}" for k, v in report["cosine"].items()), file=sys.stderr)
    if out:
        write_atomic(Path(out), json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
