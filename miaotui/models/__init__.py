"""Built-in classifiers, each a sub-package carrying its own config.toml, and config resolution."""

from __future__ import annotations

from pathlib import Path

from miaotui.config import Config, load_config
from miaotui.errors import InputError
from miaotui.workdir import CONFIG  # a built-in model ships its config as a work dir holds it

HERE = Path(__file__).parent
BUILTIN_MODELS = {
    "lstm-sentiment": HERE / "lstm_sentiment" / CONFIG,
    "minilm-sentiment": HERE / "minilm_sentiment" / CONFIG,
}
DEFAULT_MODEL = "lstm-sentiment"


def resolve_config(config_or_model: str | Path) -> Config:
    """A config file's path, or the name of a built-in model."""
    text = str(config_or_model)
    if text in BUILTIN_MODELS:
        return load_config(BUILTIN_MODELS[text])
    path = Path(text)
    if path.is_file():
        return load_config(path)
    if path.suffix == ".toml" or "/" in text:
        raise InputError(f"{text}: config file does not exist")
    raise InputError(
        f"{text!r} is neither a config file nor a built-in model (built-in: {', '.join(BUILTIN_MODELS)})"
    )
