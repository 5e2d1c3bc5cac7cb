"""A real Triton Inference Server (the nvidia-pytriton wheel's tritonserver) on a packaged text model,
queried over HTTP and gRPC with tritonclient: answers equal Classifier.predict, bad requests get an
error and the server keeps serving, and the server is always stopped."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from miaotui.cli import main
from miaotui.serving.server import TritonServer, free_port, stub_python

from conftest import error_lines, text_request, triton_server_missing

TEXTS = ["这本书写得很好，推荐", "太差了", "一般般吧，物流还行", "包装破损，不会再买了", "好"]


pytestmark = pytest.mark.skipif(triton_server_missing() is not None,
                                reason=f"no Triton server here: {triton_server_missing()}")


@pytest.fixture(scope="module")
def served(lstm_work: Path, tmp_path_factory):
    """lstm-sentiment's text model in a fresh repository, served on free loopback ports; two instances,
    so that the engines run with the CPUs divided between them (runtime/instances.py)."""
    repository = tmp_path_factory.mktemp("repo")
    result = CliRunner().invoke(main, ["package", str(lstm_work), "--triton", str(repository), "--backend",
                                       "onnxruntime", "--preferred-batch", "4,16", "--instances", "2"])
    assert result.exit_code == 0, result.output
    assert (repository / "lstm-sentiment-text" / "1" / "work" / "tokenizer.json").is_file()  # self-contained
    config = (repository / "lstm-sentiment-text" / "config.pbtxt").read_text()
    assert re.search(r'key: "engine_threads"\s+value \{\s+string_value: "auto"', config), config
    log = tmp_path_factory.mktemp("log") / "tritonserver.log"
    # The text model, and the ensemble's two Python steps (its engine step needs Triton's onnxruntime
    # or TensorRT backend, which this server has not).
    server = TritonServer(repository, ["lstm-sentiment-text", "lstm-sentiment-tokenize", "lstm-sentiment-labels"],
                          http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(), log_path=log)
    with server:
        yield server
        for client in CLIENTS:  # Triton waits for open keep-alive connections before it exits
            client.close()
        CLIENTS.clear()  # gone now, not at interpreter exit (grpc's __del__ fails then)
        import gc

        gc.collect()
    # Stopped gracefully (SIGINT: requests finish, models unload), not killed after the timeout.
    assert server.process.returncode == 0, log.read_text()[-3000:]


CLIENTS: list = []


def _http(server):
    import tritonclient.http as http

    CLIENTS.append(http.InferenceServerClient(server.http_url))
    return CLIENTS[-1]


def test_each_instance_says_what_it_runs(served):
    """Two instances with engine_threads auto: each took its share of the CPUs, and said so in the log."""
    from miaotui.runtime.instances import available_cpus

    threads = max(1, available_cpus() // 2)
    assert served.engines_served() == [
        f"lstm-sentiment-text: lstm-sentiment.onnxruntime.int8.ort on CPUExecutionProvider, {threads} "
        f"thread{'s' if threads > 1 else ''}, parked between calls (x2)"]  # no spinning between calls


def test_http_and_grpc_answer_like_classifier_predict(served, lstm_work: Path):
    import tritonclient.grpc as grpc
    import tritonclient.http as http

    from miaotui.runtime import Classifier

    expected = Classifier.load(lstm_work / "engines" / "lstm-sentiment.onnxruntime.int8.ort").predict(TEXTS)
    over_grpc = grpc.InferenceServerClient(served.grpc_url)
    CLIENTS.append(over_grpc)
    for module, client in ((http, _http(served)), (grpc, over_grpc)):
        answer = client.infer("lstm-sentiment-text", text_request(module, TEXTS))
        labels = [value.decode() for value in answer.as_numpy("label").reshape(-1)]
        scores = answer.as_numpy("score").reshape(-1)
        assert labels == [p.label for p in expected], module.__name__
        np.testing.assert_allclose(scores, [p.score for p in expected], atol=1e-6, rtol=0)
        assert answer.as_numpy("logits").shape == (len(TEXTS), 2)


def test_concurrent_single_text_requests_are_batched_and_each_answered(served, lstm_work: Path):
    """Requests of one text each, sent together: the dynamic batcher hands several to one execute();
    each still gets its own text's answer."""
    from concurrent.futures import ThreadPoolExecutor

    import tritonclient.http as http

    from miaotui.data.corpus import load_split
    from miaotui.runtime import Classifier

    texts = [e.text for e in load_split("test")[:48]]
    expected = [p.label for p in Classifier.load(lstm_work / "engines" / "lstm-sentiment.onnxruntime.int8.ort").predict(texts)]

    def ask(text):
        client = _http(served)
        return client.infer("lstm-sentiment-text", text_request(http, [text])).as_numpy("label")[0, 0].decode()

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(ask, texts)) == expected
    statistics = _http(served).get_inference_statistics("lstm-sentiment-text")["model_stats"][0]
    assert int(statistics["execution_count"]) < int(statistics["inference_count"])  # some executions took several


BAD_REQUESTS = {
    "empty text": (["好书", ""], "text[1] is empty"),
    "100,000 characters": (["好" * 100_000], "has 100000 characters; this model takes at most 10000"),
    "not UTF-8": ([b"\xff\xfe"], "not UTF-8"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_a_bad_request_gets_an_error_and_the_server_keeps_serving(served, case: str):
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    texts, expected = BAD_REQUESTS[case]
    client = _http(served)
    with pytest.raises(InferenceServerException, match=re.escape(expected)):
        client.infer("lstm-sentiment-text", text_request(http, texts))
    assert client.infer("lstm-sentiment-text", text_request(http, ["很好"])).as_numpy("label").shape == (1, 1)


def test_requests_triton_itself_refuses(served):
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    client = _http(served)
    wrong = http.InferInput("text", [1, 1], "INT64")
    wrong.set_data_from_numpy(np.array([[1]], dtype=np.int64))
    with pytest.raises(InferenceServerException, match="data-type is .INT64., but model .lstm-sentiment-text. expects .BYTES."):
        client.infer("lstm-sentiment-text", [wrong])
    with pytest.raises(InferenceServerException, match="(?i)expected 1 inputs but got 0|input"):
        client.infer("lstm-sentiment-text", [])
    too_many = ["好"] * 65  # the engine's batch max is 64
    with pytest.raises(InferenceServerException, match="(?i)batch"):
        client.infer("lstm-sentiment-text", text_request(http, too_many))
    assert client.is_model_ready("lstm-sentiment-text")


def test_serve_command_answers_curl_and_stops_on_sigterm(lstm_work: Path, tmp_path: Path):
    """`miaotui serve WORK_DIR` as a user runs it: endpoints printed once ready, curl gets a label,
    SIGTERM stops it; a taken port is one line, exit 2."""
    import json
    import shutil

    work = tmp_path / "lstm-sentiment"
    shutil.copytree(lstm_work, work)
    ports = [str(free_port()) for _ in range(3)]
    command = [sys.executable, "-m", "miaotui.cli", "serve", str(work), "--http-port", ports[0], "--grpc-port",
               ports[1], "--metrics-port", ports[2]]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        printed = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            printed.append(line)
            if line.startswith("Ctrl-C stops it"):
                break
        engine_lines = [line for line in printed if line.startswith("  engine  ")]
        assert len(engine_lines) == 1 and re.fullmatch(  # one instance: its engine's own pool
            r"  engine  lstm-sentiment-text: lstm-sentiment\.\w+\.int8\.\w+ on .+, the engine's default threads"
            r"(, parked between calls)?\n",
            engine_lines[0]), printed
        curl = next(line for line in printed if line.startswith("try: curl")).removeprefix("try: ").strip()
        answer = json.loads(subprocess.run(curl, shell=True, capture_output=True, text=True, check=True).stdout)
        label = next(o for o in answer["outputs"] if o["name"] == "label")["data"][0]
        assert label in ("negative", "positive")

        taken = subprocess.run([*command[:4], str(work), "--http-port", ports[0]], capture_output=True, text=True)
        assert taken.returncode == 2 and error_lines(taken.stderr) == [
            f"error: --http-port {ports[0]}: 127.0.0.1:{ports[0]} is taken"]
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert process.returncode == 0 and "stopped" in process.stdout.read()


def test_model_that_fails_to_load_is_one_line_with_the_servers_reason(lstm_work: Path, tmp_path: Path):
    repository = tmp_path / "repo"
    result = CliRunner().invoke(main, ["package", str(lstm_work), "--triton", str(repository), "--backend", "onnxruntime"])
    assert result.exit_code == 0, result.output
    engine = next((repository / "lstm-sentiment-text" / "1" / "work" / "engines").glob("*.ort"))
    engine.write_bytes(b"not an engine")  # the runtime refuses it: its sha256 is not the sidecar's
    ports = [str(free_port()) for _ in range(3)]
    served = subprocess.run([sys.executable, "-m", "miaotui.cli", "serve", str(repository), "--http-port", ports[0],
                             "--grpc-port", ports[1], "--metrics-port", ports[2]], capture_output=True, text=True,
                            timeout=180, env=dict(os.environ, COLUMNS="300"))
    assert served.returncode == 1, served.stderr
    (line,) = error_lines(served.stderr)
    assert line.startswith("error: tritonserver exited") and "sha256" in line, line
    assert "At:" not in line and "\\n" not in line and "model.py" not in line, line  # not the backend's traceback


def test_a_stub_python_without_the_engines_library_is_one_line_before_the_server_starts(lstm_work: Path,
                                                                                        tmp_path: Path):
    """The text model runs its engine in the stub's python: one that cannot import onnxruntime (here the
    stub's own, isolated from its site-packages) is named with the fix, exit 2, no server started."""
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\nexec {stub_python()} -I -S \"$@\"\n")
    python.chmod(0o755)
    work = tmp_path / "lstm-sentiment"
    shutil.copytree(lstm_work, work)
    served = subprocess.run([sys.executable, "-m", "miaotui.cli", "serve", str(work), "--http-port", str(free_port())],
                            capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, MIAOTUI_TRITON_PYTHON=str(python), COLUMNS="300"))
    assert served.returncode == 2, served.stderr
    (line,) = error_lines(served.stderr)
    assert re.fullmatch(rf"error: {re.escape(str(python))}: no (onnxruntime|openvino) there, which lstm-sentiment-text's "
                        rf"engine lstm-sentiment\.\1\.int8\.\w+ needs \(.*\): {re.escape(str(python))} -m pip install \1",
                        line), line


def test_ensemble_steps_tokenize_and_label_like_the_runtime(served, lstm_work: Path):
    """The GPU form's two Python steps on the real server: token ids as miaotui's tokenizer gives
    them, labels and scores as softmax/argmax of the logits; and the ensemble's wiring checked
    against each step's own config (names, dtypes) with Triton's schema."""
    import tritonclient.http as http

    from miaotui.data.tokenizers import configure, encode, load_tokenizer
    from miaotui.serving.model_config import parse
    from miaotui.runtime.classifier import softmax

    client = _http(served)
    for text in ("好", "这本书写得很好，推荐"):
        ids = client.infer("lstm-sentiment-tokenize", text_request(http, [text])).as_numpy("input_ids")
        tokenizer = configure(load_tokenizer(served.repository / "lstm-sentiment-tokenize" / "1" / "tokenizer.json"), 256)
        expected = encode(tokenizer, [text], names=["input_ids"])["input_ids"]
        np.testing.assert_array_equal(ids, expected)
    logits = np.array([[2.0, -1.0], [-0.5, 0.25]], dtype=np.float32)
    tensor = http.InferInput("logits", [2, 2], "FP32")
    tensor.set_data_from_numpy(logits)
    answer = client.infer("lstm-sentiment-labels", [tensor])
    assert [v.decode() for v in answer.as_numpy("label").reshape(-1)] == ["negative", "positive"]
    np.testing.assert_allclose(answer.as_numpy("score").reshape(-1), softmax(logits.astype(np.float64)).max(axis=1),
                               atol=1e-6)

    configs = {entry.name: parse((entry / "config.pbtxt").read_text(), entry.name)
               for entry in served.repository.iterdir() if (entry / "config.pbtxt").is_file()}
    ensemble = configs["lstm-sentiment-ensemble"]
    types = {t.name: t.data_type for t in ensemble.input}
    for step in ensemble.ensemble_scheduling.step:
        model = configs[step.model_name]
        inputs = {t.name: t.data_type for t in model.input}
        outputs = {t.name: t.data_type for t in model.output}
        for own, tensor in step.input_map.items():
            assert types[tensor] == inputs[own], (step.model_name, own)
        for own, tensor in step.output_map.items():
            types[tensor] = outputs[own]
    assert {t.name: t.data_type for t in ensemble.output} == {name: types[name] for name in ("label", "score", "logits")}


def test_a_missing_python_for_the_backend_is_one_line_naming_the_fix(lstm_work: Path, tmp_path: Path):
    missing = tmp_path / "nowhere" / "python"
    result = subprocess.run([sys.executable, "-m", "miaotui.cli", "serve", str(lstm_work), "--http-port",
                             str(free_port())], capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, MIAOTUI_TRITON_PYTHON=str(missing)))
    assert result.returncode == 2
    (line,) = error_lines(result.stderr)
    assert line.startswith(f"error: {missing}: missing; the Triton Python backend needs a Python with numpy<2")
    assert "make setup" in line
