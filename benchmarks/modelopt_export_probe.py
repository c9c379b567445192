"""Probe: can NVIDIA Model Optimizer's own ONNX exporter express a GranQ model?

Run:  python benchmarks/modelopt_export_probe.py
(needs modelopt's ``[onnx]`` import-time dependencies: onnxconverter-common, onnx-graphsurgeon,
onnxslim, polygraphy, lief, cppimport). Prints one line per attempt; docs/MODELOPT.md quotes it.

Attempts, on a W4A4 GranQ conv net (conv-relu-conv, 8x8 input), exported at batch 2:
1. ``modelopt.torch._deploy.utils.get_onnx_bytes_and_metadata`` with the TorchScript exporter;
2. the same with ``dynamo_export=True``, then run in onnxruntime at batch 2 and at batch 5;
3. the TorchScript exporter again with a dynamic batch axis, inside ``granq_export_mode``
   (modelopt's amax readiness check off for the GranQ quantizers);
4. for comparison, ``granq_ao.integrations.modelopt.export_onnx`` (both exporters) at batch 5.
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("GRANQ_FUSED", "eager")
warnings.filterwarnings("ignore")

import modelopt.torch.quantization as mtq  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

from granq_ao.integrations.modelopt import export_onnx, granq_export_mode, granq_quant_cfg  # noqa: E402


def _ops(model_bytes: bytes) -> list:
    return sorted({node.op_type for node in onnx.load_from_string(model_bytes).graph.node})


def _run(model_bytes: bytes, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(model_bytes)
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def _report(label: str, model_bytes: bytes, model: torch.nn.Module, batches=(2, 5)) -> None:
    print(f"{label}: ops {_ops(model_bytes)}")
    for batch in batches:
        x = torch.randn(batch, 3, 8, 8) * 10
        try:
            error = float(np.abs(_run(model_bytes, x) - model(x).detach().numpy()).max())
            print(f"  onnxruntime batch {batch}: max |onnx - torch| = {error:.3g}")
        except Exception as failure:  # noqa: BLE001 - the probe reports whatever happens
            print(f"  onnxruntime batch {batch}: {type(failure).__name__}: {str(failure).splitlines()[0][:300]}")


def main() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
    model = mtq.quantize(model, granq_quant_cfg(4, act_bits=4), forward_loop=None).eval()
    x = torch.randn(2, 3, 8, 8)
    from modelopt.torch._deploy.utils.torch_onnx import OnnxBytes, get_onnx_bytes_and_metadata

    for dynamo in (False, True):
        label = f"modelopt get_onnx_bytes_and_metadata(dynamo_export={dynamo})"
        try:
            packed, _ = get_onnx_bytes_and_metadata(model, (x,), dynamo_export=dynamo)
        except Exception as failure:  # noqa: BLE001
            print(f"{label}: {type(failure).__name__}: {str(failure).splitlines()[0]}")
            continue
        _report(label, OnnxBytes.from_bytes(packed).get_onnx_model_file_bytes(), model)
    with granq_export_mode(model):
        packed, _ = get_onnx_bytes_and_metadata(model, (x,), dynamic_axes={"input": {0: "batch"}})
    _report("modelopt get_onnx_bytes_and_metadata(dynamo_export=False) in granq_export_mode",
            OnnxBytes.from_bytes(packed).get_onnx_model_file_bytes(), model)
    for dynamo in (False, True):
        _report(f"granq_ao export_onnx(dynamo={dynamo})", export_onnx(model, x, dynamo=dynamo), model)


if __name__ == "__main__":
    main()
