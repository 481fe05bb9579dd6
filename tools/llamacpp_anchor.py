#!/usr/bin/env python3
"""llama.cpp on Phi-4-mini's shape, the CPU anchor for yoco's Phi-4-mini-flash, measured side by
side with `cargo run --release --example profile -- --shape phi4-flash`.

Phi-4-mini (microsoft/Phi-4-mini-instruct) is the Transformer Phi-4-mini-flash-reasoning was
made to replace at the same size (3.84B: dim 3072, 32 layers, 24 query heads over 8 KV heads of
128, FFN 8192, vocab 200064, tied embedding, 96 of 128 dimensions rotated); llama.cpp runs it as
its `phi3` architecture, and is what CPU users run it with. Weights are random (only the shape
matters for speed), written as an f16 GGUF and quantized with llama.cpp's own quantizer.

Setup (llama.cpp is built from source by pip: about 6 minutes on 2 cores; it is compiled for
this CPU, so build it on the machine that measures):

    python3 -m venv ANCHORS/venv
    ANCHORS/venv/bin/pip install -r tools/requirements-anchors.txt
    PY=ANCHORS/venv/bin/python

Where the CPU reports AMX but the machine does not let programs use it (a VM), llama.cpp's AMX
kernels crash (SIGSEGV in ggml_backend_amx_mul_mat); build it without them, keeping every other
extension of the CPU (`bench` prints llama.cpp's system_info line to check):

    CMAKE_ARGS="-DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' \
                -DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'" \
        ANCHORS/venv/bin/pip install --no-cache-dir -r tools/requirements-anchors.txt

Subcommands (each prints one JSON line per result):

    $PY tools/llamacpp_anchor.py make ANCHORS/phi4mini-f16.gguf           # 7.7 GB, ~2 min
    $PY tools/llamacpp_anchor.py quantize ANCHORS/phi4mini-f16.gguf ANCHORS/phi4mini-Q4_K_M.gguf Q4_K_M
    $PY tools/llamacpp_anchor.py quantize ANCHORS/phi4mini-f16.gguf ANCHORS/phi4mini-Q8_0.gguf Q8_0
    $PY tools/llamacpp_anchor.py bench ANCHORS/phi4mini-Q4_K_M.gguf --prompt 1024 --decode 16

    # Both sides in one sitting, alternating (ours, theirs, ours, theirs) so that both see the
    # same load on a busy machine; medians and ratios at the end (markdown), every run in --out.
    cargo build --release --example profile
    $PY tools/llamacpp_anchor.py compare --profile target/release/examples/profile \\
        --gguf-dir ANCHORS --runs 2 --decode 16 --out ANCHORS/compare.jsonl \\
        --point 1024:q4_k:Q4_K_M --point 1024:q8_0:Q8_0 --point 8192:q4_k:Q4_K_M

A point is CONTEXT:OUR_QUANT:LLAMA_TYPE; the GGUF of type T is GGUF_DIR/phi4mini-T.gguf.

What `bench` measures (one process per measurement, as `profile` does for its side):
  * weights read into memory (no mmap: llama.cpp would otherwise repack Q4_K tensors into a
    second buffer beside the mapped file and count them twice), 2 threads, flash attention,
    f16 K/V, n_batch = n_ubatch = 512 (llama.cpp's defaults), n_ctx = prompt + decode rounded
    up to 256;
  * warm-up (one token, then 32) and a cleared cache, as llama-bench does;
  * prefill: the prompt's random ids in n_batch chunks, logits for the last token only;
  * decode: one token per call with its logits (the 200064-row head included), the median;
  * peak RSS: VmHWM, started again (`5` into /proc/self/clear_refs) once the weights are loaded,
    so that it is the inference's, as `profile` reports its own; the whole process's peak too.
The GGUF's tokenizer is `none` with `phi3.vocab_size`: ids are fed directly.
"""
import argparse
import ctypes
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

# Phi-4-mini-instruct's config.json, as llama.cpp's converter (Phi3MiniModel) writes it.
PHI4_MINI = dict(dim=3072, layers=32, heads=24, kv_heads=8, ffn=8192, vocab=200064,
                 rope_dims=96, rope_base=10000.0, ctx=131072, ctx_orig=4096, eps=1e-5,
                 sliding_window=262144)
# A few-MB model of the same layout, for checking the harness end to end in seconds.
TINY = dict(PHI4_MINI, dim=256, layers=2, heads=4, kv_heads=2, ffn=512, vocab=1024, rope_dims=48)


def emit(obj):
    print(json.dumps(obj), flush=True)


def status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


# --------------------------------------------------------------------------------------------
# make: a random-weight f16 GGUF of Phi-4-mini's shape

def cmd_make(a):
    import numpy as np
    import gguf

    p = TINY if a.tiny else PHI4_MINI
    head_dim = p["dim"] // p["heads"]
    kv = head_dim * p["kv_heads"]
    w = gguf.GGUFWriter(a.out, "phi3")
    w.add_name("Phi-4-mini shape, random weights")
    w.add_context_length(p["ctx"])
    w.add_rope_scaling_orig_ctx_len(p["ctx_orig"])
    w.add_embedding_length(p["dim"])
    w.add_feed_forward_length(p["ffn"])
    w.add_block_count(p["layers"])
    w.add_head_count(p["heads"])
    w.add_head_count_kv(p["kv_heads"])
    w.add_layer_norm_rms_eps(p["eps"])
    w.add_rope_dimension_count(p["rope_dims"])
    w.add_rope_freq_base(p["rope_base"])
    w.add_sliding_window(p["sliding_window"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    # LongRoPE (the real model's scaling): its attention factor; the factors are all 1 here.
    scale = p["ctx"] / p["ctx_orig"]
    w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(p["ctx_orig"])))
    # No token strings: llama.cpp makes a vocabulary of `vocab_size` placeholder tokens.
    w.add_vocab_size(p["vocab"])
    w.add_tokenizer_model("none")
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    # (name, numpy shape, random?) in the order a conversion writes them; Q|K|V and gate|up fused
    # as llama.cpp's phi3 graph reads them; no output.weight (the head is the embedding).
    tensors = [("token_embd.weight", (p["vocab"], p["dim"]), True),
               ("rope_factors_long.weight", (p["rope_dims"] // 2,), False),
               ("rope_factors_short.weight", (p["rope_dims"] // 2,), False)]
    for i in range(p["layers"]):
        b = f"blk.{i}."
        tensors += [(b + "attn_norm.weight", (p["dim"],), False),
                    (b + "attn_qkv.weight", (p["dim"] + 2 * kv, p["dim"]), True),
                    (b + "attn_output.weight", (p["dim"], p["dim"]), True),
                    (b + "ffn_norm.weight", (p["dim"],), False),
                    (b + "ffn_up.weight", (2 * p["ffn"], p["dim"]), True),
                    (b + "ffn_down.weight", (p["dim"], p["ffn"]), True)]
    tensors.append(("output_norm.weight", (p["dim"],), False))

    def dtype(rand):
        return np.dtype(np.float16 if rand else np.float32)

    for name, shape, rand in tensors:
        w.add_tensor_info(name, shape, dtype(rand), int(np.prod(shape)) * dtype(rand).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(a.seed)
    t0 = time.time()
    n_params = 0
    for name, shape, rand in tensors:
        if rand:
            # N(0, 0.02) as yoco's random weights, drawn in f32 a block of rows at a time.
            data = np.empty(shape, dtype=np.float16)
            step = max(1, (1 << 24) // shape[1])
            for r in range(0, shape[0], step):
                block = rng.standard_normal((min(step, shape[0] - r), shape[1]), dtype=np.float32)
                data[r:r + step] = block * np.float32(0.02)
        else:
            data = np.ones(shape, dtype=np.float32)
        if not name.startswith("rope_factors"):
            n_params += data.size
        w.write_tensor_data(data)
    w.close()
    emit(dict(step="make", out=a.out, bytes=os.path.getsize(a.out), params=n_params,
              seconds=round(time.time() - t0, 1)))


# --------------------------------------------------------------------------------------------
# quantize: llama.cpp's own quantizer

def cmd_quantize(a):
    import llama_cpp as L

    L.llama_backend_init()
    params = L.llama_model_quantize_default_params()
    params.nthread = a.threads
    params.ftype = {"Q4_K_M": L.LLAMA_FTYPE_MOSTLY_Q4_K_M, "Q8_0": L.LLAMA_FTYPE_MOSTLY_Q8_0,
                    "Q4_0": L.LLAMA_FTYPE_MOSTLY_Q4_0}[a.type]
    t0 = time.time()
    rc = L.llama_model_quantize(a.inp.encode(), a.out.encode(), ctypes.byref(params))
    emit(dict(step="quantize", type=a.type, rc=rc, out=a.out, seconds=round(time.time() - t0, 1),
              bytes=os.path.getsize(a.out) if os.path.exists(a.out) else None))
    sys.exit(1 if rc else 0)


# --------------------------------------------------------------------------------------------
# bench: prefill and decode of one GGUF in this process

def cmd_bench(a):
    import numpy as np
    import llama_cpp as L

    if not a.verbose:
        @ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
        def quiet(level, text, user):
            pass
        cmd_bench.quiet = quiet  # the callback must outlive the call
        L.llama_log_set(quiet, ctypes.c_void_p(0))
    L.llama_backend_init()
    mp = L.llama_model_default_params()
    mp.n_gpu_layers = 0
    # This llama.cpp's switch for memory mapping is `load_mode` (there is no `use_mmap`).
    mp.load_mode = L.LLAMA_LOAD_MODE_MMAP if a.mmap else L.LLAMA_LOAD_MODE_NONE
    t0 = time.perf_counter()
    model = L.llama_model_load_from_file(a.model.encode(), mp)
    if not model:
        sys.exit("llama.cpp could not load " + a.model)
    load_s = time.perf_counter() - t0
    load_peak = status_bytes("VmHWM")
    # From here the peak is the inference's: the weights as held plus what it adds.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    desc = ctypes.create_string_buffer(256)
    L.llama_model_desc(model, desc, 256)

    cp = L.llama_context_default_params()
    cp.n_ctx = -(-(a.prompt + a.decode + 1) // 256) * 256
    cp.n_batch = cp.n_ubatch = a.batch
    cp.n_seq_max = 1
    cp.n_threads = cp.n_threads_batch = a.threads
    cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_ENABLED
    ctx = L.llama_init_from_model(model, cp)
    if not ctx:
        sys.exit("llama.cpp could not make a context")
    batch = L.llama_batch_init(a.batch, 0, 1)

    def run(ids, pos, logits):
        """One llama_decode of `ids` from `pos`; logits for the last id only when asked."""
        for i, t in enumerate(ids):
            batch.token[i] = int(t)
            batch.pos[i] = pos + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1 if (logits and i == len(ids) - 1) else 0
        batch.n_tokens = len(ids)
        rc = L.llama_decode(ctx, batch)
        if rc != 0:
            sys.exit(f"llama_decode returned {rc}")
        L.llama_synchronize(ctx)
        if logits:
            _ = L.llama_get_logits_ith(ctx, -1)[0]

    rng = np.random.default_rng(a.seed)
    ids = rng.integers(0, n_vocab, a.prompt + a.decode).tolist()
    # Warm-up on the one-token and the batched paths, then an empty cache.
    run(ids[:1], 0, True)
    run(ids[1:33], 1, True)
    L.llama_memory_clear(L.llama_get_memory(ctx), True)

    t0 = time.perf_counter()
    for s in range(0, a.prompt, a.batch):
        chunk = ids[s:min(s + a.batch, a.prompt)]
        run(chunk, s, s + len(chunk) == a.prompt)
    prefill_s = time.perf_counter() - t0
    steps = []
    for i in range(a.decode):
        t0 = time.perf_counter()
        run(ids[a.prompt + i:a.prompt + i + 1], a.prompt + i, True)
        steps.append(time.perf_counter() - t0)
    decode_s = statistics.median(steps)
    peak = status_bytes("VmHWM")
    emit(dict(side="llama.cpp", model=desc.value.decode(), gguf=os.path.basename(a.model),
              gguf_bytes=os.path.getsize(a.model), weight_bytes=L.llama_model_size(model),
              params=L.llama_model_n_params(model), context=a.prompt, decode_steps=a.decode,
              threads=a.threads, load_s=round(load_s, 2), prefill_s=prefill_s,
              prefill_tokens_per_s=a.prompt / prefill_s, decode_ms=decode_s * 1e3,
              decode_tokens_per_s=1 / decode_s, peak_rss_bytes=max(peak, load_peak if a.whole else 0),
              process_peak_rss_bytes=max(peak, load_peak), load_peak_rss_bytes=load_peak,
              system_info=L.llama_print_system_info().decode().strip()))
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)


# --------------------------------------------------------------------------------------------
# compare: both sides alternating, medians and ratios

def child_json(cmd):
    """The last JSON line a child prints, or None (its error shown)."""
    out = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        print(f"failed ({out.returncode}): {' '.join(cmd)}\n{out.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(lines[-1])


def ours(a, ctx, quant):
    with tempfile.TemporaryDirectory() as d:
        cmd = [a.profile, "--shape", "phi4-flash", "--contexts", str(ctx), "--quant", quant,
               "--decode-steps", str(a.decode), "--out", d]
        if subprocess.run(cmd, capture_output=True, text=True).returncode != 0:
            print("failed: " + " ".join(cmd), file=sys.stderr)
            return None
        with open(os.path.join(d, "profile.json")) as f:
            rows = json.load(f)
    if not rows:
        return None
    r = rows[0]
    r["side"] = "yoco"
    return r


def theirs(a, ctx, gguf_type):
    path = os.path.join(a.gguf_dir, f"phi4mini-{gguf_type}.gguf")
    return child_json([sys.executable, os.path.abspath(__file__), "bench", path,
                       "--prompt", str(ctx), "--decode", str(a.decode), "--threads", str(a.threads)])


def load_avg():
    with open("/proc/loadavg") as f:
        return f.read().split()[:3]


def cmd_compare(a):
    points = []
    for p in a.point:
        ctx, quant, gguf_type = p.split(":")
        points.append((int(ctx), quant, gguf_type))
    results = []
    out = open(a.out, "a") if a.out else None
    for run in range(a.runs):
        for ctx, quant, gguf_type in points:
            for side, measure in (("yoco", lambda: ours(a, ctx, quant)),
                                  ("llama.cpp", lambda: theirs(a, ctx, gguf_type))):
                before = load_avg()
                r = measure()
                if r is None:
                    continue
                r.update(run=run, point=f"{ctx}:{quant}:{gguf_type}", load_before=before,
                         load_after=load_avg(), at=time.strftime("%Y-%m-%d %H:%M:%S"))
                results.append(r)
                emit(r)
                if out:
                    out.write(json.dumps(r) + "\n")
                    out.flush()

    def med(rows, key):
        xs = [r[key] for r in rows if r.get(key) is not None]
        return statistics.median(xs) if xs else float("nan")

    print("\n| context | yoco | llama.cpp | runs | prefill s (yoco / llama.cpp) | prefill speed-up "
          "| decode tok/s (yoco / llama.cpp) | decode speed-up | peak RSS GB (yoco / llama.cpp) "
          "| weights GB (yoco / llama.cpp) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for ctx, quant, gguf_type in points:
        key = f"{ctx}:{quant}:{gguf_type}"
        y = [r for r in results if r["point"] == key and r["side"] == "yoco"]
        t = [r for r in results if r["point"] == key and r["side"] == "llama.cpp"]
        yp, tp = med(y, "prefill_s"), med(t, "prefill_s")
        yd, td = med(y, "decode_tokens_per_s"), med(t, "decode_tokens_per_s")
        print(f"| {ctx} | {quant} | {gguf_type} | {len(y)}/{len(t)} | {yp:.1f} / {tp:.1f} | "
              f"{tp / yp:.2f}x | {yd:.2f} / {td:.2f} | {yd / td:.2f}x | "
              f"{med(y, 'peak_rss_bytes') / 1e9:.2f} / {med(t, 'peak_rss_bytes') / 1e9:.2f} | "
              f"{med(y, 'weight_bytes') / 1e9:.2f} / {med(t, 'weight_bytes') / 1e9:.2f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make", help="write a random-weight f16 GGUF of Phi-4-mini's shape")
    m.add_argument("out")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--tiny", action="store_true", help="a tiny model of the same layout")
    q = sub.add_parser("quantize", help="quantize a GGUF with llama.cpp's quantizer")
    q.add_argument("inp")
    q.add_argument("out")
    q.add_argument("type", choices=["Q4_K_M", "Q8_0", "Q4_0"])
    q.add_argument("--threads", type=int, default=os.cpu_count())
    b = sub.add_parser("bench", help="prefill and decode of one GGUF, one JSON line")
    b.add_argument("model")
    b.add_argument("--prompt", type=int, default=1024)
    b.add_argument("--decode", type=int, default=16)
    b.add_argument("--threads", type=int, default=os.cpu_count())
    b.add_argument("--batch", type=int, default=512)
    b.add_argument("--seed", type=int, default=1)
    b.add_argument("--mmap", action="store_true", help="map the file instead of reading it")
    b.add_argument("--whole", action="store_true",
                   help="peak_rss_bytes over the whole process, loading included")
    b.add_argument("--verbose", action="store_true", help="llama.cpp's own log")
    c = sub.add_parser("compare", help="yoco's profile and llama.cpp, alternating")
    c.add_argument("--profile", required=True, help="the built profile example")
    c.add_argument("--gguf-dir", required=True)
    c.add_argument("--point", action="append", required=True,
                   help="CONTEXT:OUR_QUANT:LLAMA_TYPE, e.g. 1024:q4_k:Q4_K_M (repeatable)")
    c.add_argument("--runs", type=int, default=2)
    c.add_argument("--decode", type=int, default=16)
    c.add_argument("--threads", type=int, default=os.cpu_count())
    c.add_argument("--out", help="append every run's JSON line to this file")
    a = ap.parse_args()
    {"make": cmd_make, "quantize": cmd_quantize, "bench": cmd_bench, "compare": cmd_compare}[a.cmd](a)


if __name__ == "__main__":
    main()
