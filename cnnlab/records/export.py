"""`cnnlab export RUN --format onnx|torchscript`: a run's selected model as a file an app can load.

The selected weights (the EMA where the run kept one) in evaluation mode, with a dynamic batch dimension.
``--bake-preprocessing``: the graph takes images in [0, 1], (N, C, H, W), and applies the run's
preprocessing itself (per-channel normalisation, the mean image, or whitening); otherwise it takes what the
model takes, and ``<file>.json`` beside it says how to prepare images (the kind, the mean and std, and the
whitening matrix). Either way ``<file>.json`` names the input shape and the classes.

After the export the run's validation images go through the exported file (onnxruntime, or the loaded
TorchScript module) and through torch: the largest absolute difference in logits must be at most 1e-4,
and both accuracies are printed. A file that fails that check is removed.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from cnnlab.analysis.inference import exported_runner
from cnnlab.core.errors import CnnlabError
from cnnlab.runtime.files import atomic_write_path, confine, write_json

FORMATS = {"onnx": ".onnx", "torchscript": ".pt", "safetensors": ".safetensors"}
TOLERANCE = 1e-4


class Preprocess(nn.Module):
    """The run's preprocessing as graph ops: images in [0, 1] -> the model's input."""

    def __init__(self, preprocessing):
        super().__init__()
        self.register_buffer("mean", preprocessing.mean.float().cpu())
        self.register_buffer("std", preprocessing.std.float().cpu())
        self.whiten = preprocessing.matrix is not None
        self.register_buffer("matrix", preprocessing.matrix.float().cpu() if self.whiten else torch.zeros(0))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images - self.mean) / self.std
        return (x.flatten(1) @ self.matrix).view_as(x) if self.whiten else x


class Baked(nn.Module):
    def __init__(self, preprocess: nn.Module, model: nn.Module):
        super().__init__()
        self.preprocess, self.model = preprocess, model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self.preprocess(images))


def export_file(module: nn.Module, example: torch.Tensor, path: Path, fmt: str, model_name: str) -> None:
    """Write ``module`` as ``fmt``; a model the format cannot express is one line naming the op."""
    try:
        if fmt == "onnx":
            batch = torch.export.Dim("batch", min=1)
            program = torch.onnx.export(module, (example,), dynamo=True, input_names=["images"], output_names=["logits"],
                                        dynamic_shapes=({0: batch},), verbose=False)
            atomic_write_path(path, lambda tmp: program.save(str(tmp)))
        elif fmt == "safetensors":  # the weights alone, each its own contiguous tensor (a tied one copied)
            state = {name: t.detach().cpu().contiguous().clone() for name, t in module.state_dict().items()}
            atomic_write_path(path, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                traced = torch.jit.trace(module, example, check_trace=False)
                atomic_write_path(path, lambda tmp: torch.jit.save(traced, str(tmp)))
    except CnnlabError:
        raise
    except Exception as e:  # noqa: BLE001 - the exporters raise many kinds; each ends in the same one line
        raise CnnlabError(f"cnnlab export: model={model_name} cannot be exported as {fmt}: {unexportable(e)}") from None


def unexportable(error: Exception) -> str:
    """The op an exporter could not express, from its message, or the message's first line."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))  # the exporter colours its messages
    op = re.search(r"(aten::\w+|aten\.\w+(?:\.\w+)?|torch\.ops\.[\w.]+)", text)
    first = (text.strip().splitlines() or [type(error).__name__])[0].split(". ")[0].rstrip(".")[:300]
    return f"the op {op.group(1)} has no {('ONNX' if 'onnx' in text.lower() else 'exported')} form ({first})" if op else first


def parity(path: Path, fmt: str, module: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
           record: dict[str, Any]) -> dict[str, Any]:
    """The largest |logit difference| between the file (read back as `cnnlab predict` reads it, through
    ``record``, its metadata) and torch over ``batches``, and both accuracies."""
    run = exported_runner(path, fmt, record)
    worst, right, right_exported, count = 0.0, 0, 0, 0
    with torch.no_grad():
        for x, y in batches:
            reference, exported = module(x), run(x)
            worst = max(worst, (reference - exported).abs().max().item())
            right += int((reference.argmax(1) == y).sum())
            right_exported += int((exported.argmax(1) == y).sum())
            count += len(y)
    return {"max_abs_diff": worst, "torch_acc": right / count, "exported_acc": right_exported / count, "images": count}


def metadata(transform, classes: list[str], baked: bool, fmt: str) -> dict[str, Any]:
    """What an app needs beside the file: the input, the classes, and the run's evaluation preprocessing (the
    one cnnlab.load and cnnlab predict apply), whether or not the graph normalises itself."""
    p = transform.preprocessing
    channels, size, _ = transform.input_shape
    steps = (f"decode as {'RGB' if channels == 3 else 'grey (L)'}; resize the shorter side to "
             f"{transform.resize or size} (bilinear, antialiased) unless the image is {size}x{size}; "
             f"centre-crop {size}x{size}; scale to [0, 1]")
    return {"format": fmt, "input": "images in [0, 1]" if baked else "preprocessed images",
            "input_shape": ["N", channels, size, size], "resize": transform.resize, "classes": list(classes),
            "preprocessing_baked_in": baked,
            "preprocessing": {"kind": p.kind, "mean": p.mean.flatten().tolist(), "std": p.std.flatten().tolist(),
                              "matrix": None if p.matrix is None else p.matrix.tolist(),
                              "apply": steps + ("; the graph does the rest" if baked else
                                                "; then x = (x - mean) / std per channel (per pixel for a mean "
                                                "image), then x.flatten(1) @ matrix when there is one")}}


def write_metadata(path: Path, record: dict[str, Any]) -> Path:
    side = path.with_name(path.name + ".json")
    write_json(side, record)
    return side


def export(run: Path, fmt: str, out: Path | None = None, *, bake: bool = False, weights: str = "best",
           data_dir: str | None = None, device: str = "cpu", console=None) -> dict[str, Any]:
    """Export ``run``'s selected model (or ``weights="last"``), check it against torch, write its metadata.
    ``device``: where the checkpoint is loaded and the validation images are read (auto: CUDA when present); the
    file is written from the CPU, which every runtime that loads it has."""
    from cnnlab.analysis.evaluation import recorded_geometry
    from cnnlab.core.config import stored_run_config
    from cnnlab.data.statistics import Preprocessing
    from cnnlab.runtime.checkpoint import load_checkpoint, load_weights
    from cnnlab.training.assemble import setup
    from cnnlab.training.state import selected_weights

    if fmt == "safetensors" and bake:
        raise CnnlabError("cnnlab export: --bake-preprocessing makes a graph that normalises its input; a safetensors "
                          "file holds weights only (its .json says how to prepare images)")
    path = run / "checkpoints" / f"{weights}.pt" if run.is_dir() else run
    if not path.is_file():
        raise CnnlabError(f"cnnlab export: {run} is not a run directory with checkpoints/{weights}.pt")
    checkpoint = load_checkpoint(path)
    stored = stored_run_config(checkpoint.get("config"), path, data_dir=data_dir,
                               trainer={"device": device, "compile": False, "precision": "fp32"},
                               **recorded_geometry(checkpoint))
    recorded = checkpoint.get("preprocess")
    s = setup(stored, preprocessing=None if recorded is None else Preprocessing.from_state(recorded))
    model = s.model.to("cpu", memory_format=torch.contiguous_format).eval()
    if getattr(model, "memorises", False):
        raise CnnlabError(f"cnnlab export: model={stored.components['model'].name} remembers its training images "
                          "(k-NN); there is no network to export")
    load_weights(model, selected_weights(checkpoint), path)
    transform = s.transform  # the geometry the checkpoint recorded (recorded_geometry), its statistics
    preprocess = Preprocess(transform.preprocessing).cpu().eval()
    module = Baked(preprocess, model).eval() if bake else model
    batches = []  # the validation images through the run's own loader: decoded, resized and cropped as eval does
    with torch.no_grad():
        for x, y in s.loader("train", s.val_idx, train=False, raw=True):
            images = x.float().cpu() / 255
            batches.append((images if bake else preprocess(images), y.cpu()))
    s.close()
    if not batches:
        raise CnnlabError(f"cnnlab export: {run} has no readable validation image to check the export on")
    out = out or run / f"model{FORMATS[fmt]}" if run.is_dir() else out or run.with_suffix(FORMATS[fmt])
    if run.is_dir():
        confine(run)  # someone else's run directory: a link in it is not written through
    export_file(module, batches[0][0][:2], out, fmt, stored.components["model"].name)
    chosen = stored.components["model"]
    record = {**metadata(transform, s.data.classes, bake, fmt), "model": {"name": chosen.name, "options": chosen.options}}
    result = parity(out, fmt, module, batches, record)
    if result["max_abs_diff"] > TOLERANCE:
        out.unlink(missing_ok=True)
        raise CnnlabError(f"cnnlab export: {fmt} and torch differ by up to {result['max_abs_diff']:.3g} in the logits "
                          f"(more than {TOLERANCE:g}) on {result['images']} validation images; nothing written")
    side = write_metadata(out, {**record, "parity": result, "run": str(run), "weights": str(path)})
    if console is not None:
        console.print(f"exported: {out} ({fmt}, batch dimension dynamic, preprocessing "
                      f"{'baked in' if bake else 'in ' + side.name}); metadata: {side}", highlight=False)
        console.print(f"parity on {result['images']} validation images: max |logit difference| "
                      f"{result['max_abs_diff']:.2e} (at most {TOLERANCE:g}); accuracy torch {100 * result['torch_acc']:.2f}%, "
                      f"{fmt} {100 * result['exported_acc']:.2f}%", highlight=False)
    return {"file": str(out), "metadata": str(side), **result}
