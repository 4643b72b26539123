"""Packed tokens per second that the data pipeline delivers, and how readers share a source.

Part ``throughput``: configurations run interleaved (round-robin, ``--rounds`` times) so that
a change in the machine's other load hits all of them alike:

- pre-tokenized shards (``jaxcpt tokenize`` format),
- tokenizing on the fly with sentencepiece,
- tokenizing on the fly with a Hugging Face fast tokenizer (converted from the same model),

each with 0 (in-process), 1 and 2 Grain workers. Each measurement warms up (worker start,
first rows), then times ``--seconds`` of batches (seq_len 2048, per-host batch 8) and counts
non-padding tokens. The CPU used meanwhile by other processes (from /proc/stat minus this
process tree) and the load average are recorded with each measurement.

Part ``sharding``: 4 JSONL files (plain, and the same as .zst) read by 8 and 16 simulated
readers (``process_index`` / ``process_count``, one after the other in this process), each
reading its whole share once through the full pipeline. Per reader it records the records
scanned (read from the files, kept or not), the seconds spent inside reading (decompressing,
cutting records) and in total, and the tokens delivered. ``--baseline DIR`` measures another
checkout of jaxcpt (e.g. main before the split) the same way, interleaved, each measurement in
a fresh process with that checkout first on PYTHONPATH.

Part ``elastic``: the random-access path of ``data.elastic`` (``jaxcpt.data.indexed``): the
same tokens as ``.npy`` shards and as ArrayRecord shards, read by 1, 2 and 8 simulated readers
(hosts; each reader's share timed in turn in this process): packed tokens per second per reader.

Part ``beam``: documents per second of ``jaxcpt tokenize --engine beam`` (direct runner, 2
worker processes) against ``jaxcpt tokenize --workers 2`` on the same corpus, each a fresh
process, interleaved. Beam runs with ``--beam-python`` (an environment with jaxcpt[data];
docs/data.md says why it is separate).

    python benchmarks/data_throughput.py                       # throughput and sharding
    python benchmarks/data_throughput.py --parts elastic,beam --beam-python /opt/jaxcpt-data/bin/python
    python benchmarks/data_throughput.py --parts sharding --baseline /tmp/main_checkout

Writes benchmarks/results/data_throughput.json (a part not run keeps its previous results).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

SEQ_LEN, BATCH = 2048, 8


def _jiffies_total() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def _tree_jiffies(root: int) -> int:
    """utime + stime of ``root`` and all its live descendants (Grain workers are children)."""
    parents, times = {}, {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(name)] = int(fields[1])
        times[int(name)] = int(fields[11]) + int(fields[12])
    total = 0
    for pid in times:
        p = pid
        while p in parents and p != root and p > 1:
            p = parents[p]
        if p == root:
            total += times[pid]
    return total


def machine_info() -> dict:
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
    }


def make_corpus(root: str, num_docs: int, seed: int = 0) -> list[str]:
    """Pseudo-English documents: a Zipf-distributed synthetic lexicon, sentences, ~2k characters each."""
    rng = random.Random(seed)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    weights = [
        12,
        9,
        8,
        7.5,
        7,
        6.7,
        6.3,
        6,
        5.9,
        4.3,
        4,
        2.8,
        2.8,
        2.4,
        2.4,
        2.2,
        2,
        2,
        1.9,
        1.5,
        1,
        0.8,
        0.2,
        0.2,
        0.1,
        0.1,
    ]
    lexicon = ["".join(rng.choices(letters, weights, k=rng.randint(2, 10))) for _ in range(20000)]
    zipf = [1 / (i + 1) for i in range(len(lexicon))]
    docs = []
    for _ in range(num_docs):
        n_words = max(20, int(rng.lognormvariate(5.8, 0.7)))  # median ~330 words, ~2k characters
        words = rng.choices(lexicon, zipf, k=n_words)
        sentences, i = [], 0
        while i < len(words):
            k = rng.randint(5, 25)
            sentences.append(" ".join(words[i : i + k]).capitalize() + rng.choice([".", ".", ".", "?", "!", ","]))
            i += k
        docs.append(" ".join(sentences))
    with open(os.path.join(root, "corpus.jsonl"), "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    return docs


def make_tokenizers(root: str, docs: list[str]) -> tuple[str, str]:
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    with open(os.path.join(root, "train.txt"), "w") as f:
        f.write("\n".join(docs[:3000]))
    spm.SentencePieceTrainer.train(
        input=os.path.join(root, "train.txt"),
        model_prefix=os.path.join(root, "sp"),
        vocab_size=8000,
        model_type="bpe",
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        byte_fallback=True,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
        minloglevel=2,
        input_sentence_size=3000,
        shuffle_input_sentence=False,
    )
    sp_path = os.path.join(root, "sp.model")
    hf_src = os.path.join(root, "hf_src")
    os.makedirs(hf_src)
    shutil.copy(sp_path, os.path.join(hf_src, "tokenizer.model"))
    hf_path = os.path.join(root, "hf")
    LlamaTokenizer.from_pretrained(hf_src).save_pretrained(hf_path)
    return sp_path, hf_path


def measure(cfg, seconds: float) -> dict:
    from jaxcpt.data.pipeline import build_train_iterator

    it = build_train_iterator(cfg, batch_size=BATCH, seq_len=SEQ_LEN, process_index=0, process_count=1)
    try:
        started = time.perf_counter()
        for _ in range(3):  # warm-up: worker start, first packing groups, tokenizer load
            next(it)
        warmup_s = time.perf_counter() - started
        busy0, total0 = _jiffies_total()
        ours0 = _tree_jiffies(os.getpid())
        load0 = os.getloadavg()[0]
        tokens, rows_tokens, batch_times = 0, 0, []
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds or len(batch_times) < 10:
            b0 = time.perf_counter()
            batch = next(it)
            batch_times.append(time.perf_counter() - b0)
            tokens += int(batch["loss_mask"].sum())
            rows_tokens += batch["inputs"].size
        elapsed = time.perf_counter() - t0
        busy1, total1 = _jiffies_total()
        ours1 = _tree_jiffies(os.getpid())
    finally:
        it.close()
    cores = os.cpu_count()
    window_cores = (total1 - total0) / cores  # jiffies per core over the window
    other_busy = max(0, (busy1 - busy0) - (ours1 - ours0))
    return {
        "tokens_per_s": tokens / elapsed,
        "row_tokens_per_s": rows_tokens / elapsed,
        "padding_fraction": 1 - tokens / rows_tokens,
        "median_batch_ms": 1000 * statistics.median(batch_times),
        "batches": len(batch_times),
        "seconds": elapsed,
        "warmup_s": warmup_s,
        "our_cpu_cores": (ours1 - ours0) / window_cores if window_cores else None,
        "other_processes_cpu_cores": other_busy / window_cores if window_cores else None,
        "loadavg_1m_start": load0,
        "loadavg_1m_end": os.getloadavg()[0],
    }


def sharding_corpus(root: str, files: int, docs_per_file: int) -> dict[str, list[str]]:
    """{format: paths}: the same documents as plain JSONL and as .jsonl.zst files."""
    import zstandard

    docs = make_corpus(root, files * docs_per_file, seed=1)
    out: dict[str, list[str]] = {"jsonl": [], "jsonl.zst": []}
    for f in range(files):
        lines = "".join(json.dumps({"text": d}) + "\n" for d in docs[f * docs_per_file : (f + 1) * docs_per_file])
        plain = os.path.join(root, f"part-{f}.jsonl")
        with open(plain, "w") as fh:
            fh.write(lines)
        with open(plain + ".zst", "wb") as fh:
            fh.write(zstandard.ZstdCompressor(level=3).compress(lines.encode()))
        out["jsonl"].append(plain)
        out["jsonl.zst"].append(plain + ".zst")
    return out


def measure_readers(paths: list[str], tokenizer: str, readers: int) -> dict:
    """Each of ``readers`` simulated hosts reads its whole share once; per-reader counts and times."""
    import jaxcpt
    import jaxcpt.data.documents as documents
    from jaxcpt.config import from_dict
    from jaxcpt.data.config import DataConfig
    from jaxcpt.data.pipeline import build_train_iterator
    from jaxcpt.data.tokenize import cached_tokenizer

    counts = {"records": 0, "read_cpu_s": 0.0}
    read_unit = documents.read_unit

    # CPU time of this thread, not wall time: on a shared machine, waiting for a core is not reading.
    def counting_read_unit(*args, **kwargs):
        records = read_unit(*args, **kwargs)
        while True:
            t0 = time.thread_time()
            try:
                item = next(records)
            except StopIteration:
                counts["read_cpu_s"] += time.thread_time() - t0
                return
            counts["read_cpu_s"] += time.thread_time() - t0
            counts["records"] += 1
            yield item

    documents.read_unit = counting_read_unit
    cfg = from_dict(
        DataConfig,
        {"sources": [{"name": "bench", "paths": paths, "repeat": False}], "tokenizer": tokenizer, "seq_len": SEQ_LEN,
         "shuffle_buffer": 1000},
    )
    cached_tokenizer(tokenizer)  # loaded once, outside the timings
    busy0, total0 = _jiffies_total()
    ours0 = _tree_jiffies(os.getpid())
    per_reader = []
    for index in range(readers):
        counts.update(records=0, read_cpu_s=0.0)
        t0, cpu0 = time.perf_counter(), time.process_time()
        tokens = 0
        for batch in build_train_iterator(cfg, batch_size=BATCH, process_index=index, process_count=readers):
            tokens += int(batch["loss_mask"].sum())
        seconds, cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
        per_reader.append({"reader": index, "records_scanned": counts["records"], "read_cpu_s": counts["read_cpu_s"],
                           "seconds": seconds, "cpu_s": cpu_s, "tokens": tokens, "tokens_per_s": tokens / seconds,
                           "tokens_per_cpu_s": tokens / cpu_s})
    busy1, total1 = _jiffies_total()
    window_cores = (total1 - total0) / os.cpu_count()
    other_busy = max(0, (busy1 - busy0) - (_tree_jiffies(os.getpid()) - ours0))
    return {"jaxcpt": os.path.dirname(os.path.dirname(jaxcpt.__file__)), "per_reader": per_reader,
            "other_processes_cpu_cores": other_busy / window_cores if window_cores else None}


def _git_commit(directory: str) -> str | None:
    try:
        return subprocess.run(["git", "-C", directory, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def sharding_part(args) -> dict:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    codes = {"this checkout": here}
    if args.baseline:
        codes = {args.baseline_name: os.path.abspath(args.baseline), **codes}
    root = tempfile.mkdtemp(prefix="jaxcpt_bench_sharding_")
    runs = []
    try:
        corpus = sharding_corpus(root, files=4, docs_per_file=args.sharding_docs_per_file)
        sp_path, _ = make_tokenizers(root, [json.loads(line)["text"] for line in open(corpus["jsonl"][0])])
        total_records = args.sharding_docs_per_file * 4
        for round_index in range(args.rounds):
            for readers in (8, 16):
                for fmt, paths in corpus.items():
                    for label, code in codes.items():
                        spec = json.dumps({"paths": paths, "tokenizer": sp_path, "readers": readers})
                        env = {**os.environ, "PYTHONPATH": code}
                        child = subprocess.run([sys.executable, os.path.abspath(__file__), "--measure-readers", spec],
                                               env=env, capture_output=True, text=True, check=True)
                        result = json.loads(child.stdout.strip().splitlines()[-1])
                        per = result["per_reader"]
                        run = {
                            "code": label, "commit": _git_commit(code), "format": fmt, "readers": readers,
                            "round": round_index, "records_in_source": total_records,
                            "records_scanned_per_reader_mean": statistics.mean(r["records_scanned"] for r in per),
                            "records_scanned_per_reader_max": max(r["records_scanned"] for r in per),
                            "read_cpu_s_all_readers": sum(r["read_cpu_s"] for r in per),
                            "cpu_s_all_readers": sum(r["cpu_s"] for r in per),
                            "seconds_all_readers": sum(r["seconds"] for r in per),
                            "slowest_reader_s": max(r["seconds"] for r in per),
                            "tokens_per_s_per_reader_median": statistics.median(r["tokens_per_s"] for r in per),
                            "tokens_per_cpu_s": sum(r["tokens"] for r in per) / sum(r["cpu_s"] for r in per),
                            "tokens": sum(r["tokens"] for r in per),
                            "other_processes_cpu_cores": result["other_processes_cpu_cores"],
                            "per_reader": per,
                        }
                        runs.append(run)
                        print(
                            f"  {label:14s} {fmt:9s} readers={readers:2d} round={round_index}: scanned/reader "
                            f"{run['records_scanned_per_reader_mean']:>8,.0f} of {total_records:,}, reading "
                            f"{run['read_cpu_s_all_readers']:6.2f} CPU s in all, {run['tokens_per_cpu_s']:>10,.0f} "
                            f"tokens per CPU s (other load {run['other_processes_cpu_cores']:.2f} cores)",
                            flush=True,
                        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    summary = []
    for readers in (8, 16):
        for fmt in corpus:
            for label in codes:
                mine = [r for r in runs if (r["readers"], r["format"], r["code"]) == (readers, fmt, label)]
                summary.append({
                    "code": label, "commit": mine[0]["commit"], "format": fmt, "readers": readers,
                    "records_in_source": total_records,
                    "records_scanned_per_reader": statistics.median(r["records_scanned_per_reader_mean"] for r in mine),
                    "read_cpu_s_all_readers_median": statistics.median(r["read_cpu_s_all_readers"] for r in mine),
                    "cpu_s_all_readers_median": statistics.median(r["cpu_s_all_readers"] for r in mine),
                    "tokens_per_cpu_s_median": statistics.median(r["tokens_per_cpu_s"] for r in mine),
                    "tokens_per_s_per_reader_median": statistics.median(r["tokens_per_s_per_reader_median"] for r in mine),
                    "other_processes_cpu_cores_mean": float(np.mean([r["other_processes_cpu_cores"] for r in mine])),
                })
    print(f"\n{'code':14s} {'format':9s} {'readers':>7s} {'scanned/reader':>14s} {'reading CPU s':>13s} "
          f"{'all CPU s':>9s} {'tokens/CPU s':>12s}")
    for r in summary:
        print(f"{r['code']:14s} {r['format']:9s} {r['readers']:>7d} {r['records_scanned_per_reader']:>14,.0f} "
              f"{r['read_cpu_s_all_readers_median']:>13.2f} {r['cpu_s_all_readers_median']:>9.2f} "
              f"{r['tokens_per_cpu_s_median']:>12,.0f}")
    return {
        "what": "4 JSONL files (plain and .zst, the same documents) read once by 8 and 16 simulated readers "
        "(process_count), one after the other; per reader: records scanned, CPU seconds inside reading "
        "(decompressing, cutting records) and in all, wall seconds, tokens delivered",
        "seq_len": SEQ_LEN,
        "batch_size": BATCH,
        "codes": {label: {"path": path, "commit": _git_commit(path)} for label, path in codes.items()},
        "documents": total_records,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {**machine_info(), "loadavg_at_end": list(os.getloadavg())},
        "summary": summary,
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="throughput,sharding", help="comma-separated: throughput, sharding")
    parser.add_argument("--seconds", type=float, default=6.0, help="timed seconds per measurement")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of every configuration")
    parser.add_argument("--docs", type=int, default=6000, help="documents in the synthetic corpus")
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--sharding-docs-per-file", type=int, default=1500, help="documents in each of the 4 files")
    parser.add_argument("--baseline", help="sharding: another jaxcpt checkout to measure alongside (e.g. main)")
    parser.add_argument("--baseline-name", default="baseline", help="sharding: the baseline's name in the results")
    parser.add_argument("--beam-python", default=sys.executable, help="beam: a Python with apache-beam installed")
    parser.add_argument("--elastic-batches", type=int, default=20, help="elastic: batches timed per reader")
    parser.add_argument("--measure-readers", help=argparse.SUPPRESS)  # internal: one sharding measurement
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "data_throughput.json"))
    args = parser.parse_args()
    if args.measure_readers:
        spec = json.loads(args.measure_readers)
        print(json.dumps(measure_readers(spec["paths"], spec["tokenizer"], spec["readers"])))
        return
    parts = set(args.parts.split(","))
    report = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            report = json.load(f)
    if "throughput" in parts:
        report.update(throughput_part(args))
    if "sharding" in parts:
        report["sharding"] = sharding_part(args)
    if "elastic" in parts:
        report["elastic"] = elastic_part(args)
    if "beam" in parts:
        report["beam"] = beam_part(args)
    # The top level names the machine, the commit and the time of this invocation; every part keeps the machine
    # and commit it was measured on (the throughput part's as "throughput_machine" once another part ran after it).
    if "throughput" not in parts and "runs" in report:
        report.setdefault("throughput_machine", report.get("machine"))
    context = _context()
    report.update(machine={**context["machine"], "loadavg_at_end": list(os.getloadavg())}, commit=context["commit"],
                  time=time.strftime("%Y-%m-%dT%H:%M:%S%z"), parts_run=sorted(parts))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"\nwrote {args.out}")


def throughput_part(args) -> dict:

    import sentencepiece as spm

    from jaxcpt.config import from_dict
    from jaxcpt.data.command import tokenize_source
    from jaxcpt.data.config import DataConfig, SourceConfig

    root = tempfile.mkdtemp(prefix="jaxcpt_bench_")
    try:
        docs = make_corpus(root, args.docs)
        sp_path, hf_path = make_tokenizers(root, docs)
        sample = spm.SentencePieceProcessor(model_file=sp_path).encode(docs[:500])
        chars_per_token = sum(map(len, docs[:500])) / sum(map(len, sample))
        median_tokens = int(np.median([len(t) for t in sample]))
        corpus = os.path.join(root, "corpus.jsonl")
        tokenized = os.path.join(root, "tokenized")
        tokenize_source(SourceConfig(name="bench", paths=[corpus]), sp_path, tokenized, progress=False)
        inputs = {
            "pre-tokenized": ([tokenized], sp_path),
            "sentencepiece": ([corpus], sp_path),
            "hf-fast": ([corpus], hf_path),
        }
        results = []
        for round_index in range(args.rounds):
            for workers in [int(w) for w in args.workers.split(",")]:
                for name, (paths, tokenizer) in inputs.items():
                    cfg = from_dict(
                        DataConfig,
                        {
                            "sources": [{"name": "bench", "paths": paths}],
                            "tokenizer": tokenizer,
                            "seq_len": SEQ_LEN,
                            "num_workers": workers,
                            "shuffle_buffer": 1000,
                        },
                    )
                    r = {"input": name, "workers": workers, "round": round_index, **measure(cfg, args.seconds)}
                    results.append(r)
                    print(
                        f"  {name:14s} workers={workers} round={round_index}: {r['tokens_per_s']:>12,.0f} tokens/s "
                        f"(other processes {r['other_processes_cpu_cores']:.2f} cores)",
                        flush=True,
                    )
    finally:
        shutil.rmtree(root, ignore_errors=True)

    summary = []
    for workers in sorted({r["workers"] for r in results}):
        for name in inputs:
            runs = [r for r in results if r["input"] == name and r["workers"] == workers]
            summary.append(
                {
                    "input": name,
                    "workers": workers,
                    "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in runs),
                    "tokens_per_s_runs": [round(r["tokens_per_s"]) for r in runs],
                    "other_processes_cpu_cores_mean": float(np.mean([r["other_processes_cpu_cores"] for r in runs])),
                }
            )
    print(f"\n{'input':14s} {'workers':>7s} {'packed tokens/s':>16s} {'runs':>28s} {'other load (cores)':>19s}")
    for s in summary:
        runs = ", ".join(f"{v:,}" for v in s["tokens_per_s_runs"])
        print(
            f"{s['input']:14s} {s['workers']:>7d} {s['tokens_per_s_median']:>16,.0f} {runs:>28s} "
            f"{s['other_processes_cpu_cores_mean']:>19.2f}"
        )
    return {
        "benchmark": "data_throughput",
        "what": "non-padding packed tokens per second delivered to one training process (per host)",
        "seq_len": SEQ_LEN,
        "batch_size": BATCH,
        "corpus": {
            "documents": args.docs,
            "kind": "synthetic pseudo-English (Zipf lexicon), one JSONL file; sentencepiece BPE, vocab 8000",
            "median_characters": int(np.median([len(d) for d in docs])),
            "median_tokens": median_tokens,
            "characters_per_token": round(chars_per_token, 2),
        },
        "machine": {**machine_info(), "loadavg_at_end": list(os.getloadavg())},
        "throughput_machine": {**machine_info(), "loadavg_at_end": list(os.getloadavg())},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "summary": summary,
        "runs": results,
    }


def _context() -> dict:
    return {"machine": machine_info(), "commit": _git_commit(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
            "load_average_1m": os.getloadavg()[0]}


def elastic_part(args) -> dict:
    from jaxcpt.config import from_dict
    from jaxcpt.data.command import tokenize_source
    from jaxcpt.data.config import DataConfig, SourceConfig
    from jaxcpt.data.indexed import IndexedSource, write_array_record_shards
    from jaxcpt.data.pipeline import build_train_iterator
    from jaxcpt.data.sources import read_tokenized_meta

    root = tempfile.mkdtemp(prefix="jaxcpt_bench_elastic_")
    try:
        docs = make_corpus(root, args.docs)
        sp_path, _ = make_tokenizers(root, docs)
        npy = os.path.join(root, "npy")
        tokenize_source(SourceConfig(name="bench", paths=[os.path.join(root, "corpus.jsonl")]), sp_path, npy,
                        progress=False)
        meta = read_tokenized_meta(npy)
        src = IndexedSource("bench", [meta], bos_id=None, eos_id=None)
        ar = os.path.join(root, "array_record")
        write_array_record_shards(ar, [(src.tokens(d).tolist(), "") for d in range(src.num_documents)],
                                  tokenizer_meta={k: meta[k] for k in ("tokenizer", "tokenizer_fingerprint", "bos_id",
                                                                       "eos_id", "dtype")},
                                  docs_per_shard=max(1, src.num_documents // 8), source_fingerprint="bench")
        results = []
        for round_index in range(args.rounds):
            for storage, path in (("npy", npy), ("array_record", ar)):
                for readers in (1, 2, 8):
                    cfg = from_dict(DataConfig, {"sources": [{"name": "bench", "paths": [path]}], "tokenizer": sp_path,
                                                 "seq_len": SEQ_LEN, "elastic": True})
                    per_reader = []
                    for host in range(readers):
                        it = build_train_iterator(cfg, batch_size=BATCH, process_index=host, process_count=readers)
                        next(it)  # first epoch order
                        t0 = time.perf_counter()
                        tokens = sum(int(next(it)["loss_mask"].sum()) for _ in range(args.elastic_batches))
                        per_reader.append(tokens / (time.perf_counter() - t0))
                        it.close()
                    r = {"storage": storage, "readers": readers, "round": round_index,
                         "tokens_per_s_per_reader": statistics.median(per_reader), "load_average_1m": os.getloadavg()[0]}
                    results.append(r)
                    print(f"  elastic {storage:12s} readers={readers}: {r['tokens_per_s_per_reader']:>12,.0f} "
                          "tokens/s per reader", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    summary = [{"storage": st, "readers": n,
                "tokens_per_s_per_reader_median": statistics.median(
                    r["tokens_per_s_per_reader"] for r in results if r["storage"] == st and r["readers"] == n)}
               for st in ("npy", "array_record") for n in (1, 2, 8)]
    print(f"\n{'storage':14s} {'readers':>7s} {'packed tokens/s per reader':>27s}")
    for s in summary:
        print(f"{s['storage']:14s} {s['readers']:>7d} {s['tokens_per_s_per_reader_median']:>27,.0f}")
    return {**_context(), "seq_len": SEQ_LEN, "batch_per_reader": BATCH, "docs": args.docs, "runs": results,
            "summary": summary}


def beam_part(args) -> dict:
    root = tempfile.mkdtemp(prefix="jaxcpt_bench_beam_")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        docs = make_corpus(root, args.docs)
        sp_path, _ = make_tokenizers(root, docs)
        corpus = os.path.join(root, "parts")
        os.makedirs(corpus)
        for k in range(8):  # Beam parallelises over units (files): 8 files
            with open(os.path.join(corpus, f"part-{k}.jsonl"), "w") as f:
                f.writelines(json.dumps({"text": d}) + "\n" for d in docs[k::8])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]))
        runs = []
        for round_index in range(args.rounds):
            for engine, python, extra in (("local --workers 2", sys.executable, []),
                                          ("beam direct 2 workers", args.beam_python, ["--engine", "beam"])):
                out = os.path.join(root, f"out-{round_index}-{len(runs)}")
                cmd = [python, "-m", "jaxcpt.cli", "tokenize", corpus, "--output", out, "--tokenizer", sp_path,
                       "--workers", "2", *extra]
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                seconds = time.perf_counter() - t0
                if proc.returncode != 0:
                    raise SystemExit(f"{engine} failed:\n{proc.stderr[-3000:]}")
                runs.append({"engine": engine, "round": round_index, "seconds": seconds,
                             "documents_per_s": len(docs) / seconds, "load_average_1m": os.getloadavg()[0]})
                print(f"  {engine:24s} round={round_index}: {len(docs) / seconds:>10,.0f} documents/s "
                      f"({seconds:.1f} s, process start included)", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    summary = [{"engine": e, "documents_per_s_median": statistics.median(r["documents_per_s"] for r in runs
                                                                         if r["engine"] == e)}
               for e in ("local --workers 2", "beam direct 2 workers")]
    print(f"\n{'engine':24s} {'documents/s':>12s}")
    for s in summary:
        print(f"{s['engine']:24s} {s['documents_per_s_median']:>12,.0f}")
    return {**_context(), "docs": args.docs, "files": 8, "runs": runs, "summary": summary}


if __name__ == "__main__":
    main()
