"""Reference hidden states of all-MiniLM-L6-v2 for tests/minilm.rs, from a NumPy BERT forward pass
written from the BERT paper / Hugging Face modeling_bert.py (independent of candle), with token ids
from transformers' pure-Python BertTokenizer (do_lower_case=True).

    python -m venv /tmp/ref && /tmp/ref/bin/pip install transformers==4.46.3 numpy safetensors
    scripts/fetch-minilm.sh && /tmp/ref/bin/python scripts/reference/minilm_hidden.py models/all-MiniLM-L6-v2
"""
import json
import math
import sys

import numpy as np
from safetensors.numpy import load_file
from transformers import BertTokenizer

TEXTS = ["No acute cardiopulmonary abnormality.", "Large right pleural effusion."]

d = sys.argv[1]
cfg = json.load(open(f"{d}/config.json"))
w = load_file(f"{d}/model.safetensors")
tok = BertTokenizer(vocab_file=f"{d}/vocab.txt", do_lower_case=True)


def ln(x, p):
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (x - m) / np.sqrt(v + cfg["layer_norm_eps"]) * w[p + ".weight"] + w[p + ".bias"]


def lin(x, p):
    return x @ w[p + ".weight"].T + w[p + ".bias"]


def gelu(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


H, nh = cfg["hidden_size"], cfg["num_attention_heads"]
for text in TEXTS:
    ids = tok.encode(text)
    x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][: len(ids)] \
        + w["embeddings.token_type_embeddings.weight"][0]
    x = ln(x, "embeddings.LayerNorm").astype(np.float64)
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        q, k, v = (lin(x, p + f"attention.self.{n}").reshape(len(ids), nh, -1).transpose(1, 0, 2) for n in ("query", "key", "value"))
        s = q @ k.transpose(0, 2, 1) / math.sqrt(H // nh)
        s = np.exp(s - s.max(-1, keepdims=True))
        a = (s / s.sum(-1, keepdims=True)) @ v
        a = a.transpose(1, 0, 2).reshape(len(ids), H)
        x = ln(lin(a, p + "attention.output.dense") + x, p + "attention.output.LayerNorm")
        x = ln(lin(gelu(lin(x, p + "intermediate.dense")), p + "output.dense") + x, p + "output.LayerNorm")
    print(json.dumps({"text": text, "ids": ids, "cls_first8": [round(float(t), 6) for t in x[0, :8]],
                      "mean_first8": [round(float(t), 6) for t in x.mean(0)[:8]]}))
