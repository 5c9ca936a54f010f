"""Writes tests/fixtures/tiny-bert: a 2-layer BERT (hidden 16) saved twice, as the two formats
checkpoints come in, for tests/bert_formats.rs.

- pytorch_model.bin: the PyTorch zip format of torch.save (protocol-2 pickle of an OrderedDict whose
  tensors are torch._utils._rebuild_tensor_v2 calls on persistent storages 'archive/data/<key>'),
  with the names of old TensorFlow-converted checkpoints such as BioBERT v1.1: a `bert.` prefix,
  LayerNorm `gamma`/`beta`, plus pooler and MLM-head tensors a feature extractor must ignore.
- model.safetensors: the same values under the modern names (no prefix, LayerNorm weight/bias).
- config.json without layer_norm_eps/pad_token_id, as BioBERT's, and a small vocab.txt.

Standard library only (torch is not needed to write its format): python3 scripts/reference/make_tiny_bert.py
"""
import collections
import json
import os
import pickle
import random
import struct
import sys
import types
import zipfile

OUT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "tiny-bert")
H, LAYERS, HEADS, INTER, MAXPOS, TYPES = 16, 2, 2, 32, 64, 2
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "-"] + list("abcdefghijklmnopqrstuvwxyz") \
    + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"] \
    + "no acute heart size normal lungs clear pleural effusion right left lower lobe large small".split()

# Fake the two torch globals the pickle refers to, so that pickle writes them by name.
torch = types.ModuleType("torch")
torch_utils = types.ModuleType("torch._utils")
sys.modules["torch"], sys.modules["torch._utils"] = torch, torch_utils


class FloatStorage:
    pass


def _rebuild_tensor_v2(*args):
    raise RuntimeError("only for writing")


FloatStorage.__module__, FloatStorage.__qualname__ = "torch", "FloatStorage"
_rebuild_tensor_v2.__module__ = "torch._utils"
torch.FloatStorage, torch_utils._rebuild_tensor_v2 = FloatStorage, _rebuild_tensor_v2


class Storage:
    def __init__(self, key, numel):
        self.key, self.numel = key, numel


class Tensor:
    def __init__(self, key, shape):
        self.key, self.shape = key, shape

    def __reduce_ex__(self, protocol):
        stride, acc = [], 1
        for d in reversed(self.shape):
            stride.insert(0, acc)
            acc *= d
        storage = Storage(self.key, acc)
        return (_rebuild_tensor_v2, (storage, 0, tuple(self.shape), tuple(stride), False, collections.OrderedDict()))


class TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", FloatStorage, obj.key, "cpu", obj.numel)
        return None


def tensors():
    rng = random.Random(20261127)
    out = collections.OrderedDict()

    def add(name, shape, kind="w"):
        n = 1
        for d in shape:
            n *= d
        if kind == "one":
            vals = [1.0 + 0.1 * rng.gauss(0, 1) for _ in range(n)]
        else:
            vals = [rng.gauss(0, 0.3) for _ in range(n)]
        out[name] = (shape, vals)

    add("embeddings.word_embeddings.weight", [len(VOCAB), H])
    add("embeddings.position_embeddings.weight", [MAXPOS, H])
    add("embeddings.token_type_embeddings.weight", [TYPES, H])
    add("embeddings.LayerNorm.weight", [H], "one")
    add("embeddings.LayerNorm.bias", [H])
    for i in range(LAYERS):
        p = f"encoder.layer.{i}."
        for m in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            add(p + m + ".weight", [H, H])
            add(p + m + ".bias", [H])
        add(p + "attention.output.LayerNorm.weight", [H], "one")
        add(p + "attention.output.LayerNorm.bias", [H])
        add(p + "intermediate.dense.weight", [INTER, H])
        add(p + "intermediate.dense.bias", [INTER])
        add(p + "output.dense.weight", [H, INTER])
        add(p + "output.dense.bias", [H])
        add(p + "output.LayerNorm.weight", [H], "one")
        add(p + "output.LayerNorm.bias", [H])
    add("pooler.dense.weight", [H, H])
    add("pooler.dense.bias", [H])
    return out


def write_safetensors(path, ts):
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, (shape, vals) in ts.items():
        blob = struct.pack(f"<{len(vals)}f", *vals)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def torch_name(name):
    name = name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
    return name if name.startswith("cls.") else "bert." + name


def write_torch_zip(path, ts):
    ts = collections.OrderedDict(ts)
    ts["cls.predictions.bias"] = ([len(VOCAB)], [0.01 * i for i in range(len(VOCAB))])
    state = collections.OrderedDict()
    storages = []
    for i, (name, (shape, vals)) in enumerate(ts.items()):
        state[torch_name(name)] = Tensor(str(i), shape)
        storages.append((str(i), struct.pack(f"<{len(vals)}f", *vals)))
    import io
    buf = io.BytesIO()
    TorchPickler(buf, protocol=2).dump(state)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/byteorder", "little")
        for key, blob in storages:
            z.writestr(f"archive/data/{key}", blob)
        z.writestr("archive/version", "3\n")


def main():
    os.makedirs(OUT, exist_ok=True)
    ts = tensors()
    write_safetensors(os.path.join(OUT, "model.safetensors"), ts)
    write_torch_zip(os.path.join(OUT, "pytorch_model.bin"), ts)
    config = {
        "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
        "hidden_size": H, "initializer_range": 0.02, "intermediate_size": INTER,
        "max_position_embeddings": MAXPOS, "num_attention_heads": HEADS, "num_hidden_layers": LAYERS,
        "type_vocab_size": TYPES, "vocab_size": len(VOCAB),
    }
    with open(os.path.join(OUT, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    with open(os.path.join(OUT, "vocab.txt"), "w") as f:
        f.write("\n".join(VOCAB) + "\n")


main()
