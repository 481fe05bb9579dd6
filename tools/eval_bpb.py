#!/usr/bin/env python3
"""Validation bits per byte of a saved YOCO model folder (params.json, model.safetensors, tokenizer.json).

    python tools/eval_bpb.py models/shakespeare
    python tools/eval_bpb.py models/shakespeare --data ../shared/data/shakespeare --sample
    python tools/eval_bpb.py models/shakespeare --breakdown   # bits by kind of line

Each held-out play (default: twelfth_night and tempest, the split of tools/train_shakespeare.py) is
normalised exactly as in training and scored as <s> + its tokens in sliding windows of --seq-len
inputs (each window starts with <s>, as in training) with stride --seq-len/2, every token counted once.
bits per byte = total next-token NLL in bits / UTF-8 bytes of the plays. The stored weights (f16 for
the shipped model) are computed in float32. Relative paths are taken from the repository root.
"""
import argparse
import math
import re
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


SPEAKER = re.compile(r"[A-Z][A-Z0-9 ,'&-]*\.")  # a speaker line of the held-out plays ("SIR TOBY.")


def line_kinds(text):
    """The kind of line each character of `text` is in: "speech", "stage direction", "blank",
    "speaker, first" (a name's first line in the play) or "speaker, again"."""
    kinds, seen = [], set()
    for line in text.split("\n"):
        s = line.strip()
        if SPEAKER.fullmatch(s):
            kind = "speaker, again" if s in seen else "speaker, first"
            seen.add(s)
        elif s.startswith("["):
            kind = "stage direction"
        else:
            kind = "speech" if s else "blank"
        kinds += [kind] * (len(line) + 1)
    return kinds[: len(text)]


def add_breakdown(kinds, text, ids, offsets, nll):
    """Adds each token's bits and bytes to the kind of line it starts in; speaker-name tokens are
    split into the line's first token (which character speaks) and the rest (spelling the name)."""
    per_char = line_kinds(text)
    prev = None
    for (a, b), nats in zip(offsets, nll):
        kind = per_char[min(a, len(per_char) - 1)]
        if kind.startswith("speaker"):
            part = ", first token" if prev != kind else ", rest"
            prev, kind = kind, kind + part
        else:
            prev = kind
        acc = kinds.setdefault(kind, [0.0, 0])
        acc[0] += nats / math.log(2)
        acc[1] += len(text[a:b].encode("utf-8"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", nargs="?", default="models/shakespeare")
    ap.add_argument("--data", default="../shared/data/shakespeare")
    ap.add_argument("--val-plays", default="twelfth_night,tempest")
    ap.add_argument("--seq-len", type=int, default=512, help="window length (the training length)")
    ap.add_argument("--stride", type=int, default=None, help="default seq-len/2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sample", action="store_true", help="also print a greedy and a sampled text")
    ap.add_argument("--breakdown", action="store_true",
                    help="also split the bits by kind of line: speech, speaker names (first and later "
                         "appearances of each name, its first token and the rest), stage directions")
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
    kinds = {}  # kind of line -> [bits, bytes]
    for name, text in val.items():
        per_token = []
        bpb, bits, n_bytes, n_tok = yt.eval_bpb(model, tok, {name: text}, args.seq_len, args.stride,
                                                per_token=per_token)
        total_bits += bits
        total_bytes += n_bytes
        print(f"  {name:20s} {bpb:.4f} bits/byte  ({n_bytes:,} bytes, {n_tok:,} tokens)")
        if args.breakdown:
            add_breakdown(kinds, text, *per_token[0])
    print(f"validation: {total_bits / total_bytes:.4f} bits/byte over {total_bytes:,} bytes "
          f"({time.time() - t0:.0f}s)")
    if args.breakdown:
        print(f"  {'kind of line':28s} {'bytes':>9s} {'share of bits':>14s} {'bits/byte':>10s}")
        for kind, (bits, n_bytes) in sorted(kinds.items()):
            print(f"  {kind:28s} {n_bytes:9,d} {bits / total_bits * 100:13.1f}% {bits / n_bytes:10.3f}")
    if args.sample:
        words = yt.word_set(train.values())
        g = torch.Generator().manual_seed(args.seed)
        for name, temp in (("greedy", 0.0), ("sampled, temperature 0.8", 0.8)):
            text = yt.generate(model, tok, args.prompt, 300, temperature=temp, generator=g)
            frac, n = yt.real_word_fraction(text, words)
            print(f"---- {name}: {frac * 100:.0f}% of {n} words appear in the training text ----\n{text}")


if __name__ == "__main__":
    main()
