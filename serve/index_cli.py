"""`osprey index add / search`: regions of images into a PostgreSQL + pgvector index, and text -> region search."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import NoDefaultModel, resolve_model_path

EPILOG = """\
examples:
  EX=$(python -c "import osprey; print(osprey.EXAMPLE_DIR)")
  osprey index add "$EX/image.png" --masks "$EX/sam_masks.json"       # embedded PostgreSQL in ./osprey-index
  osprey index search "circle" -k 5
  osprey index add photos/*.jpg --masks sam/ --db postgresql://user@host/db --name shelf
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "index", help="store regions' embeddings in PostgreSQL (pgvector) and find regions by text",
        description="A region index: each region's embedding (osprey.embedding: the model's CLIP space), mask (COCO "
        "RLE), box and image path in a PostgreSQL table with an HNSW index; search by cosine distance. The database "
        "is --db (a postgresql:// URL, or a folder for an embedded PostgreSQL), else $OSPREY_INDEX_DB, else "
        "./osprey-index. See docs/search.md.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="index_command", required=True)

    add = sub.add_parser("add", help="embed and store every region of some images (re-adding an image replaces it)")
    add.add_argument("images", nargs="+", help="image files")
    add.add_argument("--masks", nargs="+", required=True, metavar="FILE|DIR",
                     help="one masks file per image (a JSON region list in any codec, or a SAM list), or one folder "
                          "holding <image stem>.json for each image")
    _common(add)
    add.set_defaults(func=_cmd_add)

    search = sub.add_parser("search", help="the regions nearest to a text")
    search.add_argument("query", help="the text, e.g. 'red mug'")
    search.add_argument("-k", type=int, default=10, help="number of regions (at most 1000)")
    search.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    _common(search)
    search.set_defaults(func=_cmd_search)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", default=None, help="postgresql:// URL or embedded-database folder "
                                                   "(default: $OSPREY_INDEX_DB, else ./osprey-index)")
    parser.add_argument("--name", default="regions", help="the index's name in the database")
    parser.add_argument("--model", default=None, help="model folder (default: $OSPREY_MODEL or the built-in model)")
    parser.add_argument("--clip-weights", default=None, metavar="FILE",
                        help="open_clip file with the text tower, for a model folder without its own")
    parser.add_argument("--device", default="cpu")


def _masks_files(images: list[str], masks: list[str]) -> list[Path]:
    if len(masks) == 1 and Path(masks[0]).is_dir():
        return [Path(masks[0]) / f"{Path(image).stem}.json" for image in images]
    if len(masks) != len(images):
        raise ValueError(f"{len(images)} images but {len(masks)} masks files: give one per image, or one folder")
    return [Path(m) for m in masks]


def _open(args: argparse.Namespace, create: bool):
    """(embedder, index) of the arguments; the index created for the embedder's space when `create`."""
    from osprey import region_index
    from osprey.embedding import RegionTextEmbedder


    embedder = RegionTextEmbedder.from_pretrained(resolve_model_path(args.model), args.clip_weights, args.device)
    conn = region_index.connect(region_index.resolve_db(args.db))
    if create:
        return embedder, region_index.RegionIndex.create(conn, embedder.space, embedder.dim, args.name)
    index = region_index.RegionIndex.open(conn, args.name)
    index.check_vectors(embedder.dim, embedder.space)
    return embedder, index


def _cmd_add(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from osprey import region_index
    from osprey.preprocess import load_image

    from .describe import load_masks

    try:
        files = _masks_files(args.images, args.masks)
        embedder, index = _open(args, create=True)
        stored = 0
        for image_path, masks_file in tqdm(list(zip(args.images, files, strict=True)), unit="image"):
            image = load_image(image_path)
            masks = load_masks([str(masks_file)], image.height, image.width).masks
            stored += len(region_index.add_regions(index, embedder, image_path, masks))
        info = index.stats()
    except (ValueError, FileNotFoundError, ImportError, NoDefaultModel) as exc:
        print(f"osprey index add: {exc}", file=sys.stderr)
        return 2
    print(f"stored {stored} regions of {len(args.images)} images; index {info.name!r} holds {info.regions} regions "
          f"of {info.images} images ({info.space}, {info.dim}-d)")
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    if not args.query.strip():
        print("osprey index search: the query is empty", file=sys.stderr)
        return 2
    try:
        embedder, index = _open(args, create=False)
        hits = index.search(embedder.embed_texts([args.query])[0], args.k)
    except (ValueError, FileNotFoundError, ImportError, NoDefaultModel) as exc:
        print(f"osprey index search: {exc}", file=sys.stderr)
        return 2
    for rank, hit in enumerate(hits, start=1):
        if args.json:
            print(json.dumps({"rank": rank, **hit.__dict__}))
        else:
            box = ",".join(f"{v:g}" for v in hit.box)
            print(f"{rank:3d}  {hit.score:.3f}  {hit.image}  region {hit.region}  box [{box}]  {hit.label or ''}")
    return 0
