#!/usr/bin/env python3
"""Train the small gated-retention YOCO model that ships in models/shakespeare/.

Reproduce the shipped model (from the repository root, CPU only, seeded):

    python tools/train_shakespeare.py

which is the same as the defaults spelled out:

    python tools/train_shakespeare.py --data ../shared/data/shakespeare --out models/shakespeare \
        --docs docs/training --val-plays twelfth_night,tempest --vocab 2048 --dim 192 --n-layers 6 \
        --hidden-dim 512 --n-self-heads 3 --n-attn-heads 6 --n-attn-kv-heads 3 --seq-len 512 \
        --batch 8 --steps 2200 --lr 4e-3 --min-lr 4e-4 --warmup 100 --weight-decay 0.1 \
        --dropout 0.1 --rename-p 0.8 --novel-p 1.0 --seed 1234

(--tie-embeddings trains one matrix for the input embedding and the output projection).

About an hour on the quiet 2-core CPU (torch.compile on; --no-compile for eager).
`--device cuda` runs the same code on a GPU (not how the shipped model was made).

What it does:
  1. reads the *_gut.txt files of the data folder, holds out whole plays for validation
     (--val-plays, default twelfth_night and tempest), normalises lightly (trailing spaces removed,
     runs of 3+ blank lines collapsed to 2 blank lines; line breaks and speaker names kept);
  2. trains a byte-level BPE tokenizer (HF `tokenizers`) on the training split, special tokens at
     fixed ids 0 <s>, 1 <pad>, 2 </s>, 3 <unk>;
  3. trains YOCO (self-decoder with gated retention, global KV, cross-decoder), parameter names
     exactly the reference's flat names (see shared yoco-spec.md), on a training stream rebuilt each
     epoch with the characters of each text renamed (probability --rename-p; rename_characters);
  4. writes models/shakespeare/{params.json, model.safetensors (f16), tokenizer.json},
     docs/training/{loss.csv, loss.png, README.md}, the last with the validation bits per byte of
     the shipped f16 weights and two text samples.

Paths given relative are taken relative to the repository root (the parent of tools/).
The model code lives in tools/yoco_torch.py, shared with tools/eval_bpb.py.
"""
import argparse
import collections
import csv
import json
import math
import os
import platform
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import yoco_torch as yt  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def rel(p):
    p = Path(p)
    return p if p.is_absolute() else REPO / p


def train_tokenizer(texts, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(yt.SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    for i, s in enumerate(yt.SPECIALS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    for t in texts[:3]:
        assert tok.decode(tok.encode(t).ids, skip_special_tokens=False) == t
    return tok


# Speaker lines: a short capitalised line after a blank line, followed by speech ("OTHELLO.",
# "Lady Montague.", "Ham.", "LYSANDER").
SPEAKER_LINE = re.compile(r"(?:^|\n\n)([A-Z][A-Za-z'-]*\.?(?: [A-Za-z][A-Za-z'-]*\.?){0,3})\n(?=[^\n])")
NOT_NAMES = {"Mrs", "Don"}  # titles that pass the test below


def letter_words(train_texts):
    """How often each run of letters occurs in the training text, case kept."""
    return collections.Counter(w for t in train_texts.values() for w in re.findall(r"[A-Za-z]+", t))


def character_names(train_texts, words):
    """{file: [names]}: the words of each text's speaker lines that are characters' names: seen in at
    least 3 of its speaker lines, and (almost) never written in lower case anywhere in the training
    text (`words`, letter_words) (so "KING", "LORD", "CLOWN" are not names, "OTHELLO", "Ham" are).
    Names in Title case."""
    out = {}
    for name, text in train_texts.items():
        c = collections.Counter(w for m in SPEAKER_LINE.findall(text) for w in re.findall(r"[A-Za-z]+", m))
        out[name] = sorted(
            {w.title() for w, k in c.items()
             if k >= 3 and len(w) >= 3 and w[0].isupper() and words[w.lower()] <= 2
             and not re.fullmatch("[IVXL]+", w) and w.title() not in NOT_NAMES}
        )
    return out


class NameInventor:
    """Invents character names that no training text uses: an order-2 character Markov chain over
    the training names (so "Malvino", "Ferando" rather than random letters). A held-out play's
    characters are new to the model, so the only way to predict their names is to copy them from
    earlier in the play; names the model has never seen make that the only way in training too."""

    def __init__(self, pool, known_words):
        self.next = collections.defaultdict(collections.Counter)
        for n in pool:
            s = "^^" + n.lower() + "$"
            for i in range(2, len(s)):
                self.next[s[i - 2 : i]][s[i]] += 1
        self.forbidden = {n.lower() for n in pool} | known_words

    def invent(self, rng, taken):
        for _ in range(100):
            s = "^^"
            while not s.endswith("$") and len(s) < 14:
                c = self.next[s[-2:]]
                s += rng.choices(list(c), weights=list(c.values()))[0]
            w = s[2:].rstrip("$")
            if s.endswith("$") and 3 <= len(w) <= 10 and w not in self.forbidden and w not in taken:
                return w.title()
        raise RuntimeError(f"no new name in 100 draws ({len(taken)} names taken)")


def rename_characters(text, names, pool, rng, inventor=None, novel_p=0.0):
    """`text` with each of its characters' `names` replaced, consistently, by a different name in the
    same case ("OTHELLO" -> "ORLANDO", "Othello's" -> "Orlando's"): with probability `novel_p` an
    invented one (`inventor`, NameInventor), else one drawn from `pool` (the names of all training
    texts). The training data's augmentation: the held-out plays have new characters, and a model
    can only predict their names by copying them from earlier in the play, not by remembering which
    names belong to which play."""
    if not names:
        return text
    target = dict(zip(names, rng.sample(pool, len(names))))
    taken = {t.lower() for t in target.values()}
    for n in names:
        if inventor is not None and rng.random() < novel_p:
            target[n] = inventor.invent(rng, taken)
            taken.add(target[n].lower())
    pattern = re.compile(r"\b(" + "|".join(sorted(names, key=len, reverse=True)) + r")\b", re.IGNORECASE)

    def swap(m):
        w = m.group(0)
        if w[0].islower():  # a common word that happens to match ("mar")
            return w
        t = target[w.title()]
        return t.upper() if w.isupper() else t

    return pattern.sub(swap, text)


def training_stream(train_texts, tok, names, pool, rename_p, rng, inventor=None, novel_p=0.0):
    """Token ids of every training text as <s> + text + </s>; each text has its characters renamed
    (rename_characters, names from character_names, pool their sorted union, a share novel_p of
    them invented) with probability rename_p."""
    texts = [rename_characters(t, names[k], pool, rng, inventor, novel_p) if rng.random() < rename_p else t
             for k, t in train_texts.items()]
    ids = []
    for e in tok.encode_batch(texts):
        ids += [yt.BOS] + e.ids + [yt.EOS]
    return torch.tensor(ids, dtype=torch.long)


def lr_at(step, args):
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    p = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * min(1.0, p)))


def make_batch(stream, batch, seq_len, gen):
    """Windows of seq_len+1 tokens: <s> followed by seq_len tokens from a random offset."""
    n = stream.numel() - seq_len
    starts = torch.randint(0, n, (batch,), generator=gen)
    rows = torch.stack([stream[s : s + seq_len] for s in starts.tolist()])
    bos = torch.full((batch, 1), yt.BOS, dtype=torch.long)
    rows = torch.cat([bos, rows], dim=1)
    return rows[:, :-1], rows[:, 1:]


@torch.no_grad()
def quick_val_loss(model, val_docs, seq_len, max_windows):
    """Mean token NLL (nats) over non-overlapping <s>-prefixed windows, cheap progress signal."""
    model.eval()
    tot, cnt, w = 0.0, 0, 0
    for ids in val_docs:
        for s in range(0, len(ids), seq_len - 1):
            chunk = ids[s : s + seq_len - 1]
            dev = next(model.parameters()).device
            x = torch.tensor([[yt.BOS] + chunk[:-1]], device=dev)
            y = torch.tensor([chunk], device=dev)
            if len(chunk) < 2:
                continue
            logits = model(x)
            tot += F.cross_entropy(logits[0].float(), y[0], reduction="sum").item()
            cnt += len(chunk)
            w += 1
            if w >= max_windows:
                break
        if w >= max_windows:
            break
    model.train()
    return tot / cnt


def plot_loss(rows, path, where="2-core CPU"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    st = [r["step"] for r in rows]
    tl = [r["train_loss"] for r in rows]
    win = max(1, min(25, len(tl) // 20))  # trailing mean of the train loss
    sm = [sum(tl[max(0, i - win + 1) : i + 1]) / len(tl[max(0, i - win + 1) : i + 1]) for i in range(len(tl))]
    ax.plot(st, tl, color="tab:blue", alpha=0.25, lw=0.8, label="train (per step)")
    ax.plot(st, sm, color="tab:blue", lw=1.6, label=f"train (mean of last {win} steps)")
    vs = [(r["step"], r["val_loss"]) for r in rows if r["val_loss"] != ""]
    if vs:
        ax.plot([a for a, _ in vs], [b for _, b in vs], "o-", color="tab:red", lw=1.6, ms=3,
                label="validation (held-out plays)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(f"YOCO (gated retention) on Shakespeare, {where}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def cpu_model_name():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def render_readme(args, cmd, cfg, n_params, tok_vocab, bytes_per_token, train_tokens, val_names, train_names,
                  train_time, total_time, tps, cpu, torch_version, bpb, n_bytes, n_tok, final_train, final_val,
                  size, files, greedy, sampled, frac_greedy, frac_sampled, prompt, per_play, n_names):
    emb = cfg.vocab_size * cfg.dim
    epochs = args.steps * args.batch * args.seq_len / train_tokens
    file_lines = "\n".join(f"| `{n}` | {b:,} |" for n, b in files.items())
    return f"""# Training the shipped Shakespeare model

`models/shakespeare/` holds a small gated-retention YOCO model trained from scratch on Shakespeare
with `tools/train_shakespeare.py` (PyTorch, CPU). This file was written by that script.

## Reproduce

From the repository root (Python packages pinned in `tools/requirements-train.txt`):

```
pip install -r tools/requirements-train.txt
{cmd}
```

The data folder defaults to `../shared/data/shakespeare` (relative to the repository root); pass
`--data PATH` for a copy elsewhere. Everything is seeded (`--seed {args.seed}`): tokenizer training,
initialisation, batch sampling and the text samples; the tokenizer comes out identical, and two runs
of the first 6 steps agreed to 1.2e-7 in every weight (not bit for bit: float reductions, compiled
kernels), so a rerun reproduces the model up to float rounding. The run uses
`torch.set_num_threads({args.threads})`.
Re-check the validation number of any model folder with

```
python tools/eval_bpb.py models/shakespeare
```

## Data

* Training: {len(train_names)} files of the data folder (every play and poem except the two below),
  each fed as `<s>` + text + `</s>`, {train_tokens:,} tokens.
* Validation (held out whole): **{", ".join(val_names)}** ({n_bytes:,} bytes, {n_tok:,} tokens).
* Normalisation: line ends kept, trailing spaces removed, runs of 3 or more blank lines collapsed to 2
  blank lines. Speaker names, stage directions, line breaks and punctuation untouched.
* Augmentation (`--rename-p {args.rename_p} --novel-p {args.novel_p}`): the training stream is rebuilt
  every epoch, and each training text, with probability {args.rename_p}, has its characters renamed:
  every name found in its speaker lines ({n_names} names in all, e.g. `OTHELLO.`, `Ham.`; a word counts
  as a name if it is almost never written in lower case) is replaced everywhere in that text, in the
  same case and consistently within the text, by a name invented for the occasion (with probability
  {args.novel_p}; an order-2 letter chain over the training names, never a word of the training text,
  e.g. `PHILOTUS`, `Cordio`) or else by another training text's name. The held-out plays bring new
  characters: a model that has memorised which names belong to which play cannot predict them, one
  that copies a name from earlier in the scene can, and names it has never seen teach it to copy.

## Tokenizer

Byte-level BPE trained with HF `tokenizers` on the training split: {tok_vocab} tokens
({bytes_per_token:.2f} bytes per token on the training text), ByteLevel pre-tokenizer
(`add_prefix_space=false`) and decoder, so `decode(encode(text)) == text`. Special tokens 0 `<s>` (BOS),
1 `<pad>`, 2 `</s>` (EOS), 3 `<unk>`; no post-processor (the caller prepends `<s>`).

## Model

| field | value |
|---|---|
| dim | {cfg.dim} |
| n_layers | {cfg.n_layers} ({cfg.n_layers // 2} gated-retention self-decoder + {cfg.n_layers // 2} cross-decoder layers) |
| hidden_dim | {cfg.hidden_dim} |
| n_self_heads | {cfg.n_self_heads} (head size {cfg.dim // cfg.n_self_heads}) |
| n_attn_heads / n_attn_kv_heads | {cfg.n_attn_heads} / {cfg.n_attn_kv_heads} (head size {cfg.dim // cfg.n_attn_heads}) |
| vocab_size | {cfg.vocab_size} |
| rope_theta, norm_eps | {cfg.rope_theta}, {cfg.norm_eps} |
| parameters | **{n_params:,}** ({emb:,} in `embed_tokens`{', which is also the output projection (tied in training; the file stores it under both names, `embed_tokens.weight` and `output_projection.weight`)' if args.tie_embeddings else f', {emb:,} in the untied `output_projection`'}) |

Stored as `model.safetensors` in float16 with the reference's flat parameter names, nothing else.

| file | bytes |
|---|---|
{file_lines}
| total | {size:,} |

## Training

* AdamW (betas 0.9/0.95, weight decay {args.weight_decay} on matrices except the embedding), peak learning
  rate {args.lr}, linear warm-up {args.warmup} steps, cosine decay to {args.min_lr}, gradient clipping
  {args.grad_clip}, dropout {args.dropout}.
* {args.steps} steps of {args.batch} windows x {args.seq_len} tokens (each window is `<s>` + {args.seq_len - 1}
  tokens from a random offset of the training stream, positions 0..{args.seq_len - 1}): {args.steps * args.batch * args.seq_len:,}
  tokens, {epochs:.2f} epochs. Retention in its parallel form, float32 (bf16 autocast was measured slower
  on this CPU, which lacks native bf16 arithmetic).
* Hardware: {"2-core CPU, `" + cpu + "` (lscpu model name)" if args.device == "cpu" else "`" + cpu + "` (" + args.device + ")"}, PyTorch {torch_version}.
* Wall time: training {train_time / 60:.1f} min ({tps:.0f} tokens/s); whole script, tokenizer + training +
  evaluation + samples, {total_time / 60:.1f} min.
* Final train loss (mean of the last 50 steps) {final_train:.3f} nats/token, last quick validation loss
  {final_val} nats/token. Curve: `loss.csv` (step, elapsed seconds, train loss, validation loss every
  {args.eval_every} steps on the first {args.eval_windows} non-overlapping windows), `loss.png`.

## Validation

**{bpb:.4f} bits per byte** on the held-out plays ({", ".join(f"{n} {v:.4f}" for n, v in per_play.items())}), computed on the shipped float16 weights (loaded back
from `model.safetensors`): each play is scored as `<s>` + its tokens in sliding windows of {args.seq_len}
inputs with stride {args.seq_len // 2}, every token counted once; total NLL in bits / UTF-8 bytes of the plays.

![loss](loss.png)

## Samples

Prompt `{prompt!r}` after `<s>`, 300 new tokens, shipped float16 weights, cached decoding (recurrent
retention + global KV cache). Ids 0 and 1 are never produced.

Greedy ({frac_greedy[0] * 100:.0f}% of its {frac_greedy[1]} words appear in the training text):

```
{greedy}
```

Sampled, temperature 0.8, seed {args.seed} ({frac_sampled[0] * 100:.0f}% of its {frac_sampled[1]} words appear in the training text):

```
{sampled}
```
""" + NOTES


NOTES = """
## Notes: how the shape was chosen, and what limits the number

* Compute is the limit here, not data or file size. PyTorch float32 on the 2-core CPU trains this
  shape at about 2,500 tokens/s when nothing else runs (2,249 over the shipped
  run); `torch.compile` is about 1.2x faster
  than eager here and is on by default (its first compilation takes a minute or two). bf16 matrix
  products ran at 0.6 GFLOP/s against 16 for float32 (AVX2 only, no native bf16), so bf16 autocast
  is off. The previously shipped model (1.4M parameters, 2.25 bits per byte) got only 714
  tokens/s because its run shared the CPU with full-speed Rust builds.
* A first fixed-compute sweep with this same code (float32, run on a GPU only to get through many
  configurations quickly; each configuration trained for 1.8e13 FLOPs, about 35 contended CPU
  minutes) favoured small models: with vocab 4096 and batch 16, dim 128 / 4 layers gave 2.250 bits
  per byte, dim 192 2.362, dim 256 2.438, dim 192 / 6 layers 2.471; at dim 128 / batch 8, vocab 2048
  2.187, 3072 2.193, 4096 2.210; peak learning rate 5e-3 2.171 (2e-3: 2.226); no weight decay
  2.200. Twice the compute gave 2.096 to 2.143: each doubling is worth about 0.05 to 0.07 bits per
  byte. With a quiet CPU for an hour (about 5x that budget: 9M tokens, 5 epochs) the larger shape
  shipped before this one (dim 192, 6 layers, windows of 512, dropout 0.1 against the repeated epochs) reaches
  2.03. Its validation loss was still falling slowly at the end while the training loss had
  dropped well below it (2.92 against 3.87 nats/token): more epochs mostly buy memorisation.
* The held-out plays are hard for any model trained on the rest: a 5.4M-parameter model of this code
  (dim 256, 6 layers, hidden 640, vocab 2048, windows of 512, dropout 0.1 to 0.2) trained on a GPU
  for 12M to 20M tokens (7 to 11 epochs) also reached 2.03 bits per byte on them, while its training
  loss was about 1.45 bits per byte. In its errors 82% of the bits are in verse and prose (1.96 bits
  per byte in The Tempest, 1.83 in Twelfth Night), 12% in speaker-name lines (about 4 bits per byte:
  each play's characters are new names) and 5% in stage directions. What would lower the number
  below 1.9: several times more compute (a GPU run, or a faster trainer), a tied input/output
  embedding and stronger regularisation for the many-epoch regime, or a held-out split whose
  characters also appear in training (the history plays share theirs).
* Where the held-out bits go (`python tools/eval_bpb.py models/shakespeare --breakdown`; the same
  split by kind of line). An earlier model (2.0264, no renaming): speech 1.898 bits
  per byte (83% of the bits), speaker lines 3.76 (12% of the bits on 6.4% of the bytes), stage
  directions 2.45. A speaker's name cost as much on its later appearances in a play as on its
  first (3.76 against 3.57 bits per byte): the model did not copy names. The next, trained with
  other plays' names only (`--rename-p 0.5 --novel-p 0`, otherwise the same command and seed): 2.0038, the rest of a
  repeated name 4.17 -> 4.00 bits per byte, speech 1.898 -> 1.892. It still barely copies: in
  `OLIVIA.`, after `OL`, `I`, `V`, the token `IA` costs 15 to 17 bits every time although the name
  stands up to six times earlier in the window; tokens almost absent from training have output rows
  that training only pushed down. A second run with every text
  renamed every epoch and the output projection tied to the embedding (`--rename-p 1.0
  --tie-embeddings --steps 2000`; tying lets copying a token's embedding raise that token's logit)
  reached 2.0047 (name rest 3.86, speech 1.902), and its samples give nearly every line to the
  prompt's speaker, so that run was not shipped. Copying names was still the cheapest bits left,
  but this small model, trained for an hour, did not learn it from renaming alone.
* Invented names (`--novel-p`, this model). Names the model has never seen can only be predicted
  by copying, and they make the rare upper-case tokens of new names common in training. Same
  command and seed, 2200 steps each, float16 weights: `--rename-p 0.7 --novel-p 0.6` (42% of names
  invented each epoch) 1.9647 (Tempest 2.0610, Twelfth Night 1.8823; rest of a repeated name 3.26
  bits per byte, speech 1.891); `--rename-p 0.8 --novel-p 1.0` (80%) **1.9539**, shipped (rest of
  a repeated name 3.01, speech 1.897, stage directions 2.17). In Twelfth Night the token `IA` of
  `OLIVIA` (140 times) costs a median 2.3 bits in the first run, 5.5 in the second (15 to 17 in
  the 2.0038 model). The price is in the samples: with no names in the
  prompt the model invents its speakers' names (`HEBELORK.`) where the earlier models reused
  real ones; 96% of the sampled words are still Shakespeare's, and the greedy text loops on one
  invented speaker (81%). What would lower the number further: repeated names still cost 3 bits
  per byte against 1.9 for speech (about 0.05 bits per byte of the total is left there), and a
  longer schedule or a GPU run would let the copying mature; speech itself has not moved (1.89
  to 1.90) in any of these runs, and only more compute has moved it.
"""


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/shakespeare", help="folder of *_gut.txt files")
    ap.add_argument("--out", default="models/shakespeare")
    ap.add_argument("--docs", default="docs/training")
    ap.add_argument("--val-plays", default="twelfth_night,tempest")
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--dim", type=int, default=192)
    ap.add_argument("--n-layers", type=int, default=6)
    ap.add_argument("--hidden-dim", type=int, default=512)
    ap.add_argument("--n-self-heads", type=int, default=3)
    ap.add_argument("--n-attn-heads", type=int, default=6)
    ap.add_argument("--n-attn-kv-heads", type=int, default=3)
    ap.add_argument("--rope-theta", type=float, default=10000.0)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2200)
    ap.add_argument("--lr", type=float, default=4e-3)
    ap.add_argument("--min-lr", type=float, default=4e-4)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--tie-embeddings", action="store_true",
                    help="one matrix for embed_tokens and output_projection (both names saved)")
    ap.add_argument("--rename-p", type=float, default=0.8,
                    help="probability that a training text has its characters renamed, drawn per text and epoch")
    ap.add_argument("--novel-p", type=float, default=1.0,
                    help="share of renamed characters given an invented name instead of another play's")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-windows", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu (the shipped model) or cuda")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--no-compile", dest="compile", action="store_false",
                    help="run the training step eagerly (torch.compile is about 1.7x faster on the 2-core CPU)")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (slower on CPUs without AVX512-BF16)")
    ap.add_argument("--pilot", action="store_true",
                    help="only measure throughput for --steps steps; writes nothing")
    return ap


def prepare(args):
    """Reads and splits the data, trains the tokenizer, encodes. Returns a dict."""
    data_dir = rel(args.data)
    val_names = [v.strip() for v in args.val_plays.split(",") if v.strip()]
    train_texts, val_texts = yt.load_split(data_dir, val_names)
    print(f"train files {len(train_texts)}, {sum(len(t) for t in train_texts.values())} bytes; "
          f"val {list(val_texts)} {sum(len(t) for t in val_texts.values())} bytes", flush=True)
    t0 = time.time()
    tok = train_tokenizer(list(train_texts.values()), args.vocab)
    words = letter_words(train_texts)
    names = character_names(train_texts, words)
    pool = sorted({n for ns in names.values() for n in ns})
    inventor = NameInventor(pool, {w.lower() for w in words})
    n_train_tokens = training_stream(train_texts, tok, names, pool, 0.0, random.Random(0)).numel()
    val_docs = [tok.encode(t).ids for t in val_texts.values()]
    n_train_bytes = sum(len(t.encode()) for t in train_texts.values())
    print(f"tokenizer: vocab {tok.get_vocab_size()}; train tokens {n_train_tokens} "
          f"({n_train_bytes / n_train_tokens:.2f} bytes/token); val tokens {sum(map(len, val_docs))}; "
          f"{time.time() - t0:.1f}s", flush=True)
    return dict(train_texts=train_texts, val_texts=val_texts, tok=tok, names=names, pool=pool, inventor=inventor,
                val_docs=val_docs, n_train_bytes=n_train_bytes, n_train_tokens=n_train_tokens)


def make_config(args, tok):
    return yt.Config(
        dim=args.dim, n_layers=args.n_layers, hidden_dim=args.hidden_dim, n_self_heads=args.n_self_heads,
        n_attn_heads=args.n_attn_heads, n_attn_kv_heads=args.n_attn_kv_heads,
        vocab_size=((tok.get_vocab_size() + 7) // 8) * 8,  # padded to a multiple of 8
        rope_theta=args.rope_theta, norm_eps=1e-5,
    )


def train(args, cfg, data, log_every=10):
    """Seeded training run. Returns (model, rows of loss.csv, training seconds, tokens/s).
    The training stream is rebuilt every epoch, each text's characters renamed with probability
    --rename-p (a fresh draw each epoch)."""
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    model = yt.Yoco(cfg, dropout=args.dropout, tie_embeddings=args.tie_embeddings)
    yt.init_weights(model, cfg)
    model.to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model {cfg} -> {n_params} parameters", flush=True)
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (decay if p.dim() == 2 and "embed_tokens" not in n else no_decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )

    def step_fn(x, y):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            logits = model(x)
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))

    fwd = torch.compile(step_fn) if args.compile else step_fn

    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    tokens_per_step = args.batch * args.seq_len
    rename_rng = random.Random(args.seed)
    epoch_steps = max(1, data["n_train_tokens"] // tokens_per_step)
    t_train = time.time()
    model.train()
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        if step % epoch_steps == 0:
            stream = training_stream(data["train_texts"], data["tok"], data["names"], data["pool"],
                                     args.rename_p, rename_rng, data["inventor"], args.novel_p)
        x, y = make_batch(stream, args.batch, args.seq_len, gen)
        x, y = x.to(args.device), y.to(args.device)
        loss = fwd(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        el = time.time() - t_train
        row = {"step": step + 1, "elapsed_s": round(el, 2), "train_loss": round(loss.item(), 5), "val_loss": ""}
        last = step + 1 == args.steps
        if not args.pilot and ((step + 1) % args.eval_every == 0 or last):
            row["val_loss"] = round(quick_val_loss(model, data["val_docs"], args.seq_len, args.eval_windows), 5)
        rows.append(row)
        if step < 5 or (step + 1) % log_every == 0 or row["val_loss"] != "" or last:
            tps = tokens_per_step * (step + 1) / el
            print(f"step {step + 1:5d}  loss {loss.item():.4f}  val {row['val_loss']}  lr {lr_at(step, args):.2e}  "
                  f"{el:7.1f}s  {tps:6.0f} tok/s", flush=True)
    train_time = time.time() - t_train
    tps = tokens_per_step * args.steps / train_time
    print(f"trained {args.steps} steps in {train_time:.1f}s, {tps:.0f} tokens/s", flush=True)
    return model, rows, train_time, tps


def main():
    args = build_parser().parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.time()
    data = prepare(args)
    tok, train_texts, val_texts = data["tok"], data["train_texts"], data["val_texts"]
    cfg = make_config(args, tok)
    model, rows, train_time, tps = train(args, cfg, data)
    if args.pilot:
        return
    model.cpu()
    n_params = sum(p.numel() for p in model.parameters())
    n_train_bytes, n_train_tokens = data["n_train_bytes"], data["n_train_tokens"]

    # ---- write the model (f16), then evaluate what was written ----
    out = rel(args.out)
    out.mkdir(parents=True, exist_ok=True)
    yt.save_model(model, cfg, out)
    tok.save(str(out / "tokenizer.json"))
    model16, cfg16, tok16 = yt.load_model_dir(out)
    t_eval = time.time()
    model16.to(args.device)
    per_play, nll_bits, n_bytes, n_tok = {}, 0.0, 0, 0
    for name, text in val_texts.items():
        r = yt.eval_bpb(model16, tok16, {name: text}, args.seq_len)
        per_play[name] = r[0]
        nll_bits, n_bytes, n_tok = nll_bits + r[1], n_bytes + r[2], n_tok + r[3]
    bpb = nll_bits / n_bytes
    model16.cpu()
    eval_time = time.time() - t_eval
    print(f"validation (f16 weights): {bpb:.4f} bits/byte over {n_bytes} bytes / {n_tok} tokens "
          f"({eval_time:.0f}s)", flush=True)

    # ---- samples ----
    prompt = "ROMEO.\n"
    g = torch.Generator().manual_seed(args.seed)
    greedy = yt.generate(model16, tok16, prompt, 300, temperature=0.0)
    sampled = yt.generate(model16, tok16, prompt, 300, temperature=0.8, generator=g)
    train_words = yt.word_set(train_texts.values())
    fg, ng = yt.real_word_fraction(greedy, train_words)
    fs, ns = yt.real_word_fraction(sampled, train_words)

    # ---- docs ----
    docs = rel(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    with open(docs / "loss.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", "elapsed_s", "train_loss", "val_loss"])
        w.writeheader()
        w.writerows(rows)
    plot_loss(rows, docs / "loss.png", "2-core CPU" if args.device == "cpu" else args.device)
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    total_time = time.time() - t_start
    cmd = "python tools/train_shakespeare.py " + " ".join(
        a if not os.path.isabs(a) else os.path.relpath(a, REPO) for a in sys.argv[1:]
    )
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    readme = render_readme(
        args=args, cmd=cmd.strip(), cfg=cfg, n_params=n_params, tok_vocab=tok.get_vocab_size(),
        bytes_per_token=n_train_bytes / n_train_tokens, train_tokens=n_train_tokens,
        val_names=list(val_texts), train_names=list(train_texts), train_time=train_time, total_time=total_time,
        tps=tps, cpu=cpu_model_name() if args.device == "cpu" else torch.cuda.get_device_name(), torch_version=torch.__version__, bpb=bpb, n_bytes=n_bytes, n_tok=n_tok,
        final_train=sum(r["train_loss"] for r in rows[-50:]) / len(rows[-50:]),
        final_val=rows[-1]["val_loss"], size=size, files=files, greedy=greedy, sampled=sampled,
        frac_greedy=(fg, ng), frac_sampled=(fs, ns), prompt=prompt, per_play=per_play,
        n_names=len(data["pool"]),
    )
    (docs / "README.md").write_text(readme)
    print(f"wrote {out} ({size} bytes) and {docs}; total {total_time:.0f}s", flush=True)
    print("---- greedy ----\n" + greedy + "\n---- sampled (T=0.8) ----\n" + sampled)


if __name__ == "__main__":
    main()
