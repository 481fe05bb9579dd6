"""Greedy continuations of the shipped model made by the PyTorch implementation (tools/yoco_torch.py),
independent of the Rust crate: tests/shipped_model.rs checks that yoco prints them byte for byte.

    python tools/make_golden.py      # writes tests/fixtures/shipped/greedy.json

The loop is yoco's `generate_text` with `GenerationConfig::greedy(N).for_tokenizer(..)`: the prompt is
encoded after `<s>`; `<s>` and `<pad>` are never chosen; `</s>` stops; the text is decoded without
special tokens. Needs torch, tokenizers and safetensors (tools/requirements-train.txt).
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import yoco_torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["ROMEO.\n", "HAMLET.\nTo be, or not to be"]
NEW_TOKENS = 120


@torch.no_grad()
def greedy(model, tok, prompt, n):
    bos, pad, eos = (tok.token_to_id(s) for s in ("<s>", "<pad>", "</s>"))
    ids = [bos] + tok.encode(prompt, add_special_tokens=False).ids
    cache = model.new_cache(1)
    for t in ids:
        logits = model.step(torch.tensor([t]), cache)[0]
    new = []
    while len(new) < n:
        logits[[bos, pad]] = -float("inf")
        t = int(torch.argmax(logits))
        if t == eos:
            break
        new.append(t)
        if len(new) == n:
            break
        logits = model.step(torch.tensor([t]), cache)[0]
    return new


def main():
    torch.set_num_threads(2)
    model, cfg, tok = yoco_torch.load_model_dir(os.path.join(ROOT, "models", "shakespeare"))
    cases = []
    for prompt in PROMPTS:
        new = greedy(model, tok, prompt, NEW_TOKENS)
        cases.append({"prompt": prompt, "max_new_tokens": NEW_TOKENS, "tokens": new,
                      "text": tok.decode(new, skip_special_tokens=True)})
        print(json.dumps(cases[-1]["text"]))
    out = os.path.join(ROOT, "tests", "fixtures", "shipped", "greedy.json")
    with open(out, "w") as f:
        json.dump({"made_by": "tools/make_golden.py (PyTorch, tools/yoco_torch.py, float32)",
                   "cases": cases}, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
