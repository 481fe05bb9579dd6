#!/usr/bin/env python3
"""Validation bits per byte of a saved YOCO model folder (params.json, model.safetensors, tokenizer.json).

    python tools/eval_bpb.py models/shakespeare
    python tools/eval_bpb.py models/shakespeare --data ../shared/data/shakespeare --sample

Each held-out play (default: twelfth_night and tempest, the split of tools/train_shakespeare.py) is
normalised exactly as in training and scored as <s> + its tokens in sliding windows of --seq-len
inputs (each window starts with <s>, as in training) with stride --seq-len/2, every token counted once.
bits per byte = total next-token NLL in bits / UTF-8 bytes of the plays. The stored weights (f16 for
the shipped model) are computed in float32. Relative paths are taken from the repository root.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import yoco_torch as yt  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def rel(p):
    p = Path(p)
    return p if p.is_absolute() else REPO / p


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", nargs="?", default="models/shakespeare")
    ap.add_argument("--data", default="../shared/data/shakespeare")
    ap.add_argument("--val-plays", default="twelfth_night,tempest")
    ap.add_argument("--seq-len", type=int, default=256, help="window length (the training length)")
    ap.add_argument("--stride", type=int, default=None, help="default seq-len/2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sample", action="store_true", help="also print a greedy and a sampled text")
    ap.add_argument("--prompt", default="ROMEO.\n")
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model, cfg, tok = yt.load_model_dir(rel(args.model_dir))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.model_dir}: {cfg}, {n_params:,} parameters")
    val_names = [v.strip() for v in args.val_plays.split(",") if v.strip()]
    train, val = yt.load_split(rel(args.data), val_names)
    t0 = time.time()
    total_bits, total_bytes = 0.0, 0
    for name, text in val.items():
        bpb, bits, n_bytes, n_tok = yt.eval_bpb(model, tok, {name: text}, args.seq_len, args.stride)
        total_bits += bits
        total_bytes += n_bytes
        print(f"  {name:20s} {bpb:.4f} bits/byte  ({n_bytes:,} bytes, {n_tok:,} tokens)")
    print(f"validation: {total_bits / total_bytes:.4f} bits/byte over {total_bytes:,} bytes "
          f"({time.time() - t0:.0f}s)")
    if args.sample:
        words = yt.word_set(train.values())
        g = torch.Generator().manual_seed(args.seed)
        for name, temp in (("greedy", 0.0), ("sampled, temperature 0.8", 0.8)):
            text = yt.generate(model, tok, args.prompt, 300, temperature=temp, generator=g)
            frac, n = yt.real_word_fraction(text, words)
            print(f"---- {name}: {frac * 100:.0f}% of {n} words appear in the training text ----\n{text}")


if __name__ == "__main__":
    main()
