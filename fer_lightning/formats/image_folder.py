"""Reader for `root/{train,val,test}/<class name>/*.png` folders, with optional VGG Image Annotator metadata."""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from fer_lightning.taxonomy import Taxonomy, map_labels, normalize_name

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp"})
# Folder names seen in published image-folder releases, case-folded, for each split.
SPLIT_FOLDERS: dict[str, str] = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}
VIA_COLUMNS = (
    "filename",
    "file_size",
    "file_attributes",
    "region_count",
    "region_id",
    "region_shape_attributes",
    "region_attributes",
)
# VIA's default file attributes carry no information about the subject.
VIA_IGNORED_ATTRIBUTES = frozenset({"caption", "public_domain", "image_url"})
LAYOUT = "<root>/{train,val,test}/<class name>/*.{png,jpg,jpeg,bmp}"
_SHOWN = 5


def read(root: Path, extra_classes: Sequence[str] = ()) -> pd.DataFrame:
    """Read an image-folder data set; labels are the class folder names, mapped by name onto the taxonomy."""
    root = Path(root)
    if not root.is_dir():
        raise _format_error(
            f"image_folder: data root {root} does not exist or is not a folder; expected {LAYOUT}", missing=True
        )
    split_dirs = _split_dirs(root)
    taxonomy = Taxonomy(extra_classes)
    rows: list[dict] = []
    issues: list[tuple[str, str]] = []
    for split, split_dir in split_dirs:
        for item in sorted(split_dir.iterdir()):
            if item.is_file() and item.suffix.lower() in IMAGE_EXTENSIONS:
                issues.append((_rel(item, root), "image outside a class folder has no label"))
            elif item.is_dir():
                rows.extend(_read_class_folder(item, split, root, issues))
    _report_folders_without_metadata(rows, issues)

    groups = sorted({k for row in rows for k in row if k.startswith("group_")})
    df = pd.DataFrame(rows, columns=["path", "split", "label_raw", *groups])
    ids, used = map_labels(df["label_raw"].tolist(), taxonomy)
    df["expression"] = pd.array(ids, dtype="Int64")
    df.attrs["label_mapping"] = used
    df.attrs["metadata_issues"] = issues
    if issues:
        _warn_issues(root, issues)
    return df


def _split_dirs(root: Path) -> list[tuple[str, Path]]:
    found: dict[str, Path] = {}
    for item in sorted(root.iterdir()):
        split = SPLIT_FOLDERS.get(item.name.casefold())
        if split is None or not item.is_dir():
            continue
        if split in found:
            raise _format_error(
                f"image_folder: {root} has two folders for the {split} split ({found[split].name!r} and "
                f"{item.name!r}); keep one"
            )
        found[split] = item
    if not found:
        present = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise _format_error(
            f"image_folder: no split folder (train, val or test) under {root} (folders found: {present}); "
            f"expected {LAYOUT}",
            missing=True,
        )
    return [(s, found[s]) for s in ("train", "val", "test") if s in found]


def _read_class_folder(folder: Path, split: str, root: Path, issues: list[tuple[str, str]]) -> list[dict]:
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    metadata: dict[str, dict[str, str]] = {}
    metadata_files = []
    for csv_path in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".csv"):
        header = _csv_header(csv_path)
        missing = [c for c in VIA_COLUMNS if c not in header]
        if missing:
            issues.append((_rel(csv_path, root), f"CSV is not VIA metadata (missing columns {missing}); ignored"))
            continue
        metadata_files.append(csv_path)
        _merge_via(csv_path, metadata, root, issues)

    names = {p.name for p in images}
    for filename in sorted(set(metadata) - names):
        issues.append((_rel(folder / filename, root), "metadata row for a file that does not exist"))
    rows = []
    for image in images:
        attrs = metadata.get(image.name)
        if metadata_files and attrs is None:
            issues.append((_rel(image, root), "image has no metadata row"))
        row = {
            "path": _rel(image, root),
            "split": split,
            "label_raw": folder.name,
            "_has_metadata": bool(metadata_files),
        }
        row.update({f"group_{k}": v for k, v in (attrs or {}).items()})
        rows.append(row)
    return rows


def _csv_header(path: Path) -> list[str]:
    with path.open(newline="", encoding="utf-8-sig") as f:
        return [c.strip() for c in next(csv.reader(f), [])]


def _merge_via(csv_path: Path, metadata: dict[str, dict[str, str]], root: Path, issues: list) -> None:
    """Add one VIA CSV's file attributes to `metadata` (filename -> {attribute: value})."""
    table = pd.read_csv(csv_path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    table.columns = [c.strip() for c in table.columns]
    for i, (filename, raw) in enumerate(zip(table["filename"], table["file_attributes"])):
        try:
            parsed = json.loads(raw) if raw.strip() else {}
        except json.JSONDecodeError as err:
            raise _format_error(
                f"image_folder: {csv_path} data row {i + 1} (line {i + 2}): file_attributes is not JSON "
                f"({err.msg}): {raw[:80]!r}; export the metadata again from VGG Image Annotator as CSV"
            ) from None
        if not isinstance(parsed, dict):
            raise _format_error(
                f"image_folder: {csv_path} data row {i + 1} (line {i + 2}): file_attributes must be a JSON object, "
                f"got {raw[:80]!r}"
            )
        attrs = _group_attributes(parsed)
        # VIA writes one row per region, so one file repeats; its file attributes must agree.
        if filename in metadata and metadata[filename] != attrs:
            issues.append(
                (
                    _rel(csv_path.parent / filename, root),
                    f"conflicting file_attributes in {csv_path.name}; kept the first",
                )
            )
            continue
        metadata.setdefault(filename, attrs)


def _group_attributes(parsed: dict) -> dict[str, str]:
    out = {}
    for key, value in parsed.items():
        name = normalize_name(key)
        if name in VIA_IGNORED_ATTRIBUTES:
            continue
        if isinstance(value, dict):  # VIA checkbox attributes: {"option": true, ...}
            value = ",".join(sorted(str(k) for k, on in value.items() if on))
        value = "" if value is None else str(value).strip()
        if value:
            out[name] = value
    return out


def _report_folders_without_metadata(rows: list[dict], issues: list[tuple[str, str]]) -> None:
    """When some class folders carry metadata, the folders without it would silently get empty groups."""
    with_meta = {str(Path(r["path"]).parent) for r in rows if r["_has_metadata"]}
    if not with_meta:
        return
    for folder in sorted({str(Path(r["path"]).parent) for r in rows} - with_meta):
        issues.append((folder, "class folder has no VIA metadata CSV while other class folders have one"))


def _warn_issues(root: Path, issues: list[tuple[str, str]]) -> None:
    by_reason: dict[str, list[str]] = {}
    for path, reason in issues:
        by_reason.setdefault(reason, []).append(path)
    for reason, paths in by_reason.items():
        more = f" (+{len(paths) - _SHOWN} more)" if len(paths) > _SHOWN else ""
        log.warning("image_folder %s: %d x %s: %s%s", root, len(paths), reason, ", ".join(paths[:_SHOWN]), more)


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _format_error(message: str, missing: bool = False) -> ValueError:
    # Imported lazily: the registry imports the readers.
    from fer_lightning.formats.registry import DataFileNotFoundError, DataFormatError

    return DataFileNotFoundError(message) if missing else DataFormatError(message)
