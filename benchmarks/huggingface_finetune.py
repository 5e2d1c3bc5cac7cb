"""A trained Hugging Face checkpoint through miaotui: does the INT8 engine answer like the checkpoint?

    python benchmarks/huggingface_finetune.py [--minutes 6] [--threads 2] [--out build/hf-minilm]

Random-weight checkpoints (tests/test_huggingface.py) prove the plumbing; agreement needs a trained
model. This fine-tunes a transformers BertForSequenceClassification (BERT's own [CLS] pooler and
head) on the corpus's train split for a fixed time, starting from the built-in minilm-sentiment
encoder: all-MiniLM-L6-v2 with the corpus's characters added to its vocabulary (MiniLM's own
vocabulary turns 62% of the corpus's tokens into [UNK]; nothing is downloaded). It saves it with
save_pretrained, writes the corpus splits as CSV files, and then
does what a user does: `miaotui init FOLDER --calibration calibration.csv --validation
validation.csv`, `miaotui run CONFIG --backend onnxruntime`. Reported: the checkpoint's own accuracy,
the INT8 engine's top-1 agreement with the checkpoint (transformers, FP32) on the validation split
(the gate's figure) and on the test split (through Classifier.predict: texts in, labels out), and
the machine's instruction sets. Writes benchmarks/results/hf-minilm/finetune.{json,md}.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_LENGTH = 128
CONFIG_FILE = "hf-minilm.toml"  # the `miaotui init` config in --out (pooled_rows.py reads it too)


def fine_tune(folder: Path, minutes: float, threads: int) -> dict:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from miaotui.data.corpus import LABELS, load_split
    from miaotui.data.tokenizers import encode, load_tokenizer, vocab_size
    from miaotui.models import minilm_sentiment

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    vocabulary = minilm_sentiment.HERE / "tokenizer.json"
    config = BertConfig.from_pretrained(minilm_sentiment.base_dir(), vocab_size=vocab_size(vocabulary),
                                        num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
                                        label2id={label: i for i, label in enumerate(LABELS)})
    model = BertForSequenceClassification(config)
    encoder = {k: v for k, v in minilm_sentiment.build().state_dict().items() if k in model.bert.state_dict()}
    missing, _ = model.bert.load_state_dict(encoder, strict=False)
    assert all(name.startswith("pooler.") for name in missing), missing  # only BERT's pooler starts afresh
    tokenizer = load_tokenizer(vocabulary, MAX_LENGTH)
    train = list(load_split("train"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01)
    generator = torch.Generator().manual_seed(0)
    started, steps, seen = time.perf_counter(), 0, 0
    model.train()
    while time.perf_counter() - started < minutes * 60:
        for index in torch.randperm(len(train), generator=generator).split(32):
            batch = [train[i] for i in index.tolist()]
            feed = {k: torch.from_numpy(v) for k, v in encode(tokenizer, [e.text for e in batch]).items()}
            loss = model(**feed, labels=torch.tensor([e.label for e in batch])).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            steps, seen = steps + 1, seen + len(batch)
            if time.perf_counter() - started >= minutes * 60:
                break
    model.eval()
    model.save_pretrained(folder)
    shutil.copy(vocabulary, folder / "tokenizer.json")
    return {"steps": steps, "texts_seen": seen, "epochs": round(seen / len(train), 2),
            "seconds": round(time.perf_counter() - started, 1)}


def checkpoint_predictions(folder: Path, texts: list[str], max_length: int):
    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification

    from miaotui.data.tokenizers import encode, load_tokenizer

    model = AutoModelForSequenceClassification.from_pretrained(folder, attn_implementation="eager").eval()
    tokenizer = load_tokenizer(folder / "tokenizer.json", max_length)  # as long as the engine reads
    predicted = []
    with torch.inference_mode():
        for start in range(0, len(texts), 64):
            feed = {k: torch.from_numpy(v) for k, v in encode(tokenizer, texts[start:start + 64]).items()}
            predicted.append(model(**feed).logits.argmax(-1).numpy())
    return np.concatenate(predicted)


def write_csv(path: Path, split: str) -> list:
    from miaotui.data.corpus import LABELS, load_split

    examples = list(load_split(split))
    with path.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["text", "label"])
        writer.writerows([e.text, LABELS[e.label]] for e in examples)
    return examples


def init_config(out: Path, name: str) -> Path:
    """<out>/CONFIG_FILE as a user makes it: `miaotui init` on <out>/checkpoint with <out>'s calibration and
    validation CSVs, the work dir named `name`."""
    config = out / CONFIG_FILE
    subprocess.run([sys.executable, "-m", "miaotui.cli", "init", str(out / "checkpoint"), "-o", str(config), "--force",
                    "--calibration", str(out / "calibration.csv"), "--validation", str(out / "validation.csv")], check=True)
    config.write_text(config.read_text().replace('name = "checkpoint"', f'name = "{name}"'))
    return config


def stage_seconds(work: Path, parity: dict) -> dict[str, float]:
    """Seconds of each stage the run recorded (manifest.json) and of the parity gate itself: where a
    change to the data path shows (the reference, quantize's agreement and the gate read the validation
    set whole)."""
    manifest = json.loads((work / "manifest.json").read_text())
    seconds = {name: stage.get("seconds") for name, stage in manifest.get("stages", {}).items()}
    seconds["gate"] = parity.get("seconds")
    seconds["gate engine calls"] = parity.get("engine_seconds")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=6.0, help="fine-tuning time")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "build" / "hf-minilm")
    parser.add_argument("--reuse", action="store_true", help="keep the checkpoint an earlier run trained")
    args = parser.parse_args()
    out = args.out.resolve()
    checkpoint = out / "checkpoint"
    out.mkdir(parents=True, exist_ok=True)
    if args.reuse and (out / "training.json").is_file():
        training = json.loads((out / "training.json").read_text())
    else:
        training = fine_tune(checkpoint, args.minutes, args.threads)
        (out / "training.json").write_text(json.dumps(training))

    splits = {split: write_csv(out / f"{split}.csv", split) for split in ("calibration", "validation", "test")}
    config = init_config(out, "hf-minilm")
    miaotui = [sys.executable, "-m", "miaotui.cli"]
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)  # a whole run each time: run_seconds and the stage times compare
    started = time.perf_counter()
    run = subprocess.run([*miaotui, "run", str(config), "--out", str(work), "--backend", "onnxruntime"],
                         capture_output=True, text=True)
    run_seconds = time.perf_counter() - started
    print(run.stdout[-4000:])
    parity = json.loads((work / "reports" / "hf-minilm.onnxruntime.int8" / "parity.json").read_text())

    from miaotui.engines.onnxruntime_backend import cpu_description
    from miaotui.runtime import Classifier

    cpu = cpu_description()

    classifier = Classifier.load(work, backend="onnxruntime", precision="int8", threads=args.threads)
    results = {}
    for split in ("validation", "test"):
        texts = [e.text for e in splits[split]]
        labels = [e.label for e in splits[split]]
        reference = checkpoint_predictions(checkpoint, texts, classifier.tokenizer.truncation["max_length"])
        engine = [p.index for p in classifier.predict(texts)]
        results[split] = {
            "texts": len(texts),
            "checkpoint_accuracy": round(float((reference == labels).mean()), 4),
            "engine_accuracy": round(sum(int(a == b) for a, b in zip(engine, labels)) / len(texts), 4),
            "top1_agreement": round(sum(int(a == b) for a, b in zip(engine, reference)) / len(texts), 4),
        }
    record = {"model": "BertForSequenceClassification from the minilm-sentiment encoder, fine-tuned",
              "training": training,
              "run_exit_status": run.returncode, "run_seconds": round(run_seconds, 1),
              "stage_seconds": stage_seconds(work, parity),
              "gate_passed": parity.get("passed"), "splits": results, "cpu": cpu["cpu"],
              "instruction_sets": cpu["isa"], "threads": args.threads,
              "command": f"python benchmarks/huggingface_finetune.py --minutes {args.minutes} --threads {args.threads}"}
    target = REPO / "benchmarks" / "results" / "hf-minilm"
    target.mkdir(parents=True, exist_ok=True)
    (target / "finetune.json").write_text(json.dumps(record, indent=2) + "\n")
    rows = "\n".join(f"| {split} | {r['texts']} | {r['checkpoint_accuracy']:.4f} | {r['engine_accuracy']:.4f} | "
                     f"{r['top1_agreement']:.4f} |" for split, r in results.items())
    (target / "finetune.md").write_text(
        f"# A fine-tuned Hugging Face checkpoint through miaotui\n\n`{record['command']}`; "
        f"{training['epochs']} epochs in {training['seconds']} s; `miaotui run` exit {run.returncode} "
        f"in {record['run_seconds']} s ({', '.join(f'{k} {v} s' for k, v in record['stage_seconds'].items())}); "
        f"{record['cpu']}, {', '.join(record['instruction_sets'])}\n\n"
        "| split | texts | checkpoint accuracy | INT8 engine accuracy | INT8 top-1 agreement |\n"
        "|---|---|---|---|---|\n" + rows + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
