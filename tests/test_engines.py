"""Engine builds: the onnxruntime engine end to end, real TensorRT-RTX plans (no GPU needed), the
sidecar that travels with each, bad input refused before any builder runs, and the TensorRT names
the code uses checked against TensorRT 11's own bindings."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from conftest import DATA, write_custom_config, write_data, error_lines

from miaotui.artifacts import sha256_file
from miaotui.config import load_config
from miaotui.cuda import no_gpu_reason
from miaotui.data.corpus import load_split
from miaotui.data.tokenizers import encode, load_tokenizer
from miaotui.engines import BuildOptions, TensorRTOptions, build_engine, read_metadata
from miaotui.stages import run_build_stage
from miaotui.engines.call_split import MIN_GAIN
from miaotui.engines.tensorrt_engine import HARDWARE_COMPATIBILITY
from miaotui.errors import InputError
from miaotui.models import resolve_config
from miaotui.models.lstm_sentiment import MAX_LENGTH

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "miaotui.cli", *args], capture_output=True, text=True, env=env, cwd=cwd)


def _ort_engine_session(engine: Path):
    metadata = read_metadata(engine)
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, metadata.session["graph_optimization_level"])
    options.add_session_config_entry("session.load_model_format", metadata.session["format"])
    return ort.InferenceSession(str(engine), options, providers=metadata.session["providers"])


def test_onnxruntime_engine_answers_like_onnxruntime_on_the_int8_file(lstm_work: Path, tmp_path: Path):
    engine = tmp_path / "lstm.ort"
    result = run_cli("build", str(lstm_work / "model.int8.onnx"), "--backend", "onnxruntime", "--precision", "int8",
                     "-o", str(engine))
    assert result.returncode == 0, result.stderr
    assert "lstm.ort" in result.stdout and "ran at min/opt/max" in result.stdout

    # Real text, a padded batch and a single line: the engine equals ONNX Runtime on model.int8.onnx.
    tokenizer = load_tokenizer(resolve_config("lstm-sentiment").model.tokenizer, MAX_LENGTH)
    reference = ort.InferenceSession(str(lstm_work / "model.int8.onnx"), providers=["CPUExecutionProvider"])
    built = _ort_engine_session(engine)
    for texts in ([e.text for e in load_split("validation")[:40]], ["这本书很一般"]):
        feed = {"input_ids": encode(tokenizer, texts)["input_ids"]}
        np.testing.assert_allclose(built.run(None, feed)[0], reference.run(None, feed)[0], atol=1e-5, rtol=0)

    # The sidecar describes this engine truly.
    metadata = read_metadata(engine)
    assert metadata.backend == "onnxruntime" and metadata.backend_version == ort.__version__
    assert metadata.precision == "int8" and metadata.engine_file == "lstm.ort"
    assert metadata.engine_sha256 == sha256_file(engine) and metadata.engine_bytes == engine.stat().st_size
    assert metadata.onnx_sha256 == sha256_file(lstm_work / "model.int8.onnx")
    (tensor,) = metadata.inputs
    assert (tensor.name, tensor.dtype, tensor.dims) == ("input_ids", "int64", ("batch", "seq"))
    assert (tensor.min, tensor.opt, tensor.max) == ((1, 1), (8, 128), (64, 256))  # the config's [dims]
    assert [(o.name, o.dtype) for o in metadata.outputs] == [("logits", "float32")]
    assert metadata.device["provider"] == built.get_providers()[0] == "CPUExecutionProvider"
    assert metadata.network["int8_nodes"] == 1  # the head Gemm (the lookup feeding the LSTM stays float)
    assert metadata.checks["vs_onnx_max_abs_diff"] <= 1e-5


def test_build_stage_writes_engines_into_the_work_dir_and_skips_when_current(lstm_work: Path):
    config = resolve_config("lstm-sentiment")
    first = run_build_stage(config, lstm_work, BuildOptions(backend="tensorrt-rtx"), progress=False)
    assert first.path == lstm_work / "engines" / "lstm-sentiment.tensorrt-rtx.int8.plan" and not first.skipped
    assert first.sidecar.is_file() and read_metadata(first.path).engine_sha256 == sha256_file(first.path)
    again = run_build_stage(config, lstm_work, BuildOptions(backend="tensorrt-rtx"), progress=False)
    assert again.skipped and again.path == first.path
    # TensorRT-RTX keeps no timing cache (its calls are no-ops that would need a GPU): none is written.
    assert not list((lstm_work / "engines").glob("*timing-cache*"))
    fp32 = run_build_stage(config, lstm_work, BuildOptions(backend="onnxruntime", precision="fp32"), progress=False)
    assert read_metadata(fp32.path).precision == "fp32" and read_metadata(fp32.path).network["int8_nodes"] == 0
    manifest = json.loads((lstm_work / "manifest.json").read_text())
    assert {"build:tensorrt-rtx:int8", "build:onnxruntime:fp32"} <= set(manifest["stages"])


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_tensorrt_rtx_plans_for_the_default_model(lstm_work: Path, tmp_path: Path, precision: str):
    onnx_path = lstm_work / ("model.int8.onnx" if precision == "int8" else "model.opt.onnx")
    engine = tmp_path / f"lstm.{precision}.plan"
    result = run_cli("build", str(onnx_path), "--backend", "tensorrt-rtx", "--precision", precision,
                     "--compute-capability", "SM89", "--compute-capability", "12.0", "-o", str(engine))
    assert result.returncode == 0, result.stderr
    metadata = read_metadata(engine)
    assert metadata.device["compute_capabilities"] == ["SM89", "SM120"]
    assert metadata.engine_bytes > 1_000_000 and metadata.engine_sha256 == sha256_file(engine)
    by_type = metadata.network["tensorrt"]["by_type"]
    if precision == "int8":  # the Q/DQ of the graph reached TensorRT's network
        assert by_type["DEQUANTIZE"] >= 2 and metadata.network["tensorrt"]["by_output_type"]["INT8"] >= 2
    else:
        assert "DEQUANTIZE" not in by_type


def test_a_classifier_never_seen_builds_in_fp32_and_int8(custom_model_dir: Path, tmp_path: Path):
    """TicketRouter: two inputs of its own (int64 tokens, float32 features), three classes."""
    write_custom_config(custom_model_dir, DATA)
    write_data(custom_model_dir)
    config = load_config(custom_model_dir / "config.toml")
    work = tmp_path / "work"
    for backend in ("onnxruntime", "tensorrt-rtx"):
        for precision in ("fp32", "int8"):
            result = run_build_stage(config, work, BuildOptions(backend=backend, precision=precision), progress=False)
            metadata = read_metadata(result.path)
            assert metadata.precision == precision and [o.name for o in metadata.outputs] == ["scores"]
            assert [(t.name, t.min, t.max) for t in metadata.inputs] == [
                ("tokens", (1, 2), (16, 40)), ("features", (1, 4), (16, 4))]
    assert sorted(p.name for p in (work / "engines").iterdir()) == sorted(
        f"ticket-router.{b}.{p}.{e}{j}" for b, e in (("onnxruntime", "ort"), ("tensorrt-rtx", "plan"))
        for p in ("fp32", "int8") for j in ("", ".json"))


def test_shapes_from_the_command_line_replace_the_config(lstm_work: Path, tmp_path: Path):
    engine = tmp_path / "narrow.ort"
    result = run_cli("build", str(lstm_work / "model.int8.onnx"), "--shapes", "input_ids:1x8,4x32,16x64", "-o", str(engine))
    assert result.returncode == 0, result.stderr
    (tensor,) = read_metadata(engine).inputs
    assert (tensor.min, tensor.opt, tensor.max) == ((1, 8), (4, 32), (16, 64))


def _not_onnx(folder: Path, onnx: Path) -> list[str]:
    path = folder / "notes.onnx"
    path.write_text("these are notes, not a model\n")
    return [str(path)]


def _truncated(folder: Path, onnx: Path) -> list[str]:
    path = folder / "cut.onnx"
    path.write_bytes(onnx.read_bytes()[: onnx.stat().st_size // 2])
    return [str(path)]


BAD_BUILDS = {
    "not onnx": (_not_onnx, [], "not an ONNX model"),
    "truncated": (_truncated, [], "not an ONNX model"),
    "outside the model's range": (None, ["--shapes", "input_ids:1x1,8x128,64x512"], "outside what the model was exported"),
    "min > opt": (None, ["--shapes", "input_ids:8x1,4x128,64x256"], "expected min <= opt <= max"),
    "unknown input": (None, ["--shapes", "token_ids:1x1,8x128,64x256"], "input 'token_ids', which the model does not have"),
    "wrong rank": (None, ["--shapes", "input_ids:1,8,64"], "has rank 1, the model's input has rank 2"),
    "missing folder": (None, ["-o", "{tmp}/no/such/dir/x.plan"], "does not exist"),
    "unknown compute capability": (None, ["--compute-capability", "SM90"], "--compute-capability SM90: TensorRT-RTX"),
    "wrong precision": (None, ["--precision", "fp32"], "holds a int8 graph"),
    "rtx without version compatibility": (None, ["--version-compatible"], "cannot build version-compatible plans"),
}


@pytest.mark.parametrize("case", list(BAD_BUILDS))
def test_bad_input_is_one_line_exit_2_and_no_engine_left(lstm_work: Path, tmp_path: Path, case: str):
    make_source, extra, message = BAD_BUILDS[case]
    out = tmp_path / "out"
    out.mkdir()
    source = make_source(tmp_path, lstm_work / "model.int8.onnx") if make_source else [str(lstm_work / "model.int8.onnx")]
    extra = [arg.replace("{tmp}", str(tmp_path)) for arg in extra]
    target = [] if "-o" in extra else ["-o", str(out / "x.plan")]
    result = run_cli("build", *source, "--backend", "tensorrt-rtx", *target, *extra)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and message in lines[0], lines
    assert "Traceback" not in result.stderr
    assert list(out.iterdir()) == []  # no engine, no sidecar, no temporary file
    assert not (tmp_path / "no").exists()


def test_default_output_goes_to_engines_beside_the_onnx_file_and_a_failure_leaves_no_folder(lstm_work: Path, tmp_path: Path):
    work = tmp_path / "copy"
    work.mkdir()
    for name in ("model.int8.onnx", "config.toml"):  # a work dir: its config.toml gives the name and [dims]
        (work / name).write_bytes((lstm_work / name).read_bytes())
    failed = run_cli("build", str(work / "model.int8.onnx"), "--backend", "tensorrt-rtx", "--compute-capability", "SM90")
    assert failed.returncode == 2 and not (work / "engines").exists()
    built = run_cli("build", str(work / "model.int8.onnx"))
    assert built.returncode == 0, built.stderr
    assert sorted(p.name for p in (work / "engines").iterdir()) == [
        "lstm-sentiment.onnxruntime.int8.ort", "lstm-sentiment.onnxruntime.int8.ort.json"]


def test_a_fixed_dim_of_a_bare_onnx_file_is_kept(custom_model_dir: Path, tmp_path: Path):
    """Without a config, the ONNX graph is the only judge: fixed dims must stay fixed, dynamic ones given."""
    write_custom_config(custom_model_dir, DATA)
    write_data(custom_model_dir)
    from miaotui.stages import run_optimize_stage

    config = load_config(custom_model_dir / "config.toml")
    bare = tmp_path / "bare"
    bare.mkdir()
    optimized = run_optimize_stage(config, tmp_path / "work")
    (bare / "router.onnx").write_bytes(optimized.path.read_bytes())
    with pytest.raises(InputError, match="input 'tokens' has dynamic dims"):
        build_engine(bare / "router.onnx", bare / "router.ort")
    with pytest.raises(InputError, match="dim 1 is fixed at 4 in the model, got 3, 3, 3"):
        build_engine(bare / "router.onnx", bare / "router.ort",
                     BuildOptions(shapes=("tokens:1x2,4x8,8x16", "features:1x3,4x3,8x3")))
    with pytest.raises(InputError, match="dim 'batch' is 1/2/8 .* for input 'features' but 1/4/8 for input 'tokens'"):
        build_engine(bare / "router.onnx", bare / "router.ort",
                     BuildOptions(shapes=("tokens:1x2,4x8,8x16", "features:1x4,2x4,8x4")))
    built = build_engine(bare / "router.onnx", bare / "router.ort",
                         BuildOptions(shapes=("tokens:1x2,4x8,8x16", "features:1x4,4x4,8x4")))
    assert built.metadata.input("features").max == (8, 4)
    assert sorted(p.name for p in bare.iterdir()) == ["router.onnx", "router.ort", "router.ort.json"]


def test_missing_backends_and_providers_say_how_to_get_them(lstm_work: Path, tmp_path: Path):
    if importlib.util.find_spec("tensorrt") is None:
        result = run_cli("build", str(lstm_work / "model.int8.onnx"), "--backend", "tensorrt", "-o", str(tmp_path / "x.plan"))
        assert result.returncode == 2 and "pip install 'miaotui[tensorrt]'" in result.stderr
    elif no_gpu_reason():
        result = run_cli("build", str(lstm_work / "model.int8.onnx"), "--backend", "tensorrt", "-o", str(tmp_path / "x.plan"))
        assert result.returncode == 2 and "needs a CUDA GPU" in result.stderr
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        result = run_cli("build", str(lstm_work / "model.int8.onnx"), "--provider", "cuda", "-o", str(tmp_path / "x.ort"))
        assert result.returncode == 2 and "pip install onnxruntime-gpu" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_inspect_prints_the_sidecar_and_notices_a_replaced_engine(lstm_work: Path, tmp_path: Path):
    engine = tmp_path / "lstm.plan"
    build_engine(lstm_work / "model.int8.onnx", engine, BuildOptions(backend="tensorrt-rtx"), resolve_config("lstm-sentiment"))
    result = run_cli("inspect", str(engine))
    assert result.returncode == 0, result.stderr
    assert "tensorrt-rtx" in result.stdout and "1x1 .. 8x128 .. 64x256" in result.stdout
    assert "SM80 SM86 SM89 SM120 SM121" in result.stdout  # every one offered from Ampere on
    assert "DEQUANTIZE" in result.stdout
    if no_gpu_reason():
        assert "needs a GPU to deserialize" in result.stdout
    onnx_report = run_cli("inspect", str(lstm_work / "model.int8.onnx"))
    assert "compute nodes: 1 in INT8" in onnx_report.stdout  # the head Gemm (the lookup feeding the LSTM is float)

    engine.write_bytes(engine.read_bytes()[:1000])
    damaged = run_cli("inspect", str(engine))
    assert damaged.returncode == 0 and "not the sidecar's" in damaged.stdout
    (tmp_path / "lstm.plan.json").unlink()
    missing = run_cli("inspect", str(engine))
    assert missing.returncode == 2 and "sidecar is missing" in missing.stderr


# --- TensorRT 11 names: what the code calls must exist in the real bindings -----------------------

# Variables that hold TensorRT objects in engines/: attributes read from them are TensorRT's API.
TENSORRT_OBJECTS = {"trt", "builder", "network", "parser", "builder_config", "profile", "plan", "runtime",
                    "inspector", "error", "layer", "timing_cache", "engine", "context"}
RTX_ONLY = {"ComputeCapability", "set_compute_capability", "num_compute_capabilities"}


def _tensorrt_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and not node.attr.startswith("__"):
            chain, root = [node], node.value
            while isinstance(root, (ast.Attribute, ast.Call, ast.Subscript)):
                if isinstance(root, ast.Attribute):
                    chain.append(root)
                root = root.func if isinstance(root, ast.Call) else root.value
            if not isinstance(root, ast.Name):
                continue
            if root.id == "self" and len(chain) > 1:  # self.engine.create_execution_context: root "engine"
                if chain[-1].attr in TENSORRT_OBJECTS:
                    names.add(node.attr)
            elif root.id in TENSORRT_OBJECTS:
                names.add(node.attr)
    return names


def test_every_tensorrt_name_the_code_uses_exists_in_tensorrt_11_bindings():
    spec = importlib.util.find_spec("tensorrt_bindings")  # found without importing: its libraries are not here
    if spec is None:
        pytest.skip("tensorrt-cu13-bindings is not installed; pip install -e '.[dev]'")
    extension = Path(next(iter(spec.submodule_search_locations))) / "tensorrt.so"
    identifiers = {line for line in subprocess.run(["strings", "-n", "3", str(extension)], capture_output=True,
                                                    text=True, check=True).stdout.splitlines()
                   if line.isidentifier()}

    # A few helpers (nptype) are Python, defined in the package's __init__.py.
    python_defined = {node.name for node in ast.walk(ast.parse((extension.parent / "__init__.py").read_text()))
                      if isinstance(node, ast.FunctionDef)}

    def in_extension(name: str) -> bool:
        # The linker merges a string that is the tail of another ("Runtime" lives inside "IPluginV3OneRuntime").
        return name in python_defined or any(identifier.endswith(name) for identifier in identifiers)

    used = set()
    for module in ("engines/tensorrt_engine.py", "engines/tensorrt_runner.py"):
        used |= _tensorrt_names(REPO / module)
    assert {"build_serialized_network", "set_shape", "create_timing_cache", "STRONGLY_TYPED",  # the walk works
            "deserialize_cuda_engine", "create_execution_context", "set_input_shape", "execute_async_v3"} <= used
    used |= {f"{member}" for member in HARDWARE_COMPATIBILITY.values()}  # reached through getattr
    missing = sorted(name for name in used - RTX_ONLY if not in_extension(name))
    assert not missing, f"not in TensorRT 11's bindings: {missing}"
    assert not any(in_extension(name) for name in RTX_ONLY), "the check must tell TensorRT-RTX-only names apart"
    # ... and code written against TensorRT 8's API, removed in 10, would fail it.
    assert not any(in_extension(name) for name in ("build_engine", "execute_async_v2", "max_workspace_size"))

    import tensorrt_rtx_bindings as rtx

    objects = [rtx, rtx.Builder, rtx.INetworkDefinition, rtx.OnnxParser, rtx.IBuilderConfig, rtx.IOptimizationProfile,
               rtx.ICudaEngine, rtx.Runtime, rtx.EngineInspector, rtx.ParserError, rtx.ILayer, rtx.ITimingCache,
               rtx.IExecutionContext, rtx.ILogger, rtx.ILogger.Severity, rtx.NetworkDefinitionCreationFlag, rtx.ProfilingVerbosity,
               rtx.MemoryPoolType, rtx.BuilderFlag, rtx.HardwareCompatibilityLevel, rtx.LayerInformationFormat,
               rtx.ComputeCapability]
    absent = sorted(name for name in used if not any(hasattr(o, name) for o in objects))
    assert not absent, f"not in TensorRT-RTX's bindings: {absent}"


# --- data-centre TensorRT: only where TensorRT and a CUDA GPU exist ------------------------------

@pytest.mark.gpu
def test_tensorrt_builds_runs_and_reuses_its_timing_cache(lstm_work: Path, tmp_path: Path):
    if importlib.util.find_spec("tensorrt") is None:
        pytest.skip("TensorRT is not installed (pip install 'miaotui[tensorrt]')")
    if reason := no_gpu_reason():
        pytest.skip(f"building a TensorRT plan needs a CUDA GPU: {reason}")
    import tensorrt as trt
    import torch

    config = resolve_config("lstm-sentiment")
    first = build_engine(lstm_work / "model.int8.onnx", tmp_path / "a.plan", BuildOptions(backend="tensorrt"), config)
    cache = first.metadata.settings["timing_cache"]
    assert cache["loaded_bytes"] == 0 and cache["saved_bytes"] > 0
    (tmp_path / "b.plan.timing-cache").write_bytes((tmp_path / "a.plan.timing-cache").read_bytes())
    second = build_engine(lstm_work / "model.int8.onnx", tmp_path / "b.plan",
                          BuildOptions(backend="tensorrt", tensorrt=TensorRTOptions(optimization_level=3)), config)
    assert second.metadata.settings["timing_cache"]["loaded_bytes"] == cache["saved_bytes"]

    engine = trt.Runtime(trt.Logger(trt.Logger.ERROR)).deserialize_cuda_engine((tmp_path / "a.plan").read_bytes())
    context = engine.create_execution_context()
    ids = torch.ones((4, 32), dtype=torch.int64, device="cuda")
    logits = torch.empty((4, 2), dtype=torch.float32, device="cuda")
    context.set_input_shape("input_ids", tuple(ids.shape))
    context.set_tensor_address("input_ids", ids.data_ptr())
    context.set_tensor_address("logits", logits.data_ptr())
    stream = torch.cuda.current_stream()
    assert context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    expected = ort.InferenceSession(str(lstm_work / "model.int8.onnx")).run(None, {"input_ids": ids.cpu().numpy()})[0]
    assert (logits.cpu().numpy().argmax(1) == expected.argmax(1)).all()


def test_cpu_form_looks_up_int8_rows_before_dequantizing_them(router: Path, tmp_path: Path):
    """The embedding table is dequantized row by row as looked up, not whole on every call: same floats.
    (The custom router's table is INT8; lstm-sentiment's stays float: its rows feed the LSTM.)"""
    import onnx

    from miaotui.engines.cpu_int8 import activations_to_uint8, gather_before_dequantize
    from miaotui.stages import run_quantize_stage

    config = load_config(router / "config.toml")
    source = run_quantize_stage(config, tmp_path / "work", progress=False).path
    model = onnx.load(str(source))
    initializers = {t.name for t in model.graph.initializer}
    assert gather_before_dequantize(model) == 1
    gather = next(node for node in model.graph.node if node.op_type == "Gather")
    assert gather.input[0] in initializers  # int8 rows looked up straight from the table
    assert not any(n.op_type == "DequantizeLinear" and n.input[0] in initializers and
                   any(gather.input[0] == out for out in n.output) for n in model.graph.node)
    moved = activations_to_uint8(model)
    assert moved >= 2  # the Gemms' input Q/DQ at least

    exact = build_engine(source, tmp_path / "int8.ort", BuildOptions(cpu_activations="int8"), config)
    assert exact.metadata.settings["cpu_rewrites"] == {"gather_before_dequantize": 1}
    assert exact.metadata.checks["vs_source_onnx_max_abs_diff"] == 0.0
    default = build_engine(source, tmp_path / "uint8.ort", BuildOptions(), config)
    assert default.metadata.settings["cpu_rewrites"] == {"gather_before_dequantize": 1, "uint8_activations": moved,
                                                         "int8_matmuls_with_bias": 0,  # Gemms hold their bias
                                                         "fused_int8_attention": 0}
    assert default.metadata.checks["vs_source_onnx_max_abs_diff"] < 1e-3


def _int8_matmul_graph(second_reader: bool):
    """x -> Q/DQ (uint8, zero point 128) x DQ(int8 W, per-column scales) -> MatMul -> Add(b1) -> Add(b2) -> Relu;
    with `second_reader` the MatMul's output is also a graph output."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    weights = rng.integers(-127, 128, (16, 8)).astype(np.int8)
    inits = [numpy_helper.from_array(weights, "w_q"), numpy_helper.from_array(rng.uniform(0.01, 0.02, 8).astype(np.float32), "w_s"),
             numpy_helper.from_array(np.zeros(8, np.int8), "w_z"), numpy_helper.from_array(np.float32(0.05), "a_s"),
             numpy_helper.from_array(np.uint8(128), "a_z"), numpy_helper.from_array(rng.normal(size=8).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.normal(size=8).astype(np.float32), "b2")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "a_s", "a_z"], ["x_q"]),
             helper.make_node("DequantizeLinear", ["x_q", "a_s", "a_z"], ["x_dq"]),
             helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["w_dq"], axis=1),
             helper.make_node("MatMul", ["x_dq", "w_dq"], ["mm"], name="mm"),
             helper.make_node("Add", ["mm", "b1"], ["a1"]), helper.make_node("Add", ["b2", "a1"], ["a2"]),
             helper.make_node("Relu", ["a2"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if second_reader:
        outputs.append(helper.make_tensor_value_info("mm", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 5, 16])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_int8_matmuls_take_their_biases_inside():
    """DQ x DQ -> MatMul -> Add -> Add becomes one MatMulIntegerToFloat with the two biases summed: the
    same answers; a MatMul whose output is read elsewhere is left alone."""
    from miaotui.engines.cpu_int8 import int8_matmuls_with_bias

    x = np.random.default_rng(4).normal(size=(3, 5, 16)).astype(np.float32)
    model = _int8_matmul_graph(second_reader=False)
    expected = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    assert int8_matmuls_with_bias(model) == 1
    assert [n.op_type for n in model.graph.node] == ["QuantizeLinear", "MatMulIntegerToFloat", "Relu"]
    np.testing.assert_allclose(ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0], expected,
                               atol=1e-5)
    kept = _int8_matmul_graph(second_reader=True)
    assert int8_matmuls_with_bias(kept) == 0 and "MatMulIntegerToFloat" not in [n.op_type for n in kept.graph.node]


def test_large_batches_run_in_row_slices_with_the_same_answers(lstm_work: Path, tmp_path: Path):
    """The build times the engine at its largest batch whole and in row slices and records what it
    found; with a budget in the sidecar, Engine.run cuts a larger batch into calls under it (an
    explicit batch_size still wins) and answers row for row as one call does."""
    from miaotui.runtime import Engine

    engine_path = tmp_path / "lstm.ort"
    assert run_cli("build", str(lstm_work / "model.int8.onnx"), "-o", str(engine_path)).returncode == 0
    metadata = read_metadata(engine_path)
    split = metadata.checks["call_split"]
    assert split["shape"] == [64, 128] and "whole" in split["ms"] and all(ms > 0 for ms in split["ms"].values())
    assert metadata.session.get("max_call_elements") == split["max_call_elements"]  # what Engine.run will use
    # The decision rests on each budget's time over whole calls', paired round by round
    assert set(split["to_whole"]) == set(split["ms"]) - {"whole"} and all(r > 0 for r in split["to_whole"].values())
    best = min(split["to_whole"], key=split["to_whole"].get)
    assert split["max_call_elements"] == (int(best) if split["to_whole"][best] <= 1 - MIN_GAIN else None)
    chosen = f"calls of at most {best} elements" if split["max_call_elements"] else "whole calls"
    assert (f"call split: {chosen} (slices of {best} elements over whole calls {split['to_whole'][best]:.3f}, kept at or "
            "under 0.95)") in " ".join(run_cli("inspect", str(engine_path)).stdout.split())
    assert 0 <= metadata.checks["cpu_busy_elsewhere"] <= 1  # how busy the machine was while it timed

    tokenizer = load_tokenizer(resolve_config("lstm-sentiment").model.tokenizer, MAX_LENGTH)
    feed = {"input_ids": encode(tokenizer, [e.text for e in load_split("validation")[:45]])["input_ids"]}
    whole = _ort_engine_session(engine_path).run(None, feed)[0]
    sidecar = Path(f"{engine_path}.json")
    data = json.loads(sidecar.read_text())
    data["session"]["max_call_elements"] = 8 * feed["input_ids"].shape[1]  # 8 rows a call
    sidecar.write_text(json.dumps(data))
    engine = Engine.load(engine_path)
    calls = []
    runner_run = engine._backend.run
    engine._backend.run = lambda arrays: calls.append(len(arrays["input_ids"])) or runner_run(arrays)
    np.testing.assert_allclose(engine.run(feed)["logits"], whole, atol=1e-5, rtol=0)
    assert calls == [8, 8, 8, 8, 8, 5]
    calls.clear()
    engine.run(feed, batch_size=20)
    assert calls == [20, 20, 5]


def test_build_timing_interleaves_its_candidates_and_warms_each_first():
    """The build's comparisons (call split, OpenVINO's attention form) time every candidate once a
    round, the order reversed every other round, after warm-up calls that are not counted."""
    from miaotui.engines.timing import interleaved

    order: list[str] = []
    timed = interleaved({name: (lambda name=name: order.append(name)) for name in ("a", "b", "c")}, rounds=3,
                        warmup=2, attempts=1)
    assert order[:6] == ["a", "a", "b", "b", "c", "c"]
    assert order[6:] == ["a", "b", "c", "c", "b", "a", "a", "b", "c"]
    assert set(timed.ms()) == {"a", "b", "c"} and all(len(ms) == 3 and min(ms) >= 0 for ms in timed.rounds.values())


def test_build_decisions_pair_the_candidates_round_by_round():
    """A slow spell that starts between two candidates' calls moves one's median and not the other's; the
    ratio within each round still says what the candidate costs."""
    from miaotui.engines.timing import Interleaved

    # "split" is 5% faster than "whole" in every round; the machine ran at half speed from between the two
    # calls of the second round to the end of the fourth.
    timed = Interleaved({"whole": np.array([10.0, 10.0, 20.0, 20.0, 10.0]),
                         "split": np.array([9.5, 19.0, 19.0, 19.0, 9.5])})
    assert timed.ms() == {"whole": 10.0, "split": 19.0}  # by the medians, 1.9x slower
    assert timed.ratio("split", "whole") == pytest.approx(0.95)
    assert timed.ratio("whole", "split") == pytest.approx(1 / 0.95)


SPIN = ("import os, sys, time\nos.sched_setaffinity(0, {int(sys.argv[1])})\nend = time.time() + float(sys.argv[2])\n"
        "while time.time() < end: pass")


def _spinners(cpus, seconds: float = float("inf")) -> list[subprocess.Popen]:
    """One process spinning on each of `cpus` (pinned there) for `seconds`: another user's load on the machine."""
    return [subprocess.Popen([sys.executable, "-c", SPIN, str(cpu), str(seconds)]) for cpu in cpus]


def _stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        process.kill()
        process.wait()


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or not Path("/proc/stat").exists(), reason="Linux only")
def test_cpu_use_counts_other_processes_on_this_process_cpus_and_not_its_own_work():
    """cpu_use: a process spinning on this thread's CPU shows as busy elsewhere; this thread's own
    spinning does not (the kernel's busy ticks less this process's CPU time)."""
    import time

    from miaotui.engines.timing import cpu_use

    allowed = os.sched_getaffinity(0)
    cpu = min(allowed)
    os.sched_setaffinity(0, {cpu})
    try:
        with cpu_use() as own:
            started = time.monotonic()
            while time.monotonic() - started < 1.5:
                pass
        spinners = _spinners([cpu])
        try:
            time.sleep(0.2)
            with cpu_use() as other:
                time.sleep(1.5)
        finally:
            _stop(spinners)
    finally:
        os.sched_setaffinity(0, allowed)
    assert other.busy_elsewhere is not None and other.busy_elsewhere > 0.6, other
    assert own.busy_elsewhere is not None and own.busy_elsewhere < other.busy_elsewhere - 0.4, (own, other)


def _cpu_quota() -> float | None:
    """CPUs' worth of time this process's cgroup may use (cgroup v2 cpu.max or v1 cfs quota); None: no quota."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text().strip()
            period = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    return None if quota in ("max", "-1") else int(quota) / int(period)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or not Path("/proc/stat").exists(), reason="Linux only")
def test_a_build_on_a_busy_machine_records_it_and_warns_that_its_timing_may_be_wrong(lstm_work: Path, tmp_path: Path):
    """The call split is chosen by timing: a build that shared its CPUs with other processes says so
    in the sidecar (checks.cpu_busy_elsewhere) and in one warning line naming the engine and what was timed."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) > 8:
        pytest.skip(f"{len(cpus)} CPUs: too many to load with spinning processes")
    quota = _cpu_quota()
    if quota is not None and quota < len(cpus):
        pytest.skip(f"a cgroup quota of {quota:.1f} CPUs over {len(cpus)}: spinners would share it with the build")
    engine_path = tmp_path / "lstm.ort"
    spinners = _spinners(cpus)
    try:
        result = run_cli("build", str(lstm_work / "model.int8.onnx"), "-o", str(engine_path))
    finally:
        _stop(spinners)
    assert result.returncode == 0, result.stderr
    busy = read_metadata(engine_path).checks["cpu_busy_elsewhere"]
    assert busy > 0.2, busy
    warning = [line for line in result.stderr.splitlines() if "warning:" in line]
    assert len(warning) == 1 and "lstm.ort: other processes took" in warning[0] and "call split" in warning[0], result.stderr
    shown = run_cli("inspect", str(engine_path)).stdout
    assert f"other processes took {busy:.0%} of the CPU time while the build timed its choices: what it timed" in shown


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or not Path("/proc/stat").exists(), reason="Linux only")
def test_a_comparison_timed_while_other_processes_were_busy_is_timed_again_and_the_quiet_attempt_counts():
    """interleaved: rounds during which other processes kept this process's CPUs busy are timed again
    after a pause; the attempt that counts is the quietest, and its share goes to the open ledger."""
    import time

    from miaotui.engines.timing import BUSY_ELSEWHERE_WARNING, cpu_use, interleaved, timing_ledger

    cpus = sorted(os.sched_getaffinity(0))
    quota = _cpu_quota()
    if len(cpus) > 8 or (quota is not None and quota < len(cpus)):
        pytest.skip("cannot load every CPU of this process with spinning processes")
    with cpu_use() as before:  # the quiet attempt needs a machine that is quiet without the spinners
        time.sleep(1.0)
    if before.busy_elsewhere is not None and before.busy_elsewhere > BUSY_ELSEWHERE_WARNING / 2:
        pytest.skip(f"other processes already keep this machine busy ({before.busy_elsewhere:.0%} of its CPU time)")
    # Spinners that stop by themselves 1.5 s after they start: the first attempt (0.8 s, after 0.4 s of
    # warm-up calls) runs beside them, the next one (after the 1 s pause) on a quiet machine.
    calls: list[str] = []
    spinners = _spinners(cpus, seconds=1.5)
    try:
        time.sleep(0.1)  # the spinners' interpreters started
        with timing_ledger() as shares:
            timed = interleaved({name: (lambda name=name: calls.append(name) or time.sleep(0.2)) for name in "ab"},
                                rounds=2, warmup=1).ms()
    finally:
        _stop(spinners)
    assert len(calls) >= 2 + 2 * 4, calls  # warm-up, the busy attempt, at least one more
    assert len(shares) == 1 and shares[0] <= BUSY_ELSEWHERE_WARNING, shares
    assert set(timed) == {"a", "b"} and all(190 < ms < 400 for ms in timed.values()), timed
