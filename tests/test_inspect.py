from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from miaotui.cli import main
from miaotui.config import load_config
from miaotui.errors import InputError
from miaotui.stages import ExportOptions, run_export_stage
from miaotui.export.inspect_onnx import TensorInfo, summarize_onnx

from conftest import error_lines


def test_summary_of_an_exported_model_with_external_weights(custom_model_dir: Path, tmp_path: Path):
    config = load_config(custom_model_dir / "config.toml")
    result = run_export_stage(config, tmp_path / "work", ExportOptions(external_data_threshold=1000))
    summary = summarize_onnx(result.path)
    assert summary.inputs == [
        TensorInfo("tokens", "int64", ("batch", "words")),
        TensorInfo("features", "float32", ("batch", 4)),
    ]
    assert summary.outputs == [TensorInfo("scores", "float32", ("batch", 3))]
    assert summary.opset == 20 and summary.foreign_domains == []
    assert summary.size_bytes == result.size_bytes  # the .data file counts
    assert summary.op_counts["Gemm"] >= 1

    shown = CliRunner().invoke(main, ["inspect", str(result.path)], env={"COLUMNS": "200"})
    assert shown.exit_code == 0
    assert "[batch, words]" in shown.stdout and "plain ONNX" in shown.stdout


def test_contrib_ops_are_flagged(tmp_path: Path):
    node = helper.make_node("FastGelu", ["x"], ["y"], domain="com.microsoft")
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    path = tmp_path / "contrib.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)]), path)
    assert summarize_onnx(path).foreign_domains == ["com.microsoft"]


@pytest.mark.parametrize("name, content, expected", [
    ("junk.onnx", b"not a model", "not an ONNX model"),
    ("empty.onnx", b"", "not an ONNX model"),
    ("missing.onnx", None, "does not exist"),
    ("weights.bin", b"", "expected an .onnx file"),
])
def test_bad_files_are_exit_2(tmp_path: Path, name: str, content: bytes | None, expected: str):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 2 and expected in result.stderr
    assert len(error_lines(result.stderr)) == 1
    if path.suffix == ".onnx":
        with pytest.raises(InputError):
            summarize_onnx(path)
