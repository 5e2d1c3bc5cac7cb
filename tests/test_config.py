from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from miaotui.cli import main
from miaotui.config import load_config
from miaotui.errors import InputError
from miaotui.models import BUILTIN_MODELS, resolve_config

from conftest import CUSTOM_CONFIG, write_custom_config, error_lines


def test_builtin_config_resolves_paths_and_dims():
    config = resolve_config("lstm-sentiment")
    assert config.name == "lstm-sentiment"
    assert config.model.checkpoint.is_file() and config.model.checkpoint.is_absolute()
    assert config.dims["seq"].max == 256 and config.dims["batch"].opt == 8
    assert config.inputs["input_ids"].shape == ("batch", "seq")
    assert config.shape_at("input_ids", {"batch": 3, "seq": 9}) == (3, 9)
    assert config.validate["int8"]["min_top1_agreement"] == 0.99
    assert config.padding_mask is None and config.quantize.bias_correction
    minilm = resolve_config("minilm-sentiment")
    assert minilm.padding_mask == "attention_mask"
    assert load_config_text_roundtrip(minilm).padding_mask == "attention_mask"


def test_custom_config_resolves_relative_to_its_folder(custom_model_dir: Path):
    config = load_config(custom_model_dir / "config.toml")
    assert config.model.factory == f"{custom_model_dir / 'router.py'}:build"
    assert config.model.outputs == ("scores",)
    assert config.inputs["features"].shape == ("batch", 4)
    assert config.inputs["features"].range == (-2.0, 2.0)


def load_config_text_roundtrip(config):
    """The config as a work dir stores it (config.toml from to_dict), read back."""
    import tempfile

    import tomli_w

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.toml"
        path.write_bytes(tomli_w.dumps(config.to_dict()).encode())
        return load_config(path)


BAD_CONFIGS = {
    # case: (edit of the custom config, text the one-line error must contain)
    "missing factory": (lambda t: t.replace('factory = "router.py:build"\n', ""), "model.factory: missing"),
    "wrong dtype name": (lambda t: t.replace('dtype = "float32"', 'dtype = "float31"'), "inputs.features.dtype"),
    "factory file missing": (lambda t: t.replace("router.py:build", "nowhere.py:build"), "nowhere.py"),
    "min above max": (lambda t: t.replace("min = 2, opt = 12, max = 40", "min = 50, opt = 12, max = 40"),
                      "dims.words: min (50) must not exceed max (40)"),
    "unknown key": (lambda t: t.replace("[model]", "[model]\ncheckpiont = 'x'"), "model.checkpiont: unknown key"),
    "undefined dim": (lambda t: t.replace('["batch", "words"]', '["batch", "tokens"]'), "dim 'tokens' is not defined"),
    "int input without range": (lambda t: t.replace(', range = [0, 50]', ''), "inputs.tokens.range: missing"),
    "empty range": (lambda t: t.replace('range = [0, 50]', 'range = [50, 50]'), "inputs.tokens.range"),
    "not toml": (lambda t: t + "\n[[[", "not valid TOML"),
    "missing name": (lambda t: t.replace('name = "ticket-router"', ''), "name: missing"),
    "bad name": (lambda t: t.replace('name = "ticket-router"', 'name = "../escape"'), "name: expected"),
    "bad method": (lambda t: t + '\n[quantize]\nmethod = "kl"\n', "quantize.method: expected one of minmax, entropy, percentile"),
    "zero samples": (lambda t: t + "\n[quantize]\nsamples = 0\n", "quantize.samples: expected a positive number"),
    "exclude not a list": (lambda t: t + '\n[quantize]\nexclude = "Gather"\n', "quantize.exclude: expected list"),
    "quantize typo": (lambda t: t + "\n[quantize]\nsample = 10\n", "quantize.sample: unknown key"),
    "float padding mask": (lambda t: t.replace("range = [-2.0, 2.0] }", "range = [-2.0, 2.0], padding_mask = true }"),
                           "inputs.features.padding_mask: a padding mask is an integer or bool (batch, sequence) input"),
    "padding mask not bool": (lambda t: t.replace("range = [0, 50] }", "range = [0, 50], padding_mask = 1 }"),
                              "inputs.tokens.padding_mask: expected bool"),
    "bias correction not bool": (lambda t: t + '\n[quantize]\nbias_correction = "yes"\n',
                                 "quantize.bias_correction: expected bool"),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_config_is_one_line_naming_the_key(custom_model_dir: Path, case: str):
    edit, expected = BAD_CONFIGS[case]
    path = write_custom_config(custom_model_dir, text=edit(CUSTOM_CONFIG.format(extra="")))
    with pytest.raises(InputError) as caught:
        load_config(path)
    message = str(caught.value)
    assert expected in message
    assert str(path) in message
    assert "\n" not in message


@pytest.mark.parametrize("case", ["missing factory", "wrong dtype name", "factory file missing", "min above max"])
def test_cli_bad_config_exits_2_and_writes_nothing(custom_model_dir: Path, case: str, tmp_path: Path):
    edit, expected = BAD_CONFIGS[case]
    path = write_custom_config(custom_model_dir, text=edit(CUSTOM_CONFIG.format(extra="")))
    out = tmp_path / "work"
    result = CliRunner().invoke(main, ["export", str(path), "--out", str(out)])
    assert result.exit_code == 2
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0]
    assert "Traceback" not in result.output
    assert not out.exists()


def test_checkpoint_that_does_not_fit_names_the_tensor(custom_model_dir: Path, tmp_path: Path):
    import torch
    from safetensors.torch import load_file, save_file

    state = load_file(str(custom_model_dir / "router.safetensors"))
    state["head.weight"] = torch.zeros(5, 32)  # 5 classes where the model has 3
    save_file(state, str(custom_model_dir / "router.safetensors"))
    out = tmp_path / "work"
    result = CliRunner().invoke(main, ["export", str(custom_model_dir / "config.toml"), "--out", str(out)])
    assert result.exit_code == 2
    assert "head.weight is (5, 32) in the checkpoint, (3, 32) in the model" in result.stderr
    assert len(error_lines(result.stderr)) == 1
    assert not out.exists()


def test_pickled_checkpoint_with_code_is_refused(custom_model_dir: Path, tmp_path: Path):
    import pickle

    class Payload:  # a pickle that would run code when unpickled without weights_only
        def __reduce__(self):
            return (print, ("unpickled!",))

    bad = custom_model_dir / "router.pt"
    bad.write_bytes(pickle.dumps({"head.weight": Payload()}))
    text = CUSTOM_CONFIG.format(extra="").replace("router.safetensors", "router.pt")
    path = write_custom_config(custom_model_dir, text=text)
    result = CliRunner().invoke(main, ["export", str(path), "--out", str(tmp_path / "w")])
    assert result.exit_code == 2
    assert "not a weights-only torch checkpoint" in result.stderr
    assert "unpickled!" not in result.output


def test_unknown_model_name_lists_builtins():
    with pytest.raises(InputError) as caught:
        resolve_config("resnet-9000")
    assert all(name in str(caught.value) for name in BUILTIN_MODELS)


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda t: t.replace("tokens = ", "ids = "), "inputs: 'ids' is not an argument of TicketRouter.forward(tokens, features)"),
        (lambda t: t.replace('outputs = ["scores"]', 'outputs = ["scores", "extra"]'),
         "model.outputs: the model returns 1 output(s), the config names 2"),
    ],
    ids=["input name not a forward argument", "more outputs than the model returns"],
)
def test_config_that_does_not_fit_the_model_is_exit_2(custom_model_dir: Path, tmp_path: Path, edit, expected):
    path = write_custom_config(custom_model_dir, text=edit(CUSTOM_CONFIG.format(extra="")))
    out = tmp_path / "work"
    result = CliRunner().invoke(main, ["export", str(path), "--out", str(out)])
    assert result.exit_code == 2
    assert expected in result.stderr and len(error_lines(result.stderr)) == 1
    assert not out.exists()
