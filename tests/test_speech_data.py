"""The synthesised speech corpus: log-mel features, phone folding, sentences, synthesis, caching, folders."""

from __future__ import annotations

import json
import math
import wave

import numpy as np
import pytest
import torch

from linear_transformers.data import speech

needs_synth = pytest.mark.skipif(
    bool(speech.synthesizers_missing()),
    reason=f"{', '.join(speech.synthesizers_missing())} not installed (apt-get install espeak-ng flite)",
)


@pytest.mark.parametrize("window", ["hamming", "rectangular"])
@pytest.mark.parametrize("seconds", [0.01, 0.3, 1.237])
def test_log_mel_matches_python_speech_features(window, seconds):
    psf = pytest.importorskip("python_speech_features")
    rng = np.random.default_rng(int(seconds * 1000))
    t = np.arange(int(seconds * 16000)) / 16000
    x = 0.3 * np.sin(2 * np.pi * (200 + 3000 * t) * t) + 0.05 * rng.standard_normal(len(t))
    winfunc = np.hamming if window == "hamming" else (lambda n: np.ones((n,)))
    energies, _ = psf.fbank(
        x, samplerate=16000, winlen=0.025, winstep=0.01, nfilt=40, nfft=512, preemph=0.97, winfunc=winfunc
    )  # fmt: skip (logfbank = log of fbank, which takes the window)
    want = np.log(energies)
    got = speech.log_mel(x, window=window)
    assert got.shape == want.shape and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-4)


def test_log_mel_puts_a_tone_in_its_band_and_rejects_bad_input():
    fb = speech.mel_filterbank(40, 512, 16000)
    assert fb.shape == (40, 257) and fb.min() >= 0 and fb.max() <= 1 and (fb.sum(1) > 0).all()
    tone = np.sin(2 * np.pi * 1000 * np.arange(16000) / 16000)
    band = int(speech.log_mel(tone).mean(0).argmax())
    assert fb[band, round(1000 * 512 / 16000)] > 0  # the loudest band is one whose filter covers 1 kHz
    with pytest.raises(ValueError, match="mono waveform"):
        speech.log_mel(np.zeros((2, 100)))
    with pytest.raises(ValueError, match="window"):
        speech.log_mel(tone, window="hann")


def test_espeak_ipa_folds_into_the_39_phones():
    phones, unknown = speech.fold_espeak("ð_ə k_w_ˈɪ_k b_ɹ_ˈaʊ_n f_ˈɑːɹ_t\n ˌoʊ_v_ɚ")
    assert phones == ["dh", "ah", "k", "w", "ih", "k", "b", "r", "aw", "n", "f", "aa", "r", "t", "ow", "v", "er"]
    assert unknown == []
    phones, unknown = speech.fold_espeak("ʕ_ə")
    assert phones == ["ah"] and unknown == ["ʕ"]
    assert all(p in speech.PHONES for ps in speech.ESPEAK_IPA.values() for p in ps)
    assert len(speech.PHONES) == 39


def test_flite_phones_fold():
    assert speech.fold_flite("pau hh ax l ow dh eh r pau") == (["hh", "ah", "l", "ow", "dh", "eh", "r"], [])
    assert speech.fold_flite("hh qq") == (["hh"], ["qq"])


def test_sentences_from_a_play():
    text = """THE TEMPEST

PROSPERO.
Twelve year since, Miranda, twelve year since,
Thy father was the Duke of Milan. [Exit.]
This etext is copyrighted, read the licence for ever and ever.
MIRANDA.
Sir, are not you my father? Sir, are not you my father?
O! Go."""
    got = speech.sentences_from_text(text, 4, 14)
    assert got == [
        "Twelve year since, Miranda, twelve year since, Thy father was the Duke of Milan.",
        "Sir, are not you my father?",
    ]


@needs_synth
@pytest.mark.parametrize(("engine", "voice"), [("espeak", "en-us+f3"), ("flite", "slt")])
def test_synthesizers_speak_with_their_phones(engine, voice):
    x, phones, unknown = speech.synthesize("Hello there, my good friend.", engine, voice, 1.0, 1.0)
    assert x.dtype == np.float32 and 0.8 < len(x) / speech.SAMPLE_RATE < 4 and np.abs(x).max() > 0.05
    assert unknown == [] and {"hh", "l", "dh", "m", "g", "f", "r", "n", "d"} <= set(phones)
    slow, _, _ = speech.synthesize("Hello there, my good friend.", engine, voice, 0.8, 1.0)
    assert len(slow) > 1.1 * len(x)  # the speed factor is applied


def _text_file(tmp_path, n=40):
    words = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november".split()
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(words, 5)).capitalize() + "." for _ in range(n)]
    path = tmp_path / "text.txt"
    path.write_text("\n".join(lines))
    return path


@needs_synth
def test_corpus_is_held_out_by_sentence_and_voice_and_cached(tmp_path):
    settings = speech.CorpusSettings(train_utterances=8, test_utterances=4, text=str(_text_file(tmp_path)))
    info = speech.build_corpus(tmp_path / "c", settings, log=lambda *_: None)
    train, test = speech.load_corpus(tmp_path / "c")
    assert (len(train), len(test)) == (8, 4)
    assert not {m["text"] for m in train.meta} & {m["text"] for m in test.meta}
    assert not {(m["engine"], m["voice"]) for m in train.meta} & {(m["engine"], m["voice"]) for m in test.meta}
    for split in (train, test):
        for f, p in zip(split.features, split.phones, strict=True):
            assert f.shape[1] == 40 and len(f) > 50 and 5 < len(p) < len(f)
    assert info["splits"]["train"]["utterances"] == 8 and info["splits"]["train"]["hours"] > 0
    assert info["unmapped_symbols"] == {}
    stamp = (tmp_path / "c" / "train.npz").stat().st_mtime_ns
    assert speech.build_corpus(tmp_path / "c", settings) == info  # reused, not rebuilt
    assert (tmp_path / "c" / "train.npz").stat().st_mtime_ns == stamp
    again = speech.build_corpus(tmp_path / "c", speech.CorpusSettings(8, 4, seed=1, text=settings.text), log=print)
    assert again["settings"]["seed"] == 1 and json.loads((tmp_path / "c" / "corpus.json").read_text()) == again


def test_corpus_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="corpus.json missing"):
        speech.load_corpus(tmp_path)
    if not speech.synthesizers_missing():
        with pytest.raises(ValueError, match="sentences"):
            speech.build_corpus(tmp_path / "c", speech.CorpusSettings(100, 10, text=str(_text_file(tmp_path, 20))))


def _write_wav(path, x, rate):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes((np.clip(x, -1, 1) * 32767).astype(np.int16).tobytes())


def test_folder_corpus(tmp_path):
    for split in ("train", "test"):
        (tmp_path / split).mkdir()
        _write_wav(tmp_path / split / "a.wav", np.sin(np.arange(8000) / 5), 8000)
        (tmp_path / split / "a.phn").write_text("h# HH AX L OW h#".replace("h# ", "").replace(" h#", ""))
    train, _ = speech.load_folder_corpus(tmp_path)
    assert [speech.PHONES[i] for i in train.phones[0]] == ["hh", "ah", "l", "ow"]
    assert abs(len(train.features[0]) - 100) <= 2  # one second, resampled to 16 kHz, 10 ms frames
    (tmp_path / "test" / "a.phn").write_text("hh qq")
    with pytest.raises(ValueError, match="qq"):
        speech.load_folder_corpus(tmp_path)
    (tmp_path / "test" / "a.phn").unlink()
    with pytest.raises(FileNotFoundError, match="a.phn"):
        speech.load_folder_corpus(tmp_path)
    assert math.isfinite(float(train.features[0].sum()))
