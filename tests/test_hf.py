"""The Hugging Face transformers integration, with the real library, offline: the Auto classes,
save/load, generate() against our own generate (greedy, seeded sampling, beam search against a
brute-force reference, left padding), the recurrent cache, Trainer, a peft LoRA adapter, pipeline,
and `export --hf` / loading the folder back into our CLI."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the [hf] extra (transformers) is not installed")

from linear_transformers import hf  # noqa: E402
from linear_transformers.model import CausalTransformer, ModelConfig  # noqa: E402

ALPHABET = "\n .abcdefgh"


def small(attention="causal-linear", head="categorical", seed=0, **kw) -> CausalTransformer:
    torch.manual_seed(seed)
    vocab = 256 if head == "mol" else len(ALPHABET)
    cfg = ModelConfig(
        vocab_size=vocab, max_len=48, d_model=32, n_layers=2, n_heads=4, d_ff=48, attention=attention, head=head, **kw
    )
    return CausalTransformer(cfg).eval()


def ids(text: str) -> torch.Tensor:
    return torch.tensor([[ALPHABET.index(c) for c in text]])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "model"
    hf.save_hf(small(), path, {"name": "text", "alphabet": ALPHABET, "vocab_size": len(ALPHABET)})
    return path


def test_config_mirrors_model_config_and_is_registered(folder):
    import dataclasses

    names = {f.name for f in dataclasses.fields(ModelConfig)}
    assert names <= set(hf.LinearTransformerConfig().to_dict())  # every model setting has its field
    config = transformers.AutoConfig.from_pretrained(folder)
    assert type(config) is hf.LinearTransformerConfig and config.hidden_size == 32 and config.num_hidden_layers == 2
    assert json.loads((folder / "config.json").read_text())["model_type"] == "linear_transformer"
    with pytest.raises(ValueError, match="d_model=30 is not divisible by n_heads=4"):
        hf.LinearTransformerConfig(d_model=30, n_heads=4)


@pytest.mark.parametrize(
    "attention,head", [("causal-linear", "categorical"), ("causal-softmax", "categorical"), ("causal-linear", "mol")]
)
def test_save_pretrained_from_pretrained_gives_identical_logits(tmp_path, attention, head):
    model = small(attention, head)
    hf.save_hf(model, tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is hf.LinearTransformerForCausalLM and not loaded.training
    tokens = torch.randint(0, model.cfg.vocab_size, (3, 20))
    with torch.no_grad():
        params = model(tokens, include_next=True)[:, 1:]
        expected = params if head == "categorical" else model.head.log_probs(params)
        got = loaded(tokens).logits
    assert torch.equal(got, loaded(tokens, use_cache=False).logits) or torch.allclose(got, expected, atol=1e-6)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert (tmp_path / "model.safetensors").exists()


def test_greedy_generate_equals_ours_and_a_left_padded_batch_equals_each_alone(folder):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    ours = model.model
    prompts = ["abc", "h. gadfe", "e"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    assert batch["attention_mask"][0].tolist() == [0] * 5 + [1] * 3  # padded on the left
    out = model.generate(**batch, max_new_tokens=12, do_sample=False)
    for row, prompt in zip(out, prompts, strict=True):
        alone = ours.generate(prompt=ids(prompt), max_new_tokens=12, temperature=0)
        assert row[-12:].tolist() == alone[0, -12:].tolist()
        single = model.generate(**tokenizer([prompt], return_tensors="pt"), max_new_tokens=12, do_sample=False)
        assert single[0, -12:].tolist() == alone[0, -12:].tolist()
    text = tokenizer.decode(out[1], skip_special_tokens=True)
    assert text.startswith("h. gadfe") and len(text) == len("h. gadfe") + 12


@pytest.mark.parametrize("options", [dict(temperature=0.8, top_k=5), dict(temperature=1.2, top_p=0.9)])
def test_sampling_with_a_seed_equals_ours_token_for_token(folder, options):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    prompt = ids("cab.")
    draws = hf.SameDraws(torch.Generator().manual_seed(7), **options)
    out = model.generate(prompt, max_new_tokens=30, do_sample=True, logits_processor=[draws])
    ours = model.model.generate(prompt=prompt, max_new_tokens=30, generator=torch.Generator().manual_seed(7), **options)
    assert out.tolist() == ours.tolist()
    other = model.model.generate(
        prompt=prompt, max_new_tokens=30, generator=torch.Generator().manual_seed(8), **options
    )
    assert other.tolist() != ours.tolist()  # the seed matters: the comparison can fail


def reference_beam_search(model: CausalTransformer, prompt: torch.Tensor, beams: int, steps: int) -> list[int]:
    """Beam search by brute force: every step scores every continuation of every beam with the
    parallel forward (no cache), keeps the `beams` best by total log-probability."""
    seqs = [(0.0, prompt[0].tolist())]
    for _ in range(steps):
        candidates = []
        for score, seq in seqs:
            with torch.no_grad():
                logp = model.head.log_probs(model(torch.tensor([seq]), include_next=True)[0, -1])
            candidates += [(score + logp[v].item(), [*seq, v]) for v in range(logp.shape[0])]
        seqs = sorted(candidates, key=lambda c: -c[0])[:beams]
    return seqs[0][1]


@pytest.mark.parametrize("attention", ["causal-linear", "causal-softmax"])
def test_beam_search_equals_a_brute_force_reference(tmp_path, attention):
    model = small(attention, seed=3)
    hf.save_hf(model, tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    prompt = ids("fa")
    out = loaded.generate(
        prompt, max_new_tokens=5, num_beams=4, do_sample=False, length_penalty=0.0, early_stopping=True
    )
    assert out[0].tolist() == reference_beam_search(model, prompt, beams=4, steps=5)
    # with as many beams as continuations, beam search is exact: the best of all 11^3 sequences
    exact = loaded.generate(prompt, max_new_tokens=3, num_beams=121, do_sample=False, length_penalty=0.0)
    best = max(
        itertools.product(range(len(ALPHABET)), repeat=3),
        key=lambda c: -model.nll(torch.cat([prompt, torch.tensor([c])], 1))[0, 2:].sum().item(),
    )
    assert exact[0, 2:].tolist() == list(best)


def test_the_cache_is_recurrent_state_and_says_what_it_cannot_do(folder):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    out = model(ids("abcde"), use_cache=True)
    cache = out.cache
    assert isinstance(cache, hf.RecurrentStateCache) and isinstance(cache, transformers.cache_utils.Cache)
    assert cache.get_seq_length() == 5 and cache.batch_size == 1 and len(cache) == 2
    sizes = [layer.S.numel() for layer in cache.state.layers]
    step = model(ids("f"), cache=cache, use_cache=True)
    assert step.cache.get_seq_length() == 6 and [layer.S.numel() for layer in cache.state.layers] == sizes  # O(1)
    full = model(ids("abcdef"), use_cache=False).logits[:, -1]
    torch.testing.assert_close(step.logits[:, -1], full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="cannot be cropped back to an earlier position"):
        cache.crop(2)
    cache.batch_repeat_interleave(3)
    assert cache.batch_size == 3
    cache.reorder_cache(torch.tensor([2, 0]))
    assert cache.batch_size == 2
    # the loss covers every position whatever logits_to_keep keeps
    x = ids("abcdefgh")
    full, last = model(x, labels=x, use_cache=False), model(x, labels=x, use_cache=False, logits_to_keep=1)
    assert last.logits.shape[1] == 1 and torch.equal(last.logits[:, -1], full.logits[:, -1])
    torch.testing.assert_close(last.loss, full.loss)
    with pytest.raises(ValueError, match=r"token ids \[13\] are not in the model's vocabulary"):
        model(torch.tensor([[1, 13]]))
    with pytest.raises(ValueError, match="inputs_embeds is not supported"):
        model(ids("ab"), inputs_embeds=torch.zeros(1, 2, 32))


def test_trainer_lowers_the_loss(tmp_path):
    from torch.utils.data import Dataset

    class Repeats(Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            x = ids(("abcdefgh" * 4)[i % 8 : i % 8 + 16])[0]
            return {"input_ids": x, "labels": x.clone()}

    model = hf.from_model(small(seed=5)).train()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        max_steps=40,
        learning_rate=3e-3,
        logging_steps=10,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Repeats())
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 4 and losses[-1] < 0.5 * losses[0]


def test_peft_lora_on_the_attention_projections_trains_and_merges(folder):
    peft = pytest.importorskip("peft", reason="peft is not installed")
    base = transformers.AutoModelForCausalLM.from_pretrained(folder)
    lora = peft.get_peft_model(
        base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv", "out"], lora_dropout=0.0)
    )
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    x = ids("abcabcabcabcabc")
    first = None
    for _ in range(30):
        loss = lora(input_ids=x, labels=x).loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first
    lora.eval()
    # generation with the adapter in place (the fused C step must not drop it) equals the merged model's
    adapted = lora.generate(input_ids=ids("ab"), max_new_tokens=10, do_sample=False)
    merged = lora.merge_and_unload()
    assert type(merged.model.blocks[0].attn.qkv) is torch.nn.Linear
    assert merged.generate(ids("ab"), max_new_tokens=10, do_sample=False).tolist() == adapted.tolist()
    before = transformers.AutoModelForCausalLM.from_pretrained(folder).state_dict()
    after = merged.state_dict()
    assert set(after) == set(before) and not torch.equal(
        after["model.blocks.0.attn.qkv.weight"], before["model.blocks.0.attn.qkv.weight"]
    )


def test_lora_finds_its_default_targets_without_being_told(folder):
    """LoraConfig(task_type="CAUSAL_LM") with no target_modules: the model type's targets (qkv, out)
    are in peft's table (linear_transformers.hf.LORA_TARGETS)."""
    peft = pytest.importorskip("peft", reason="peft is not installed")
    from linear_transformers.hf import LORA_TARGETS

    base = transformers.AutoModelForCausalLM.from_pretrained(folder)
    lora = peft.get_peft_model(base, peft.LoraConfig(task_type="CAUSAL_LM", r=4))
    # (names end in <module>.lora_A.default.weight)
    adapted = {n.rsplit(".", 3)[0].rsplit(".", 1)[-1] for n, p in lora.named_parameters() if p.requires_grad}
    assert adapted == set(LORA_TARGETS)


def test_pipeline_returns_text(folder):
    generate = transformers.pipeline("text-generation", model=str(folder))
    out = generate("bad cab", max_new_tokens=8)
    assert out[0]["generated_text"].startswith("bad cab") and len(out[0]["generated_text"]) == len("bad cab") + 8


def test_export_hf_and_our_cli_reads_the_folder_back(tmp_path, capsys):
    from linear_transformers.checkpoint import load_model
    from linear_transformers.cli import main
    from linear_transformers.train import TrainConfig, train

    text = tmp_path / "text.txt"
    text.write_text("abc defgh. " * 200)
    run = tmp_path / "run"
    cfg = ModelConfig(vocab_size=9, max_len=32, d_model=16, n_layers=1, n_heads=2, d_ff=32)
    train(
        cfg,
        TrainConfig(
            data="text",
            data_path=str(text),
            seq_len=32,
            out=str(run),
            steps=3,
            batch_size=2,
            progress=False,
            eval_every=0,
            device="cpu",
        ),
    )
    assert main(["export", "--checkpoint", str(run), "--hf", str(tmp_path / "hf")]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "hf").iterdir()}
    ours, _ = load_model(run)
    back, config = load_model(tmp_path / "hf")
    assert config["data"]["alphabet"] == " .abcdefgh"  # the text's characters, for sample and eval
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), back.state_dict().values(), strict=True))
    out = tmp_path / "samples.txt"
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(tmp_path / "hf"),
                "--prompt",
                "abc",
                "--max-new-tokens",
                "5",
                "--out",
                str(out),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert out.read_text().startswith("abc")
    capsys.readouterr()
    # the folder names its data without this machine's directories: eval finds it from there, or says where it looked
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["training"]["data_path"] == "text.txt"
    assert main(["eval", "--checkpoint", str(tmp_path / "hf"), "--batches", "1", "--device", "cpu"]) == 2
    assert "is not at text.txt (from its config); pass --data-path" in capsys.readouterr().err
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(tmp_path / "hf"),
                "--batches",
                "1",
                "--device",
                "cpu",
                "--data-path",
                str(text),
            ]
        )
        == 0
    )
    assert main(["eval", "--checkpoint", str(run), "--batches", "1", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "text test:" in lines[-1] and lines[-1] == lines[-2]  # the folder gives the checkpoint's bits/dim
