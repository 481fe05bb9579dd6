#!/usr/bin/env python3
"""Seed corpus for the cargo-fuzz targets in fuzz/ (run from the repository root):

    python3 tools/make_fuzz_corpus.py

Writes small valid inputs, so the fuzzer starts from files that load and mutates from there:
  fuzz/corpus/params_json/   the fixture configs and a few edge cases
  fuzz/corpus/safetensors/   [u16 LE json length][params.json][model.safetensors], tiny models
                             (gated retention and sliding window)
  fuzz/corpus/pth/           a tiny checkpoint.pth (the config the `pth` target fixes)
  fuzz/corpus/pth_pickle/    its data.pkl alone (the `pth_pickle` target zips it with the
                             seed's tensor data, so it reads corpus/pth/tiny too)
  fuzz/corpus/gguf/          model.gguf files: the tiny model in f32, and a model of width 32
                             with its projections in Q8_0 and Q4_0 (written here, field by field)
Needs numpy and safetensors (tools/requirements.txt); deterministic.
"""
import json
import os
import struct
import sys
import zipfile

import numpy as np
from safetensors.numpy import save

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_fixtures as mf  # noqa: E402
import reference as ref  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "fuzz", "corpus")

# Must equal PARAMS in fuzz/fuzz_targets/pth.rs.
TINY = dict(dim=8, n_layers=2, hidden_dim=16, n_self_heads=2, n_attn_heads=2, n_attn_kv_heads=1,
            vocab_size=16)
TINY_SWA = dict(TINY, n_layers=4, sliding_window=3)


def write(target, name, data):
    folder = os.path.join(CORPUS, target)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "wb") as f:
        f.write(data)


def params_bytes(p):
    return json.dumps(p).encode()


def gguf_string(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def q8_0(a):
    """GGML Q8_0 blocks of the rows of `a`: per 32 values an f16 scale then 32 int8."""
    blocks = a.astype(np.float32).reshape(-1, 32)
    d = np.abs(blocks).max(axis=1) / 127.0
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d != 0)
    q = np.round(blocks * inv[:, None]).astype(np.int8)
    return b"".join(s.tobytes() + r.tobytes() for s, r in zip(d.astype("<f2"), q))


def q4_0(a):
    """GGML Q4_0 blocks: per 32 values an f16 scale then 16 bytes, value j in the low nibble of
    byte j and value j + 16 in its high nibble, stored as q + 8."""
    blocks = a.astype(np.float32).reshape(-1, 32)
    idx = np.abs(blocks).argmax(axis=1)
    mx = blocks[np.arange(len(blocks)), idx]
    d = mx / -8.0
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d != 0)
    q = np.clip(np.floor(blocks * inv[:, None] + 8.5), 0, 15).astype(np.uint8)
    packed = q[:, :16] | (q[:, 16:] << 4)
    return b"".join(s.tobytes() + r.tobytes() for s, r in zip(d.astype("<f2"), packed))


def gguf_bytes(params, weights, formats):
    """A YOCO model.gguf: general.architecture and yoco.<field> metadata, then the tensors
    (GGUF type 0 = f32, 2 = Q4_0, 8 = Q8_0 as `formats` says; f32 otherwise), 32-byte aligned."""
    meta = [gguf_string("general.architecture") + struct.pack("<I", 8) + gguf_string("yoco")]
    for k, v in params.items():
        if v is None:
            continue
        if isinstance(v, int):
            meta.append(gguf_string("yoco." + k) + struct.pack("<IQ", 10, v))
        else:
            meta.append(gguf_string("yoco." + k) + struct.pack("<Id", 12, v))
    infos, data = [], b""
    for name, a in weights.items():
        kind = formats.get(name, 0)
        raw = {0: lambda x: x.astype("<f4").tobytes(), 2: q4_0, 8: q8_0}[kind](a)
        dims = list(reversed(a.shape))
        infos.append(gguf_string(name) + struct.pack("<I", len(dims))
                     + b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", kind, len(data)))
        data += raw + b"\0" * (-len(raw) % 32)
    head = b"GGUF" + struct.pack("<IQQ", 3, len(infos), len(meta)) + b"".join(meta) + b"".join(infos)
    return head + b"\0" * (-len(head) % 32) + data


def main():
    for name, cfg in mf.CONFIGS.items():
        write("params_json", name + ".json", params_bytes(cfg["params"]))
    write("params_json", "tiny.json", params_bytes(TINY))
    write("params_json", "tiny_swa.json", params_bytes(TINY_SWA))
    write("params_json", "all_fields.json", params_bytes(dict(
        TINY, rope_theta=500000.0, norm_eps=1e-6, sliding_window=None, max_batch_size=1,
        max_seq_len=4096, model_parallel_size=1, load_checkpoint=False)))

    for name, p, seed in [("tiny", TINY, 1), ("tiny_swa", TINY_SWA, 2)]:
        w = mf.make_weights(ref.normalize_params(p), seed)
        js = params_bytes(p)
        write("safetensors", name, struct.pack("<H", len(js)) + js + save(w))

    w = mf.make_weights(ref.normalize_params(TINY), 3)
    path = os.path.join(CORPUS, "pth", "tiny")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    mf.write_pth_by_hand(path, w)
    with zipfile.ZipFile(path) as z:
        pickle = next(z.read(n) for n in z.namelist() if n.endswith("data.pkl"))
    write("pth_pickle", "tiny", pickle)

    w = mf.make_weights(ref.normalize_params(TINY), 4)
    write("gguf", "tiny_f32", gguf_bytes(TINY, w, {}))
    wide = dict(TINY, dim=32, hidden_dim=64)
    w = mf.make_weights(ref.normalize_params(wide), 5)
    formats = {n: (8 if "self_decoder" in n else 2) for n, a in w.items()
               if a.ndim == 2 and n != "embed_tokens.weight"}
    write("gguf", "wide_q8_0_q4_0", gguf_bytes(wide, w, formats))
    print(f"corpus written under {os.path.relpath(CORPUS, ROOT)}")


if __name__ == "__main__":
    main()
