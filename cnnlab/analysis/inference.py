"""A trained run, or a file `cnnlab export` wrote, applied to images as the run's evaluation applied them:
``cnnlab.load`` and ``cnnlab predict``.

Both go through the run's recorded ImageTransform (cnnlab.data.images): decode, resize, centre crop,
normalise. A run directory or checkpoint gives the torch model; an exported ``.onnx`` (onnxruntime) or
TorchScript ``.pt`` gives the file's graph, prepared by what its ``<file>.json`` records.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset

from cnnlab.analysis.evaluation import (averaged_log_probs, checkpoint_file, recorded_geometry, recorded_transform,
                                        tta_views)
from cnnlab.core.config import stored_run_config
from cnnlab.core.errors import CnnlabError
from cnnlab.core.plugins import load_components
from cnnlab.core.registry import MODELS
from cnnlab.core.schema import Fields, ListOf
from cnnlab.data.folder import skipped_lines
from cnnlab.data.images import IMAGE_SUFFIXES, ImageTransform, Unreadable, checked_geometry
from cnnlab.data.loaders import collate_readable
from cnnlab.data.statistics import Preprocessing
from cnnlab.runtime.checkpoint import load_checkpoint, load_weights
from cnnlab.runtime.files import read_json



@dataclass
class TrainedModel:
    """A run's selected model in eval mode, its evaluation preprocessing and its class names."""

    model: torch.nn.Module
    transform: ImageTransform
    classes: list[str]
    path: Path

    def logits(self, x: torch.Tensor, tta_flip: bool = False) -> list[torch.Tensor]:
        """The model's logits for a batch from ``transform.batch`` (and its mirror image with ``tta_flip``)."""
        with torch.inference_mode():
            return [self.model(view) for view in tta_views(self.transform.normalise(x), tta_flip, 0)]


def load_trained(target: str | Path, weights: str = "best", device: str | torch.device = "cpu") -> TrainedModel:
    """A run directory's (or checkpoint file's) model, preprocessing and classes."""
    from cnnlab.training.assemble import build_model, resolve_device
    from cnnlab.training.state import selected_weights

    path = checkpoint_file(target, weights)
    checkpoint = load_checkpoint(path)
    stored = stored_run_config(checkpoint.get("config"), path, **recorded_geometry(checkpoint))
    device = resolve_device(str(device))
    transform = recorded_transform(checkpoint, stored, device)
    classes = [str(c) for c in checkpoint["classes"]] if "classes" in checkpoint else None
    if classes is None:
        classes = [str(c) for c in stored.components["dataset"].build().classes]
    shape = SimpleNamespace(channels=transform.channels, input_size=transform.size, num_classes=len(classes))
    model = build_model(stored, shape, device, init=False)
    load_weights(model, selected_weights(checkpoint), path)
    model.eval()
    if getattr(model, "memorises", False):  # k-NN compares its raw memory as it compares the queries
        model.prepare = transform
    return TrainedModel(model, transform, classes, path)


EXPORT_RECORD = Fields(required={"format": str, "input_shape": list, "classes": ListOf((str, int)),
                                 "preprocessing_baked_in": bool},
                       optional={"resize": (int, None), "preprocessing": dict, "parity": dict, "run": str,
                                 "weights": str, "input": str, "model": dict})


def exported_runner(path: Path, fmt: str, record: dict) -> Callable[[torch.Tensor], torch.Tensor]:
    """The file `cnnlab export` wrote, as a function of a batch: onnxruntime's session, a TorchScript module, or
    (safetensors) the registered model its record names, built with its options and the file's weights. A
    safetensors file holds tensors only, and the record's model name is looked up among the registered models:
    neither can run code."""
    if fmt == "onnx":
        try:
            import onnxruntime  # the optional extra, only for an .onnx file
        except ImportError:
            raise CnnlabError("an .onnx file needs onnxruntime: pip install 'cnnlab[export]'") from None
        try:
            session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own kinds for a damaged file
            raise CnnlabError(f"{path} is not an ONNX model onnxruntime can load "
                              f"({(str(e).strip().splitlines() or [type(e).__name__])[0][:120]})") from None
        return lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    if fmt == "torchscript":
        with warnings.catch_warnings():  # PyTorch deprecates TorchScript for its own users; this format is asked for
            warnings.simplefilter("ignore", FutureWarning)
            try:
                module = torch.jit.load(str(path), map_location="cpu")
            except RuntimeError as e:
                raise CnnlabError(f"{path} is not a TorchScript file ({str(e).splitlines()[0][:120]})") from None
        return lambda x: module(x)
    if fmt == "safetensors":
        return safetensors_model(path, record)
    raise CnnlabError(f"{path}: format {fmt!r} is not one cnnlab export writes (onnx, torchscript, safetensors)")


def safetensors_model(path: Path, record: dict) -> torch.nn.Module:
    """The model a safetensors export's record names (a registered model, its options), with the file's weights,
    in eval mode on the CPU."""
    side = path.with_name(path.name + ".json")
    spec = record.get("model")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not isinstance(spec.get("options", {}), dict):
        raise CnnlabError(f"{side} is not a valid record: a safetensors export names its model (model.name, "
                          "model.options)")
    _, channels, size = record["input_shape"][:3]
    load_components()
    model = MODELS.build(spec["name"], dict(spec.get("options") or {}), "model", in_channels=int(channels),
                         num_classes=len(record["classes"]), input_size=int(size))
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CnnlabError(f"{path} is not a safetensors file cnnlab can read ({str(e).splitlines()[0][:120]})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        why = [line.strip() for line in str(e).splitlines()[1:] if line.strip()] or [str(e)]
        raise CnnlabError(f"{path} does not fit model={spec['name']} as {side.name} describes it ({why[0][:160]})") from None
    return model.eval()


class ExportedModel:
    """A file `cnnlab export` wrote, run by onnxruntime, TorchScript or (safetensors) the model it names, with the
    preprocessing its metadata records."""

    def __init__(self, path: Path):
        side = path.with_name(path.name + ".json")
        record = read_json(side, EXPORT_RECORD, "export metadata")
        if record is None:
            raise CnnlabError(f"{path}: no {side.name} beside it (cnnlab export writes one with the preprocessing)")
        _, channels, size, _ = [*record["input_shape"], None][:4]
        prep = record.get("preprocessing")
        if prep is None:
            raise CnnlabError(f"{side} is not a valid record: it holds no preprocessing (export again with this cnnlab)")
        size, resize, channels = checked_geometry(size, record.get("resize"), channels, str(side))

        def statistic(values) -> torch.Tensor:  # per channel, or per pixel (the mean image)
            t = torch.tensor(values, dtype=torch.float32)
            return t.view(channels, 1, 1) if t.numel() == channels else t.view(channels, size, size)

        try:
            matrix = prep.get("matrix")
            preprocessing = Preprocessing(str(prep["kind"]), statistic(prep["mean"]), statistic(prep["std"]),
                                          None if matrix is None else torch.tensor(matrix, dtype=torch.float32))
            if preprocessing.matrix is not None and preprocessing.matrix.shape != (channels * size * size,) * 2:
                raise ValueError
        except (KeyError, TypeError, ValueError, RuntimeError):
            raise CnnlabError(f"{side} is not a valid record: its preprocessing does not fit {channels}x{size}x{size} "
                              "images") from None
        self.transform = ImageTransform(size, resize, channels, preprocessing)
        self.classes, self.baked, self.path = [str(c) for c in record["classes"]], record["preprocessing_baked_in"], path
        self.run = exported_runner(path, record["format"], record)
        self.model = self.run if isinstance(self.run, torch.nn.Module) else None  # safetensors: a torch model

    def logits(self, x: torch.Tensor, tta_flip: bool = False) -> list[torch.Tensor]:
        scaled = x.float().div(255) if x.dtype == torch.uint8 else x.float()
        inputs = scaled if self.baked else self.transform.normalise(x)
        with torch.inference_mode():
            return [self.run(view.contiguous()) for view in tta_views(inputs, tta_flip, 0)]


def open_predictor(target: str, weights: str = "best", device: str = "cpu") -> TrainedModel | ExportedModel:
    """An exported file (.onnx, or any file with export's <file>.json beside it: TorchScript, safetensors), else a
    run or checkpoint."""
    path = Path(target)
    if path.is_file() and (path.suffix == ".onnx" or path.with_name(path.name + ".json").is_file()):
        return ExportedModel(path)
    return load_trained(target, weights, device)


def image_files(targets: Sequence[str]) -> tuple[list[Path], list[str]]:
    """The images that ``targets`` (files, folders searched recursively, shell-style globs) name, in order,
    and a warning for each thing passed over."""
    files, passed = [], []
    for target in targets:
        path = Path(target)
        if path.is_dir():
            for folder, subfolders, names in os.walk(path, followlinks=True):
                subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
                for name in sorted(n for n in names if not n.startswith(".")):
                    (files if Path(name).suffix.lower() in IMAGE_SUFFIXES else passed).append(Path(folder) / name)
        elif path.is_file():
            files.append(path)
        elif glob.has_magic(target) and (found := sorted(glob.glob(target, recursive=True))):
            files.extend(Path(p) for p in found if Path(p).is_file())
        else:
            passed.append(path)
    missing = [p for p in passed if not p.exists()]
    warnings = [f"skipped {p}: no such file, folder or match" for p in missing]
    warnings += skipped_lines([p for p in passed if p.exists()], f"not an image file (images end in "
                                                                  f"{', '.join(IMAGE_SUFFIXES)})")
    return files, warnings


class ImageFiles(Dataset):
    """Each file as its (C, size, size) uint8 evaluation view, or the line naming it when it does not decode."""

    def __init__(self, files: list[Path], transform: ImageTransform):
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            return self.transform.uint8(self.files[i]), i
        except CnnlabError as e:
            return Unreadable.at(f"{e}; skipped", i), i


def predictions(predictor: TrainedModel | ExportedModel, files: list[Path], *, batch_size: int = 64,
                workers: int = 2, top_k: int = 1, tta_flip: bool = False, warn: Callable[[str], None],
                on_batch: Callable[[int], None] | None = None) -> Iterator[dict[str, Any]]:
    """Per readable file, in order: {"file", "top": [(class, probability), ...]} (``top_k`` of them)."""
    loader = DataLoader(ImageFiles(files, predictor.transform), batch_size=batch_size, num_workers=workers,
                        collate_fn=collate_readable)
    k = min(top_k, len(predictor.classes))
    for x, index, skipped in loader:
        for line in skipped:
            warn(str(line))
        if x is not None:
            probs = averaged_log_probs(predictor.logits(x, tta_flip)).exp()
            top = probs.topk(k, dim=1)
            for i, values, classes in zip(index.tolist(), top.values.tolist(), top.indices.tolist()):
                yield {"file": str(files[i]), "top": [(predictor.classes[c], p) for c, p in zip(classes, values)]}
        if on_batch is not None:
            on_batch(len(skipped) + (0 if x is None else len(x)))


def write_predictions(rows: Iterator[dict[str, Any]], fmt: str, top_k: int, console) -> int:
    """The rows as a table (after the last), or as CSV or a JSON array (as they come); returns how many."""
    count = 0
    if fmt == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["file", *[f"{what}_{i + 1}" for i in range(top_k) for what in ("class", "prob")]])
        for row in rows:
            writer.writerow([row["file"], *[v for c, p in row["top"] for v in (c, f"{p:.6f}")]])
            count += 1
        return count
    if fmt == "json":  # one array, written as the rows come
        for row in rows:
            print("[" if count == 0 else ",", json.dumps(
                {"file": row["file"], "class": row["top"][0][0], "prob": row["top"][0][1],
                 "top": [{"class": c, "prob": p} for c, p in row["top"]]}))
            count += 1
        print("]" if count else "[]")
        return count
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    table.add_column("file")
    table.add_column("class")
    table.add_column("prob", justify="right")
    if top_k > 1:
        table.add_column(f"next {top_k - 1}")
    for row in rows:
        (first, p), rest = row["top"][0], row["top"][1:]
        table.add_row(row["file"], first, f"{100 * p:.1f}%",
                      *([", ".join(f"{c} {100 * q:.1f}%" for c, q in rest)] if top_k > 1 else []))
        count += 1
    console.print(table)
    return count
