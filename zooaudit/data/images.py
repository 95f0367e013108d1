"""Image folders: one sub-folder per class (``<root>/<class>/<image>``).

Dataset name ``image-folder``; ``DatasetSpec.path`` is the root folder (a local
path or ``file://`` URL). Options (``DatasetSpec.options``):

- ``image_size``: ``"HxW"`` or one integer; images are resized to it (bilinear).
  Without it every image must already have the same size.
- ``mode``: ``"RGB"`` (default, 3 channels) or ``"L"`` (1 channel).
- ``on_error``: ``"fail"`` (default) or ``"skip"`` for files that cannot be decoded.
- ``groups``: a CSV file (relative to the root; default ``groups.csv`` when present)
  with a ``path`` column (relative to the root) and one column per group attribute.
- ``masks``: a folder (relative to the root, and then not a class) of foreground masks in
  the same layout, ``<masks>/<class>/<image stem>.png``: one per image, any non-zero pixel
  is foreground; resized with nearest neighbours to ``image_size``. Stored as
  ``AuditDataset.masks`` ``(sample, y, x)`` bool.
- ``label_sets``: multi-label data, a sidecar file (relative to the root; default
  ``label_sets.csv`` or ``label_sets.json`` when present) giving each image its set of label
  names — CSV: columns ``path`` and ``labels``, the names separated by ``;`` (empty: no label);
  JSON: ``{"<class>/<image>": ["name", ...]}``. Stored as ``AuditDataset.label_sets``
  ``(sample, label)`` 0/1; the folder's class stays the single label.
- ``label_set_names``: the allowed label names, in column order (default: the sorted names seen).
- ``multi_groups``: set-valued attributes, a sidecar file (default ``multi_groups.csv`` /
  ``.json`` when present) — CSV: a ``path`` column and one column per attribute, names separated
  by ``;``; JSON: ``{"<class>/<image>": {"<attr>": ["name", ...]}}``. Stored as
  ``AuditDataset.group_sets`` ``(sample, value)`` 0/1, value names in sorted order.

Labels are class indices in sorted order of the folder names; sample ids are the
positions in sorted (class, file) order; inputs ``(sample, channel, y, x)``
float32 in [0, 1]. Group attribute values are coded in sorted order of their
string form, the names kept in ``group_names`` (the text datasets' convention).
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from ..errors import ZooauditError
from .multihot import from_names
from .registry import register
from .types import AuditDataset

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
OPTIONS = {"image_size", "mode", "on_error", "groups", "masks", "label_sets", "label_set_names", "multi_groups"}
SET_SEPARATOR = ";"     # between the names of one cell of a multi-hot sidecar CSV


def local_path(path: str | None, dataset: str) -> Path:
    """A dataset's local path from ``DatasetSpec.path`` (plain or ``file://``); must exist."""
    if not path:
        raise ZooauditError(f"Dataset {dataset!r} needs a path (DatasetSpec.path / --dataset {dataset}=PATH).")
    parsed = urlparse(path)
    if parsed.scheme not in ("", "file"):
        raise ZooauditError(f"Dataset {dataset!r} reads local files only; got {path!r} (allowed: a path or "
                            "file:///abs/path).")
    p = Path(parsed.path if parsed.scheme == "file" else path).expanduser().resolve()
    if not p.exists():
        raise ZooauditError(f"Dataset {dataset!r}: {str(p)!r} does not exist.")
    return p


def check_options(options: dict, allowed: set[str], dataset: str) -> None:
    bad = sorted(set(options) - allowed)
    if bad:
        raise ZooauditError(f"Unknown option(s) {bad} for dataset {dataset!r}. Allowed: {', '.join(sorted(allowed))}.")


def options_and_path(spec, allowed: set[str], dataset: str) -> tuple[dict, Path]:
    """The door of a loader that reads local files: ``(options, local path)`` of ``spec``,
    after refusing option names outside ``allowed`` (:func:`check_options`, :func:`local_path`)."""
    options = dict(spec.options)
    check_options(options, allowed, dataset)
    return options, local_path(spec.path, dataset)


def parse_size(value) -> tuple[int, int] | None:
    """``"32x48"`` → ``(32, 48)`` (height, width); ``32`` → ``(32, 32)``."""
    if value is None:
        return None
    try:
        parts = [int(p) for p in str(value).lower().split("x")]
        if len(parts) == 1:
            parts *= 2
        if len(parts) != 2 or min(parts) < 1:
            raise ValueError
        return parts[0], parts[1]
    except ValueError:
        raise ZooauditError(f"Bad image_size {value!r}: expected 'HxW' or one positive integer.") from None


def to_array(img, mode: str, size: tuple[int, int] | None) -> np.ndarray:
    """A PIL image → ``(channel, y, x)`` float32 in [0, 1], converted to ``mode`` and resized to ``size``."""
    from PIL import Image

    img = img.convert(mode)
    if size is not None and img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.BILINEAR)
    a = np.asarray(img, dtype=np.float32) / 255.0
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def stack_images(arrays: list[np.ndarray], names: list[str], dataset: str) -> np.ndarray:
    """Stack per-image arrays; differing sizes are an error that names two of them."""
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        first = arrays[0].shape
        other = next(i for i, a in enumerate(arrays) if a.shape != first)
        raise ZooauditError(f"Dataset {dataset!r}: images differ in size ({names[0]!r} is {first}, {names[other]!r} "
                            f"is {arrays[other].shape}); set options.image_size, e.g. '32x32'.")
    return np.stack(arrays).astype(np.float32, copy=False)


def code_groups(columns: dict[str, list]) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
    """Group attribute values → int64 codes in sorted order of their string form, and the names."""
    groups, names = {}, {}
    for attr, values in columns.items():
        labels = sorted({str(v) for v in values})
        index = {v: i for i, v in enumerate(labels)}
        groups[attr] = np.array([index[str(v)] for v in values], np.int64)
        names[attr] = labels
    return groups, names


def _read_groups(root: Path, spec_value, files: list[str]) -> tuple[dict, dict]:
    path = root / (spec_value or "groups.csv")
    if not path.exists():
        if spec_value:
            raise ZooauditError(f"Group file {str(path)!r} (options.groups) does not exist.")
        return {}, {}
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "path" not in rows[0]:
        raise ZooauditError(f"Group file {str(path)!r} needs a header with a 'path' column and one column per "
                            "group attribute.")
    by_path = {r["path"]: r for r in rows}
    missing = [f for f in files if f not in by_path]
    if missing:
        raise ZooauditError(f"Group file {str(path)!r} has no row for {len(missing)} image(s), e.g. {missing[:3]}.")
    attrs = [c for c in rows[0] if c != "path"]
    return code_groups({a: [by_path[f][a] for f in files] for a in attrs})


def _sidecar(root: Path, option: str, spec_value, files: list[str], labels: bool) -> dict[str, list[list[str]]] | None:
    """``{column: per-file lists of names}`` from a multi-hot sidecar (``options.<option>``), or None when
    there is none. ``labels``: the one column is ``labels`` (a JSON value is then the list itself)."""
    if spec_value:
        path = root / str(spec_value)
        if not path.exists():
            raise ZooauditError(f"Sidecar file {str(path)!r} (options.{option}) does not exist.")
    else:
        path = next((p for p in (root / f"{option}.csv", root / f"{option}.json") if p.exists()), None)
        if path is None:
            return None
    where = f"{str(path)!r} (options.{option})"
    if path.suffix.lower() == ".json":
        try:
            by_path = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ZooauditError(f"Sidecar file {where} is not valid JSON: {err}.") from None
        if not isinstance(by_path, dict):
            raise ZooauditError(f"Sidecar file {where} must hold an object keyed by image path (<class>/<image>).")
        if labels:
            by_path = {k: {"labels": v} for k, v in by_path.items()}
        elif not all(isinstance(v, dict) for v in by_path.values()):
            raise ZooauditError(f"Sidecar file {where}: each image maps to an object {{attribute: [names]}}.")
        columns = sorted({c for v in by_path.values() for c in v})
    elif path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        columns = [c for c in (rows[0] if rows else []) if c != "path"]
        if not rows or "path" not in rows[0] or not columns or (labels and columns != ["labels"]):
            want = "'path' and 'labels'" if labels else "'path' and one per set-valued attribute"
            raise ZooauditError(f"Sidecar file {where} needs a header with the columns {want}.")
        by_path = {r["path"]: {c: [v.strip() for v in (r[c] or "").split(SET_SEPARATOR) if v.strip()]
                               for c in columns} for r in rows}
    else:
        raise ZooauditError(f"Sidecar file {where} must be a .csv or a .json file.")
    missing = [f for f in files if f not in by_path]
    if missing:
        raise ZooauditError(f"Sidecar file {where} has no entry for {len(missing)} image(s), e.g. {missing[:3]}.")
    return {c: [by_path[f].get(c, []) for f in files] for c in columns}


def _read_sets(root: Path, options: dict, files: list[str]) -> dict:
    """The multi-hot columns (``label_sets``, ``group_sets``) of an image folder's sidecars."""
    out: dict = {}
    vocabulary = options.get("label_set_names")
    if vocabulary is not None and not (isinstance(vocabulary, list) and all(isinstance(v, str) for v in vocabulary)):
        raise ZooauditError(f"options.label_set_names must be a list of label names; got {vocabulary!r}.")
    if (cols := _sidecar(root, "label_sets", options.get("label_sets"), files, labels=True)) is not None:
        out["label_sets"], out["label_set_names"] = from_names(cols["labels"], "label_sets", "image-folder",
                                                               vocabulary)
    elif vocabulary is not None:
        raise ZooauditError("options.label_set_names needs label sets (options.label_sets or a label_sets.csv / "
                            ".json sidecar in the root).")
    if (cols := _sidecar(root, "multi_groups", options.get("multi_groups"), files, labels=False)) is not None:
        for attr, rows in cols.items():
            matrix, names = from_names(rows, f"multi_groups[{attr!r}]", "image-folder")
            out.setdefault("group_sets", {})[attr] = matrix
            out.setdefault("group_set_names", {})[attr] = names
    return out


def _read_masks(root: Path, folder: str, files: list[str], size: tuple[int, int] | None) -> np.ndarray:
    """``(sample, y, x)`` bool masks of ``files`` (``<class>/<name>``) from ``root/folder``."""
    from PIL import Image

    base = root / folder
    if not base.is_dir():
        raise ZooauditError(f"Mask folder {str(base)!r} (options.masks) does not exist.")
    out = []
    for rel in files:
        path = base / Path(rel).with_suffix(".png")
        if not path.exists():
            raise ZooauditError(f"Image {rel!r} has no mask {str(path)!r} (options.masks: one <class>/<stem>.png "
                                "per image).")
        with Image.open(path) as img:
            img = img.convert("L")
            if size is not None and img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.NEAREST)   # a mask stays binary
            out.append(np.asarray(img) > 0)
    return np.stack(out)


@register("image-folder")
def load_image_folder(spec) -> AuditDataset:
    from PIL import Image, UnidentifiedImageError

    options, root = options_and_path(spec, OPTIONS, "image-folder")
    mode = str(options.get("mode", "RGB"))
    on_error = str(options.get("on_error", "fail"))
    if mode not in ("RGB", "L"):
        raise ZooauditError(f"Unknown image mode {mode!r}. Allowed: RGB, L.")
    if on_error not in ("fail", "skip"):
        raise ZooauditError(f"Unknown on_error {on_error!r}. Allowed: fail, skip.")
    size = parse_size(options.get("image_size"))
    mask_folder = options.get("masks")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")
                     and (mask_folder is None or d.resolve() != (root / str(mask_folder)).resolve()))
    if not classes:
        raise ZooauditError(f"Image folder {str(root)!r} has no class sub-folders (expected <root>/<class>/<image>).")
    arrays, labels, files, ids = [], [], [], []
    position = 0
    for label, cls in enumerate(classes):
        for f in sorted(p for p in (root / cls).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            rel = f"{cls}/{f.name}"
            try:
                with Image.open(f) as img:
                    arrays.append(to_array(img, mode, size))
            except (UnidentifiedImageError, OSError, ValueError) as err:
                if on_error == "fail":
                    raise ZooauditError(f"Cannot read image {str(f)!r}: {err}. Fix or remove it, or set "
                                        "options.on_error='skip'.") from None
                log.warning("skipping unreadable image %s: %s", f, err)
                position += 1
                continue
            labels.append(label)
            files.append(rel)
            ids.append(position)
            position += 1
    if not arrays:
        raise ZooauditError(f"Image folder {str(root)!r} holds no readable images (suffixes: "
                            f"{', '.join(IMAGE_SUFFIXES)}).")
    groups, group_names = _read_groups(root, options.get("groups"), files)
    inputs = stack_images(arrays, files, "image-folder")
    masks = None if mask_folder is None else _read_masks(root, str(mask_folder), files, inputs.shape[-2:])
    return AuditDataset(
        name="image-folder",
        spec=spec.model_dump(),
        inputs=inputs,
        labels=np.array(labels, np.int64),
        sample_ids=np.array(ids, np.int64),
        groups=groups,
        group_names=group_names,
        masks=masks,
        class_names=classes,
        **_read_sets(root, options, files),
    )
