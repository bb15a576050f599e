"""Datasets: the readers parse tiny files the tests write, and a missing or malformed file raises an
error naming the file and what was expected."""

from __future__ import annotations

import gzip
import importlib.util
import io
import os
import tarfile

import numpy as np
import pytest
import torch

from linear_transformers import data
from linear_transformers.data import images as img


def write_idx(path, array: np.ndarray, compress: bool = False) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


def write_mnist_folder(folder, n_train=40, n_test=12, side=8, compress=True, seed=0) -> None:
    """Tiny MNIST-format files: each image is its label's brightness plus a ramp down the rows and
    some noise, so there is something to learn."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if compress else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, (n,))
        ramp = np.arange(side)[None, :, None] * 8
        images = np.clip(labels[:, None, None] * 16 + ramp + rng.integers(0, 24, (n, side, side)), 0, 255)
        write_idx(folder / f"{split}-images-idx3-ubyte{suffix}", images, compress)
        write_idx(folder / f"{split}-labels-idx1-ubyte{suffix}", labels, compress)


@pytest.mark.parametrize("compress", [True, False], ids=["gz", "raw"])
def test_idx_folder_round_trip(tmp_path, compress):
    write_mnist_folder(tmp_path, compress=compress)
    x, y = img.idx_folder(tmp_path, "train")
    assert x.shape == (40, 8, 8) and x.dtype == np.uint8 and y.shape == (40,) and y.dtype == np.int64
    d = data.load("mnist", tmp_path)
    assert d.train.shape == (40, 64) and d.test.shape == (12, 64) and d.vocab_size == 256 and d.n_classes == 10
    tokens, labels = d.get("train", torch.tensor([3, 5]))
    assert torch.equal(tokens[0], torch.tensor(x[3].reshape(-1)).long()) and labels.tolist() == y[[3, 5]].tolist()


def test_idx_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected a folder of IDX files"):
        img.idx_folder(tmp_path / "nowhere", "train")
    write_mnist_folder(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="expected t10k-labels-idx1-ubyte or t10k-labels-idx1-ubyte.gz in"):
        img.idx_folder(tmp_path, "test")
    bad = tmp_path / "bad.idx"
    bad.write_bytes(b"\x12\x34\x56\x78rest")
    with pytest.raises(ValueError, match=r"bad.idx: not an IDX file of unsigned bytes .* got 12345678"):
        img.read_idx(bad)
    short = tmp_path / "short.idx"
    short.write_bytes(bytes([0, 0, 8, 2, 0, 0, 0, 3, 0, 0, 0, 3]) + bytes(5))
    with pytest.raises(ValueError, match=r"short.idx: header says shape \(3, 3\) \(9 bytes\), the file holds 5"):
        img.read_idx(short)
    long = tmp_path / "long.idx"
    long.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 3]) + bytes(4))
    with pytest.raises(ValueError, match=r"long.idx: header says shape \(3,\) \(3 bytes\), the file holds more"):
        img.read_idx(long)
    huge = tmp_path / "huge.idx"  # dims whose product overflows 64 bits
    huge.write_bytes(bytes([0, 0, 8, 3]) + b"\xff\xff\xff\xff" * 3 + bytes(10))
    with pytest.raises(ValueError, match=r"huge.idx: header says shape .* over 17179869184: damaged"):
        img.read_idx(huge)
    cut = tmp_path / "cut.idx"
    cut.write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    with pytest.raises(ValueError, match="the header ends inside its 3 dimensions"):
        img.read_idx(cut)


def test_a_gzip_bomb_is_not_decompressed_past_its_header(tmp_path, monkeypatch):
    """A .gz whose header promises 10 bytes but which decompresses to 200 MB is refused after
    reading 11 bytes of its body, not after inflating it all."""
    import gzip

    bomb = tmp_path / "bomb-idx1-ubyte.gz"
    with gzip.open(bomb, "wb") as f:
        f.write(bytes([0, 0, 8, 1, 0, 0, 0, 10]))
        for _ in range(200):
            f.write(bytes(1 << 20))
    inflated = []
    real_open = gzip.open

    def counting_open(*args, **kwargs):
        f = real_open(*args, **kwargs)
        read = f.read
        f.read = lambda n=-1: (lambda b: inflated.append(len(b)) or b)(read(n))
        return f

    monkeypatch.setattr(img.gzip, "open", counting_open)
    with pytest.raises(ValueError, match=r"header says shape \(10,\) \(10 bytes\), the file holds more"):
        img.read_idx(bomb)
    assert 0 < sum(inflated) <= 8 + 11
    broken = tmp_path / "broken.gz"
    broken.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="broken.gz: not a readable IDX file"):
        img.read_idx(broken)


def test_cifar10_binary_batches(tmp_path):
    rng = np.random.default_rng(0)
    expected = {}
    for name in img.CIFAR_FILES["train"] + img.CIFAR_FILES["test"]:
        labels = rng.integers(0, 10, 3)
        planes = rng.integers(0, 256, (3, 3, 32, 32))  # [N, C, H, W] as stored
        records = np.concatenate([labels[:, None], planes.reshape(3, -1)], axis=1).astype(np.uint8)
        (tmp_path / name).write_bytes(records.tobytes())
        expected[name] = (labels, planes)
    x, y = img.cifar10_binary(tmp_path, "test")
    labels, planes = expected["test_batch.bin"]
    assert x.shape == (3, 32, 32, 3) and y.tolist() == labels.tolist()
    assert (x[1, 4, 7] == planes[1, :, 4, 7]).all()  # channels last: R, G, B of one pixel
    d = data.load("cifar10", tmp_path)
    assert d.seq_len == 3072 and d.train.shape == (15, 3072) and d.image_shape == (32, 32, 3)
    assert d.train[0, :3].tolist() == expected["data_batch_1.bin"][1][0, :, 0, 0].tolist()  # sub-pixels interleaved
    (tmp_path / "data_batch_3.bin").write_bytes(bytes(100))
    with pytest.raises(ValueError, match="data_batch_3.bin: 100 bytes is not a whole number of 3073-byte records"):
        img.cifar10_binary(tmp_path, "train")
    (tmp_path / "test_batch.bin").unlink()
    with pytest.raises(FileNotFoundError, match="test_batch.bin .*binary version"):
        img.cifar10_binary(tmp_path, "test")
    with pytest.raises(ValueError, match="cifar10: pass the folder"):
        data.load("cifar10")


def test_cifar10_python_batches_are_read_without_running_pickle_code(tmp_path):
    import pickle

    rng = np.random.default_rng(1)
    expected = {}
    for name in img.CIFAR_PYTHON_FILES["train"] + img.CIFAR_PYTHON_FILES["test"]:
        pixels = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, 3).tolist()
        batch = {b"batch_label": b"x", b"labels": labels, b"data": pixels, b"filenames": [b"a.png"] * 3}
        (tmp_path / name).write_bytes(pickle.dumps(batch, protocol=2))
        expected[name] = (labels, pixels)
    x, y = img.cifar10_python(tmp_path, "test")
    labels, pixels = expected["test_batch"]
    assert x.shape == (3, 32, 32, 3) and y.tolist() == labels
    assert (x[2, 5, 9] == pixels[2].reshape(3, 32, 32)[:, 5, 9]).all()
    d = data.load("cifar10", tmp_path)  # the folder's version is found by its file names
    assert d.train.shape == (15, 3072) and d.test.shape == (3, 3072)

    class Payload:  # a pickle that would run a command when loaded
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    (tmp_path / "data_batch_2").write_bytes(pickle.dumps({b"data": Payload()}, protocol=2))
    with pytest.raises(ValueError, match="data_batch_2: not a CIFAR-10 python batch .*refused to load .*system"):
        img.cifar10_python(tmp_path, "train")
    assert not (tmp_path / "pwned").exists()
    (tmp_path / "data_batch_2").write_bytes(pickle.dumps({b"data": np.zeros((2, 5), np.uint8), b"labels": [1, 2]}))
    with pytest.raises(ValueError, match=r"data_batch_2: expected b'data' as a uint8 array \[N, 3072\]"):
        img.cifar10_python(tmp_path, "train")
    (tmp_path / "data_batch_2").write_bytes(pickle.dumps({b"data": pixels, b"labels": [1, 2, 12]}))
    with pytest.raises(ValueError, match="data_batch_2: expected b'labels' as 3 labels in 0..9"):
        img.cifar10_python(tmp_path, "train")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no CIFAR-10 batches found; expected the binary version"):
        img.cifar10(empty, "train")


def test_downsample_and_quantize():
    x = np.arange(16, dtype=np.uint8).reshape(1, 4, 4) * 16
    assert img.downsample(x, 2).tolist() == [[[40, 72], [168, 200]]]
    with pytest.raises(ValueError, match="cannot downsample 4x4 images to 3x3"):
        img.downsample(x, 3)
    assert img.quantize(np.array([0, 15, 16, 255], dtype=np.uint8), 16).tolist() == [0, 0, 1, 15]


def test_text_file_and_tarball(tmp_path):
    (tmp_path / "a.txt").write_text("to be or not to be, " * 40)
    d = data.load("text", tmp_path / "a.txt", seq_len=16)
    assert d.is_text and d.vocab_size == len(set("to be or not to be, ")) and d.seq_len == 16
    tokens, labels = d.get("train", torch.tensor([0, 3]))
    assert labels is None and d.decode_text(tokens[0]) == "to be or not to b"[:16]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, text in [("pkg/texts/b.txt", "second " * 50), ("pkg/texts/a.txt", "first " * 50), ("pkg/x.py", "no")]:
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    (tmp_path / "plays.tar.gz").write_bytes(buf.getvalue())
    text = data.read_text(tmp_path / "plays.tar.gz")
    assert text.startswith("first ") and "second" in text and "no" not in text.split()
    with pytest.raises(FileNotFoundError, match="missing"):
        data.read_text(tmp_path / "none.txt")
    with pytest.raises(ValueError, match="too few for windows of seq_len=4096"):
        data.load("text", tmp_path / "a.txt", seq_len=4096)


@pytest.mark.skipif(importlib.util.find_spec("numcodecs") is None, reason="needs the data extra (numcodecs)")
def test_bundled_mnist():
    d = data.load("mnist", size=14, levels=16)
    assert d.train.shape == (60000, 196) and d.test.shape == (10000, 196) and int(d.train.max()) == 15
    assert d.train_labels[:5].tolist() == [5, 0, 4, 1, 9]  # the first MNIST training labels
    assert sorted(torch.bincount(d.test_labels).tolist())[0] > 800


@pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="needs scikit-learn")
def test_digits():
    d = data.load("digits")
    assert d.vocab_size == 17 and d.seq_len == 64 and len(d.train) + len(d.test) == 1797


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        data.load("imagenet")
