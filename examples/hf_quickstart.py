"""Load, generate and fine-tune one of our models with Hugging Face transformers.

linear-transformers export --checkpoint runs/shakespeare --hf hf/shakespeare
python examples/hf_quickstart.py hf/shakespeare
python examples/hf_quickstart.py --quick     # an untrained model written on the spot (what CI runs)
"""

import argparse
import string
import tempfile

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, pipeline

import linear_transformers.hf  # (registers the model type with the Auto classes)
from linear_transformers.model import CausalTransformer, ModelConfig

parser = argparse.ArgumentParser()
parser.add_argument("folder", nargs="?", default="hf/shakespeare", help="a folder written by export --hf")
parser.add_argument("--quick", action="store_true", help="an untrained character model, a few steps")
args = parser.parse_args()
folder = args.folder
if args.quick:  # a small untrained character model, exported as `export --hf` would
    alphabet = string.printable
    model = CausalTransformer(ModelConfig(vocab_size=len(alphabet), max_len=128, d_model=64, n_layers=2, n_heads=4))
    folder = linear_transformers.hf.save_hf(model, tempfile.mkdtemp() + "/hf", data={"alphabet": alphabet})
model = AutoModelForCausalLM.from_pretrained(folder)
tokenizer = AutoTokenizer.from_pretrained(folder)
print(type(model).__name__, f"{model.num_parameters() / 1e6:.2f}M parameters")

# generate: prompts of different lengths in one batch (padded on the left), O(1) per token
torch.manual_seed(0)
batch = tokenizer(["ROMEO:", "First Citizen:\nWe"], return_tensors="pt", padding=True)
out = model.generate(**batch, max_new_tokens=60, do_sample=True, temperature=0.8)
for text in tokenizer.batch_decode(out, skip_special_tokens=True):
    print(repr(text))

# the pipeline
generate = pipeline("text-generation", model=folder)
print(repr(generate("KING:", max_new_tokens=40, do_sample=False)[0]["generated_text"]))


# fine-tune with Trainer on one line, a few steps: the loss falls
class Lines(torch.utils.data.Dataset):
    def __init__(self, text: str) -> None:
        self.ids = tokenizer(text, return_tensors="pt")["input_ids"][0]

    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids, "labels": self.ids}


train_args = TrainingArguments(
    output_dir=tempfile.mkdtemp(),
    max_steps=3 if args.quick else 30,
    per_device_train_batch_size=8,
    learning_rate=3e-3,
    logging_steps=1 if args.quick else 10,
    report_to=[],
    save_strategy="no",
    use_cpu=True,
    disable_tqdm=True,
)
trainer = Trainer(model=model, args=train_args, train_dataset=Lines("To be, or not to be, that is the question."))
trainer.train()
print("loss:", [round(e["loss"], 3) for e in trainer.state.log_history if "loss" in e])
model.eval()
out = model.generate(**tokenizer("To be, or", return_tensors="pt"), max_new_tokens=34, do_sample=False)
print(repr(tokenizer.decode(out[0], skip_special_tokens=True)))
