"""Reader for `root/images/` plus a `legend.csv` (columns user.id, image, emotion) with no official split."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from fer_lightning.taxonomy import Taxonomy, map_labels

COLUMNS = ("user.id", "image", "emotion")
DEFAULT_LEGENDS = ("legend.csv", "data/legend.csv")
LAYOUT = "<root>/images/*.jpg plus <root>/legend.csv or <root>/data/legend.csv with columns user.id,image,emotion"


def read(
    root: Path, legend: str | None = None, images: str = "images", extra_classes: Sequence[str] = ()
) -> pd.DataFrame:
    """Read the legend; every row is split 'train' and `attrs['needs_split']` asks the data module to split."""
    root = Path(root)
    if not root.is_dir():
        raise _format_error(
            f"legend_csv: data root {root} does not exist or is not a folder; expected {LAYOUT}", missing=True
        )
    legend_path = _find_legend(root, legend)
    image_dir = root / images
    if not image_dir.is_dir():
        raise _format_error(
            f"legend_csv: image folder {image_dir} does not exist; expected {LAYOUT} (option data.reader.images)",
            missing=True,
        )

    table = pd.read_csv(legend_path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    table.columns = [c.strip() for c in table.columns]
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise _format_error(
            f"legend_csv: {legend_path} lacks the columns {missing} (found {list(table.columns)}); "
            f"expected the columns {list(COLUMNS)}"
        )
    # Labels come in mixed case with stray spaces (HAPPINESS, happiness ); Taxonomy.id_of folds both away.
    ids, used = map_labels(table["emotion"].tolist(), Taxonomy(extra_classes))
    prefix = Path(images).as_posix().rstrip("/")
    df = pd.DataFrame(
        {
            "path": [f"{prefix}/{name}" for name in table["image"]],
            "split": "train",
            "expression": pd.array(ids, dtype="Int64"),
            "label_raw": table["emotion"].to_numpy(dtype=object),
            "annotator": table["user.id"].str.strip().to_numpy(dtype=object),
        }
    )
    df.attrs["label_mapping"] = used
    df.attrs["needs_split"] = True
    return df


def _find_legend(root: Path, legend: str | None) -> Path:
    if legend is not None:
        path = Path(legend) if Path(legend).is_absolute() else root / legend
        if not path.is_file():
            raise _format_error(
                f"legend_csv: legend file {path} (option data.reader.legend) does not exist", missing=True
            )
        return path
    for candidate in DEFAULT_LEGENDS:
        if (root / candidate).is_file():
            return root / candidate
    raise _format_error(
        f"legend_csv: no legend file under {root} (looked for {list(DEFAULT_LEGENDS)}); expected {LAYOUT}, "
        "or name the file with data.reader.legend",
        missing=True,
    )


def _format_error(message: str, missing: bool = False) -> ValueError:
    # Imported lazily: the registry imports the readers.
    from fer_lightning.formats.registry import DataFileNotFoundError, DataFormatError

    return DataFileNotFoundError(message) if missing else DataFormatError(message)
