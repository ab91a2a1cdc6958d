"""The canonical expression taxonomy (AffectNet ids) and the mapping of data-set labels onto it by name."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

# AffectNet's ids are the canonical ids. 8-10 exist in raw AffectNet and are dropped by default.
CANONICAL: dict[int, str] = {
    0: "neutral",
    1: "happy",
    2: "sad",
    3: "surprise",
    4: "fear",
    5: "disgust",
    6: "anger",
    7: "contempt",
    8: "none",
    9: "uncertain",
    10: "non_face",
}
EXPRESSIONS_8: tuple[str, ...] = tuple(CANONICAL[i] for i in range(8))
NON_EXPRESSION_IDS: frozenset[int] = frozenset({8, 9, 10})
# Ids for data-set specific classes (e.g. "focused") declared in config start here.
FIRST_EXTRA_ID = 11

# data.classes value: the classes found in the data set (resolved after reading)
AUTO_CLASSES = "auto"

# Every spelling seen in the data sets we read, case-folded.
ALIASES: dict[str, str] = {
    "neutral": "neutral",
    "neutrality": "neutral",
    "calm": "neutral",
    "happy": "happy",
    "happiness": "happy",
    "joy": "happy",
    "sad": "sad",
    "sadness": "sad",
    "surprise": "surprise",
    "surprised": "surprise",
    "suprise": "surprise",
    "surprize": "surprise",
    "fear": "fear",
    "fearful": "fear",
    "scared": "fear",
    "afraid": "fear",
    "disgust": "disgust",
    "disgusted": "disgust",
    "disgusting": "disgust",
    "anger": "anger",
    "angry": "anger",
    "contempt": "contempt",
    "contemptuous": "contempt",
    "none": "none",
    "uncertain": "uncertain",
    "non_face": "non_face",
    "non-face": "non_face",
    "nonface": "non_face",
}


class Taxonomy:
    """Canonical classes plus the data set's extra classes; maps names and ids both ways."""

    def __init__(self, extra_classes: Sequence[str] = ()):
        self.name_to_id: dict[str, int] = {name: i for i, name in CANONICAL.items()}
        for offset, name in enumerate(extra_classes):
            key = normalize_name(name)
            if key in ALIASES or key in self.name_to_id:
                raise ValueError(
                    f"data.extra_classes: {name!r} is already a canonical class ({ALIASES.get(key, key)}); "
                    "remove it from data.extra_classes"
                )
            self.name_to_id[key] = FIRST_EXTRA_ID + offset
        self.id_to_name: dict[int, str] = {i: n for n, i in self.name_to_id.items()}

    def id_of(self, label: str) -> int | None:
        """Canonical id of a label written in any case or alias, None when unknown."""
        key = normalize_name(label)
        key = ALIASES.get(key, key)
        return self.name_to_id.get(key)

    def name_of(self, class_id: int) -> str:
        return self.id_to_name[int(class_id)]

    def resolve_classes(self, classes: Iterable[str | int]) -> list[int]:
        """Turn the configured class list (names or ids) into canonical ids, in the given order."""
        if isinstance(classes, str):
            if is_auto(classes):
                raise ValueError(
                    "data.classes=auto: the classes are the ones found in the data set, known only after reading it "
                    "(FERDataModule.load_records); pass a list such as data.classes=[happy,sad] where the classes "
                    "are needed before reading"
                )
            raise ValueError(f"data.classes: {classes!r} is neither a list of classes nor 'auto'")
        ids: list[int] = []
        for c in classes:
            if isinstance(c, int) or (isinstance(c, str) and c.isdigit()):
                cid = int(c)
                if cid not in self.id_to_name:
                    raise ValueError(f"data.classes: unknown class id {cid}; known ids: {sorted(self.id_to_name)}")
            else:
                found = self.id_of(c)
                if found is None:
                    raise ValueError(
                        f"data.classes: unknown class {c!r}; known: {sorted(self.name_to_id)} "
                        "(declare data-set specific classes in data.extra_classes)"
                    )
                cid = found
            if cid in ids:
                raise ValueError(f"data.classes: {c!r} is listed twice")
            ids.append(cid)
        if len(ids) < 2:
            raise ValueError("data.classes: at least 2 classes are needed")
        return ids


def is_auto(classes: object) -> bool:
    """data.classes=auto: the classes are those found in the data set (e.g. an image folder's class folders)."""
    return isinstance(classes, str) and classes.strip().casefold() == AUTO_CLASSES


def class_order(taxonomy: Taxonomy, ids: Iterable[int]) -> list[int]:
    """The order data.classes=auto gives: canonical ids ascending, then data-set classes sorted by name."""
    ids = set(ids)
    canonical = sorted(i for i in ids if i < FIRST_EXTRA_ID)
    extra = sorted((i for i in ids if i >= FIRST_EXTRA_ID), key=taxonomy.name_of)
    return canonical + extra


def normalize_name(label: str) -> str:
    return str(label).strip().casefold().replace(" ", "_")


def map_labels(labels: Iterable[str], taxonomy: Taxonomy) -> tuple[list[int | None], dict[str, str]]:
    """Map raw labels by name; returns ids (None when unknown) and the raw->canonical mapping used."""
    ids: list[int | None] = []
    used: dict[str, str] = {}
    for raw in labels:
        cid = taxonomy.id_of(raw)
        ids.append(cid)
        if cid is not None:
            used[str(raw)] = taxonomy.name_of(cid)
    return ids, used


def id_mapping(source: Mapping[int, str], taxonomy: Taxonomy) -> dict[int, int]:
    """Map a data set's own integer ids (e.g. FER2013's 0=angry) onto canonical ids by name."""
    out = {}
    for src_id, name in source.items():
        cid = taxonomy.id_of(name)
        if cid is None:
            raise ValueError(f"label {name!r} (id {src_id}) has no canonical class")
        out[int(src_id)] = cid
    return out
