#!/usr/bin/env python3
"""Build the YOCO parity fixtures under tests/fixtures/ from tools/reference.py.

Run from the repository root:    python3 tools/make_fixtures.py

For every config a folder tests/fixtures/<name>/ gets
  params.json            the reference's fields (dim, n_layers, ... sliding_window)
  model.safetensors      random float32 weights under the reference's parameter names
                         (or shards + model.safetensors.index.json, or checkpoint.pth)
  expected.safetensors   tokens (int64, (T,)), logits (float32, (T, vocab)) of the full
                         causal forward, and the logits of two deliberately wrong RoPE
                         variants: logits_halfsplit_rope, logits_standard_freqs.

Everything is deterministic (fixed numpy seeds). Only numpy + safetensors are needed,
except for checkpoint.pth, which is written with torch.save when torch is importable
and otherwise by a small hand-written writer of the torch zip-pickle format.
"""

import io
import json
import os
import pickle
import shutil
import struct
import sys
import zipfile

import numpy as np
from safetensors.numpy import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference as ref  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures")

# Trap logits must differ from the correct ones by clearly more than this.
TRAP_MIN = 1e-3

# Weight scales, as multiples of 1/sqrt(fan_in). Chosen so that the residual stream
# stays O(1), attention / retention are position-sensitive, and the logits have a
# spread of a few units (so that a 1e-4 tolerance is meaningful).
SCALES = {
    "embed": 1.0,      # x0 = sqrt(dim) * embed -> entries of std ~1
    "qk": 1.5,         # sharper attention / retention scores
    "v": 1.0,
    "g": 1.0,
    # gt_proj: a reference-init-like 0.3/sqrt(dim), scaled up x20, so gt has std ~5 and
    # the decay exp(logsigmoid(gt)/16) ranges over ~0.5 .. 1 per token and head
    "gt": 0.3 * 20.0,
    "out": 0.7,
    "fc": 1.0,
    "fc2": 0.7,
    "kv": 1.0,
    "logits": 3.0,
    "norm_jitter": 0.1,  # norm weights = 1 + 0.1 * randn
}

CONFIGS = {
    "gret": dict(
        params=dict(dim=64, n_layers=4, hidden_dim=160, n_self_heads=4, n_attn_heads=4,
                    n_attn_kv_heads=2, vocab_size=256),
        T=300, seed=1001),
    "swa": dict(
        params=dict(dim=64, n_layers=4, hidden_dim=112, n_self_heads=4, n_attn_heads=8,
                    n_attn_kv_heads=2, vocab_size=264, sliding_window=32),
        T=300, seed=2002),
    "gret_long_theta": dict(
        params=dict(dim=64, n_layers=2, hidden_dim=136, n_self_heads=4, n_attn_heads=4,
                    n_attn_kv_heads=1, vocab_size=256, rope_theta=8e7, norm_eps=1e-5),
        T=600, seed=3003),
}


def make_weights(p, seed):
    """Random float32 weights under the reference's names, shapes (out, in)."""
    rng = np.random.default_rng(seed)
    w = {}
    for name, shape in ref.param_shapes(p).items():  # insertion order is deterministic
        if name.endswith("norm.weight"):
            a = 1.0 + SCALES["norm_jitter"] * rng.standard_normal(shape)
        else:
            fan_in = shape[1]
            if name == "embed_tokens.weight":
                key, fan_in = "embed", p["dim"]
            elif name == "output_projection.weight":
                key = "logits"
            elif name.endswith(("q_proj.weight", "k_proj.weight")) and ".layers." in name:
                key = "qk"
            elif name.endswith("v_proj.weight") and ".layers." in name:
                key = "v"
            elif name.endswith("g_proj.weight"):
                key = "g"
            elif name.endswith("gt_proj.weight"):
                key = "gt"
            elif name.endswith("out_proj.weight"):
                key = "out"
            elif name.endswith(("fc1.weight", "gate.weight")):
                key = "fc"
            elif name.endswith("fc2.weight"):
                key = "fc2"
            elif name in ("cross_decoder.k_proj.weight", "cross_decoder.v_proj.weight"):
                key = "kv"
            else:
                raise KeyError(name)
            a = SCALES[key] / np.sqrt(fan_in) * rng.standard_normal(shape)
        w[name] = a.astype(np.float32)
    return w


def write_params(folder, params):
    with open(os.path.join(folder, "params.json"), "w") as f:
        json.dump(params, f, indent=2)
        f.write("\n")


def safetensors_bytes(w):
    return sum(a.nbytes for a in w.values())


# --------------------------------------------------------------------------- .pth writers


def write_pth_torch(path, state):
    import torch

    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, path)


def _pk_str(s):
    b = s.encode("utf-8")
    return b"X" + struct.pack("<I", len(b)) + b  # BINUNICODE


def _pk_int(i):
    return b"J" + struct.pack("<i", i)  # BININT


def _pk_tuple(items):
    return b"(" + b"".join(items) + b"t"  # MARK ... TUPLE


def write_pth_by_hand(path, state):
    """torch zip-pickle format (what torch.save writes), without torch.

    <name>/data.pkl: protocol-2 pickle of a dict {key: tensor}; each tensor is
      torch._utils._rebuild_tensor_v2(storage, 0, size, stride, False, OrderedDict())
      with storage given by persistent id ('storage', torch.FloatStorage, '<i>', 'cpu', numel).
    <name>/data/<i>: the raw little-endian float32 bytes; <name>/version: "3".
    """
    name = os.path.splitext(os.path.basename(path))[0]
    glob_rebuild = b"ctorch._utils\n_rebuild_tensor_v2\n"
    glob_storage = b"ctorch\nFloatStorage\n"
    glob_odict = b"ccollections\nOrderedDict\n"
    pk = [b"\x80\x02", b"}", b"("]  # PROTO 2, EMPTY_DICT, MARK
    blobs = []
    for i, (key, arr) in enumerate(state.items()):
        arr = np.ascontiguousarray(arr, dtype="<f4")
        skey = str(i)
        blobs.append((skey, arr.tobytes()))
        strides = [int(np.prod(arr.shape[j + 1:])) for j in range(arr.ndim)]
        pid = _pk_tuple([_pk_str("storage"), glob_storage, _pk_str(skey), _pk_str("cpu"),
                         _pk_int(arr.size)]) + b"Q"  # BINPERSID
        args = _pk_tuple([
            pid,
            _pk_int(0),
            _pk_tuple([_pk_int(s) for s in arr.shape]),
            _pk_tuple([_pk_int(s) for s in strides]),
            b"\x89",  # NEWFALSE: requires_grad
            glob_odict + b")R",  # OrderedDict() : EMPTY_TUPLE, REDUCE
        ])
        pk.append(_pk_str(key) + glob_rebuild + args + b"R")
    pk.append(b"u.")  # SETITEMS, STOP
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr(f"{name}/data.pkl", b"".join(pk))
        z.writestr(f"{name}/byteorder", b"little")
        for skey, data in blobs:
            z.writestr(f"{name}/data/{skey}", data)
        z.writestr(f"{name}/version", b"3\n")


def write_pth(path, state):
    try:
        import torch  # noqa: F401
    except Exception:
        write_pth_by_hand(path, state)
        return "hand-written torch zip pickle (torch not importable)"
    write_pth_torch(path, state)
    # Also exercise the hand-written fallback against torch.load, so it stays valid.
    import tempfile

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        alt = os.path.join(tmp, "checkpoint.pth")
        write_pth_by_hand(alt, state)
        loaded = torch.load(alt, map_location="cpu", weights_only=True)
        assert list(loaded) == list(state)
        for k, v in state.items():
            assert loaded[k].dtype == torch.float32 and np.array_equal(loaded[k].numpy(), v), k
    return f"torch.save (torch {torch.__version__}); hand-written fallback verified with torch.load"


# --------------------------------------------------------------------------- main


def build(name, cfg):
    p = cfg["params"]
    T = cfg["T"]
    folder = os.path.join(OUT, name)
    os.makedirs(folder, exist_ok=True)
    w = make_weights(p, cfg["seed"])
    rng = np.random.default_rng(cfg["seed"] + 7)
    tokens = rng.integers(0, p["vocab_size"], size=T).astype(np.int64)

    logits = ref.forward(p, w, tokens)
    half = ref.forward(p, w, tokens, variant="halfsplit")
    std = ref.forward(p, w, tokens, variant="standard_freqs")
    d_half = float(np.max(np.abs(half - logits)))
    d_std = float(np.max(np.abs(std - logits)))
    print(f"[{name}] T={T} logits std={logits.std():.3f} min={logits.min():.2f} max={logits.max():.2f}")
    print(f"[{name}] max|halfsplit - correct| = {d_half:.4e}   max|standard_freqs - correct| = {d_std:.4e}")
    assert d_half > TRAP_MIN and d_std > TRAP_MIN, name
    if p.get("sliding_window") is not None:
        W = p["sliding_window"]
        wider = ref.forward(p, w, tokens, sliding_window=W + 1)
        d_w = float(np.max(np.abs(wider - logits)))
        print(f"[{name}] max|logits(W={W + 1}) - logits(W={W})| = {d_w:.4e}")
        assert d_w > TRAP_MIN, name

    write_params(folder, p)
    save_file(w, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    save_file({
        "tokens": tokens,
        "logits": logits.astype(np.float32),
        "logits_halfsplit_rope": half.astype(np.float32),
        "logits_standard_freqs": std.astype(np.float32),
    }, os.path.join(folder, "expected.safetensors"))
    return w


def build_sharded(src, name):
    p = CONFIGS[src]["params"]
    folder = os.path.join(OUT, name)
    os.makedirs(folder, exist_ok=True)
    w = load_file(os.path.join(OUT, src, "model.safetensors"))
    files = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    # shard 1: embedding + self-decoder; shard 2: cross-decoder + output projection
    parts = [{}, {}]
    for k, v in w.items():
        parts[0 if k.startswith(("embed_tokens.", "self_decoder.")) else 1][k] = v
    weight_map = {}
    for fname, part in zip(files, parts):
        save_file(part, os.path.join(folder, fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    index = {"metadata": {"total_size": safetensors_bytes(w)},
             "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
        f.write("\n")
    write_params(folder, p)
    # Same weights as `src`: the tests read `src`'s expected.safetensors (no copy, smaller repo).
    print(f"[{name}] {len(parts[0])} + {len(parts[1])} tensors in two shards")


def build_pth(src, name):
    p = CONFIGS[src]["params"]
    folder = os.path.join(OUT, name)
    os.makedirs(folder, exist_ok=True)
    w = load_file(os.path.join(OUT, src, "model.safetensors"))
    state = {"decoder.model." + k: v for k, v in w.items()}
    how = write_pth(os.path.join(folder, "checkpoint.pth"), state)
    write_params(folder, p)
    print(f"[{name}] checkpoint.pth written with {how}")


def main():
    ref.self_check()
    os.makedirs(OUT, exist_ok=True)
    for name, cfg in CONFIGS.items():
        build(name, cfg)
    build_sharded("gret", "gret_sharded")
    build_pth("gret", "gret_pth")
    total = 0
    for dirpath, _, files in os.walk(OUT):
        total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
    print(f"total fixture size: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
