"""A character-level language model trained in parallel, on packed documents, then sampled as an
RNN: the library's docstrings are the documents (they ship with it), each its own length.

    python examples/char_model.py            # ~2 minutes on 2 cores
    python examples/char_model.py --quick    # seconds (what CI runs)
"""

import argparse
import importlib
import pkgutil
import time

import torch

import linear_transformers
from linear_transformers.model import CausalTransformer, ModelConfig

parser = argparse.ArgumentParser()
parser.add_argument("--quick", action="store_true", help="a few steps, to check that it runs")
args = parser.parse_args()
torch.manual_seed(0)

# the documents: every module docstring of the package, one document each
docs = []
for info in pkgutil.walk_packages(linear_transformers.__path__, "linear_transformers."):
    if info.name.endswith("__main__"):  # (running it is the command line)
        continue
    try:
        doc = importlib.import_module(info.name).__doc__
    except ImportError:  # (a module of an optional extra that is not installed)
        continue
    if doc and len(doc) > 40:
        docs.append(doc.strip()[:1024])
alphabet = sorted(set("".join(docs)))
encode = {c: i for i, c in enumerate(alphabet)}
print(f"{len(docs)} documents, {sum(map(len, docs))} characters, lengths {min(map(len, docs))}-{max(map(len, docs))}")

cfg = ModelConfig(vocab_size=len(alphabet), max_len=1024, d_model=128, n_layers=3, n_heads=4, d_ff=512)
model = CausalTransformer(cfg)
optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
steps, batch = (5, 4) if args.quick else (300, 16)
start = time.perf_counter()
for step in range(1, steps + 1):
    # a batch: documents of every length one after another in one row, cu_seqlens marking them (no padding)
    picked = [docs[i] for i in torch.randint(len(docs), (batch,))]
    tokens = torch.tensor([[encode[c] for doc in picked for c in doc]])
    cu = torch.tensor([0, *torch.tensor([len(d) for d in picked]).cumsum(0).tolist()])
    loss = model.nll(tokens, cu_seqlens=cu).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step % 50 == 0 or step == steps:
        print(f"step {step}: {loss.item() / 0.6931:.3f} bits/char ({time.perf_counter() - start:.0f} s)")

# sample as an RNN: a prompt in parallel, then one O(1) step per character
model.eval()
prompt = torch.tensor([[encode[c] for c in "The "]])
out = model.generate(prompt=prompt, max_new_tokens=60 if args.quick else 300, temperature=0.8)
print(repr("".join(alphabet[i] for i in out[0].tolist())))
