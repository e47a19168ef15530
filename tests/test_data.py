"""Readers on tiny files in the real on-disk formats, dataset lookup, split, loaders, augmentation."""

import urllib.error

import numpy as np
import pytest
import torch

from cnnlab.augment.batched import BatchPipeline, build_ops
from cnnlab.data import datasets
from cnnlab.data.formats import read_cifar_batch, read_idx, write_cifar_batch, write_idx
from cnnlab.data.loaders import InMemoryLoader, StreamingLoader, TensorImageDataset
from cnnlab.data.split import stratified_split
from cnnlab.core.errors import CnnlabError
from cnnlab.core.registry import DATASETS


# --- IDX --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["images-idx3-ubyte", "images-idx3-ubyte.gz"])
def test_idx_round_trip_plain_and_gzip(tmp_path, name):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / name, images)
    assert np.array_equal(read_idx(tmp_path / name), images)


def test_idx_reader_reads_the_format_byte_by_byte(tmp_path):
    # magic 0x00000801 (ubyte, 1 dim), count 3, then the labels
    (tmp_path / "labels").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 2, 9]))
    assert read_idx(tmp_path / "labels").tolist() == [7, 2, 9]
    (tmp_path / "ints").write_bytes(bytes([0, 0, 0x0C, 1, 0, 0, 0, 1, 0, 0, 1, 0]))
    assert read_idx(tmp_path / "ints").tolist() == [256]  # big-endian int32


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "bad magic number"),
        (b"\x08\x03\x00\x00", "bad magic number"),
        (bytes([0, 0, 8, 3, 0, 0]), "truncated header"),
        (bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2]), r"header says shape \(5,\) \(5 bytes of data\) but the file holds 2"),
    ],
)
def test_corrupt_idx_names_the_file(tmp_path, payload, message):
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(payload)
    with pytest.raises(CnnlabError, match=message) as e:
        read_idx(path)
    assert str(path) in str(e.value)


def test_truncated_gzip_names_the_file(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    write_idx(path, np.zeros((4, 28, 28), np.uint8))
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(CnnlabError, match=f"corrupt gzip file {path}"):
        read_idx(path)


# --- the MNIST family: lookup order and messages ----------------------------------------------------

def write_mnist_files(folder, n_train=30, n_test=10, gz=True, classes=10):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    suffix = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", (np.arange(n) % classes).astype(np.uint8))


@pytest.mark.parametrize("dataset", ["fashion_mnist", "mnist"])
@pytest.mark.parametrize("layout", ["torchvision", "flat"])
def test_mnist_family_reads_the_configured_root(tmp_path, monkeypatch, dataset, layout):
    monkeypatch.setitem(datasets.SYSTEM_DIRS, dataset, [])
    sub = {"fashion_mnist": "FashionMNIST", "mnist": "MNIST"}[dataset]
    folder = tmp_path / sub / "raw" if layout == "torchvision" else tmp_path
    write_mnist_files(folder, gz=layout == "flat")
    data = DATASETS.build(dataset, {"root": str(tmp_path), "download": False}, prefix="dataset")
    assert data.train_images.shape == (30, 1, 28, 28) and data.test_images.shape == (10, 1, 28, 28)
    assert data.train_images.dtype == torch.uint8 and data.train_labels.tolist()[:3] == [0, 1, 2]
    assert data.num_classes == 10 and data.input_size == 28 and data.channels == 1


def test_fashion_mnist_falls_back_to_the_debian_package_folder(tmp_path, monkeypatch):
    system = tmp_path / "usr-share-datasets-fashion-mnist"
    write_mnist_files(system, n_train=20)
    monkeypatch.setitem(datasets.SYSTEM_DIRS, "fashion_mnist", [system])
    data = DATASETS.build("fashion_mnist", {"root": str(tmp_path / "empty"), "download": False}, prefix="dataset")
    assert len(data.train_labels) == 20 and data.classes[0] == "T-shirt/top"


def test_configured_root_wins_over_the_system_folder(tmp_path, monkeypatch):
    system = tmp_path / "system"
    write_mnist_files(system, n_train=20)
    write_mnist_files(tmp_path / "mine" / "FashionMNIST" / "raw", n_train=12)
    monkeypatch.setitem(datasets.SYSTEM_DIRS, "fashion_mnist", [system])
    data = DATASETS.build("fashion_mnist", {"root": str(tmp_path / "mine"), "download": False}, prefix="dataset")
    assert len(data.train_labels) == 12


def test_missing_data_without_download_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setitem(datasets.SYSTEM_DIRS, "fashion_mnist", [])
    with pytest.raises(CnnlabError) as e:
        DATASETS.build("fashion_mnist", {"root": str(tmp_path), "download": False}, prefix="dataset")
    msg = str(e.value)
    assert "Fashion-MNIST not found" in msg and "dataset-fashion-mnist" in msg and "dataset.download=true" in msg


def test_failed_download_is_one_clear_error(tmp_path, monkeypatch):
    import torchvision.datasets

    calls = []

    def offline(root, download):
        calls.append((root, download))
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    with pytest.raises(CnnlabError, match="MNIST is not in .* could not be downloaded .URLError"):
        DATASETS.build("mnist", {"root": str(tmp_path), "download": True}, prefix="dataset")
    assert calls == [(str(tmp_path), True)]


def test_download_is_used_when_files_are_missing(tmp_path, monkeypatch):
    import torchvision.datasets

    def fake_download(root, download):  # what torchvision leaves behind: raw/ with the IDX files
        write_mnist_files(tmp_path / "MNIST" / "raw", n_train=8, gz=False)

    monkeypatch.setattr(torchvision.datasets, "MNIST", fake_download)
    data = DATASETS.build("mnist", {"root": str(tmp_path), "download": True}, prefix="dataset")
    assert len(data.train_labels) == 8


def test_mismatched_image_and_label_files_are_named(tmp_path, monkeypatch):
    monkeypatch.setitem(datasets.SYSTEM_DIRS, "mnist", [])
    write_mnist_files(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(7, np.uint8))
    with pytest.raises(CnnlabError, match="do not match"):
        DATASETS.build("mnist", {"root": str(tmp_path), "download": False}, prefix="dataset")


# --- CIFAR -----------------------------------------------------------------------------------------

def write_cifar10(root, per_batch=6):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(2)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        write_cifar_batch(folder / name, rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                          np.arange(per_batch) % 10, "labels")
    import pickle

    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    return folder


def test_cifar10_reads_torchvision_batches(tmp_path):
    write_cifar10(tmp_path)
    data = DATASETS.build("cifar10", {"root": str(tmp_path), "download": False}, prefix="dataset")
    assert data.train_images.shape == (30, 3, 32, 32) and data.test_images.shape == (6, 3, 32, 32)
    assert data.classes[:2] == ["c0", "c1"] and data.channels == 3 and data.num_classes == 10


def test_cifar_pixel_layout_is_channel_planes(tmp_path):
    row = np.concatenate([np.full(1024, 10), np.full(1024, 20), np.full(1024, 30)]).astype(np.uint8)
    write_cifar_batch(tmp_path / "b", row[None], [3], "labels")
    images, labels = read_cifar_batch(tmp_path / "b", "labels")
    assert images[0, :, 5, 7].tolist() == [10, 20, 30] and labels.tolist() == [3]


def test_cifar100_uses_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name in ("train", "test"):
        write_cifar_batch(folder / name, np.zeros((4, 3072), np.uint8), [99, 0, 5, 50], "fine_labels")
    data = DATASETS.build("cifar100", {"root": str(tmp_path), "download": False}, prefix="dataset")
    assert data.num_classes == 100 and data.train_labels.tolist() == [99, 0, 5, 50]


def test_corrupt_cifar_batch_names_the_file(tmp_path):
    folder = write_cifar10(tmp_path)
    (folder / "data_batch_3").write_bytes(b"\x80\x04garbage")
    with pytest.raises(CnnlabError, match="corrupt CIFAR batch .*data_batch_3"):
        DATASETS.build("cifar10", {"root": str(tmp_path), "download": False}, prefix="dataset")


def test_cifar_reader_refuses_pickles_that_run_code(tmp_path):
    import os
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (tmp_path / "evil").write_bytes(pickle.dumps({"data": Evil(), "labels": []}))
    with pytest.raises(CnnlabError, match="unexpected object"):
        read_cifar_batch(tmp_path / "evil", "labels")


def test_missing_cifar_names_the_missing_file(tmp_path):
    with pytest.raises(CnnlabError, match="CIFAR-10 not found .*data_batch_1 is missing"):
        DATASETS.build("cifar10", {"root": str(tmp_path), "download": False}, prefix="dataset")


# --- synthetic -------------------------------------------------------------------------------------

def test_synthetic_options_shape_the_data():
    data = DATASETS.build("synthetic", {"channels": 2, "size": 12, "classes": 5, "train_size": 50, "test_size": 20},
                          prefix="dataset")
    assert data.train_images.shape == (50, 2, 12, 12) and data.test_images.shape == (20, 2, 12, 12)
    assert data.num_classes == 5 and sorted(set(data.train_labels.tolist())) == list(range(5))
    assert len(data.mean) == 2 and len(data.std) == 2


def test_synthetic_seed_and_noise_reach_the_images():
    a = DATASETS.build("synthetic", {"seed": 1, "size": 8}, prefix="dataset")
    b = DATASETS.build("synthetic", {"seed": 1, "size": 8}, prefix="dataset")
    c = DATASETS.build("synthetic", {"seed": 2, "size": 8}, prefix="dataset")
    assert torch.equal(a.train_images, b.train_images) and not torch.equal(a.train_images, c.train_images)
    clean = DATASETS.build("synthetic", {"noise": 0.0, "size": 8}, prefix="dataset")
    # without noise every image of a class is its prototype
    first = clean.train_images[clean.train_labels == 0]
    assert (first == first[0]).all()


# --- validation split ------------------------------------------------------------------------------

def test_validation_split_is_disjoint_stratified_and_seeded():
    labels = torch.arange(1000) % 10
    train, val = stratified_split(labels, 0.1, seed=0)
    assert len(set(train.tolist()) & set(val.tolist())) == 0
    assert sorted(train.tolist() + val.tolist()) == list(range(1000))
    assert torch.bincount(labels[val]).tolist() == [10] * 10  # 10% of every class
    again, _ = stratified_split(labels, 0.1, seed=0)
    other, _ = stratified_split(labels, 0.1, seed=1)
    assert torch.equal(train, again) and not torch.equal(train, other)


def test_split_that_leaves_nothing_is_an_error():
    with pytest.raises(CnnlabError, match="val_fraction"):
        stratified_split(torch.arange(3), 0.1, seed=0)


# --- loaders and augmentation ----------------------------------------------------------------------

def identity_pipeline(channels=1):
    return BatchPipeline([], [0.0] * channels, [1.0 / 255] * channels, torch.device("cpu"), seed=0)


def test_in_memory_loader_visits_every_sample_once_per_epoch_in_a_new_order():
    images = torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1)
    loader = InMemoryLoader(images, torch.arange(100), 32, shuffle=True, drop_last=False, seed=0,
                            device=torch.device("cpu"), transform=identity_pipeline())
    epoch1 = torch.cat([y for _, y in loader])
    epoch2 = torch.cat([y for _, y in loader])
    assert len(loader) == 4 and sorted(epoch1.tolist()) == list(range(100))
    assert not torch.equal(epoch1, epoch2)
    x, y = next(iter(loader))
    assert torch.allclose(x.view(-1), y.float())  # images travel with their labels


def test_drop_last_and_eval_order():
    images = torch.zeros(10, 1, 2, 2, dtype=torch.uint8)
    dropped = InMemoryLoader(images, torch.arange(10), 4, shuffle=True, drop_last=True, seed=0,
                             device=torch.device("cpu"), transform=identity_pipeline())
    assert len(dropped) == 2 and sum(len(y) for _, y in dropped) == 8
    ordered = InMemoryLoader(images, torch.arange(10), 4, shuffle=False, drop_last=False, seed=0,
                             device=torch.device("cpu"), transform=identity_pipeline())
    assert torch.cat([y for _, y in ordered]).tolist() == list(range(10))


def test_streaming_loader_yields_the_same_samples_through_a_dataloader():
    images = torch.arange(40, dtype=torch.uint8).view(40, 1, 1, 1)
    loader = StreamingLoader(TensorImageDataset(images, torch.arange(40)), 8, shuffle=True, drop_last=False,
                             seed=0, device=torch.device("cpu"), transform=identity_pipeline(), num_workers=0)
    xs, ys = zip(*loader)
    assert sorted(torch.cat(ys).tolist()) == list(range(40))
    assert torch.allclose(torch.cat(xs).view(-1), torch.cat(ys).float())


def test_pipeline_normalises_with_the_dataset_statistics():
    pipe = BatchPipeline([], [0.5], [0.25], torch.device("cpu"), seed=0)
    x = pipe(torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1))
    assert x.view(-1).tolist() == [-2.0, 2.0]


def test_channels_last_reaches_the_batches():
    pipe = BatchPipeline([], [0.0] * 3, [1.0] * 3, torch.device("cpu"), seed=0, channels_last=True)
    x = pipe(torch.zeros(2, 3, 4, 4, dtype=torch.uint8))
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def test_hflip_probability_is_per_sample():
    x = torch.arange(4.0).view(1, 1, 1, 4).repeat(1000, 1, 1, 1)
    g = torch.Generator().manual_seed(0)
    never, always = build_ops({"hflip": {"p": 0.0}})[0], build_ops({"hflip": {"p": 1.0}})[0]
    assert torch.equal(never(x, g), x) and torch.equal(always(x, g), x.flip(3))
    half = build_ops({"hflip": {"p": 0.5}})[0](x, g)
    flipped = (half[:, 0, 0, 0] == 3).float().mean().item()
    assert 0.4 < flipped < 0.6  # each image decides for itself


def test_random_crop_shifts_each_image_independently():
    x = torch.zeros(500, 1, 5, 5)
    x[:, :, 2, 2] = 1.0  # a dot in the centre
    g = torch.Generator().manual_seed(0)
    out = build_ops({"random_crop": {"padding": 2}})[0](x, g)
    positions = {tuple(torch.nonzero(img[0])[0].tolist()) for img in out if img.sum() > 0}
    assert len(positions) == 25  # every shift of -2..2 in both axes occurs
    assert out.shape == x.shape
    assert torch.equal(build_ops({"random_crop": {"padding": 0}})[0](x, g), x)


def test_random_crop_fill_modes():
    x = torch.ones(200, 1, 4, 4)
    g = torch.Generator().manual_seed(0)
    zero = build_ops({"random_crop": {"padding": 2, "fill": "zero"}})[0](x, g)
    reflect = build_ops({"random_crop": {"padding": 2, "fill": "reflect"}})[0](x, g)
    assert zero.min() == 0.0 and reflect.min() == 1.0  # reflection of a constant image is constant


def test_unknown_augmentation_op_is_a_registry_error():
    with pytest.raises(CnnlabError, match="unknown augmentation 'rotat'"):
        build_ops({"rotat": {}})
