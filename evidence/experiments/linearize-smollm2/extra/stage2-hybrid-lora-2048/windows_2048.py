"""The 2048-token windows of stage 2 at the generation length: a run's data.pt (512-token windows cut
from each split's token stream, in order) cut again at 2048. Run once, before
`linear-transformers finetune --student runs/lz-hybrid/model --data runs/lz-data-2048.pt
--out runs/lz-hybrid-lora-2048 --steps 90 --threads 2` (stopped at 45 steps and resumed: constant
learning rate, the same data order, so the same as one run of 90)."""
import sys

import torch

source, target = sys.argv[1:3] if len(sys.argv) == 3 else ("runs/lz-hybrid/data.pt", "runs/lz-data-2048.pt")
data = torch.load(source, weights_only=True)
out = {}
for split in ("train", "held_out", "second_domain"):
    flat = data[split].reshape(-1)
    n = len(flat) // 2048
    out[split] = flat[: n * 2048].view(n, 2048).clone()
torch.save(out, target)
