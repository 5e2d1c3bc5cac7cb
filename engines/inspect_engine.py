"""What an engine is: its sidecar, whether the file still matches it, and for a TensorRT plan the
layers and their precisions where the library can say (its engine inspector needs the plan
deserialized, which needs a GPU; without one, the layer counts the builder saw are shown)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from miaotui.artifacts import sha256_file
from miaotui.engines.backend import get_backend
from miaotui.engines.metadata import EngineMetadata, read_metadata


@dataclass
class EngineReport:
    path: Path
    metadata: EngineMetadata
    file_matches: bool  # the engine's sha256 is the sidecar's
    layers: list[dict[str, Any]] = field(default_factory=list)  # from the engine inspector
    layers_unavailable: str | None = None  # why there is no layer list


def inspect_engine(path: str | Path) -> EngineReport:
    from miaotui.errors import InputError

    engine_path = Path(path)
    if engine_path.name.endswith(".json"):  # the sidecar named instead of the engine
        engine_path = engine_path.with_name(engine_path.name.removesuffix(".json"))
    if not engine_path.is_file():
        raise InputError(f"{engine_path}: file does not exist")
    metadata = read_metadata(engine_path)
    report = EngineReport(engine_path, metadata, sha256_file(engine_path) == metadata.engine_sha256)
    if report.file_matches:
        report.layers, report.layers_unavailable = get_backend(metadata.backend).layers(engine_path, metadata)
    return report


# A reading this close to its rule may fall on the other side in the next build: the spread of one build's
# reading across processes was 0.013-0.018 for minilm-sentiment's attention form on a Zen 5 (benchmarks/NOTES.md).
CLOSE_TO_RULE = 0.015


@dataclass(frozen=True)
class TimingDecision:
    """One choice a build made by timing, as its sidecar records it."""

    what: str  # "attention form", "LSTM form", "one-text form", "streams form", "call split"
    chosen: str
    ratio: float  # the candidate's time over the baseline's, as the build read it
    compared: str  # what over what
    rule: float  # the candidate is kept at or under this ratio
    pinned_by: str | None  # the build option that fixes the choice instead

    @property
    def close(self) -> bool:
        return abs(self.ratio - self.rule) < CLOSE_TO_RULE


def timing_decisions(metadata: EngineMetadata) -> list[TimingDecision]:
    """The choices the build made by timing (engines/timing.py), from the sidecar's checks."""
    checks, settings, decisions = metadata.checks, metadata.settings, []
    forms = (("attention", "attention form", "--openvino-attention int8|float", "int8", "float"),
             ("lstm", "LSTM form", "--openvino-lstm int8|float", "int8", "float"),
             ("one_text", "one-text form", "--openvino-one-text static|dynamic", "static", "dynamic"),
             ("streams", "streams form", "--openvino-streams split|single", "split", "single"))
    for part, what, flag, candidate, baseline in forms:
        timed = checks.get(f"{part}_timing")
        if isinstance(timed, dict) and f"{candidate}_to_{baseline}" in timed:
            decisions.append(TimingDecision(what, str(settings.get(part)), float(timed[f"{candidate}_to_{baseline}"]),
                                            f"{candidate} over {baseline}", 1 - float(timed["min_gain"]), flag))
    split = checks.get("call_split")
    if isinstance(split, dict) and isinstance(split.get("ms"), dict) and len(split["ms"]) > 1:
        from miaotui.engines.call_split import MIN_GAIN

        # to_whole: paired round by round; sidecars before it have the medians only
        ratios = split.get("to_whole") or {name: ms / split["ms"]["whole"] for name, ms in split["ms"].items() if name != "whole"}
        best = min(ratios, key=ratios.get)
        chosen = f"calls of at most {split['max_call_elements']} elements" if split.get("max_call_elements") else "whole calls"
        decisions.append(TimingDecision("call split", chosen, float(ratios[best]),
                                        f"slices of {best} elements over whole calls", 1 - MIN_GAIN, None))
    return decisions
