"""A real Triton Inference Server process on a model repository: found, started, waited for, stopped.

The server binary comes from the PyPI wheel nvidia-pytriton (tritonserver 2.51 with its Python
backend; it runs on a CPU). Only the binary is used: PyTriton's own Python package pins numpy<2,
so the wheel is installed with --no-deps and never imported. The Python backend wants its stub for
this Python version inside the backend folder, so a backend folder of links is laid out in a
temporary directory for each server.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from miaotui.errors import InputError, MiaotuiError

INSTALL_HINT = "pip install --no-deps nvidia-pytriton==0.7.0"
READY_TIMEOUT_S = 120.0
ENGINE_LOG_PREFIX = "miaotui: "  # how a text-model instance's log line about its engine begins (python_model.py)
EXIT_TIMEOUT_S = 20  # after SIGINT, Triton waits this long for requests in flight and open connections
STOP_TIMEOUT_S = 40.0  # and is killed if it has not exited by then


@dataclass(frozen=True)
class ServerFiles:
    binary: Path
    libraries: Path  # the wheel's bundled shared libraries (LD_LIBRARY_PATH)
    python_backend: Path  # libtriton_python.so and triton_python_backend_utils.py
    stub: Path  # triton_python_backend_stub for this Python version


def server_files() -> ServerFiles:
    """Where the wheel put the server, or InputError naming what to install."""
    spec = importlib.util.find_spec("pytriton")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"miaotui serve needs the Triton server binary from the nvidia-pytriton wheel: {INSTALL_HINT}")
    root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    files = ServerFiles(root / "bin" / "tritonserver", root.parent.parent / "nvidia_pytriton.libs",
                        root / "backends" / "python", root / "python_backend_stubs" / version / "triton_python_backend_stub")
    for path in (files.binary, files.python_backend, files.stub):
        if not path.exists():
            raise InputError(f"{path}: missing from the nvidia-pytriton wheel (Python {version} needs its stub); "
                             f"reinstall it: {INSTALL_HINT}")
    return files


STUB_ENV = "triton-python"  # beside the Python running miaotui: sys.prefix / STUB_ENV, made by `make setup`


def stub_python() -> Path:
    """The python for the Python backend's stub. The wheel's stub was built against numpy 1.x and
    reads numpy 2 arrays with the wrong item size (a BYTES input arrives as its first byte repeated),
    so it runs in a small environment of its own: numpy<2, onnxruntime, openvino, tokenizers, miaotui without
    dependencies (the runtime needs no more); MIAOTUI_TRITON_PYTHON names another."""
    named = os.environ.get("MIAOTUI_TRITON_PYTHON")
    candidate = Path(named) if named else Path(sys.prefix) / STUB_ENV / "bin" / "python"
    if not candidate.is_file():
        raise InputError(f"{candidate}: missing; the Triton Python backend needs a Python with numpy<2 and miaotui's "
                         f"runtime: `make setup` makes it, or: python -m venv {Path(sys.prefix) / STUB_ENV} && "
                         f"{Path(sys.prefix) / STUB_ENV / 'bin' / 'pip'} install 'numpy<2' onnxruntime openvino tokenizers && "
                         f"{Path(sys.prefix) / STUB_ENV / 'bin' / 'pip'} install --no-deps miaotui")
    return candidate


def check_stub_runs_engines(repository: Path, models: list[str], python: Path) -> None:
    """Each text model runs its engine in the stub's Python: the library that engine needs (openvino,
    onnxruntime) must import there. Said before the server starts, in one line, rather than as the
    Python backend's traceback once the model fails to load."""
    import json

    from miaotui.engines.backend import get_backend

    needs: dict[str, tuple[str, str]] = {}  # module -> (model, engine file)
    for model in models:
        for sidecar in sorted((repository / model).glob("*/work/engines/*.json")):
            try:
                backend = json.loads(sidecar.read_text(encoding="utf-8")).get("backend")
                module = get_backend(backend).runtime_module
            except (OSError, ValueError, AttributeError, InputError):
                continue  # the runtime itself refuses a broken sidecar, naming it, when the model loads
            if module:
                needs.setdefault(module, (model, sidecar.name.removesuffix(".json")))
    if not needs:
        return
    probe = "import importlib.util, sys; print(' '.join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))"
    try:
        answer = subprocess.run([str(python), "-c", probe, *needs], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise InputError(f"{python}: cannot run it ({error}); the Triton Python backend runs the text models there") from None
    if answer.returncode != 0:
        said = (answer.stderr.strip().splitlines() or [f"exit status {answer.returncode}"])[-1]
        raise InputError(f"{python}: cannot run it ({said}); the Triton Python backend runs the text models there")
    missing = answer.stdout.split()
    if missing:
        model, engine = needs[missing[0]]
        raise InputError(f"{python}: no {missing[0]} there, which {model}'s engine {engine} needs (the Triton Python "
                         f"backend runs it with this python): {python} -m pip install {missing[0]}")


def check_port_free(host: str, port: int, what: str) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as error:
            reason = "is taken" if error.errno == errno.EADDRINUSE else f"cannot be bound ({error.strerror})"
            raise InputError(f"--{what}-port {port}: {host}:{port} {reason}") from None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


@dataclass
class TritonServer:
    """`with TritonServer(repo, ["m-text"]) as server:` starts tritonserver, returns once every model
    is ready, and stops it (SIGINT: in-flight requests finish) when the block ends."""

    repository: Path
    models: list[str]
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    log_path: Path | None = None  # the server's own log (default: in its temporary folder)
    python: Path | None = None  # the python the Python backend's stub runs (default: stub_python())
    process: subprocess.Popen | None = field(default=None, init=False)
    _folder: Path | None = field(default=None, init=False)

    @property
    def http_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.grpc_port}"

    def start(self) -> "TritonServer":
        files = server_files()
        if not self.repository.is_dir():
            raise InputError(f"{self.repository}: no such model repository")
        for model in self.models:
            if not (self.repository / model / "config.pbtxt").is_file():
                raise InputError(f"{self.repository / model}: no config.pbtxt; package the model first")
        for what, port in (("http", self.http_port), ("grpc", self.grpc_port), ("metrics", self.metrics_port)):
            check_port_free(self.host, port, what)
        check_stub_runs_engines(self.repository, self.models, self.python or stub_python())
        self._folder = Path(tempfile.mkdtemp(prefix="miaotui-triton-"))
        backends = self._folder / "backends" / "python"
        backends.mkdir(parents=True)
        for source in (*files.python_backend.iterdir(), files.stub):
            if source.is_file():
                (backends / source.name).symlink_to(source)
        log = self.log_path or self._folder / "tritonserver.log"
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(files.libraries), env.get("LD_LIBRARY_PATH")]))
        # The Python backend's stub runs the python first on PATH (one with numpy 1.x and miaotui's runtime).
        env["PATH"] = os.pathsep.join([str((self.python or stub_python()).parent), env.get("PATH", "")])
        command = [str(files.binary), f"--model-repository={self.repository.resolve()}",
                   f"--backend-directory={backends.parent}", "--model-control-mode=explicit",
                   *[f"--load-model={model}" for model in self.models], "--exit-on-error=true",
                   "--strict-readiness=true", f"--exit-timeout-secs={EXIT_TIMEOUT_S}", f"--http-address={self.host}", f"--http-port={self.http_port}",
                   f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}", f"--metrics-address={self.host}",
                   f"--metrics-port={self.metrics_port}", "--allow-gpu-metrics=false", "--allow-cpu-metrics=true"]
        with open(log, "wb") as stream:
            self.process = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)  # Ctrl-C reaches miaotui, which stops it
        self.log = log
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise MiaotuiError(f"tritonserver exited ({self.process.returncode}) before the model was ready: "
                                   f"{self.failure_reason()}")
            if all(self._ready(model) for model in self.models):
                return
            time.sleep(0.2)
        raise MiaotuiError(f"tritonserver: {', '.join(self.models)} not ready after {READY_TIMEOUT_S:.0f} s: "
                           f"{self.failure_reason()}")

    def _ready(self, model: str) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/models/{model}/ready", timeout=2) as answer:
                return answer.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def engines_served(self) -> list[str]:
        """What each text-model instance said it runs (serving/python_model.py logs it when it loads):
        "NAME-text: ENGINE on PROVIDER, ...", one entry per distinct line, "(xN)" for N instances."""
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return []
        said = [line.split(f'"{ENGINE_LOG_PREFIX}', 1)[1].rstrip().removesuffix('"') for line in lines
                if f'"{ENGINE_LOG_PREFIX}' in line]
        return [line + (f" (x{count})" if count > 1 else "") for line, count in Counter(said).items()]

    def failure_reason(self) -> str:
        """The server's own reason, from its log: the first error line (a model that failed to load)."""
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return "no log"
        errors = [line for line in lines if line.startswith("E") and "]" in line]
        wanted = [line for line in errors if "failed to load" in line or "Poll failed" in line] or errors
        if not wanted:
            return (lines[-1] if lines else "no output") + f" (log: {self.log})"
        reason = wanted[0].split("]", 1)[1].strip()
        # The Python backend appends the model's traceback ("\n\nAt:\n  file(line): function...", escaped):
        # the error's own sentence is the reason, the log keeps the rest.
        reason = reason.split("\\n", 1)[0].rstrip()
        if reason.startswith('"') and not reason.endswith('"'):
            reason += '"'
        return reason + f" (log: {self.log})"

    def stop(self) -> None:
        """SIGINT (Triton finishes what is in flight, then waits at most EXIT_TIMEOUT_S for clients to
        close their connections), then SIGKILL after STOP_TIMEOUT_S."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        # The temporary folder goes, unless it holds the log of a server that failed.
        failed = self.process is not None and self.process.returncode not in (0, -signal.SIGINT, None)
        if self._folder is not None and not (failed and self.log_path is None):
            shutil.rmtree(self._folder, ignore_errors=True)

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
