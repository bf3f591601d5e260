"""grok1 and llama.cpp side by side: the same shapes, in the same run, on the same threads.

    python benchmarks/llama_cpp_bench.py --config bench-cpu-mem --batch 1 8 --json out.json
    python benchmarks/llama_cpp_bench.py --llama-bench /tmp/llama/build/bin/llama-bench

Writes the benchmarked config (bench.py's `--config`, `--num-layers`, ...) as a GGUF file of
llama.cpp's `grok` architecture: random Q8_0 blocks for every matrix and the tied embedding, float32
norms and router (llama.cpp's quantizer leaves the router unquantised), the experts' hidden size
zero-padded to a multiple of 32 (Q8_0 rows are whole 32-weight blocks: bench-cpu's 2736 becomes
2752), and a SentencePiece-style vocabulary of the config's size. Then it runs bench.py's
measurement and, after each of its rounds, one llama-bench decode run (`-n STEPS -d PROMPT`: STEPS
tokens after a PROMPT-token context) and one prompt-processing run (`-p PROMPT`), each `-r 1` on
`--threads` threads (default: as many as XLA:CPU uses). llama-bench feeds random token ids, so its
steps route to varying experts too; its decode is one sequence (batch 1).

llama-bench comes from `--llama-bench PATH` or PATH; without one this prints how to build it and
exits 0 (skipped). docs/performance.md says how to build it and what was measured. Needs the
`gguf` package: `pip install -e '.[bench]'`.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench  # noqa: E402

Q8_BLOCK, Q8_BYTES = 32, 34  # weights per Q8_0 block; its bytes (an f16 scale, 32 int8)

HOW_TO_GET = """llama-bench not found (give --llama-bench PATH or put it on PATH): skipped.
To build it (a few minutes on 2 cores; outside this repository):
  cd /tmp && pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36
  tar xzf llama_cpp_python-0.3.36.tar.gz && cd llama_cpp_python-0.3.36/vendor/llama.cpp
  cmake -B /tmp/llama-build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \\
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF
  cmake --build /tmp/llama-build --target llama-bench -j 2
then: --llama-bench /tmp/llama-build/bin/llama-bench"""


# -- the GGUF file --------------------------------------------------------------------------------
def padded(n: int) -> int:
    return -(-n // Q8_BLOCK) * Q8_BLOCK


def q8_0(rng, rows: tuple, n_in: int, n_real: int | None = None) -> np.ndarray:
    """Random Q8_0 rows, uint8 [*rows, n_in / 32 * 34]: each block of 32 weights is an f16 scale
    and 32 int8; weights at positions >= n_real in a row are zero."""
    blocks = n_in // Q8_BLOCK
    q = rng.integers(-127, 128, (*rows, n_in), dtype=np.int8)
    if n_real is not None:
        q[..., n_real:] = 0
    scale = rng.uniform(0.5, 1.5, (*rows, blocks, 1)) * (1.0 / (127 * np.sqrt(n_in)))
    packed = np.concatenate(
        [scale.astype(np.float16).view(np.uint8), q.view(np.uint8).reshape(*rows, blocks, 32)],
        axis=-1,
    )
    return packed.reshape(*rows, blocks * Q8_BYTES)


def zero_rows(packed: np.ndarray, total: int) -> np.ndarray:
    """`packed` [..., n, bytes] extended with all-zero rows (zero scale and weights) to `total`."""
    pad = [(0, 0)] * packed.ndim
    pad[-2] = (0, total - packed.shape[-2])
    return np.pad(packed, pad)


def vocabulary(size: int) -> tuple[list, list, list]:
    """Token strings, scores and types of a SentencePiece ("llama") vocabulary of `size`: the
    special tokens where grok1's config puts them (pad 0, eos 2), 256 byte tokens, words."""
    import gguf

    tt = gguf.TokenType
    tokens = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [tt.CONTROL, tt.CONTROL, tt.CONTROL, tt.UNKNOWN] + [tt.BYTE] * 256
    tokens += [f"\u2581w{i}" for i in range(size - len(tokens))]
    types += [tt.NORMAL] * (size - len(types))
    scores = [0.0] * 4 + [-1e4] * 256 + [-float(i) for i in range(size - 260)]
    return tokens[:size], scores[:size], [int(t) for t in types[:size]]


def write_gguf(config, path: str, seed: int = 0) -> dict:
    """Writes `config`'s shapes as a grok GGUF (random Q8_0) to `path` atomically; returns the
    bytes of each kind of weight (embedding, attention, router_norms, experts_all)."""
    import gguf

    c = config
    rng = np.random.default_rng(seed)
    d, e, f = c.emb_size, c.num_experts, c.ffn_size
    fp = padded(f)
    hq, hk = c.num_q_heads * c.key_size, c.num_kv_heads * c.key_size
    if hq != d:
        raise SystemExit(f"llama.cpp's grok needs num_q_heads * key_size == emb_size: {hq} != {d}")
    if d % Q8_BLOCK:
        raise SystemExit(f"Q8_0 needs emb_size a multiple of {Q8_BLOCK}, got {d}")
    name = lambda t, i=None: gguf.TENSOR_NAMES[t].format(bid=i) + ".weight"  # noqa: E731
    T = gguf.MODEL_TENSOR
    q8 = gguf.GGMLQuantizationType.Q8_0
    sizes = {"embedding": 0, "attention": 0, "router_norms": 0, "experts_all": 0}
    tmp = path + ".tmp"
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GROK])
    try:
        writer.add_name(f"grok1-bench-{c.num_layers}L")
        writer.add_context_length(c.sequence_len)
        writer.add_embedding_length(d)
        writer.add_block_count(c.num_layers)
        writer.add_feed_forward_length(fp)
        writer.add_expert_feed_forward_length(fp)
        writer.add_head_count(c.num_q_heads)
        writer.add_head_count_kv(c.num_kv_heads)
        writer.add_key_length(c.key_size)
        writer.add_value_length(c.key_size)
        writer.add_rope_freq_base(c.rope_base)
        writer.add_layer_norm_rms_eps(c.norm_eps)
        writer.add_expert_count(e)
        writer.add_expert_used_count(c.num_selected_experts)
        writer.add_embedding_scale(c.embedding_multiplier_scale)
        writer.add_logit_scale(c.output_multiplier_scale)
        writer.add_attn_output_scale(c.attn_output_multiplier)
        writer.add_attn_logit_softcapping(c.attn_logit_cap)
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
        tokens, scores, types = vocabulary(c.vocab_size)
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_pad_token_id(c.pad_token)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(c.eos_token)
        writer.add_unk_token_id(3)
        writer.add_add_bos_token(False)

        def add(kind, tensor_name, array, quantized=True):
            writer.add_tensor(tensor_name, array, raw_dtype=q8 if quantized else None)
            sizes[kind] += array.nbytes

        ones = np.ones(d, np.float32)
        add("embedding", name(T.TOKEN_EMBD), q8_0(rng, (c.vocab_size,), d))
        add("router_norms", name(T.OUTPUT_NORM), ones, quantized=False)
        for i in range(c.num_layers):
            for norm in (T.ATTN_NORM, T.ATTN_OUT_NORM, T.FFN_NORM, T.LAYER_OUT_NORM):
                add("router_norms", name(norm, i), ones, quantized=False)
            for t, rows in ((T.ATTN_Q, hq), (T.ATTN_K, hk), (T.ATTN_V, hk), (T.ATTN_OUT, d)):
                add("attention", name(t, i), q8_0(rng, (rows,), d if t != T.ATTN_OUT else hq))
            router = (rng.standard_normal((e, d)) / np.sqrt(d)).astype(np.float32)
            add("router_norms", name(T.FFN_GATE_INP, i), router, quantized=False)
            for t in (T.FFN_GATE_EXP, T.FFN_UP_EXP):  # [E, F, D]: rows F..fp are zero
                add("experts_all", name(t, i), zero_rows(q8_0(rng, (e, f), d), fp))
            add("experts_all", name(T.FFN_DOWN_EXP, i), q8_0(rng, (e, d), fp, n_real=f))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return sizes


# -- llama-bench ----------------------------------------------------------------------------------
def llama_bench(binary, model, threads, *, prompt=0, gen=0, depth=0, extra=()) -> dict:
    """One llama-bench test (`-r 1`, JSON output): its record (samples_ts, cpu_info, ...)."""
    cmd = [binary, "-m", model, "-t", str(threads), "-p", str(prompt), "-n", str(gen),
           "-d", str(depth), "-r", "1", "-o", "json", *extra]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    (record,) = json.loads(done.stdout)
    return record


def llama_step_bytes(sizes: dict, config, experts_per_layer: float, filled: float) -> int:
    """Bytes one llama.cpp decode step reads at least: as `bench.weight_bytes` counts ours, over
    the GGUF's tensors, with its f16 KV cache."""
    experts = sizes["experts_all"] * experts_per_layer / config.num_experts
    kv = bench.kv_bytes(config, 1, filled, "float16")
    return int(sizes["embedding"] + sizes["attention"] + sizes["router_norms"] + experts + kv)


def main(argv=None) -> int:
    ap = bench.build_parser("grok1 and llama.cpp side by side")
    ap.add_argument("--llama-bench", default=None, help="llama.cpp's llama-bench binary")
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: XLA's)")
    ap.add_argument("--gguf", default=None, help="write (and keep) the GGUF file here")
    ap.add_argument(
        "--repack", default="auto", choices=("auto", "0", "1"),
        help="llama-bench --repack; auto: 0 on CPUs with AMX (llama.cpp issue #20824: its AMX "
        "path crashes on multi-token batches), llama.cpp's default otherwise",
    )  # fmt: skip
    args = ap.parse_args(argv)
    if args.llama_bench and not os.access(args.llama_bench, os.X_OK):
        ap.error(f"--llama-bench {args.llama_bench}: not an executable file")
    binary = args.llama_bench or shutil.which("llama-bench")
    if binary is None:
        print(HOW_TO_GET)
        return 0
    try:
        import gguf  # noqa: F401
    except ImportError:
        ap.error("writing the GGUF file needs the gguf package: pip install -e '.[bench]'")
    if args.layers:
        ap.error("--layers (compile time) has no llama.cpp counterpart: use bench.py")

    machine = bench.machine_info()
    threads = args.threads or machine["threads"] or 1
    repack = {"auto": "0" if "amx_tile" in machine["isa"] else None}.get(args.repack, args.repack)
    extra = ("--repack", repack) if repack is not None else ()
    config, sizing = bench.resolve(ap, args, machine)
    workdir = None if args.gguf else tempfile.mkdtemp(prefix="grok1-gguf-")
    path = args.gguf or os.path.join(workdir, "bench.gguf")
    json_path, args.json = args.json, None
    try:
        print(f"writing {path} ...", flush=True)
        sizes = write_gguf(config, path, args.seed)
        llama_bench(binary, path, threads, prompt=8, extra=extra)  # loads it, before our runs
        peer = {"binary": binary, "threads": threads, "extra_args": list(extra),
                "gguf_bytes": os.path.getsize(path), "tensor_bytes": sizes,
                "ffn_padded": padded(config.ffn_size), "rounds": []}  # fmt: skip

        def between(batch, i):
            tg = llama_bench(binary, path, threads, gen=args.steps, depth=args.prompt, extra=extra)
            pp = llama_bench(binary, path, threads, prompt=args.prompt, extra=extra)
            peer.setdefault("build_commit", tg.get("build_commit"))
            peer.setdefault("cpu_info", tg.get("cpu_info"))
            peer["rounds"].append({"batch": batch, "round": i, "decode_tok_s": tg["samples_ts"][0],
                                   "prompt_tok_s": pp["samples_ts"][0]})  # fmt: skip

        resolved = machine, (config, sizing)
        report = bench.run(args, ap, between, extra={"llama_cpp": peer}, resolved=resolved)
    finally:
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    compare(report, peer, config, args)
    if json_path:
        tmp = json_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=1)
        os.replace(tmp, json_path)
    return 0


def compare(report, peer, config, args) -> None:
    """Adds llama.cpp's figures (with its bytes per step and MBU against the same bandwidth
    samples) and the ratios to the report, and prints them."""
    dec = [r["decode_tok_s"] for r in peer["rounds"]]
    pre = [r["prompt_tok_s"] for r in peer["rounds"]]
    peer["decode_tok_s"], peer["prompt_tok_s"] = bench.spread(dec), bench.spread(pre)
    bw = statistics.median(
        b for r in report["results"] for b in r["seconds"]["bandwidth_bytes_s"]
    )  # fmt: skip
    filled = args.prompt + 1 + (args.steps - 1) / 2
    ours1 = next((r for r in report["results"] if r["batch"] == 1), None)
    experts = ours1["experts_touched"]["mean"] if ours1 else config.num_selected_experts
    peer["bytes_per_step"] = llama_step_bytes(peer["tensor_bytes"], config, experts, filled)
    peer["mbu"] = peer["bytes_per_step"] * peer["decode_tok_s"]["median"] / bw
    print(f"llama.cpp ({peer['build_commit']}, {peer['threads']} threads, Q8_0, experts padded to "
          f"{peer['ffn_padded']}): decode {bench.show(peer['decode_tok_s'], '{:.1f}')} tok/s "
          f"({peer['bytes_per_step'] / 1e6:.1f} MB/step, MBU {100 * peer['mbu']:.0f}%), "
          f"prompt {bench.show(peer['prompt_tok_s'])} tok/s")  # fmt: skip
    if ours1:
        ratio = {
            "decode": ours1["decode_tok_s"]["median"] / peer["decode_tok_s"]["median"],
            "prefill": ours1["prefill_tok_s"]["median"] / peer["prompt_tok_s"]["median"],
        }
        peer["grok1_over_llama_batch1"] = ratio
        print(f"grok1 / llama.cpp at batch 1 (medians): decode {ratio['decode']:.2f}x, "
              f"prefill {ratio['prefill']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
