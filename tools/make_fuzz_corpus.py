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
    print(f"corpus written under {os.path.relpath(CORPUS, ROOT)}")


if __name__ == "__main__":
    main()
