"""PyTorch YOCO (gated-retention self-decoder + global KV + cross-decoder), written from the shared
spec (yoco-spec.md), for training the demonstration model and for checking it.

Parameter names are exactly the reference's flat names (`embed_tokens.weight`,
`self_decoder.layers.{l}.mixer.q_proj.weight`, ..., `layer_norm.weight` (the final norm, at the top
level as `YOCO.layer_norm` is in the official code), `output_projection.weight`); nothing else is stored.

Used by tools/train_shakespeare.py and tools/eval_bpb.py.
"""
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
BOS, PAD, EOS, UNK = 0, 1, 2, 3


# --------------------------------------------------------------------------- data

def normalise(text):
    """Light normalisation: LF line ends, no trailing spaces, runs of 3+ blank lines -> 2 blank lines.
    Line breaks, speaker names, stage directions and punctuation are kept as they are."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{4,}", "\n\n\n", text)
    return text.strip("\n") + "\n"


def load_split(data_dir, val_names):
    """Returns ({name: text} for training, {name: text} for validation), names without `_gut.txt`."""
    data_dir = Path(data_dir)
    files = sorted(data_dir.glob("*.txt"))
    if not files:
        raise SystemExit(f"no .txt files in {data_dir}")
    train, val = {}, {}
    for f in files:
        name = f.name[: -len("_gut.txt")] if f.name.endswith("_gut.txt") else f.stem
        text = normalise(f.read_text(encoding="utf-8"))
        (val if name in val_names else train)[name] = text
    missing = set(val_names) - set(val)
    if missing:
        raise SystemExit(f"validation plays not found in {data_dir}: {sorted(missing)}")
    return train, val


# --------------------------------------------------------------------------- model

@dataclass
class Config:
    dim: int
    n_layers: int
    hidden_dim: int
    n_self_heads: int
    n_attn_heads: int
    n_attn_kv_heads: int
    vocab_size: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.eps) * self.weight


def rms_norm(x, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope_angles(positions, head_dim, theta):
    """cos, sin of shape (T, head_dim/2): inv_freq = theta ** -linspace(0, 1, d/2), angle = f32 pos * inv_freq."""
    inv_freq = theta ** -torch.linspace(0, 1, head_dim // 2, dtype=torch.float32, device=positions.device)
    ang = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    return torch.cos(ang), torch.sin(ang)


def apply_rope(x, cos, sin):
    """Interleaved (GPT-J) pairs (x[2i], x[2i+1]); x (..., T, d), cos/sin (T, d/2)."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    y1 = x1 * cos - x2 * sin
    y2 = x2 * cos + x1 * sin
    return torch.stack((y1, y2), dim=-1).flatten(-2)


class FeedForward(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=False)  # activated branch
        self.gate = nn.Linear(dim, hidden, bias=False)  # linear branch
        self.fc2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.fc2(F.silu(self.fc1(x)) * self.gate(x))


class GatedRetention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        D, H = cfg.dim, cfg.n_self_heads
        self.H, self.d, self.eps = H, D // H, cfg.norm_eps
        self.q_proj = nn.Linear(D, D, bias=False)
        self.k_proj = nn.Linear(D, D, bias=False)
        self.v_proj = nn.Linear(D, D, bias=False)
        self.g_proj = nn.Linear(D, D, bias=False)
        self.gt_proj = nn.Linear(D, H, bias=False)
        self.out_proj = nn.Linear(D, D, bias=False)

    def _qkvg(self, x, cos, sin):
        B, T, D = x.shape
        H, d = self.H, self.d
        q = self.q_proj(x).view(B, T, H, d).transpose(1, 2)
        k = self.k_proj(x).view(B, T, H, d).transpose(1, 2)
        v = self.v_proj(x).view(B, T, H, d).transpose(1, 2)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin) * d ** -0.5
        lg = F.logsigmoid(self.gt_proj(x).float()).transpose(1, 2) / 16.0  # (B, H, T) log decay
        return q, k, v, lg

    def _finish(self, x, o):
        B, T, _ = x.shape
        o = rms_norm(o, self.eps)  # per-head, no weight
        o = o.transpose(1, 2).reshape(B, T, -1)
        return self.out_proj(F.silu(self.g_proj(x)) * o)

    def forward(self, x, cos, sin):
        """Parallel form: o_n = sum_{m<=n} exp(G_n - G_m) (q_n . k_m) v_m."""
        T = x.shape[1]
        q, k, v, lg = self._qkvg(x, cos, sin)
        G = torch.cumsum(lg, dim=-1)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        decay = (G.unsqueeze(-1) - G.unsqueeze(-2)).masked_fill(~causal, float("-inf")).exp()
        scores = (q @ k.transpose(-1, -2)) * decay.to(q.dtype)
        return self._finish(x, scores @ v)

    def step(self, x, cos, sin, state):
        """Recurrent form for one token: S = exp(lg) S + k^T v, o = q S.  x (B, 1, D)."""
        q, k, v, lg = self._qkvg(x, cos, sin)  # (B,H,1,d), lg (B,H,1)
        state = torch.exp(lg)[..., None] * state + k.transpose(-1, -2) @ v
        return self._finish(x, q @ state), state


class SelfLayer(nn.Module):
    def __init__(self, cfg, dropout):
        super().__init__()
        self.mixer = GatedRetention(cfg)
        self.mixer_layer_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = FeedForward(cfg.dim, cfg.hidden_dim)
        self.final_layer_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, cos, sin):
        x = x + self.drop(self.mixer(self.mixer_layer_norm(x), cos, sin))
        return x + self.drop(self.ffn(self.final_layer_norm(x)))

    def step(self, x, cos, sin, state):
        h, state = self.mixer.step(self.mixer_layer_norm(x), cos, sin, state)
        x = x + h
        return x + self.ffn(self.final_layer_norm(x)), state


class CrossAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.q_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.out_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.H, self.hd = cfg.n_attn_heads, cfg.dim // cfg.n_attn_heads
        self.rep = cfg.n_attn_heads // cfg.n_attn_kv_heads

    def forward(self, x, k, v, cos, sin, causal):
        B, T, D = x.shape
        q = apply_rope(self.q_proj(x).view(B, T, self.H, self.hd).transpose(1, 2), cos, sin)
        k = k.repeat_interleave(self.rep, dim=1)  # query head h reads kv head h // rep
        v = v.repeat_interleave(self.rep, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out_proj(o.transpose(1, 2).reshape(B, T, D))


class CrossLayer(nn.Module):
    def __init__(self, cfg, dropout):
        super().__init__()
        self.mixer = CrossAttention(cfg)
        self.mixer_layer_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = FeedForward(cfg.dim, cfg.hidden_dim)
        self.final_layer_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, k, v, cos, sin, causal=True):
        x = x + self.drop(self.mixer(self.mixer_layer_norm(x), k, v, cos, sin, causal))
        return x + self.drop(self.ffn(self.final_layer_norm(x)))


class SelfDecoder(nn.Module):
    def __init__(self, cfg, dropout):
        super().__init__()
        self.layers = nn.ModuleList(SelfLayer(cfg, dropout) for _ in range(cfg.n_layers // 2))


class CrossDecoder(nn.Module):
    def __init__(self, cfg, dropout):
        super().__init__()
        self.Hkv, self.hd = cfg.n_attn_kv_heads, cfg.dim // cfg.n_attn_heads
        self.kv_layer_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.k_proj = nn.Linear(cfg.dim, self.Hkv * self.hd, bias=False)
        self.v_proj = nn.Linear(cfg.dim, self.Hkv * self.hd, bias=False)
        self.layers = nn.ModuleList(CrossLayer(cfg, dropout) for _ in range(cfg.n_layers // 2))

    def global_kv(self, x, cos, sin):
        B, T, _ = x.shape
        xn = self.kv_layer_norm(x)
        k = self.k_proj(xn).view(B, T, self.Hkv, self.hd).transpose(1, 2)
        v = self.v_proj(xn).view(B, T, self.Hkv, self.hd).transpose(1, 2)
        return apply_rope(k, cos, sin), v  # RoPE on K only


class Yoco(nn.Module):
    def __init__(self, cfg, dropout=0.0, tie_embeddings=False):
        super().__init__()
        assert cfg.n_layers % 2 == 0 and cfg.dim % cfg.n_self_heads == 0
        assert cfg.dim % cfg.n_attn_heads == 0 and cfg.n_attn_heads % cfg.n_attn_kv_heads == 0
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.self_decoder = SelfDecoder(cfg, dropout)
        self.cross_decoder = CrossDecoder(cfg, dropout)
        # The final norm belongs to the model, not the cross-decoder (official `YOCO.layer_norm`):
        # its parameter is `layer_norm.weight` at the top level of the state dict.
        self.layer_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output_projection = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if tie_embeddings:
            # One matrix for input and output (both names are still saved): a token's output row is then
            # its input embedding, so attention that copies an earlier token raises that token's logit,
            # even for a token rarely seen in training (new names in held-out plays).
            self.output_projection.weight = self.embed_tokens.weight
        self.drop = nn.Dropout(dropout)

    def forward(self, ids):
        """Full (training) forward, positions 0..T-1; returns logits (B, T, V)."""
        cfg = self.cfg
        T = ids.shape[1]
        pos = torch.arange(T, device=ids.device)
        cos_s, sin_s = rope_angles(pos, cfg.dim // cfg.n_self_heads, cfg.rope_theta)
        cos_a, sin_a = rope_angles(pos, cfg.dim // cfg.n_attn_heads, cfg.rope_theta)
        x = self.drop(self.embed_tokens(ids) * math.sqrt(cfg.dim))
        for layer in self.self_decoder.layers:
            x = layer(x, cos_s, sin_s)
        k, v = self.cross_decoder.global_kv(x, cos_a, sin_a)
        for layer in self.cross_decoder.layers:
            x = layer(x, k, v, cos_a, sin_a)
        return self.output_projection(self.layer_norm(x))

    # ---- incremental decoding (recurrent retention + one global KV cache) ----
    def new_cache(self, batch=1):
        cfg = self.cfg
        d = cfg.dim // cfg.n_self_heads
        states = [torch.zeros(batch, cfg.n_self_heads, d, d) for _ in self.self_decoder.layers]
        return {"pos": 0, "states": states, "k": None, "v": None}

    @torch.no_grad()
    def step(self, ids, cache):
        """One token per batch row (ids (B,)) at position cache['pos']; returns logits (B, V)."""
        cfg = self.cfg
        pos = torch.tensor([cache["pos"]])
        cos_s, sin_s = rope_angles(pos, cfg.dim // cfg.n_self_heads, cfg.rope_theta)
        cos_a, sin_a = rope_angles(pos, cfg.dim // cfg.n_attn_heads, cfg.rope_theta)
        x = self.embed_tokens(ids[:, None]) * math.sqrt(cfg.dim)
        for i, layer in enumerate(self.self_decoder.layers):
            x, cache["states"][i] = layer.step(x, cos_s, sin_s, cache["states"][i])
        k, v = self.cross_decoder.global_kv(x, cos_a, sin_a)
        cache["k"] = k if cache["k"] is None else torch.cat([cache["k"], k], dim=2)
        cache["v"] = v if cache["v"] is None else torch.cat([cache["v"], v], dim=2)
        for layer in self.cross_decoder.layers:
            x = layer(x, cache["k"], cache["v"], cos_a, sin_a, causal=False)
        cache["pos"] += 1
        return self.output_projection(self.layer_norm(x))[:, -1]


def init_weights(model, cfg, std=0.02):
    resid_std = std / math.sqrt(2 * cfg.n_layers)
    for name, p in model.named_parameters():
        if name.endswith("layer_norm.weight"):
            nn.init.ones_(p)
        elif name == "embed_tokens.weight" and model.output_projection.weight is p:
            # Tied: the final norm makes a row's logit for its own token dim * std, so keep std small
            # (0.02: about 3.8 at dim 192) lest the untrained model predict its input token again.
            nn.init.normal_(p, std=std)
        elif name == "embed_tokens.weight":
            nn.init.normal_(p, std=cfg.dim ** -0.5)  # sqrt(dim) * embed has unit scale
        elif name.endswith("out_proj.weight") or name.endswith("fc2.weight"):
            nn.init.normal_(p, std=resid_std)
        else:
            nn.init.normal_(p, std=std)


# --------------------------------------------------------------------------- files

def save_model(model, cfg, out_dir, dtype=torch.float16):
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "model.safetensors").chmod(0o644)
    (out_dir / "params.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")


def load_model_dir(model_dir):
    """Loads params.json, model.safetensors (any float dtype, computed in f32) and tokenizer.json."""
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    model_dir = Path(model_dir)
    params = json.loads((model_dir / "params.json").read_text())
    assert "sliding_window" not in params, "only the gated-retention variant is implemented here"
    fields = Config.__dataclass_fields__
    cfg = Config(**{k: v for k, v in params.items() if k in fields})
    model = Yoco(cfg)
    sd = {k: v.float() for k, v in load_file(str(model_dir / "model.safetensors")).items()}
    model.load_state_dict(sd, strict=True)
    model.eval()
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    return model, cfg, tok


# --------------------------------------------------------------------------- evaluation

@torch.no_grad()
def eval_bpb(model, tok, val_texts, seq_len, stride=None, batch=16, per_token=None):
    """Validation bits per byte: each text is scored as <s> + its tokens, in sliding windows of
    seq_len inputs (each window starts with <s>, like training), every token counted exactly once with
    at least seq_len - stride tokens of context (except at the start). Returns
    (bpb, total NLL in bits, UTF-8 bytes, tokens). With a list as per_token, appends for each text
    (token ids, character offsets, NLL in nats of each token)."""
    model.eval()
    device = next(model.parameters()).device
    stride = stride or seq_len // 2
    W = seq_len - 1  # text tokens per window after the leading <s>
    windows = []  # (input ids, target ids, index of the first target to count)
    n_bytes, n_tok = 0, 0
    docs = []  # (ids, offsets, per-token NLL)
    for text in val_texts.values() if isinstance(val_texts, dict) else val_texts:
        enc = tok.encode(text)
        ids = enc.ids
        assert tok.decode(ids, skip_special_tokens=False) == text
        docs.append((ids, enc.offsets, [0.0] * len(ids)))
        n_bytes += len(text.encode("utf-8"))
        n_tok += len(ids)
        done, start = 0, 0  # targets ids[:done] already counted
        while done < len(ids):
            start = min(start, max(0, len(ids) - (W + 1)))
            tgt = ids[start : start + W + 1]
            windows.append(([BOS] + tgt[:-1], tgt, done - start, len(docs) - 1, start))
            done = start + len(tgt)
            start += stride
    total_nats, counted = 0.0, 0
    for i in range(0, len(windows), batch):
        group = windows[i : i + batch]
        by_len = {}
        for w in group:
            by_len.setdefault(len(w[0]), []).append(w)
        for ws in by_len.values():
            x = torch.tensor([w[0] for w in ws], device=device)
            y = torch.tensor([w[1] for w in ws], device=device)
            logp = F.log_softmax(model(x).float(), dim=-1)
            nll = -logp.gather(2, y[..., None])[..., 0]
            for r, w in enumerate(ws):
                total_nats += nll[r, w[2]:].sum().item()
                counted += len(w[1]) - w[2]
                docs[w[3]][2][w[4] + w[2] : w[4] + len(w[1])] = nll[r, w[2]:].tolist()
    assert counted == n_tok, (counted, n_tok)
    if per_token is not None:
        per_token.extend(docs)
    bits = total_nats / math.log(2)
    return bits / n_bytes, bits, n_bytes, n_tok


@torch.no_grad()
def generate(model, tok, prompt, n_new, temperature=0.8, generator=None, top_k=None):
    """<s> + prompt, then n_new tokens, recurrent/cached decoding; ids 0 (<s>) and 1 (<pad>) are
    never produced (as in the reference's loop). Returns prompt + generated text."""
    model.eval()
    ids = [BOS] + tok.encode(prompt).ids
    cache = model.new_cache()
    for t in ids:
        logits = model.step(torch.tensor([t]), cache)
    out = []
    for _ in range(n_new):
        logits = logits[0].float().clone()
        logits[BOS] = float("-inf")
        logits[PAD] = float("-inf")
        if temperature <= 0:
            nxt = int(torch.argmax(logits))
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, top_k).values[-1]
                logits[logits < kth] = float("-inf")
            nxt = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))
        if nxt == EOS:
            break
        out.append(nxt)
        logits = model.step(torch.tensor([nxt]), cache)
    return prompt + tok.decode(out, skip_special_tokens=False)


WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*")


def word_set(texts):
    s = set()
    for t in texts:
        s.update(w.lower() for w in WORD.findall(t))
    return s


def real_word_fraction(text, words):
    ws = [w.lower() for w in WORD.findall(text)]
    if not ws:
        return 0.0, 0
    return sum(w in words for w in ws) / len(ws), len(ws)
