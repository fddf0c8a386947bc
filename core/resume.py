"""Per-layer results of an unfinished calibration, so that a rerun skips the layers already done.

One safetensors-format file per layer (or input group) in a folder beside the final file
(`<file>.partial/<hash>.layer`: not `.safetensors`, so model lists never offer them), named by a hash of everything the result depends on: the layer's weights and
bias, its calibration statistics (which follow from the model, the calibration settings and the
seed), the quantizer settings and the decisions taken before it (rank, smoothing). A rerun with the
same inputs finds the same names; anything changed gives new names, so a stale result is never
reused. Files are written atomically; the folder is removed once the final file is saved.
"""
import dataclasses
import hashlib
import json
import os
import shutil

import torch
from safetensors import safe_open

from .checkpoint import save_checkpoint
from .layer_quant import ACT_BITS, QuantizedLinear

SCALE_NAMES = ("wscales", "wscale_mult", "wscale_base")


def _feed(h, part) -> None:
    if part is None:
        h.update(b"\x00none")
    elif isinstance(part, torch.Tensor):
        t = part.detach().contiguous().cpu()
        h.update(f"tensor{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(part, (list, tuple)):
        h.update(f"seq{len(part)}".encode())
        for p in part:
            _feed(h, p)
    else:
        h.update(json.dumps(part, sort_keys=True, default=str).encode())


def config_fingerprint(cfg) -> dict:
    """The quantizer settings that change a layer's result (names to skip and where to save do not)."""
    d = dataclasses.asdict(cfg)
    for k in ("skip_patterns", "min_features", "gram_budget_mb", "outlier_k_std"):
        d.pop(k, None)
    return d


class PartialResults:
    def __init__(self, folder: str):
        self.folder = folder
        os.makedirs(folder, exist_ok=True)

    @staticmethod
    def key(*parts) -> str:
        h = hashlib.blake2b(digest_size=20)
        _feed(h, list(parts))
        return h.hexdigest()

    def _path(self, key, ext):
        return os.path.join(self.folder, f"{key}.{ext}")

    def save(self, key: str, results: list) -> None:
        tensors, meta = {}, []
        for i, q in enumerate(results):
            for name, t in q.tensors().items():
                tensors[f"{i}.{name}"] = t
            meta.append({"rank": q.rank, "alpha": q.alpha, "report": q.report})
        save_checkpoint(self._path(key, "layer"), tensors, {"results": json.dumps(meta)})

    def load(self, key: str):
        """The saved results under `key`, or None (also for an unreadable file: the layer is redone)."""
        path = self._path(key, "layer")
        if not os.path.isfile(path):
            return None
        try:
            with safe_open(path, framework="pt") as f:
                meta = json.loads(f.metadata()["results"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception:
            return None
        out = []
        for i, m in enumerate(meta):
            t = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".", 1)[0] == str(i)}
            alpha = m["alpha"]
            out.append(QuantizedLinear(
                qweight=t["qweight"], scales={n: t[n] for n in SCALE_NAMES if n in t},
                smooth_factor=t["smooth_factor"], proj_down=t["proj_down"], proj_up=t["proj_up"],
                bias=t.get("bias"), rank=m["rank"], alpha=tuple(alpha) if isinstance(alpha, list) else alpha,
                report=m["report"], act_shift=t.get("act_shift"), act16=ACT_BITS in t))
        return out

    def save_json(self, key: str, obj) -> None:
        path = self._path(key, "json")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(obj, f)
        os.replace(tmp, path)

    def load_json(self, key: str):
        path = self._path(key, "json")
        if not os.path.isfile(path):
            return None
        try:
            with open(path) as f:
                return json.load(f)
        except ValueError:
            return None

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
