"""The served text model under load: N concurrent clients, one text per request, against the
in-process Classifier.predict loop of one text at a time.

    python benchmarks/serve.py [--model minilm-sentiment] [--clients 1,8,32] [--seconds 60]
                               [--instances N --engine-threads auto|default|N] [--backend openvino]
                               [--beside lstm-sentiment --beside-clients 8]

Packages the work dir's INT8 onnxruntime engine (or --backend's) as a text model (build/<model> must
hold it: `miaotui run MODEL --backend onnxruntime`), starts a real Triton server (miaotui.serving.server) on
free loopback ports, and for each client count runs that many threads, each with its own
tritonclient HTTP client sending one random test-split text per request for --seconds. Reported:
requests per second, p50/p99 latency, errors, and the resident memory of the server and its Python
backend stub (after a warm-up, and at the end: growth must stay under 64 MiB). Then the same texts
through Classifier.predict one at a time, in this process, for --seconds. Writes
benchmarks/results/<model>/serve[.instancesN.THREADS][.BACKEND].{json,md}.

--beside serves a second work dir's text model in the same server (same options), loaded by
--beside-clients clients of its own during every row (0: loaded, never asked): two classifiers on
one machine, each engine sizing its pool by --engine-threads. Its texts/s is reported beside each row;
the in-process loop is skipped; results go to serve.beside-MODEL-N[...].{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def resident_mib(pid: int) -> float:
    """VmRSS of `pid` and every process below it (the server and its Python backend stubs)."""
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            total += next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(child) for child in (task / "children").read_text().split()]
        except (OSError, StopIteration):
            continue
    return total / 1024


def load(server, model: str, texts: list[str], clients: int, seconds: float) -> dict:
    import tritonclient.http as http

    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def client_loop(seed: int) -> None:
        client = http.InferenceServerClient(server.http_url, network_timeout=60)
        rng = random.Random(seed)
        mine, failed = [], []
        while time.perf_counter() < stop_at:
            value = np.array([[rng.choice(texts).encode("utf-8")]], dtype=np.object_)
            tensor = http.InferInput("text", [1, 1], "BYTES")
            tensor.set_data_from_numpy(value)
            started = time.perf_counter()
            try:
                client.infer(model, [tensor])
                mine.append(time.perf_counter() - started)
            except Exception as error:  # counted, not raised: the figure is the error count
                failed.append(str(error).splitlines()[0])
        with lock:
            latencies.extend(mine)
            errors.extend(failed)

    threads = [threading.Thread(target=client_loop, args=(seed,)) for seed in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    values = np.asarray(latencies) * 1000
    return {"clients": clients, "seconds": round(elapsed, 1), "requests": len(latencies),
            "texts_per_s": round(len(latencies) / elapsed, 1),
            "p50_ms": round(float(np.percentile(values, 50)), 2) if len(values) else None,
            "p99_ms": round(float(np.percentile(values, 99)), 2) if len(values) else None,
            "errors": len(errors), "first_error": errors[0] if errors else None}


def in_process(engine: Path, texts: list[str], seconds: float) -> dict:
    from miaotui.runtime import Classifier

    classifier = Classifier.load(engine)
    rng = random.Random(0)
    latencies = []
    stop_at = time.perf_counter() + seconds
    started = time.perf_counter()
    while time.perf_counter() < stop_at:
        before = time.perf_counter()
        classifier.predict([rng.choice(texts)])
        latencies.append(time.perf_counter() - before)
    elapsed = time.perf_counter() - started
    values = np.asarray(latencies) * 1000
    return {"clients": "in-process loop", "seconds": round(elapsed, 1), "requests": len(latencies),
            "texts_per_s": round(len(latencies) / elapsed, 1), "p50_ms": round(float(np.percentile(values, 50)), 2),
            "p99_ms": round(float(np.percentile(values, 99)), 2), "errors": 0, "first_error": None}


def cpu_flags() -> list[str]:
    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), [])
    return [f for f in ("avx2", "avx512f", "avx512_vnni", "amx_int8") if f in flags]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm-sentiment")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds of 8 clients before memory is read")
    parser.add_argument("--instances", type=int, default=1, help="text-model instances (processes) in the server")
    parser.add_argument("--engine-threads", default="auto", help="threads per instance: auto, default or N")
    parser.add_argument("--backend", default="onnxruntime", help="which of the work dir's INT8 engines to serve")
    parser.add_argument("--beside", help="another model's text model in the same server (build/<beside>)")
    parser.add_argument("--beside-clients", type=int, default=0, help="clients loading it during each row")
    args = parser.parse_args()

    from miaotui.data.corpus import load_split
    from miaotui.serving.server import TritonServer, free_port
    from miaotui.serving.text_model import package_text_model
    from miaotui.serving.triton import TritonOptions

    work = REPO / "build" / args.model
    texts = [e.text for e in load_split("test")]
    with tempfile.TemporaryDirectory(prefix="miaotui-serve-bench-") as folder:
        options = TritonOptions(instances=args.instances, engine_threads=args.engine_threads)
        text_model = package_text_model(work, Path(folder), options, backend=args.backend, precision="int8")
        beside = (package_text_model(REPO / "build" / args.beside, Path(folder), options, backend=args.backend,
                                     precision="int8") if args.beside else None)
        server = TritonServer(Path(folder), [text_model.name] + ([beside.name] if beside else []),
                              http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())
        rows = []
        with server:
            warm = load(server, text_model.name, texts, 8, args.warmup)
            memory_after_warmup = resident_mib(server.process.pid)
            for clients in [int(c) for c in args.clients.split(",")]:
                if beside and args.beside_clients:
                    other: dict = {}
                    thread = threading.Thread(target=lambda: other.update(
                        load(server, beside.name, texts, args.beside_clients, args.seconds)))
                    thread.start()
                rows.append(load(server, text_model.name, texts, clients, args.seconds))
                if beside and args.beside_clients:
                    thread.join()
                    rows[-1]["beside_texts_per_s"] = other["texts_per_s"]
                    rows[-1]["beside_errors"] = other["errors"]
                print(json.dumps(rows[-1]), flush=True)
            memory_at_end = resident_mib(server.process.pid)
            engines_served = server.engines_served()
        if not beside:
            rows.append(in_process(text_model.engine, texts, args.seconds))
            print(json.dumps(rows[-1]), flush=True)
    record = {"model": args.model, "engine": text_model.engine.name, "warmup": warm,
              "resident_mib": {"after_warmup": round(memory_after_warmup, 1), "at_end": round(memory_at_end, 1),
                               "growth": round(memory_at_end - memory_after_warmup, 1)},
              "rows": rows, "cpu": platform.processor() or platform.machine(), "instruction_sets": cpu_flags(),
              "cores": __import__("os").cpu_count(),
              "instances": args.instances, "engine_threads": args.engine_threads, "engines_served": engines_served,
              "beside": {"model": args.beside, "engine": beside.engine.name, "clients": args.beside_clients}
              if beside else None,
              "command": f"python benchmarks/serve.py --model {args.model} --clients {args.clients} "
                         f"--seconds {args.seconds:g}" + (f" --instances {args.instances} --engine-threads "
                                                          f"{args.engine_threads}" if args.instances > 1 else "")
                         + (f" --backend {args.backend}" if args.backend != "onnxruntime" else "")
                         + (f" --beside {args.beside} --beside-clients {args.beside_clients}" if beside else "")}
    target = REPO / "benchmarks" / "results" / args.model
    target.mkdir(parents=True, exist_ok=True)
    stem = "serve" if args.instances == 1 else f"serve.instances{args.instances}.{args.engine_threads}"
    stem += f".{args.backend}" if args.backend != "onnxruntime" else ""
    if beside:
        stem += f".beside-{args.beside}-{args.beside_clients}" + (
            f".threads-{args.engine_threads}" if args.instances == 1 and args.engine_threads != "auto" else "")
    (target / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"# {args.model} served by Triton (text model, {text_model.engine.name}, {args.instances} instance(s), "
             f"engine threads {args.engine_threads})", "",
             f"`{record['command']}`; {record['cores']} cores, CPU flags {', '.join(record['instruction_sets'])}; "
             f"server resident memory {record['resident_mib']['after_warmup']} MiB after warm-up, "
             f"{record['resident_mib']['at_end']} MiB at the end (growth {record['resident_mib']['growth']} MiB)", "",
             "Engines: " + "; ".join(engines_served), ""]
    if beside:
        lines[-2:-2] = [f"Beside it in the same server: {args.beside} ({beside.engine.name}), "
                        f"{args.beside_clients} clients of its own during each row.", ""]
    extra = " beside texts/s |" if beside and args.beside_clients else ""
    lines += [f"| clients | texts/s | p50 ms | p99 ms | requests | errors |{extra}",
              "|---|---|---|---|---|---|" + ("---|" if extra else "")]
    lines += [f"| {r['clients']} | {r['texts_per_s']} | {r['p50_ms']} | {r['p99_ms']} | {r['requests']} | {r['errors']} |"
              + (f" {r['beside_texts_per_s']} |" if extra else "") for r in rows]
    (target / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
