#!/usr/bin/env python3
"""Independent NumPy (float64) reference implementation of the YOCO forward pass.

Written from the crate's spec of the reference implementation (microsoft/unilm,
folder YOCO/yoco/models/decoder/). Deliberately naive: every formula is spelled
out directly, batch size 1, no caching, O(T^2) retention in its parallel form.

    x0     = sqrt(dim) * embed_tokens[ids]
    x      = self_decoder(x0)            n_layers/2 layers (gated retention or SWA)
    K, V   = global_kv(x)                once, at the midpoint
    x      = cross_decoder(x, K, V)      n_layers/2 layers
    logits = output_projection(RMSNorm(x))

Weights are a dict {reference parameter name: ndarray}; linear weights are
(out, in), so a linear layer is y = x @ W.T.

`variant` selects the RoPE used everywhere (self-decoder q/k, global K, cross q):
    "correct"        the reference: inv_freq = theta ** -linspace(0, 1, d/2),
                     interleaved pairs (x[2i], x[2i+1]).
    "halfsplit"      WRONG on purpose: pairs (x[i], x[i + d/2]) (Llama / GPT-NeoX).
    "standard_freqs" WRONG on purpose: inv_freq = theta ** -(2i/d).
The two wrong variants exist only to build "trap" fixtures.

Run directly, it performs its self-checks (retention parallel == recurrent ==
chunkwise to 1e-10, a tiny end-to-end forward) and, given fixture folders as
arguments, recomputes their logits and compares against expected.safetensors.
"""

import json
import math
import os
import sys

import numpy as np

VARIANTS = ("correct", "halfsplit", "standard_freqs")


# --------------------------------------------------------------------------- params


def load_params(path):
    """Read params.json and fill in the reference's defaults."""
    with open(path) as f:
        p = json.load(f)
    return normalize_params(p)


def normalize_params(p):
    p = dict(p)
    p.setdefault("rope_theta", 10000.0)
    p.setdefault("norm_eps", 1e-5)
    p.setdefault("sliding_window", None)
    return p


# --------------------------------------------------------------------------- basic ops


def linear(x, w):
    """y = x @ W.T with W of shape (out, in)."""
    return x @ w.T


def rms_norm(x, weight, eps):
    """x * rsqrt(mean(x^2) + eps) over the last axis, times weight (if any)."""
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    if weight is not None:
        y = y * weight
    return y


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def silu(x):
    return x * sigmoid(x)


def logsigmoid(x):
    # log(sigmoid(x)) = -log(1 + exp(-x)), written stably for both signs.
    return -np.logaddexp(0.0, -x)


def softmax(x, axis=-1):
    m = np.max(x, axis=axis, keepdims=True)
    e = np.exp(x - m)
    return e / np.sum(e, axis=axis, keepdims=True)


def ffn(x, w, prefix):
    """SwiGLU: fc2( silu(fc1 x) * (gate x) ). fc1 is the activated branch."""
    a = linear(x, w[prefix + "fc1.weight"])
    b = linear(x, w[prefix + "gate.weight"])
    return linear(silu(a) * b, w[prefix + "fc2.weight"])


# --------------------------------------------------------------------------- RoPE


def rope_inv_freq(head_dim, theta, variant="correct"):
    """Inverse frequencies as float32 (the reference builds them in f32)."""
    half = head_dim // 2
    if variant == "standard_freqs":
        expo = 2.0 * np.arange(half, dtype=np.float64) / head_dim  # theta ** -(2i/d)
    else:
        expo = np.linspace(0.0, 1.0, half)  # theta ** -linspace(0, 1, d/2)
    return (1.0 / (float(theta) ** expo)).astype(np.float32)


def rope_cos_sin(positions, head_dim, theta, variant="correct"):
    """cos/sin tables of shape (T, d/2) for absolute positions.

    Angle = float32(pos) * float32(inv_freq) computed in float32, as the
    reference does; cos and sin are then taken in float64.
    """
    inv_freq = rope_inv_freq(head_dim, theta, variant)
    pos = np.asarray(positions).astype(np.float32)
    angle = (pos[:, None] * inv_freq[None, :]).astype(np.float32)  # f32 product
    angle = angle.astype(np.float64)
    return np.cos(angle), np.sin(angle)


def apply_rope(x, cos, sin, variant="correct"):
    """x: (T, H, d); cos, sin: (T, d/2)."""
    c = cos[:, None, :].astype(x.dtype)
    s = sin[:, None, :].astype(x.dtype)
    out = np.empty_like(x)
    if variant == "halfsplit":
        half = x.shape[-1] // 2
        x1 = x[..., :half]
        x2 = x[..., half:]
        out[..., :half] = x1 * c - x2 * s
        out[..., half:] = x2 * c + x1 * s
    else:
        # interleaved (GPT-J): (x[2i], x[2i+1]) -> (x0 c - x1 s, x1 c + x0 s)
        x0 = x[..., 0::2]
        x1 = x[..., 1::2]
        out[..., 0::2] = x0 * c - x1 * s
        out[..., 1::2] = x1 * c + x0 * s
    return out


# --------------------------------------------------------------------------- retention


def retention_parallel(q, k, v, log_gamma):
    """Naive parallel gated retention.

    q, k, v: (H, T, d), k already scaled by d^-0.5; log_gamma: (H, T).
    o_n = sum_{m <= n} exp(G_n - G_m) (q_n . k_m) v_m,  G = cumsum(log_gamma).
    """
    H, T, _ = q.shape
    G = np.cumsum(log_gamma, axis=-1)  # (H, T)
    causal = np.tril(np.ones((T, T), dtype=bool))
    diff = G[:, :, None] - G[:, None, :]  # (H, n, m) = G_n - G_m
    decay = np.where(causal[None], np.exp(np.where(causal[None], diff, 0.0)), 0.0)
    scores = np.einsum("hnd,hmd->hnm", q, k) * decay
    return np.einsum("hnm,hmd->hnd", scores, v)


def retention_recurrent(q, k, v, log_gamma, state=None):
    """Recurrent gated retention, one token at a time.

    S_t = exp(log_gamma_t) S_{t-1} + k_t^T v_t  (S: H x d_k x d_v);  o_t = q_t S_t.
    Returns (o of shape (H, T, d), final state).
    """
    H, T, dk = q.shape
    dv = v.shape[-1]
    S = np.zeros((H, dk, dv), dtype=q.dtype) if state is None else state.copy()
    out = np.zeros((H, T, dv), dtype=q.dtype)
    for t in range(T):
        gamma = np.exp(log_gamma[:, t])[:, None, None]
        S = gamma * S + k[:, t, :, None] * v[:, t, None, :]
        out[:, t] = np.einsum("hd,hde->he", q[:, t], S)
    return out, S


def retention_chunkwise(q, k, v, log_gamma, chunk=256, state=None):
    """Chunkwise form (the reference's prefill): inner-chunk parallel part plus
    (q_i * exp(G_i)) S_prev; then S = exp(G_last) S_prev + sum_j exp(G_last - G_j) k_j^T v_j,
    where G is the cumsum of log_gamma *within* the chunk."""
    H, T, dk = q.shape
    dv = v.shape[-1]
    S = np.zeros((H, dk, dv), dtype=q.dtype) if state is None else state.copy()
    out = np.zeros((H, T, dv), dtype=q.dtype)
    for s0 in range(0, T, chunk):
        s1 = min(T, s0 + chunk)
        qc, kc, vc, lg = q[:, s0:s1], k[:, s0:s1], v[:, s0:s1], log_gamma[:, s0:s1]
        G = np.cumsum(lg, axis=-1)  # (H, C)
        inner = retention_parallel(qc, kc, vc, lg)
        cross = np.einsum("hcd,hde->hce", qc * np.exp(G)[..., None], S)
        out[:, s0:s1] = inner + cross
        G_last = G[:, -1]
        w = np.exp(G_last[:, None] - G)  # (H, C)
        S = np.exp(G_last)[:, None, None] * S + np.einsum("hcd,hce->hde", kc * w[..., None], vc)
    return out, S


# --------------------------------------------------------------------------- mixers


def split_heads(x, n_heads):
    T, D = x.shape
    return x.reshape(T, n_heads, D // n_heads)


def gret_mixer(x, w, prefix, p, variant, retention="parallel"):
    """Gated retention. x: (T, dim), already mixer-normed."""
    T, D = x.shape
    H = p["n_self_heads"]
    d = D // H
    q = split_heads(linear(x, w[prefix + "q_proj.weight"]), H)
    k = split_heads(linear(x, w[prefix + "k_proj.weight"]), H)
    v = split_heads(linear(x, w[prefix + "v_proj.weight"]), H)
    g = linear(x, w[prefix + "g_proj.weight"])  # (T, D)
    gt = linear(x, w[prefix + "gt_proj.weight"])  # (T, H)

    cos, sin = rope_cos_sin(np.arange(T), d, p["rope_theta"], variant)
    q = apply_rope(q, cos, sin, variant)
    k = apply_rope(k, cos, sin, variant)
    k = k * d ** -0.5
    log_gamma = logsigmoid(gt) / 16.0  # (T, H)

    qh, kh, vh = (a.transpose(1, 0, 2) for a in (q, k, v))  # (H, T, d)
    lg = log_gamma.T  # (H, T)
    if retention == "parallel":
        o = retention_parallel(qh, kh, vh, lg)
    elif retention == "recurrent":
        o, _ = retention_recurrent(qh, kh, vh, lg)
    elif retention == "chunkwise":
        o, _ = retention_chunkwise(qh, kh, vh, lg)
    else:
        raise ValueError(retention)

    # per-head RMSNorm without weight; eps is args.norm_eps in the reference (1e-5)
    o = rms_norm(o, None, p["norm_eps"])
    o = o.transpose(1, 0, 2).reshape(T, D)
    o = silu(g) * o
    return linear(o, w[prefix + "out_proj.weight"])


def attention(q, k, v, mask):
    """Softmax attention. q: (T, Hq, hd), k, v: (S, Hkv, hd), mask: (T, S) bool.
    Query head h reads kv head h // (Hq / Hkv). Scale 1/sqrt(hd)."""
    T, Hq, hd = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    out = np.zeros((T, Hq, v.shape[-1]), dtype=q.dtype)
    for h in range(Hq):
        kv_h = h // group
        scores = (q[:, h, :] @ k[:, kv_h, :].T) / math.sqrt(hd)
        scores = np.where(mask, scores, -np.inf)
        out[:, h, :] = softmax(scores, axis=-1) @ v[:, kv_h, :]
    return out


def swa_mixer(x, w, prefix, p, variant, window):
    """Sliding-window attention: query i sees keys i-W+1 .. i (inclusive)."""
    T, D = x.shape
    H = p["n_self_heads"]
    d = D // H
    q = split_heads(linear(x, w[prefix + "q_proj.weight"]), H)
    k = split_heads(linear(x, w[prefix + "k_proj.weight"]), H)
    v = split_heads(linear(x, w[prefix + "v_proj.weight"]), H)
    cos, sin = rope_cos_sin(np.arange(T), d, p["rope_theta"], variant)
    q = apply_rope(q, cos, sin, variant)
    k = apply_rope(k, cos, sin, variant)
    i = np.arange(T)[:, None]
    j = np.arange(T)[None, :]
    mask = (j <= i) & (j >= i - window + 1)
    o = attention(q, k, v, mask).reshape(T, D)
    return linear(o, w[prefix + "out_proj.weight"])


def global_kv(x, w, p, variant):
    """Midpoint K/V from the self-decoder output. RoPE on K only."""
    T, D = x.shape
    hd = D // p["n_attn_heads"]
    Hkv = p["n_attn_kv_heads"]
    xn = rms_norm(x, w["cross_decoder.kv_layer_norm.weight"], p["norm_eps"])
    K = linear(xn, w["cross_decoder.k_proj.weight"]).reshape(T, Hkv, hd)
    V = linear(xn, w["cross_decoder.v_proj.weight"]).reshape(T, Hkv, hd)
    cos, sin = rope_cos_sin(np.arange(T), hd, p["rope_theta"], variant)
    K = apply_rope(K, cos, sin, variant)
    return K, V


def cross_mixer(x, K, V, w, prefix, p, variant):
    T, D = x.shape
    Hq = p["n_attn_heads"]
    hd = D // Hq
    q = split_heads(linear(x, w[prefix + "q_proj.weight"]), Hq)
    cos, sin = rope_cos_sin(np.arange(T), hd, p["rope_theta"], variant)
    q = apply_rope(q, cos, sin, variant)
    mask = np.tril(np.ones((T, K.shape[0]), dtype=bool))  # causal
    o = attention(q, K, V, mask).reshape(T, D)
    return linear(o, w[prefix + "out_proj.weight"])


# --------------------------------------------------------------------------- model


def forward(p, w, tokens, variant="correct", sliding_window="params", retention="parallel",
            dtype=np.float64):
    """Full causal forward for one sequence. Returns logits (T, vocab), float64 by default.

    p: params dict (see load_params); w: {name: array} (any float dtype, cast to `dtype`);
    sliding_window: "params" to use p["sliding_window"], else an int/None override;
    dtype: float64 for the fixtures; float32 only to estimate what error an f32
    implementation should expect.
    """
    assert variant in VARIANTS, variant
    p = normalize_params(p)
    w = {k: np.asarray(a, dtype=dtype) for k, a in w.items()}
    window = p["sliding_window"] if sliding_window == "params" else sliding_window
    eps = p["norm_eps"]
    n_half = p["n_layers"] // 2
    tokens = np.asarray(tokens, dtype=np.int64)

    x = math.sqrt(p["dim"]) * w["embed_tokens.weight"][tokens]

    for l in range(n_half):
        pre = f"self_decoder.layers.{l}."
        h = rms_norm(x, w[pre + "mixer_layer_norm.weight"], eps)
        if window is None:
            h = gret_mixer(h, w, pre + "mixer.", p, variant, retention)
        else:
            h = swa_mixer(h, w, pre + "mixer.", p, variant, window)
        x = x + h
        x = x + ffn(rms_norm(x, w[pre + "final_layer_norm.weight"], eps), w, pre + "ffn.")

    K, V = global_kv(x, w, p, variant)

    for l in range(n_half):
        pre = f"cross_decoder.layers.{l}."
        h = rms_norm(x, w[pre + "mixer_layer_norm.weight"], eps)
        x = x + cross_mixer(h, K, V, w, pre + "mixer.", p, variant)
        x = x + ffn(rms_norm(x, w[pre + "final_layer_norm.weight"], eps), w, pre + "ffn.")

    x = rms_norm(x, w["layer_norm.weight"], eps)
    return linear(x, w["output_projection.weight"])


def param_shapes(p):
    """{name: shape} of every parameter the reference model has."""
    p = normalize_params(p)
    D, F, V = p["dim"], p["hidden_dim"], p["vocab_size"]
    Hs, Hkv = p["n_self_heads"], p["n_attn_kv_heads"]
    hd = D // p["n_attn_heads"]
    s = {"embed_tokens.weight": (V, D), "output_projection.weight": (V, D)}
    for l in range(p["n_layers"] // 2):
        for part in ("self_decoder", "cross_decoder"):
            pre = f"{part}.layers.{l}."
            s[pre + "mixer_layer_norm.weight"] = (D,)
            s[pre + "final_layer_norm.weight"] = (D,)
            s[pre + "ffn.fc1.weight"] = (F, D)
            s[pre + "ffn.gate.weight"] = (F, D)
            s[pre + "ffn.fc2.weight"] = (D, F)
        pre = f"self_decoder.layers.{l}.mixer."
        names = ("q", "k", "v", "out") if p["sliding_window"] is not None else ("q", "k", "v", "g", "out")
        for n in names:
            s[pre + f"{n}_proj.weight"] = (D, D)
        if p["sliding_window"] is None:
            s[pre + "gt_proj.weight"] = (Hs, D)
        pre = f"cross_decoder.layers.{l}.mixer."
        s[pre + "q_proj.weight"] = (D, D)
        s[pre + "out_proj.weight"] = (D, D)
    s["cross_decoder.k_proj.weight"] = (Hkv * hd, D)
    s["cross_decoder.v_proj.weight"] = (Hkv * hd, D)
    s["cross_decoder.kv_layer_norm.weight"] = (D,)
    s["layer_norm.weight"] = (D,)  # YOCO.layer_norm: top level, not in the cross-decoder
    return s


# --------------------------------------------------------------------------- self-check


def self_check(verbose=True):
    rng = np.random.default_rng(1234)

    # 1. retention: parallel == recurrent == chunkwise (several chunk sizes)
    H, T, d = 3, 70, 8
    q = rng.standard_normal((H, T, d))
    k = rng.standard_normal((H, T, d)) * d ** -0.5
    v = rng.standard_normal((H, T, d))
    lg = logsigmoid(3.0 * rng.standard_normal((H, T))) / 16.0
    o_par = retention_parallel(q, k, v, lg)
    o_rec, S_rec = retention_recurrent(q, k, v, lg)
    err = np.max(np.abs(o_par - o_rec))
    assert err < 1e-10, f"parallel vs recurrent retention: {err}"
    for chunk in (1, 7, 16, 70, 256):
        o_chk, S_chk = retention_chunkwise(q, k, v, lg, chunk=chunk)
        e1 = np.max(np.abs(o_par - o_chk))
        e2 = np.max(np.abs(S_rec - S_chk))
        assert e1 < 1e-10 and e2 < 1e-10, f"chunkwise({chunk}): {e1} {e2}"
    # state carried across a split (prefill part, then continue recurrently)
    _, S_a = retention_chunkwise(q[:, :40], k[:, :40], v[:, :40], lg[:, :40], chunk=16)
    o_b, _ = retention_recurrent(q[:, 40:], k[:, 40:], v[:, 40:], lg[:, 40:], state=S_a)
    err2 = np.max(np.abs(o_par[:, 40:] - o_b))
    assert err2 < 1e-10, f"split prefill + recurrent: {err2}"

    # 2. RoPE: interleaved rotation preserves pair norms and is relative
    cos, sin = rope_cos_sin(np.arange(T), d, 10000.0)
    x = rng.standard_normal((T, 2, d))
    y = apply_rope(x, cos, sin)
    assert np.allclose(x[..., 0::2] ** 2 + x[..., 1::2] ** 2, y[..., 0::2] ** 2 + y[..., 1::2] ** 2)
    assert np.allclose(y[0], x[0])  # position 0 is the identity

    # 3. tiny end-to-end model: the three retention forms give the same logits
    p = normalize_params(dict(dim=16, n_layers=2, hidden_dim=24, n_self_heads=2,
                              n_attn_heads=2, n_attn_kv_heads=1, vocab_size=20))
    w = {n: 0.3 * rng.standard_normal(s) for n, s in param_shapes(p).items()}
    w = {n: (1.0 + a if n.endswith("norm.weight") else a) for n, a in w.items()}
    toks = rng.integers(0, 20, size=30)
    lp = forward(p, w, toks, retention="parallel")
    for r in ("recurrent", "chunkwise"):
        e = np.max(np.abs(lp - forward(p, w, toks, retention=r)))
        assert e < 1e-10, f"forward parallel vs {r}: {e}"
    # causality: logits of a prefix do not depend on later tokens
    e = np.max(np.abs(lp[:12] - forward(p, w, toks[:12])))
    assert e < 1e-10, f"causality: {e}"
    if verbose:
        print(f"self-check ok: retention parallel vs recurrent max |diff| = {err:.2e}")
    return err


# --------------------------------------------------------------------------- CLI


def load_fixture_weights(folder):
    """Weights of a fixture folder: model.safetensors, shards + index, or checkpoint.pth
    (the last needs torch; a trainer prefix `decoder.model.` is stripped)."""
    from safetensors.numpy import load_file

    single = os.path.join(folder, "model.safetensors")
    if os.path.exists(single):
        return load_file(single)
    pth = os.path.join(folder, "checkpoint.pth")
    if os.path.exists(pth):
        import torch

        sd = torch.load(pth, map_location="cpu", weights_only=True)
        prefix = "decoder.model."
        return {(k[len(prefix):] if k.startswith(prefix) else k): v.numpy() for k, v in sd.items()}
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        index = json.load(f)
    w = {}
    for fname in sorted(set(index["weight_map"].values())):
        w.update(load_file(os.path.join(folder, fname)))
    return w


def check_fixture(folder):
    from safetensors.numpy import load_file

    p = load_params(os.path.join(folder, "params.json"))
    try:
        w = load_fixture_weights(folder)
    except ImportError as e:  # checkpoint.pth needs torch, which tools/requirements.txt leaves out
        print(f"{folder}: skipped ({e})")
        return None
    exp_path = os.path.join(folder, "expected.safetensors")
    if not os.path.exists(exp_path):  # gret_sharded / gret_pth reuse gret's
        exp_path = os.path.join(os.path.dirname(os.path.normpath(folder)), "gret", "expected.safetensors")
    exp = load_file(exp_path)
    logits = forward(p, w, exp["tokens"])
    err = np.max(np.abs(logits - exp["logits"].astype(np.float64)))
    print(f"{folder}: max |logits - expected| = {err:.3e}")
    assert err <= 1e-4, f"{folder}: the reference disagrees with the fixture's logits by {err}"
    if "greedy" in exp:  # fixtures made by the official code also hold its greedy tokens
        seq = list(exp["tokens"][: int(exp["prompt_len"][0])])
        for _ in range(len(exp["greedy"])):
            last = forward(p, w, seq)[-1]
            last[[0, 1]] = -np.inf  # the official greedy loop never emits <s> or <pad>
            seq.append(int(np.argmax(last)))
        new = seq[int(exp["prompt_len"][0]):]
        same = new == [int(t) for t in exp["greedy"]]
        print(f"{folder}: greedy continuation of {len(new)} tokens {'identical' if same else 'DIFFERS'}")
        assert same, (new, exp["greedy"])
    return err


def fixture_folders(paths):
    """The given folders; a folder without params.json stands for every folder under it that has one."""
    for path in paths:
        if os.path.exists(os.path.join(path, "params.json")):
            yield path
        elif os.path.isdir(path):
            yield from fixture_folders(os.path.join(path, sub) for sub in sorted(os.listdir(path)))


if __name__ == "__main__":
    self_check()
    for folder in fixture_folders(sys.argv[1:]):
        check_fixture(folder)
