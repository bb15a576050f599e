// The demo's sampler: a seeded generator and the choice of a token from log-probabilities.
// tests/test_web.py ports both to Python and checks the port against this file (in Node).

// mulberry32: a small seeded generator, so a seed gives the same image every time
export function random(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

// temperature 0: the most likely token (the first one on ties, as torch.argmax);
// otherwise a draw from softmax(log_probs / temperature)
export function choose(logProbs, temperature, rand) {
  let best = 0;
  for (let i = 1; i < logProbs.length; i++) if (logProbs[i] > logProbs[best]) best = i;
  if (temperature === 0) return best;
  const weights = new Float64Array(logProbs.length);
  let total = 0;
  for (let i = 0; i < logProbs.length; i++) {
    weights[i] = Math.exp((logProbs[i] - logProbs[best]) / temperature);
    total += weights[i];
  }
  let u = rand() * total;
  for (let i = 0; i < weights.length; i++) {
    u -= weights[i];
    if (u < 0) return i;
  }
  return best;
}
