"""Find images shared between splits: byte-identical, perceptually near-identical, or mirrored copies."""

from __future__ import annotations

import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from fer_lightning.data.records import SPLITS

log = logging.getLogger(__name__)

LEAK_COLUMNS = ("path_a", "split_a", "path_b", "split_b", "kind", "distance")
POLICIES = ("warn", "error")
_KIND_ORDER = {"exact": 0, "flipped": 1, "perceptual": 2}
_SHOWN = 5


class LeakageError(ValueError):
    """The same image (or a near copy of it) appears in two splits."""


def dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix: `dct_matrix(n) @ x` is the DCT of the length-n vector x."""
    k = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    m = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * x + 1) * k / (2 * n))
    m[0] /= np.sqrt(2.0)
    return m


def perceptual_hash(image: Image.Image, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """DCT hash bits of the grayscale image and of its horizontal mirror, each of length (size // 2) ** 2 - 1.

    The image is shrunk to size x size (area average), transformed with a 2-D DCT, and the lowest
    (size // 2)^2 frequencies other than the mean are compared with their median.
    """
    gray = np.asarray(image.convert("L").resize((size, size), Image.Resampling.BOX), dtype=np.float64)
    m = dct_matrix(size)
    k = size // 2
    low = (m @ gray @ m.T)[:k, :k]
    # Mirroring x -> size-1-x multiplies horizontal frequency v by (-1)^v, so no second transform is needed.
    mirrored = low * np.where(np.arange(k) % 2 == 1, -1.0, 1.0)[None, :]
    return _bits(low), _bits(mirrored)


def _bits(low: np.ndarray) -> np.ndarray:
    # Rounding makes flat images hash the same on every platform instead of by floating-point noise.
    ac = np.round(low.ravel()[1:], 6)
    return ac > np.median(ac)


def find_leaks(
    records: pd.DataFrame, root: Path, *, size: int = 16, hamming: int = 4, num_workers: int = 4
) -> pd.DataFrame:
    """Pairs of images in different splits that are byte-identical, perceptually near-identical or mirrored copies."""
    if size < 4:
        raise ValueError(f"data.leakage: hash size must be at least 4, got {size}")
    n_bits = (size // 2) ** 2 - 1
    if not 0 <= hamming < n_bits // 2:
        raise ValueError(
            f"data.leakage: hamming threshold must be in [0, {n_bits // 2}) for size {size}, got {hamming}"
        )
    root = Path(root)
    paths = records["path"].astype(str).tolist()
    splits = records["split"].astype(str).to_numpy()
    if len(set(splits)) < 2:
        return _empty()

    def one(path: str) -> tuple[str, np.ndarray, np.ndarray] | None:
        return _hash_file(root / path, size)

    if num_workers > 1:
        with ThreadPoolExecutor(max_workers=num_workers) as pool:
            hashed = list(pool.map(one, paths))
    else:
        hashed = [one(p) for p in paths]
    unreadable = [p for p, h in zip(paths, hashed) if h is None]
    if unreadable:
        log.warning(
            "leakage check: %d images could not be decoded and were not compared: %s",
            len(unreadable),
            ", ".join(unreadable[:_SHOWN]),
        )
    keep = np.array([h is not None for h in hashed], dtype=bool)
    index = np.flatnonzero(keep)
    if len(index) == 0:
        out = _empty()
        out.attrs["unreadable"] = unreadable
        return out
    sha1 = np.array([hashed[i][0] for i in index], dtype=object)
    bits = np.stack([hashed[i][1] for i in index])
    mirror_bits = np.stack([hashed[i][2] for i in index])
    direct, mirror = _pack(bits), _pack(mirror_bits)
    split = splits[index]

    # The first 8 bytes of the SHA-1 find the candidates; the full digest decides "exact" below.
    sha1_key = np.array([int(h[:16], 16) for h in sha1], dtype=np.uint64)
    pairs = [_equal_key_pairs(sha1_key, sha1_key)]
    # Pigeonhole: two hashes within `hamming` bits agree exactly on at least one of hamming + 1 bands.
    for band in np.array_split(np.arange(n_bits), hamming + 1):
        key, mirror_key = _band_key(bits[:, band]), _band_key(mirror_bits[:, band])
        pairs.append(_equal_key_pairs(key, key))
        pairs.append(_equal_key_pairs(key, mirror_key))
    cand = np.concatenate(pairs, axis=0)
    cand = cand[(cand[:, 0] != cand[:, 1]) & (split[cand[:, 0]] != split[cand[:, 1]])]
    cand = np.unique(np.sort(cand, axis=1), axis=0)
    i, j = cand[:, 0], cand[:, 1]

    d_direct = _hamming(direct[i], direct[j])
    d_mirror = np.minimum(_hamming(direct[i], mirror[j]), _hamming(mirror[i], direct[j]))
    exact = sha1[i] == sha1[j]
    near = ~exact & (d_direct <= hamming)
    flipped = ~exact & ~near & (d_mirror <= hamming)
    found = exact | near | flipped
    kind = np.where(exact, "exact", np.where(near, "perceptual", "flipped"))[found]
    distance = np.where(exact, 0, np.where(near, d_direct, d_mirror))[found]
    i, j = index[i[found]], index[j[found]]

    # Earlier split (train, val, test) first so the table reads "train image X leaks into test".
    rank = {s: r for r, s in enumerate(SPLITS)}
    swap = np.array([rank.get(splits[a], 99) > rank.get(splits[b], 99) for a, b in zip(i, j)], dtype=bool)
    a, b = np.where(swap, j, i), np.where(swap, i, j)
    out = pd.DataFrame(
        {
            "path_a": [paths[x] for x in a],
            "split_a": splits[a],
            "path_b": [paths[x] for x in b],
            "split_b": splits[b],
            "kind": kind,
            "distance": distance.astype(np.int64),
        }
    )
    out = out.sort_values(
        ["kind", "distance", "path_a", "path_b"], key=lambda c: c.map(_KIND_ORDER) if c.name == "kind" else c
    ).reset_index(drop=True)
    out.attrs["unreadable"] = unreadable
    return out


def check_leakage(
    records: pd.DataFrame,
    root: Path,
    *,
    policy: str = "warn",
    max_images: int = 50000,
    force: bool = False,
    num_workers: int = 4,
) -> pd.DataFrame:
    """Run find_leaks unless the data set is larger than max_images; policy 'error' raises LeakageError on any leak."""
    if policy not in POLICIES:
        raise ValueError(f"data.leakage.policy: {policy!r} is not one of {list(POLICIES)}")
    if len(records) > max_images and not force:
        log.warning(
            "leakage check skipped: %d images > data.leakage.max_images=%d; set data.leakage.force=true "
            "(or raise data.leakage.max_images) to run it",
            len(records),
            max_images,
        )
        out = _empty()
        out.attrs["skipped"] = True
        return out
    leaks = find_leaks(records, root, num_workers=num_workers)
    if leaks.empty:
        log.info("leakage check: no image shared between splits among %d images", len(records))
        return leaks
    counts = leaks.groupby(["split_a", "split_b", "kind"]).size()
    summary = ", ".join(f"{n} {kind} {a}/{b}" for (a, b, kind), n in counts.items())
    first = "; ".join(
        f"{r.path_a} ({r.split_a}) ~ {r.path_b} ({r.split_b}) [{r.kind}, distance {r.distance}]"
        for r in leaks.head(_SHOWN).itertuples()
    )
    message = f"leakage check: {len(leaks)} image pairs shared between splits ({summary}); first: {first}"
    if policy == "error":
        raise LeakageError(
            f"{message}. Remove the copies from one split, or set data.leakage.policy=warn to train anyway "
            "(data.leakage.max_images bounds the check's size)"
        )
    log.warning("%s (data.leakage.policy=warn; set it to error to stop on leaks)", message)
    return leaks


def _hash_file(path: Path, size: int) -> tuple[str, np.ndarray, np.ndarray] | None:
    try:
        data = path.read_bytes()
        with Image.open(path) as image:
            # JPEG draft decoding shrinks large photos by DCT scaling before the resize; far faster.
            image.draft("L", (4 * size, 4 * size))
            bits, mirror = perceptual_hash(image, size)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        log.debug("leakage check: cannot read %s: %s", path, err)
        return None
    return hashlib.sha1(data).hexdigest(), bits, mirror


def _pack(bits: np.ndarray) -> np.ndarray:
    """(n, B) bools -> (n, ceil(B / 64)) uint64 words for popcount."""
    packed = np.packbits(bits, axis=1)
    pad = (-packed.shape[1]) % 8
    packed = np.pad(packed, ((0, 0), (0, pad)))
    return np.ascontiguousarray(packed).view(np.uint64)


def _hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.bitwise_count(a ^ b).sum(axis=1).astype(np.int64)


def _band_key(bits: np.ndarray) -> np.ndarray:
    # Bands wider than 64 bits key on their first 64: a coarser key only adds candidates, all verified later.
    return _pack(bits[:, :64])[:, 0]


def _equal_key_pairs(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """All (i, j) with left[i] == right[j], as an (m, 2) int64 array (a sort-merge join)."""
    order = np.argsort(right, kind="stable")
    ordered = right[order]
    lo = np.searchsorted(ordered, left, side="left")
    counts = np.searchsorted(ordered, left, side="right") - lo
    i = np.repeat(np.arange(len(left)), counts)
    offsets = np.arange(len(i)) - np.repeat(np.cumsum(counts) - counts, counts)
    j = order[np.repeat(lo, counts) + offsets]
    return np.stack([i, j], axis=1).astype(np.int64)


def _empty() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "path_a": pd.Series([], dtype=object),
            "split_a": pd.Series([], dtype=object),
            "path_b": pd.Series([], dtype=object),
            "split_b": pd.Series([], dtype=object),
            "kind": pd.Series([], dtype=object),
            "distance": pd.Series([], dtype=np.int64),
        }
    )
