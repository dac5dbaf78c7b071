"""Streaming producers over corpora of any size: peak producer RSS against a corpus 10x smaller, reading +
tokenizing rate against what the model consumes, and time to the first batch.

    python benchmarks/corpus_streaming.py                 # JSONL and Parquet corpora of 2 GB (and 0.2 GB), S3
    python benchmarks/corpus_streaming.py --small          # the CI-sized run tests/services run (tiny model)

For each format a corpus of --gb gigabytes and one 10x smaller are generated on local disk (and a --s3-mb one on a
moto S3 server); --producers producers (each its own process, as Ray actors are) stream --tokens tokens between
them through the model. Printed per corpus: the producers' peak RSS (VmHWM), model load and time to the first
batch (and its part outside the model's forward: reading, tokenizing, packing, capture), and the model's own rate
(tokens/s of the cut model's forward). The reading + tokenizing rate and the reader's time to its first window
(listing the corpus included) are measured alone (no model). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from procmem import rss_bytes  # noqa: E402

WORDS = ("the of and to in is was for on that with as by it at from his an were are which this be or had not "
         "but first one their its new after who they have her she two been other when there all during into "
         "school time may years more most only over city some world would where later up such used many can "
         "state about national out known university united then made").split()


def _documents(count: int, seed: int) -> list[str]:
    import numpy as np

    rng = np.random.default_rng(seed)
    vocabulary = np.array(WORDS)
    return [" ".join(vocabulary[rng.integers(0, len(WORDS), int(rng.integers(80, 600)))]) for _ in range(count)]


def make_corpus(folder: Path, fmt: str, size: int) -> str:
    """A corpus of at least `size` bytes: numbered documents (so none repeats) in files of at most 512 MB."""
    folder.mkdir(parents=True, exist_ok=True)
    pool = _documents(4096, seed=0)
    written, number, files = 0, 0, 0
    file_limit = 512 << 20
    while written < size:
        path = folder / f"part{files:04d}.{'jsonl' if fmt == 'jsonl' else 'parquet'}"
        in_file = 0
        if fmt == "jsonl":
            with open(path, "w") as out:
                while in_file < file_limit and written + in_file < size:
                    lines = "".join(json.dumps({"text": f"document {number + i}. {pool[(number + i) % len(pool)]}"})
                                    + "\n" for i in range(1024))
                    number += 1024
                    out.write(lines)
                    in_file += len(lines)
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            schema = pa.schema([("text", pa.string())])
            with pq.ParquetWriter(path, schema, compression="none", use_dictionary=False) as writer:
                while in_file < file_limit and written + in_file < size:
                    texts = [f"document {number + i}. {pool[(number + i) % len(pool)]}" for i in range(2048)]
                    number += len(texts)
                    writer.write_table(pa.table({"text": texts}, schema=schema), row_group_size=2048)  # ~4 MB groups
                    in_file += sum(map(len, texts))
        written += path.stat().st_size
        files += 1
    return str(folder)


def _spec(source: str, model: str, tokens: int, producers: int):
    from api.jobspec import JobSpec

    tiny = {"random": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128}}
    return JobSpec.model_validate({
        "model": tiny if model == "tiny" else {"name": "embedded"},
        "hook": {"layer": 1 if model == "tiny" else 3}, "dictionaries": [{"k": 8}],
        "data": {"source": source, "context_length": 256, "holdout_fraction": 0.0},
        "training": {"batch_tokens": 4096, "tokens": tokens}, "cluster": {"producers": producers}})


def _producer(spec_json: str, index: int, producers: int, tokens: int, out) -> None:
    """One producer process: stream `tokens` rows, report its peak RSS and timings."""
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // producers))
    from services.model_producer import ActivationProducer

    started = time.perf_counter()
    producer = ActivationProducer(spec_json, index, producers, epochs=1)
    info = producer.info()
    meta, _ = producer.next_batch()
    first = time.perf_counter() - started
    first_forward = meta["forward_seconds"]  # the model's share of the first batch
    got = meta["tokens"]
    while got < tokens and not meta["end"]:
        meta, _ = producer.next_batch()
        got += meta["tokens"]
    out.put({"peak_rss": rss_bytes("VmHWM"), "first_batch_s": first,
             "first_batch_after_load_s": first - info["model_load_s"], "model_load_s": info["model_load_s"],
             "first_batch_forward_s": first_forward,
             "first_batch_without_model_s": first - info["model_load_s"] - first_forward,
             "corpus_list_s": info["corpus_list_s"], "tokens": got,
             "model_tokens_per_s": meta["tokens_forwarded"] / max(meta["forward_seconds"], 1e-9)})


def stream(source: str, model: str, tokens: int, producers: int) -> dict:
    """`producers` producer processes through `tokens` tokens of `source`; the figures of the largest of them."""
    spec = _spec(source, model, tokens, producers)
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    processes = [context.Process(target=_producer, args=(spec.model_dump_json(), i, producers, tokens // producers,
                                                         out)) for i in range(producers)]
    for p in processes:
        p.start()
    results = []
    while len(results) < producers:
        try:
            results.append(out.get(timeout=5))
        except queue.Empty:
            failed = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
            if failed:
                raise RuntimeError(f"a producer process failed (exit codes {failed}); its error is above") from None
    for p in processes:
        p.join()
    return {"peak_rss_mib": max(r["peak_rss"] for r in results) / 2**20,
            "first_batch_s": max(r["first_batch_s"] for r in results),
            "first_batch_after_load_s": max(r["first_batch_after_load_s"] for r in results),
            "first_batch_without_model_s": max(r["first_batch_without_model_s"] for r in results),
            "model_load_s": max(r["model_load_s"] for r in results),
            "corpus_list_s": max(r["corpus_list_s"] for r in results),
            "tokens": sum(r["tokens"] for r in results),
            "model_tokens_per_s": sum(r["model_tokens_per_s"] for r in results) / len(results)}


def read_rate(source: str, model: str, tokens: int) -> tuple[float, float]:
    """Tokens/s of reading + tokenizing + packing alone (one process, no model), and the seconds from listing the
    corpus to the first window."""
    from services.data import corpus_pieces
    from services.models import load_language_model
    from services.windows import CorpusWindows

    spec = _spec(source, model, tokens, 1)
    tokenizer = load_language_model(spec.model, keep_layers=1).tokenizer
    listed = time.perf_counter()
    windows = CorpusWindows(tokenizer, spec.data, corpus_pieces(spec.data), seed=0, producer=0, epochs=1)
    started, got, first_window = time.perf_counter(), 0, None
    for _, window in windows.windows():
        first_window = first_window or time.perf_counter() - listed
        got += len(window)
        if got >= tokens:
            break
    return got / (time.perf_counter() - started), first_window


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.0, help="size of the large corpus of each format")
    parser.add_argument("--tokens", type=int, default=4096 * 24, help="tokens the producers stream in all")
    parser.add_argument("--producers", type=int, default=2)
    parser.add_argument("--model", choices=["embedded", "tiny"], default="embedded",
                        help="embedded: the cut SmolLM2-135M at layer 3; tiny: a random 2-layer model")
    parser.add_argument("--formats", default="jsonl,parquet")
    parser.add_argument("--s3-mb", type=int, default=256, help="size of the corpus on the moto S3 server (0: none)")
    parser.add_argument("--folder", default=None, help="where corpora are generated (default: a temporary folder)")
    parser.add_argument("--small", action="store_true", help="CI size: 100 MB corpora, tiny model, no S3")
    args = parser.parse_args()
    if args.small:
        args.gb, args.model, args.s3_mb, args.tokens = 0.1, "tiny", 0, 4096 * 8
    root = Path(args.folder or tempfile.mkdtemp(prefix="corpus-streaming-"))
    size = int(args.gb * 2**30)
    figures: dict = {"gb": args.gb, "model": args.model, "producers": args.producers, "tokens": args.tokens}
    try:
        for fmt in args.formats.split(","):
            large = make_corpus(root / f"{fmt}-large", fmt, size)
            small = make_corpus(root / f"{fmt}-small", fmt, size // 10)
            big, little = stream(large, args.model, args.tokens, args.producers), \
                stream(small, args.model, args.tokens, args.producers)
            (rate, first_window), (_, first_window_small) = read_rate(large, args.model, args.tokens), \
                read_rate(small, args.model, args.tokens)
            figures[fmt] = {"large": big, "small": little, "rss_ratio": big["peak_rss_mib"] / little["peak_rss_mib"],
                            "read_tokens_per_s": rate,
                            "read_over_model": rate / big["model_tokens_per_s"],
                            "reader_first_window_s": {"large": first_window, "small": first_window_small}}
            print(f"{fmt}: {args.gb:g} GB corpus peak RSS {big['peak_rss_mib']:.0f} MiB vs "
                  f"{little['peak_rss_mib']:.0f} MiB at 1/10 (x{figures[fmt]['rss_ratio']:.3f}); first batch "
                  f"{big['first_batch_after_load_s']:.2f} s vs {little['first_batch_after_load_s']:.2f} s after "
                  f"the model loaded ({big['model_load_s']:.2f} s; listing the corpus {big['corpus_list_s']:.2f} s; "
                  f"outside the forward {big['first_batch_without_model_s']:.2f} s vs "
                  f"{little['first_batch_without_model_s']:.2f} s; the reader alone: first window "
                  f"{first_window:.3f} s vs {first_window_small:.3f} s); read+tokenize "
                  f"{rate:,.0f} tokens/s = {figures[fmt]['read_over_model']:.1f}x the model's "
                  f"{big['model_tokens_per_s']:,.0f}", flush=True)
            shutil.rmtree(root / f"{fmt}-large")
        if args.s3_mb:
            figures["s3"] = s3_run(root, args)
    finally:
        if args.folder is None:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(figures))


def s3_run(root: Path, args) -> dict:
    """A Parquet corpus of --s3-mb MB on a moto S3 server, read through fsspec range reads."""
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"})
    try:
        local = make_corpus(root / "s3-corpus", "parquet", args.s3_mb << 20)
        fs = s3fs.S3FileSystem()
        fs.mkdir("corpus")
        fs.put(local + "/", "corpus/parquet/", recursive=True)
        result = stream("s3://corpus/parquet", args.model, args.tokens, args.producers)
        print(f"s3: {args.s3_mb} MB Parquet on moto, peak RSS {result['peak_rss_mib']:.0f} MiB, first batch "
              f"{result['first_batch_s']:.2f} s ({result['first_batch_after_load_s']:.2f} s after the model loaded, "
              f"{result['first_batch_without_model_s']:.2f} s outside the forward)", flush=True)
        return result
    finally:
        server.stop()


if __name__ == "__main__":
    main()
