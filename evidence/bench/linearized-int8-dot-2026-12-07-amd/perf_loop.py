import copy, time, torch, sys
from transformers import AutoModelForCausalLM
from linear_transformers.decode import DecodeConfig
from linear_transformers.linearize import LinearizedCache
from linear_transformers.linearize.step import fused_step
m = AutoModelForCausalLM.from_pretrained("runs/lz-hybrid/model").eval()
ids = torch.randint(0, 49152, (1, 256))
cache = LinearizedCache()
with torch.no_grad(): m(ids, cache=cache, use_cache=True)
step = fused_step(m, DecodeConfig.precision(sys.argv[1]))
states = [copy.deepcopy(cache.states[i]) for i in range(len(cache.states))]
tok = torch.tensor([5]); t0 = time.time()
while time.time() - t0 < 10: step(tok, states[0].seen.clone(), states)
