"""The shape of the code: packages import one way, the work dir's names live in one module, and a
backend is one module plus one registration line."""

from __future__ import annotations

import ast
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
# Source folders and the package each maps to (pyproject's package-dir).
PACKAGES = {"export": "miaotui.export", "engines": "miaotui.engines", "runtime": "miaotui.runtime",
            "validation": "miaotui.validation", "serving": "miaotui.serving", "miaotui": "miaotui"}
SUBPACKAGES = ("data", "models", "bench", "stages")


def _package_of(module: str) -> str | None:
    """miaotui.X.Y -> "miaotui.X" for a sub-package; the top-level modules (config, errors, ...) are "core"."""
    parts = module.split(".")
    if parts[0] != "miaotui":
        return None
    if len(parts) == 1:
        return "core"
    if parts[1] in SUBPACKAGES or parts[1] in ("export", "engines", "runtime", "validation", "serving"):
        return f"miaotui.{parts[1]}"
    return "cli" if parts[1] == "cli" else "core"


def _sources():
    for folder, package in PACKAGES.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            module = ".".join([package, *path.relative_to(REPO / folder).with_suffix("").parts]).removesuffix(".__init__")
            yield path, module


def import_edges() -> dict[tuple[str, str], list[str]]:
    """(importing package, imported package) -> files, counting imports inside functions too."""
    edges: dict[tuple[str, str], list[str]] = {}
    for path, module in _sources():
        source = _package_of(module)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else \
                [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                target = _package_of(name)
                if target and target != source:
                    edges.setdefault((source, target), []).append(str(path.relative_to(REPO)))
    return edges


def test_no_package_imports_another_in_a_loop():
    edges = import_edges()
    graph: dict[str, set[str]] = {}
    for source, target in edges:
        graph.setdefault(source, set()).add(target)
    # The direction the design names: cli -> stages -> (export, engines, validation, serving) -> core.
    assert ("core", "miaotui.stages") not in edges and ("miaotui.export", "miaotui.stages") not in edges
    assert ("miaotui.validation", "miaotui.export") not in edges, edges.get(("miaotui.validation", "miaotui.export"))

    def cycle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    return path + [nxt]
                if nxt not in path:
                    stack.append((nxt, path + [nxt]))
        return None

    loops = {tuple(loop) for package in graph if (loop := cycle_from(package))}
    described = [" -> ".join(loop) + "  (" + "; ".join(sorted({f for a, b in zip(loop, loop[1:]) for f in edges[(a, b)]}))
                 + ")" for loop in loops]
    assert not loops, "import loops between packages:\n" + "\n".join(described)


WORK_DIR_NAMES = ("config.toml", "manifest.json", "model.onnx", "model.opt.onnx", "model.int8.onnx", "model.fp16.onnx",
                  "model.int8-fp16.onnx", "calibration.json", "quantization.json", "reference.npz", "engines", "reports",
                  "parity.json", "parity.md", "parity.xml", "bench.json", "bench.md", "bench.png", "layers.json",
                  "layers.png")
# Triton's repository layout has names of its own: the file its onnxruntime / TensorRT backend loads.
ALLOWED = {("model.onnx", "engines/onnxruntime_backend.py")}


def test_the_work_dirs_file_names_are_spelled_in_one_module():
    found = []
    for path, _ in _sources():
        relative = str(path.relative_to(REPO))
        if relative == "miaotui/workdir.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in WORK_DIR_NAMES and id(node) not in docstrings \
                    and (node.value, relative) not in ALLOWED:
                found.append(f"{relative}:{node.lineno} {node.value!r}")
    assert not found, "work dir file names outside miaotui/workdir.py:\n" + "\n".join(found)


# A whole backend: ONNX Runtime without ahead-of-time optimization, its engine the .onnx file itself.
PLAIN_BACKEND = '''
from pathlib import Path
import shutil

from miaotui.engines.backend import Backend, BackendBuild


class PlainOnnx(Backend):
    name = "plain-onnx"
    suffix = ".onnx"
    help = "plain-onnx (the ONNX file, run by ONNX Runtime as it is)"

    def version(self):
        import onnxruntime
        return onnxruntime.__version__

    def build(self, job):
        shutil.copyfile(job.onnx_path, job.engine_path)
        return BackendBuild(self.version(), {"kind": "cpu"}, {}, {"copied": True})

    def open(self, path, metadata, threads):
        import onnxruntime

        class Runner:
            provider = "CPUExecutionProvider"
            session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

            def run(self, arrays):
                return self.session.run([o.name for o in metadata.outputs], arrays)

        return Runner()


BACKEND = PlainOnnx()
'''


def test_a_backend_is_one_module_and_one_registration_line(lstm_work: Path, tmp_path: Path, monkeypatch):
    from miaotui.engines import backend as registry_module
    from miaotui.engines import BuildOptions, build_engine
    from miaotui.engines.choice import choose_engine
    from miaotui.models import resolve_config
    from miaotui.runtime import Engine

    (tmp_path / "plain_onnx_backend.py").write_text(textwrap.dedent(PLAIN_BACKEND))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry_module, "BACKEND_MODULES", registry_module.BACKEND_MODULES + ("plain_onnx_backend",))
    registry_module.registry.cache_clear()
    try:
        assert "plain-onnx" in registry_module.backend_names()
        work = tmp_path / "work"
        (work / "engines").mkdir(parents=True)
        (work / "config.toml").write_text((lstm_work / "config.toml").read_text())
        engine = work / "engines" / "lstm-sentiment.plain-onnx.fp32.onnx"
        built = build_engine(lstm_work / "model.opt.onnx", engine, BuildOptions(backend="plain-onnx"),
                             resolve_config("lstm-sentiment"))
        assert built.metadata.backend == "plain-onnx" and built.metadata.checks == {"copied": True}
        ids = np.arange(1, 41, dtype=np.int64).reshape(2, 20)
        logits = Engine.load(engine)(input_ids=ids)["logits"]
        ours = Engine.load(lstm_work / "engines" / "lstm-sentiment.onnxruntime.int8.ort")(input_ids=ids)["logits"]
        assert logits.shape == (2, 2) and np.abs(logits - ours).max() < 0.2  # fp32 graph vs the INT8 engine
        assert choose_engine(work) == engine  # the work dir's only engine, found by its suffix
        with pytest.raises(Exception, match="Triton serves"):
            registry_module.get_backend("plain-onnx").triton_model(engine, built.metadata, tmp_path, None)
    finally:
        registry_module.registry.cache_clear()
        sys.modules.pop("plain_onnx_backend", None)


def test_cli_choices_and_runtime_dispatch_come_from_the_registry():
    from click.testing import CliRunner

    from miaotui.cli import main
    from miaotui.engines.backend import backend_names, registry, triton_backends

    help_text = CliRunner().invoke(main, ["build", "--help"], env={"COLUMNS": "300"}).output
    for name in backend_names():
        assert name in help_text
    assert set(triton_backends()) == {"onnxruntime", "tensorrt", "openvino"}
    assert {b.suffix for b in registry().values()} == {".ort", ".plan", ".xml"}
    engine_py = (REPO / "runtime" / "engine.py").read_text()
    assert "onnxruntime" not in engine_py.split('"""', 2)[2], "the runtime dispatches by registry, not by name"
