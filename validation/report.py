"""The gate's reports: parity.json (everything), parity.md (for a pull-request comment) and JUnit XML
(one test case per checked metric, which CI systems display)."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from dataclasses import asdict
from pathlib import Path

from miaotui.artifacts import atomic_write_bytes, atomic_write_json
from miaotui.validation.gate import ParityReport
from miaotui.workdir import PARITY_REPORTS

METRIC_ROWS = (  # (label, attribute, format) for the tables
    ("samples", "samples", "d"),
    ("max abs error", "max_abs_error", ".3g"),
    ("mean abs error", "mean_abs_error", ".3g"),
    ("max relative error", "max_rel_error", ".3g"),
    ("cosine", "cosine", ".6f"),
    ("worst sample cosine", "worst_sample_cosine", ".4f"),
    ("NaN / Inf", None, ""),
    ("top-1 agreement", "top1_agreement", ".4f"),
    ("top-k agreement", "topk_agreement", ".4f"),
    ("KL divergence", "kl_divergence", ".3g"),
    ("accuracy: PyTorch", "reference_accuracy", ".4f"),
    ("accuracy: engine", "engine_accuracy", ".4f"),
    ("accuracy drop", "accuracy_drop", "+.4f"),
)


def metric_text(metrics, attribute: str | None, fmt: str) -> str:
    if attribute is None:
        return f"{metrics.nan_count} / {metrics.inf_count}"
    value = getattr(metrics, attribute)
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return format(value, fmt)


def verdict_line(report: ParityReport) -> str:
    if report.passed:
        return f"PASSED: {len(report.checks)} checks on {report.samples} samples"
    failed = "; ".join(c.sentence().removesuffix(" FAILED") for c in report.failures())
    return f"FAILED: {failed}"


def markdown(report: ParityReport) -> str:
    lines = [f"### miaotui parity: {Path(report.engine).name}", "",
             f"**{verdict_line(report)}**", "",
             f"{report.backend} ({report.provider}), {report.precision}, against the PyTorch reference on "
             f"`{report.validation_set}`.", ""]
    header = "| metric | " + " | ".join(m.output for m in report.judged) + " |"
    lines += [header, "|---" * (len(report.judged) + 1) + "|"]
    for label, attribute, fmt in METRIC_ROWS:
        lines.append(f"| {label} | " + " | ".join(metric_text(m, attribute, fmt) for m in report.judged) + " |")
    lines += ["", "| check | value | bar | |", "|---|---|---|---|"]
    for check in report.checks:
        value = "n/a" if check.value is None else f"{check.value:.6g}"
        sign = "<=" if check.kind == "max" else ">="
        lines.append(f"| {check.output} {check.metric} | {value} | {sign} {check.limit:g} | "
                     f"{'ok' if check.passed else '**FAILED**'} |")
    lines += [f"- {warning}" for warning in report.warnings]
    return "\n".join(lines) + "\n"


def junit_xml(report: ParityReport) -> bytes:
    name = Path(report.engine).name
    suite = ET.Element("testsuite", name=f"miaotui parity {name}", tests=str(len(report.checks)),
                       failures=str(len(report.failures())), errors="0", time=f"{report.seconds:.3f}")
    for check in report.checks:
        case = ET.SubElement(suite, "testcase", classname=f"parity.{name}", name=f"{check.output}.{check.metric}")
        if not check.passed:
            failure = ET.SubElement(case, "failure", message=check.sentence(), type="ParityBarMissed")
            failure.text = check.sentence()
    suites = ET.Element("testsuites")
    suites.append(suite)
    return ET.tostring(suites, encoding="utf-8", xml_declaration=True)


def write_reports(report: ParityReport, folder: Path, junit: Path | None = None) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    json_name, markdown_name, junit_name = PARITY_REPORTS
    written = [folder / json_name, folder / markdown_name, junit or folder / junit_name]
    atomic_write_json(written[0], asdict(report) | {"passed": report.passed, "verdict": verdict_line(report)})
    atomic_write_bytes(written[1], markdown(report).encode())
    atomic_write_bytes(written[2], junit_xml(report))
    return written
