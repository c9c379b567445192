"""Smoke test of benchmarks/lowering_x86.py at a tiny batch: what each compiled model calls.
No timing asserts; the kernel facts are what docs/TORCHAO.md states."""
import shutil

import pytest

pytest.importorskip("torchao")
pytest.importorskip("pytorchcv")
if shutil.which("g++") is None and shutil.which("c++") is None:
    pytest.skip("Inductor on CPU needs a C++ compiler", allow_module_level=True)

@pytest.fixture(scope="module")
def result(load_script):
    module = load_script("benchmarks/lowering_x86.py")
    table = module.run(batch=8, bits=3, placement="paper", rounds=1, log=lambda line: None)
    assert "| `granq_compiled` |" in module.format_table(table)
    return {row["row"]: row for row in table["rows"]}


def test_x86_int8_lowers_every_conv_and_linear_to_integer_kernels(result):
    row = result["x86_int8_compiled"]
    assert row["integer_kernel_calls"] == 22  # 21 convs + the classifier
    assert row["batch_norm_nodes"] == 0 and not any(name.startswith("granq_ao") for name in row["kernel_calls"])


def test_granq_runs_float_convs_with_its_dynamic_ops(result):
    row = result["granq_compiled"]
    assert row["integer_kernel_calls"] == 0
    calls = row["kernel_calls"]
    # paper placement: 19 ReLU outputs get run-time q/dq; the 22 weights' q/dq fold into constants
    assert [calls.get(f"granq_ao.{op}") for op in ("choose_qparams_dynamic", "quantize", "dequantize")] == [19] * 3
    assert result["granq_eager"]["granq_ao_ops"] == 3 * (19 + 22)
    assert result["granq_eager"]["batch_norm_nodes"] == 21  # conv-bn is not folded by convert
