"""A Phi-4-mini-flash-reasoning directory of the real shape with random bf16 weights.

Written as the published model is (`config.json`, safetensors shards, an index), so that loading
it exercises the same code and the same memory as loading the download. Used to measure the
peak memory of quantize-at-load (README, "Phi-4-mini-flash-reasoning"):

    python3 tools/make_phi4flash_random.py DIR [--layers 32]     # 7.7 GB at the real shape
    /usr/bin/time -v target/release/examples/generate --model DIR --quant q4_k ...

Needs only NumPy. The names and shapes follow the reference's `state_dict()` (SPEC: even layers
of the first half are Mamba, odd ones sliding-window attention, layer L/2 the memory Mamba, L/2+1
the global attention, then GMU and cross-attention in turn; tied head).
"""

import argparse
import json
import os
import shutil
import struct

import numpy as np


def parameters(cfg):
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    h, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = d // h
    e, n, k = 2 * d, 16, 4
    r = -(-d // 16)
    layers = cfg["num_hidden_layers"]
    half = layers // 2
    yield "model.embed_tokens.weight", (v, d)
    for i in range(layers):
        p = f"model.layers.{i}."
        even = i % 2 == 0
        for norm in ("input_layernorm", "post_attention_layernorm"):
            yield p + norm + ".weight", (d,)
            yield p + norm + ".bias", (d,)
        if even and i <= half:  # Mamba (the memory one at L/2 too)
            yield p + "attn.in_proj.weight", (2 * e, d)
            yield p + "attn.conv1d.weight", (e, 1, k)
            yield p + "attn.conv1d.bias", (e,)
            yield p + "attn.x_proj.weight", (r + 2 * n, e)
            yield p + "attn.dt_proj.weight", (e, r)
            yield p + "attn.dt_proj.bias", (e,)
            yield p + "attn.A_log", (e, n)
            yield p + "attn.D", (e,)
            yield p + "attn.out_proj.weight", (d, e)
        elif even:  # GMU
            yield p + "attn.in_proj.weight", (e, d)
            yield p + "attn.out_proj.weight", (d, e)
        else:
            rows = h * hd if i > half + 1 else (h + 2 * kv) * hd
            yield p + "attn.Wqkv.weight", (rows, d)
            yield p + "attn.Wqkv.bias", (rows,)
            yield p + "attn.out_proj.weight", (d, h * hd)
            yield p + "attn.out_proj.bias", (d,)
            for x in ("q1", "k1", "q2", "k2"):
                yield p + f"attn.inner_cross_attn.lambda_{x}", (hd,)
            yield p + "attn.inner_cross_attn.subln.weight", (2 * hd,)
        yield p + "mlp.fc1.weight", (2 * f, d)
        yield p + "mlp.fc2.weight", (d, f)
    yield "model.final_layernorm.weight", (d,)
    yield "model.final_layernorm.bias", (d,)


def bf16_bits(x):
    """float32 -> bfloat16 bit patterns (round to nearest even), as uint16."""
    b = x.astype(np.float32).view(np.uint32)
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)


def random_values(name, shape, rng):
    count = int(np.prod(shape))
    if name.endswith("A_log"):  # log of 1..16 per state, as Mamba initialises it
        return np.log(np.tile(np.arange(1, shape[1] + 1, dtype=np.float32), (shape[0], 1)))
    if name.endswith("norm.weight") or name.endswith(".D") or name.endswith("subln.weight"):
        return np.ones(count, dtype=np.float32)
    if name.endswith(".bias") or "lambda_" in name:
        return np.zeros(count, dtype=np.float32)
    fan_in = shape[-1] if len(shape) > 1 else 1
    return rng.standard_normal(count, dtype=np.float32) * (0.5 / np.sqrt(fan_in))


def write_shard(path, tensors, rng):
    header, offset = {}, 0
    for name, shape in tensors:
        size = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(text)))
        out.write(text)
        for name, shape in tensors:
            # Large tensors in bands of rows, so the writer's own memory stays small.
            values = random_values(name, shape, rng).reshape(shape[0], -1)
            for start in range(0, shape[0], 8192):
                out.write(bf16_bits(values[start : start + 8192]).tobytes())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-bytes", type=float, default=4.0e9)
    args = ap.parse_args()
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "..", "tests", "fixtures", "phi4flash", "real_config.json")) as f:
        cfg = json.load(f)
    cfg["num_hidden_layers"] = args.layers
    os.makedirs(args.dir, exist_ok=True)
    with open(os.path.join(args.dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    shards, size = [[]], 0
    for name, shape in parameters(cfg):
        bytes_ = int(np.prod(shape)) * 2
        if shards[-1] and size + bytes_ > args.shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += bytes_
    rng = np.random.default_rng(args.seed)
    weight_map = {}
    for i, tensors in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_shard(os.path.join(args.dir, file), tensors, rng)
        weight_map.update({name: file for name, _ in tensors})
    with open(os.path.join(args.dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)
    print(f"{args.dir}: {len(weight_map)} tensors in {len(shards)} shards")


if __name__ == "__main__":
    main()
