from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest

# A classifier the project has never seen: two inputs under its own names (int64 tokens, float32
# features), three classes, an output named "scores".
CUSTOM_MODEL = '''
import torch
from torch import nn


class TicketRouter(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.features_proj = nn.Linear(4, 16)
        self.head = nn.Linear(32, 3)

    def forward(self, tokens, features):
        pooled = self.embed(tokens).mean(dim=1)
        return self.head(torch.cat([pooled, torch.tanh(self.features_proj(features))], dim=-1))


def build():
    torch.manual_seed(1)
    return TicketRouter()
'''

CUSTOM_CONFIG = """
name = "ticket-router"
[model]
factory = "router.py:build"
checkpoint = "router.safetensors"
outputs = ["scores"]
labels = ["billing", "bug", "other"]
[inputs]
tokens = {{ dtype = "int64", shape = ["batch", "words"], range = [0, 50] }}
features = {{ dtype = "float32", shape = ["batch", 4], range = [-2.0, 2.0] }}
[dims]
batch = {{ min = 1, opt = 4, max = 16 }}
words = {{ min = 2, opt = 12, max = 40 }}
{extra}
"""


@pytest.fixture
def custom_model_dir(tmp_path: Path) -> Path:
    """A folder with router.py, router.safetensors (trained-looking random weights) and config.toml."""
    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "router.py").write_text(textwrap.dedent(CUSTOM_MODEL))
    namespace: dict = {}
    exec(compile(CUSTOM_MODEL, "router.py", "exec"), namespace)
    model = namespace["build"]()
    torch.manual_seed(7)
    state = {k: torch.randn_like(v) * 0.5 for k, v in model.state_dict().items()}
    save_file(state, str(folder / "router.safetensors"))
    write_custom_config(folder)
    return folder


def write_custom_config(folder: Path, extra: str = "", text: str | None = None) -> Path:
    path = folder / "config.toml"
    path.write_text(text if text is not None else CUSTOM_CONFIG.format(extra=extra))
    return path


DATA = """
[data]
calibration = "calib.npz"
validation = "val.npz"
"""


def write_data(folder: Path, samples: int = 200, words: int = 12, seed: int = 0, **edits) -> None:
    """calib.npz and val.npz for the TicketRouter (tokens int64, features float32); `edits` replace
    calibration arrays by name (None drops one)."""
    rng = np.random.default_rng(seed)
    calibration = {"tokens": rng.integers(0, 50, (samples, words), dtype=np.int64),
                   "features": rng.uniform(-2, 2, (samples, 4)).astype(np.float32)}
    for name, value in edits.items():
        if value is None:
            calibration.pop(name, None)
        else:
            calibration[name] = value
    np.savez(folder / "calib.npz", **calibration)
    np.savez(folder / "val.npz", tokens=rng.integers(0, 50, (96, 20), dtype=np.int64),
             features=rng.uniform(-2, 2, (96, 4)).astype(np.float32), labels=rng.integers(0, 3, 96))


@pytest.fixture
def router(custom_model_dir: Path) -> Path:
    write_custom_config(custom_model_dir, DATA)
    write_data(custom_model_dir)
    return custom_model_dir


@pytest.fixture(scope="session")
def lstm_work(tmp_path_factory) -> Path:
    """The default model's work dir as `make export` leaves it: model.onnx, model.opt.onnx,
    model.int8.onnx, config.toml and engines/lstm-sentiment.onnxruntime.int8.ort. Shared: tests may
    add engines and reports to it, never change what is there."""
    from miaotui.engines import BuildOptions
    from miaotui.stages import run_build_stage
    from miaotui.models import resolve_config

    work = tmp_path_factory.mktemp("lstm") / "work"
    run_build_stage(resolve_config("lstm-sentiment"), work, BuildOptions(backend="onnxruntime"), progress=False)
    return work


def error_lines(stderr: str) -> list[str]:
    """stderr without the stage progress lines ("miaotui: STAGE NAME ..."): what a failed command said."""
    return [line for line in stderr.strip().splitlines() if not line.startswith("miaotui: ")]


def triton_server_missing() -> str | None:
    """Why no Triton server can run here (what to install), or None."""
    from miaotui.serving.server import server_files, stub_python

    try:
        server_files()
        stub_python()
    except Exception as error:  # InputError naming what to install
        return str(error)
    return None


def text_request(module, texts, dtype="BYTES"):
    """A text model's `text` input for tritonclient's http or grpc `module`: one row per text."""
    values = np.array([[t.encode("utf-8") if isinstance(t, str) else t] for t in texts], dtype=np.object_)
    tensor = module.InferInput("text", list(values.shape), dtype)
    tensor.set_data_from_numpy(values)
    return [tensor]
