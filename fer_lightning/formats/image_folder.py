"""Reader for image-folder data sets, with optional VGG Image Annotator (VIA) metadata.

Two layouts: `root/{train,val,test}/<class name>/*.png` (split folders) and `root/<class name>/*.png` (the
torchvision ImageFolder layout, e.g. CK+48: every row is 'train' and `attrs['needs_split']` asks the data module to
split with data.split_fractions). A class folder may hold VIA CSV exports (any name) whose file attributes and
extra plain columns become group_* columns.
"""

from __future__ import annotations

import ast
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
# VIA columns holding a dict: JSON as VIA writes it, or a Python dict literal as some published exports have it.
VIA_DICT_COLUMNS = ("file_attributes", "region_shape_attributes", "region_attributes")
# VIA's default file attributes carry no information about the subject.
VIA_IGNORED_ATTRIBUTES = frozenset({"caption", "public_domain", "image_url"})
LAYOUT = "<root>/{train,val,test}/<class name>/*.{png,jpg,jpeg,bmp} or <root>/<class name>/*.{png,jpg,jpeg,bmp}"
_SHOWN = 5


def read(root: Path, extra_classes: Sequence[str] = ()) -> pd.DataFrame:
    """Read an image-folder data set; labels are the class folder names, mapped by name onto the taxonomy.

    A folder name that is neither a canonical class (in any alias) nor in `extra_classes` gets no id here
    (expression NA, label_raw kept); `attrs['class_folders']` lists every class folder name found, so the data
    module can keep such folders as data-set classes (data.classes=auto).
    """
    root = Path(root)
    if not root.is_dir():
        raise _format_error(
            f"image_folder: data root {root} does not exist or is not a folder; expected {LAYOUT}", missing=True
        )
    split_dirs, class_dirs, loose = _scan_root(root)
    taxonomy = Taxonomy(extra_classes)
    rows: list[dict] = []
    issues: list[tuple[str, str]] = []
    issues += [(_rel(p, root), "image outside a class folder has no label") for p in loose]
    if split_dirs:
        for split, split_dir in split_dirs:
            for item in sorted(split_dir.iterdir()):
                if item.is_file() and item.suffix.lower() in IMAGE_EXTENSIONS:
                    issues.append((_rel(item, root), "image outside a class folder has no label"))
                elif item.is_dir() and not _hidden(item):
                    rows.extend(_read_class_folder(item, split, root, issues))
    else:
        # root/<class>/*.png: no official split; every row is train until the data module splits them
        for folder in class_dirs:
            rows.extend(_read_class_folder(folder, "train", root, issues))
    _report_folders_without_metadata(rows, issues)

    groups = sorted({k for row in rows for k in row if k.startswith("group_")})
    df = pd.DataFrame(rows, columns=["path", "split", "label_raw", *groups])
    ids, used = map_labels(df["label_raw"].tolist(), taxonomy)
    df["expression"] = pd.array(ids, dtype="Int64")
    df.attrs["label_mapping"] = used
    df.attrs["metadata_issues"] = issues
    df.attrs["class_folders"] = sorted(set(df["label_raw"]))
    if not split_dirs:
        df.attrs["needs_split"] = True
        log.info(
            "image_folder %s: no split folders, %d class folders: every image is split by data.split_fractions",
            root,
            len(class_dirs),
        )
    if issues:
        _warn_issues(root, issues)
    return df


def _hidden(path: Path) -> bool:
    return path.name.startswith(".")


def _has_images(folder: Path) -> bool:
    return any(p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.iterdir())


def _scan_root(root: Path) -> tuple[list[tuple[str, Path]], list[Path], list[Path]]:
    """(split folders in train/val/test order, class folders at the root, images loose at the root)."""
    found: dict[str, Path] = {}
    class_dirs: list[Path] = []
    others: list[str] = []
    loose: list[Path] = []
    for item in sorted(root.iterdir()):
        if item.is_file():
            if item.suffix.lower() in IMAGE_EXTENSIONS:
                loose.append(item)
            continue
        if not item.is_dir() or _hidden(item):
            continue
        split = SPLIT_FOLDERS.get(item.name.casefold())
        if split is None:
            if _has_images(item):
                class_dirs.append(item)
            else:
                others.append(item.name)
            continue
        if split in found:
            raise _format_error(
                f"image_folder: {root} has two folders for the {split} split ({found[split].name!r} and "
                f"{item.name!r}); keep one"
            )
        found[split] = item
    if found and class_dirs:
        raise _format_error(
            f"image_folder: {root} mixes split folders {[p.name for p in found.values()]} with class folders "
            f"{[p.name for p in class_dirs]} (folders with images directly inside); use one layout: "
            f"{LAYOUT} (move the class folders into a split folder, or the split folders' class folders up)"
        )
    if not found and not class_dirs:
        hint = ""
        if len(others) == 1:
            hint = f"; if the data set is one level down, point data.root at it: data.root={root / others[0]}"
        raise _format_error(
            f"image_folder: no split folder (train, val or test) and no class folder with images under {root} "
            f"(folders found: {others}); expected {LAYOUT}{hint}",
            missing=True,
        )
    return [(s, found[s]) for s in ("train", "val", "test") if s in found], class_dirs, loose


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
    """Add one VIA CSV's file attributes and extra plain columns to `metadata` (filename -> {attribute: value})."""
    table = pd.read_csv(csv_path, dtype=str, keep_default_na=False, encoding="utf-8-sig").fillna("")
    table.columns = [str(c).strip() for c in table.columns]
    # columns after VIA's own (e.g. age, gender) are plain per-file attributes; pandas names blank headers "Unnamed"
    plain = [c for c in table.columns if c not in VIA_COLUMNS and c and not c.startswith("Unnamed:")]
    for i, record in enumerate(table.to_dict("records")):
        filename = record["filename"].strip()
        parsed = {col: _parse_dict(record[col], csv_path, i, col) for col in VIA_DICT_COLUMNS}
        attrs = _group_attributes(parsed["file_attributes"])
        for col in plain:
            name, value = normalize_name(col), record[col].strip()
            if not value:
                continue
            if name in attrs and attrs[name] != value:
                issues.append(
                    (
                        _rel(csv_path.parent / filename, root),
                        f"metadata disagreement: {csv_path.name} data row {i + 1} (line {i + 2}): {name}: "
                        f"file_attributes {attrs[name]!r}, column {col} {value!r}; kept the file_attributes value",
                    )
                )
                continue
            attrs.setdefault(name, value)
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


def _parse_dict(raw: str, csv_path: Path, i: int, column: str) -> dict:
    """A VIA dict cell: JSON (VIA's own export) or a Python dict literal (single quotes, as in some releases)."""
    text = raw.strip()
    if not text:
        return {}
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as err:
        try:
            parsed = ast.literal_eval(text)  # literals only: never evaluates code
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise _format_error(
                f"image_folder: {csv_path} data row {i + 1} (line {i + 2}), column {column}: neither a JSON object "
                f"nor a Python dict literal (JSON: {err.msg} at character {err.pos}): {text[:80]!r}; fix that cell "
                '(e.g. {"gender": "male"} or {}), or export the metadata again from VGG Image Annotator as CSV'
            ) from None
    if not isinstance(parsed, dict):
        raise _format_error(
            f"image_folder: {csv_path} data row {i + 1} (line {i + 2}), column {column}: must be a dict "
            f"(JSON object or Python dict literal), got {type(parsed).__name__} {text[:80]!r}; fix that cell "
            "(an empty one is written {})"
        )
    return parsed


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
    # grouped by kind: a reason "kind: detail" (e.g. one metadata disagreement) shows its detail beside its path
    by_kind: dict[str, list[str]] = {}
    for path, reason in issues:
        kind, _, detail = reason.partition(": ")
        by_kind.setdefault(kind, []).append(f"{path} ({detail})" if detail else path)
    for kind, items in by_kind.items():
        more = f" (+{len(items) - _SHOWN} more)" if len(items) > _SHOWN else ""
        log.warning("image_folder %s: %d x %s: %s%s", root, len(items), kind, ", ".join(items[:_SHOWN]), more)


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _format_error(message: str, missing: bool = False) -> ValueError:
    # Imported lazily: the registry imports the readers.
    from fer_lightning.formats.registry import DataFileNotFoundError, DataFormatError

    return DataFileNotFoundError(message) if missing else DataFormatError(message)
