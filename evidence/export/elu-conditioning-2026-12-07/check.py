import sys, torch, torch.nn.functional as F
from linear_transformers import feature_maps
from linear_transformers.checkpoint import load_model
from linear_transformers.export import export
old = len(sys.argv) > 2 and sys.argv[2] == "old"
if old:  # the map as it was: elu(x) + 1, with its cancellation
    feature_maps.EluFeatureMap.forward_keys = lambda self, x: F.elu(x) + 1
model, config = load_model(sys.argv[1])
try:
    s = export(model, f"/tmp/repro/m-{'old' if old else 'new'}.onnx", data=config.get("data"))
    print("old" if old else "new", "exported:", s["verified"])
except ValueError as e:
    print("old" if old else "new", "refused:", e)
# float32 vs float64 logits on held-out text
from linear_transformers import data as datasets
d = datasets.load("text", "/tmp/repro/licenses.txt", seq_len=128)
x = d.test[:128 * 8].long().view(8, 128)
with torch.no_grad():
    a = model(x); b = model.double()(x)
print("float32 vs float64 logits, largest difference:", (a.double() - b).abs().max().item())
