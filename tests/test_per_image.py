"""The per-image (DataLoader) path: image folders, SVHN, STL-10, and augment names mapped onto torchvision v2."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

import cnnlab.training.assemble as assemble_module
from cnnlab.augment.batched import build_ops, resized_crop_boxes, resized_crops
from cnnlab.augment.per_image import Geometry, V2_EQUIVALENTS, per_image_transform, split_pipeline
from cnnlab.data import datasets
from cnnlab.data.folder import FileImageDataset, imagefolder
from cnnlab.data.images import EvaluationView
from cnnlab.data.formats import write_stl10, write_svhn_mat
from cnnlab.core.errors import CnnlabError
from cnnlab.core.registry import AUGMENTS
from tests.conftest import run_cli, run_tiny

# A tiny tree: 3 classes, 8x8 up to 12x10 pixel images of different sizes.
FOLDER = ["dataset=imagefolder", "dataset.size=8", "model=mlp", "model.hidden=[16]", "data.num_workers=0"]


def write_tree(root, classes=("ant", "bee", "cat"), per_class=12, sizes=((10, 12), (8, 8), (9, 11))):
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            h, w = sizes[i % len(sizes)]
            pixels = np.clip(rng.normal(60 + 70 * c, 20, (h, w, 3)), 0, 255).astype(np.uint8)  # class = brightness
            Image.fromarray(pixels).save(root / name / f"{i:03d}{'.png' if i % 2 else '.jpg'}")
    return root


# --- image folders ----------------------------------------------------------------------------------

def test_one_tree_is_split_into_train_and_a_stratified_test(tmp_path):
    data = imagefolder(root=str(write_tree(tmp_path / "tree")), size=8, test_fraction=0.25)
    assert data.classes == ["ant", "bee", "cat"] and data.reads_files
    assert len(data.train_files) == 27 and len(data.test_files) == 9
    assert data.test_labels.bincount().tolist() == [3, 3, 3]
    assert not set(data.train_files) & set(data.test_files)
    assert data.resize == round(8 * 256 / 224) and data.mean == (0.485, 0.456, 0.406)


def test_train_and_val_folders_are_train_and_test(tmp_path):
    write_tree(tmp_path / "t" / "train")
    write_tree(tmp_path / "t" / "val", per_class=2)
    data = imagefolder(root=str(tmp_path / "t"), size=8)
    assert len(data.train_files) == 36 and len(data.test_files) == 6 and data.validation_idx is None
    assert all("val" in f.parts for f in data.test_files)


def test_a_val_dir_is_the_validation_set(tmp_path):
    write_tree(tmp_path / "t" / "train")
    write_tree(tmp_path / "t" / "valid", per_class=3)
    write_tree(tmp_path / "t" / "test", per_class=2)
    data = imagefolder(root=str(tmp_path / "t"), size=8, val_dir="valid", test_dir="test")
    train_idx, val_idx = data.validation_idx
    assert len(train_idx) == 36 and len(val_idx) == 9
    assert all("valid" in data.train_files[i].parts for i in val_idx.tolist())


def test_folder_images_are_decoded_resized_and_centre_cropped(tmp_path):
    data = imagefolder(root=str(write_tree(tmp_path / "tree")), size=8, channels=1)
    transform = per_image_transform({}, Geometry(8, data.resize), train=False, resized=True)
    x, y = data.per_image("train", None, transform)[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.uint8 and y.item() == 0
    raw, _ = FileImageDataset(data.train_files[:1], data.train_labels[:1], 1)[0]
    assert raw.shape[1:] in ((10, 12), (8, 8), (9, 11))  # the file's own size before the transform


def test_a_non_image_file_is_skipped_with_a_warning_naming_it(tmp_path):
    root = write_tree(tmp_path / "tree")
    (root / "bee" / "notes.txt").write_text("not an image")
    (root / "bee" / ".DS_Store").write_bytes(b"\0")  # hidden files are passed over silently
    data = imagefolder(root=str(root), size=8)
    assert len(data.train_files) + len(data.test_files) == 36
    assert [w for w in data.warnings if "skipped" in w] == [
        f"skipped {root / 'bee' / 'notes.txt'}: not an image file (images end in .jpg, .jpeg, .png, .ppm, .bmp, "
        ".pgm, .tif, .tiff, .webp, .gif)"]
    result = run_cli("train", f"dataset.root={root}", *FOLDER, "trainer.device=cpu", "trainer.epochs=1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"warning: skipped {root / 'bee' / 'notes.txt'}: not an image file" in result.stdout


@pytest.mark.parametrize("workers", [0, 1])
def test_a_corrupt_image_is_skipped_with_one_warning_naming_it_even_from_a_worker(tmp_path, workers):
    root = write_tree(tmp_path / "tree", per_class=4)
    (root / "cat" / "000.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    result = run_cli("train", f"dataset.root={root}", *FOLDER, f"data.num_workers={workers}", "trainer.epochs=2",
                     "data.val_fraction=0.25", "dataset.test_fraction=0.25", "data.batch_size=4",
                     "trainer.device=cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if "000.jpg" in line]
    assert len(lines) == 1, result.stdout  # once, not once an epoch
    assert lines[0].startswith(f"warning: {root / 'cat' / '000.jpg'} is not a readable image") and "skipped" in lines[0]


@pytest.mark.parametrize(("layout", "message"), [
    ("missing_root", "is not a folder"), ("no_classes", "has no class subfolders"),
    ("empty_class", "has no images"), ("classes_differ", "other classes than the training folder"),
    ("no_test", "the test folder"),
])
def test_bad_trees_are_named(tmp_path, layout, message):
    root = tmp_path / "t"
    if layout == "no_classes":
        root.mkdir()
    elif layout == "empty_class":
        write_tree(root)
        (root / "dog").mkdir()
    elif layout == "classes_differ":
        write_tree(root / "train")
        write_tree(root / "val", classes=("ant", "bee"))
    elif layout == "no_test":
        write_tree(root / "train")
    with pytest.raises(CnnlabError, match=message):
        imagefolder(root=str(root), size=8)


def test_imagefolder_needs_a_root():
    with pytest.raises(CnnlabError, match="needs dataset.root"):
        imagefolder()


def test_imagefolder_trains_end_to_end_through_workers(tmp_path, captured):
    root = write_tree(tmp_path / "tree", per_class=16)
    summary = run_tiny(tmp_path / "run", f"dataset.root={root}", *FOLDER, "data.num_workers=1",
                       "data.prefetch_factor=3", "augment=imagenet", "data.batch_size=8", "trainer.epochs=3",
                       "data.val_fraction=0.2", "dataset.test_fraction=0.25")
    train_loader, val_loader = captured["loaders"][:2]
    assert isinstance(train_loader, assemble_module.StreamingLoader)
    assert train_loader.loader.num_workers == 1 and train_loader.loader.prefetch_factor == 3
    train_steps = [type(t) for t in train_loader.dataset.transform.transforms]
    val_steps = val_loader.dataset.transform.transforms
    assert train_steps == [v2.RandomResizedCrop, v2.RandomHorizontalFlip]  # the pipeline picks its own crop
    assert type(val_steps[0]) is EvaluationView  # evaluation: resize + centre crop, no augmentation
    assert summary["sizes"] == {"train": 30, "val": 6, "test": 12} and summary["status"] == "completed"
    assert summary["selected"]["test"]["acc"] > 0.6  # classes differ in brightness: learnable


def test_in_memory_true_is_refused_for_an_image_folder(tmp_path):
    root = write_tree(tmp_path / "tree", per_class=4)
    with pytest.raises(CnnlabError, match="read per image from disk; data.in_memory must be auto or false"):
        run_tiny(tmp_path / "run", f"dataset.root={root}", *FOLDER, "data.in_memory=true")


# --- SVHN and STL-10 in their real formats --------------------------------------------------------

def test_svhn_reads_the_mat_files_and_maps_label_10_to_0(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 3, 32, 32), dtype=np.uint8)
    write_svhn_mat(tmp_path / "train_32x32.mat", images, [0, 1, 2, 3, 9, 0])
    write_svhn_mat(tmp_path / "test_32x32.mat", images[:2], [5, 0])
    import scipy.io

    assert scipy.io.loadmat(tmp_path / "train_32x32.mat")["y"].ravel().tolist() == [10, 1, 2, 3, 9, 10]
    data = datasets.svhn(root=str(tmp_path), download=False)
    assert data.train_labels.tolist() == [0, 1, 2, 3, 9, 0] and data.test_labels.tolist() == [5, 0]
    assert torch.equal(data.train_images, torch.from_numpy(images))
    write_svhn_mat(tmp_path / "extra_32x32.mat", images[:3], [7, 7, 7])
    assert len(datasets.svhn(root=str(tmp_path), download=False, extra=True).train_labels) == 9


def test_corrupt_and_missing_svhn_files_are_named(tmp_path):
    with pytest.raises(CnnlabError, match="train_32x32.mat is missing"):
        datasets.svhn(root=str(tmp_path), download=False)
    (tmp_path / "train_32x32.mat").write_bytes(b"MATLAB 5.0 garbage")
    (tmp_path / "test_32x32.mat").write_bytes(b"")
    with pytest.raises(CnnlabError, match="corrupt SVHN file .*train_32x32.mat"):
        datasets.svhn(root=str(tmp_path), download=False)


def test_stl10_reads_the_binary_files_column_major(tmp_path):
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    images = np.random.default_rng(0).integers(0, 256, (4, 3, 96, 96), dtype=np.uint8)
    write_stl10(folder / "train_X.bin", folder / "train_y.bin", images, [0, 9, 3, 3])
    write_stl10(folder / "test_X.bin", folder / "test_y.bin", images[:2], [1, 2])
    assert (folder / "train_y.bin").read_bytes() == bytes([1, 10, 4, 4])  # labels 1..10 on disk
    # the file stores each channel column by column: its first 96 bytes are image 0's first column
    assert (folder / "train_X.bin").read_bytes()[:96] == images[0, 0, :, 0].tobytes()
    data = datasets.stl10(root=str(tmp_path), download=False)
    assert torch.equal(data.train_images, torch.from_numpy(images)) and data.train_labels.tolist() == [0, 9, 3, 3]
    assert data.classes[0] == "airplane" and data.input_size == 96
    (folder / "test_X.bin").write_bytes(b"\0" * 1000)
    with pytest.raises(CnnlabError, match="corrupt STL-10 file .*test_X.bin"):
        datasets.stl10(root=str(tmp_path), download=False)


# --- augment names on the per-image path ----------------------------------------------------------

def v2_for(name, **options):
    return per_image_transform({name: options}, Geometry(16, 16), train=True, resized=False).transforms[0]


def test_every_batched_image_op_but_cutout_and_pca_lighting_has_a_v2_equivalent():
    batched = {n for n in AUGMENTS.names() if AUGMENTS.get(n).family != "mixing"
               and not AUGMENTS.get(n).meta.get("per_image_only")}
    assert batched - set(V2_EQUIVALENTS) == {"cutout", "pca_lighting"}


@pytest.mark.parametrize(("name", "options", "check"), [
    ("hflip", {"p": 0.3}, lambda t: isinstance(t, v2.RandomHorizontalFlip) and t.p == 0.3),
    ("vflip", {"p": 0.7}, lambda t: isinstance(t, v2.RandomVerticalFlip) and t.p == 0.7),
    ("random_crop", {"padding": 3, "fill": "reflect"},
     lambda t: isinstance(t, v2.RandomCrop) and t.padding == [3, 3, 3, 3] and t.padding_mode == "reflect" and t.size == (16, 16)),
    ("random_resized_crop", {"scale_min": 0.3, "ratio_max": 2.0},
     lambda t: isinstance(t, v2.RandomResizedCrop) and t.scale == (0.3, 1.0) and t.ratio == (0.75, 2.0)),
    ("random_resized_crop", {"p": 0.5}, lambda t: isinstance(t, v2.RandomChoice) and t.p == [0.5, 0.5]),
    ("random_affine", {"degrees": 20.0, "translate": 0.2, "shear": 5.0, "p": 0.5},
     lambda t: isinstance(t, v2.RandomApply) and t.p == 0.5 and t.transforms[0].degrees == [-20.0, 20.0]
     and tuple(t.transforms[0].translate) == (0.2, 0.2) and t.transforms[0].shear == [-5.0, 5.0]),
    ("color_jitter", {"brightness": 0.2, "saturation": 0.0},
     lambda t: isinstance(t, v2.ColorJitter) and t.brightness == (0.8, 1.2) and t.saturation is None),
    ("random_erasing", {"p": 0.4, "scale_min": 0.1, "value": "random"},
     lambda t: isinstance(t, v2.RandomErasing) and t.p == 0.4 and t.scale == (0.1, 0.33) and t.value is None),  # v2 stores "random" as None
    ("auto_augment", {"policy": "svhn"}, lambda t: isinstance(t, v2.AutoAugment) and t.policy == v2.AutoAugmentPolicy.SVHN),
    ("rand_augment", {"num_ops": 3, "magnitude": 12},
     lambda t: isinstance(t, v2.RandAugment) and t.num_ops == 3 and t.magnitude == 12),
    ("trivial_augment", {}, lambda t: isinstance(t, v2.TrivialAugmentWide)),
])
def test_each_option_reaches_its_v2_transform(name, options, check):
    assert check(v2_for(name, **options))


@pytest.mark.parametrize("name", ["auto_augment", "rand_augment", "trivial_augment", "random_resized_crop", "random_affine"])
def test_per_image_ops_keep_shape_and_dtype_and_follow_the_seed(name):
    x = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    t = v2_for(name)
    torch.manual_seed(5)
    a = torch.stack([t(x) for _ in range(8)])
    torch.manual_seed(5)
    b = torch.stack([t(x) for _ in range(8)])
    assert a.shape == (8, 3, 16, 16) and a.dtype == torch.uint8 and torch.equal(a, b)
    assert len({tuple(v.flatten().tolist()) for v in a}) > 1  # each image its own draw


def test_streamed_tensor_data_maps_the_same_pipeline_onto_v2(tmp_path, captured):
    summary = run_tiny(tmp_path / "run", "trainer.epochs=1", "data.in_memory=false", "data.num_workers=0",
                       "augment=mixup", "augment.ops.random_crop.padding=2")
    loader = captured["loaders"][0]
    steps = loader.dataset.transform.transforms
    assert [type(t) for t in steps] == [v2.RandomCrop, v2.RandomHorizontalFlip] and steps[0].padding == [2, 2, 2, 2]
    assert [getattr(op, "mixes_labels", False) for op in loader.transform.ops] == [True]  # mixup stays batched
    x, y = next(iter(loader))
    assert y.shape == (16, 4) and torch.allclose(y.sum(1), torch.ones(16))
    assert summary["status"] == "completed"


def test_an_op_missing_on_a_path_is_one_clear_error(tmp_path):
    with pytest.raises(CnnlabError, match="'cutout' has no torchvision.transforms.v2 equivalent .*data.in_memory=false"):
        run_tiny(tmp_path / "a", "data.in_memory=false", "augment=cutout")
    with pytest.raises(CnnlabError, match="'rand_augment' runs per image .*set data.in_memory=false"):
        run_tiny(tmp_path / "b", "augment=randaugment")
    assert not (tmp_path / "a" / "checkpoints").exists()  # refused before any training


def test_split_keeps_the_order_and_sends_mixing_to_the_batch():
    ops = {"random_crop": {}, "rand_augment": {}, "cutmix": {}, "hflip": {}}
    batched, per_image = split_pipeline(ops, per_image=True, where="test")
    assert list(batched) == ["cutmix"] and list(per_image) == ["random_crop", "rand_augment", "hflip"]
    assert list(split_pipeline({"hflip": {}, "cutmix": {}}, per_image=False, where="test")[0]) == ["hflip", "cutmix"]


# --- the batched random_resized_crop ----------------------------------------------------------------

def test_batched_resized_crop_equals_torchvision_for_the_same_boxes():
    x = torch.rand(4, 3, 32, 24)
    boxes = (torch.tensor([0, 3, 5, 10]), torch.tensor([0, 2, 7, 1]), torch.tensor([32, 20, 9, 15]),
             torch.tensor([24, 11, 17, 5]))
    out = resized_crops(x, *boxes)
    for i in range(4):
        top, left, h, w = (int(b[i]) for b in boxes)
        assert torch.allclose(out[i], TF.resized_crop(x[i], top, left, h, w, [32, 24], antialias=True), atol=1e-5)


def test_resized_crop_boxes_follow_the_scale_and_ratio_ranges():
    x = torch.zeros(1)
    top, left, h, w = resized_crop_boxes(20000, 32, 32, (0.2, 0.6), (0.5, 2.0), x, torch.Generator().manual_seed(0))
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 32).all()
    area = (h * w).float() / 1024
    assert 0.17 < area.min() and area.max() < 0.64  # within the range, up to rounding
    ratio = (w / h).float()
    assert 0.45 < ratio.min() and ratio.max() < 2.2 and abs(ratio.log().mean().item()) < 0.02  # log-uniform


def test_resized_crop_falls_back_to_the_centre_when_no_box_fits():
    # a 4x32 strip can hold no box of ratio 1 and area >= 90%: torchvision's fallback, the central crop
    top, left, h, w = resized_crop_boxes(5, 4, 32, (0.9, 1.0), (1.0, 1.0), torch.zeros(1), torch.Generator())
    assert h.tolist() == [4] * 5 and w.tolist() == [4] * 5 and left.tolist() == [14] * 5 and top.tolist() == [0] * 5
    assert build_ops({"random_resized_crop": {}})[0](torch.rand(2, 3, 8, 8), torch.Generator()).shape == (2, 3, 8, 8)
