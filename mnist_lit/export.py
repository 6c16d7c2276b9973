"""Export a trained Net for deployment: the guide's plain state_dict (.pth), or ONNX checked with onnxruntime."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

from mnist_lit import runs
from mnist_lit.checkpoints import write_atomically
from mnist_lit.datasets import DATASETS
from mnist_lit.errors import ExportError
from mnist_lit.model import Net, log_probabilities

ONNX_TOLERANCE = 1e-4
CHECK_IMAGES = 5  # random images the written file is run on, beside torch


class Classifier(nn.Module):
    """A network with log-probabilities out, whatever it outputs itself: what the ONNX file and serve answer."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return log_probabilities(self.net, self.net(x))


def export(ckpt_path: str | os.PathLike, output: Path, directory: Path | None = None) -> str:
    """Write the checkpoint's Net to output in the format its extension names ('last': the newest checkpoint in
    directory); return what was done."""
    suffix = output.suffix.lower()
    if suffix not in (".pth", ".pt", ".onnx"):
        raise ExportError(f"cannot export to {output}: the extension must be .pth (the guide's state_dict) or .onnx")
    if output.is_dir():
        raise ExportError(f"cannot export to {output}: it is a folder; name a file")
    if output.exists() and not output.is_file():
        raise ExportError(f"cannot export to {output}: it exists and is not a regular file; name a file")
    trained = runs.load(ckpt_path, directory)
    net, spec = trained.net, trained.net_spec
    known = DATASETS[trained.dataset]
    # The file holds weights only: a deployment must normalise its inputs as the training data was.
    inputs = f"; inputs as {known.title}'s: 28x28, (pixel / 255 - {known.mean}) / {known.std}"
    output.parent.mkdir(parents=True, exist_ok=True)
    if suffix in (".pth", ".pt"):
        buffer = io.BytesIO()
        if type(net) is Net:  # exactly what the guide saves
            torch.save(net.state_dict(), buffer)
            write_atomically(str(output), buffer)
            return f"wrote {output} (the Net's state_dict: Net().load_state_dict(torch.load({str(output)!r})){inputs})"
        # Any other network: its weights and the class path and arguments that rebuild it, all plain data
        torch.save({"net": spec, "state_dict": net.state_dict()}, buffer)
        write_atomically(str(output), buffer)
        name = type(net).__name__
        return (
            f"wrote {output} (a dict: 'net', the class path and init_args of {name}, and 'state_dict', its weights:"
            f" {name}(**d['net']['init_args']).load_state_dict(d['state_dict']) with d = torch.load(...){inputs})"
        )
    # Exported and checked in a scratch folder, then written over output atomically: a failed or killed export
    # leaves output as it was and nothing beside it.
    with tempfile.TemporaryDirectory(prefix="mnist_lit-export-") as scratch:
        onnx_file = Path(scratch) / "model.onnx"
        difference = _write_onnx(Classifier(net).eval(), onnx_file)
        write_atomically(str(output), io.BytesIO(onnx_file.read_bytes()))
    return (
        f"wrote {output} (ONNX, dynamic batch; onnxruntime matches torch to {difference:.1e} on {CHECK_IMAGES} random"
        f" images{inputs})"
    )


def _write_onnx(net: nn.Module, path: Path) -> float:
    try:
        import onnxruntime
    except ImportError:
        raise ExportError(
            "ONNX export needs onnx and onnxruntime: pip install -e '.[export]' in the project's folder"
        ) from None
    example = torch.randn(2, 1, 28, 28)
    batch = torch.export.Dim("batch", min=1)
    try:
        torch.onnx.export(
            net, (example,), path, input_names=["image"], output_names=["log_probs"],
            dynamic_shapes=({0: batch},), external_data=False, dynamo=True, verbose=False,
        )  # fmt: skip
    except ImportError as err:
        raise ExportError(
            f"ONNX export needs {err.name or 'onnxscript'}: pip install -e '.[export]' in the project's folder"
        ) from None
    # Check the written file, with another batch size than the one traced.
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = torch.randn(CHECK_IMAGES, 1, 28, 28)
    (onnx_out,) = session.run(None, {"image": images.numpy()})
    with torch.inference_mode():
        difference = float((torch.from_numpy(onnx_out) - net(images)).abs().max())
    if not difference <= ONNX_TOLERANCE:
        path.unlink()
        raise ExportError(f"the ONNX model differs from PyTorch by {difference:.2e} (> {ONNX_TOLERANCE}); not written")
    return difference
