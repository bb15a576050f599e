// The web demo: load the exported recurrent step (linear-transformers export) with onnxruntime-web
// and generate an image token by token, drawing every pixel as it is produced.
//
// The step's contract (see src/linear_transformers/export.py): feed token, position and the state
// tensors S_i, z_i; get params, log_probs, position_out and S_i_out, z_i_out. The first token is the
// start token (vocab_size + class); every later one is the token just chosen.
import { choose, random } from "./sampling.js";
import * as ort from "./vendor/ort.wasm.bundle.min.mjs";

ort.env.wasm.numThreads = 1; // threads need cross-origin isolation; one thread is plenty for this model
// (the bundle finds ort-wasm-simd-threaded.wasm next to itself, in vendor/)

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const modelBase = params.get("model") || "model/model";

class Generator {
  constructor(meta, session) {
    this.meta = meta;
    this.session = session;
    const shape = meta.data?.image_shape;
    if (!shape || meta.data.alphabet) throw new Error("this page draws image models; the exported model is not one");
    [this.height, this.width] = shape;
    this.channels = shape[2] || 1;
    this.levels = meta.model.vocab_size;
    this.length = this.height * this.width * this.channels;
  }

  initialFeeds(startToken) {
    const feeds = {
      token: new ort.Tensor("int64", BigInt64Array.of(BigInt(startToken)), [1]),
      position: new ort.Tensor("int64", BigInt64Array.of(0n), [1]),
    };
    for (const input of this.meta.inputs.slice(2)) {
      const shape = input.shape.map((d) => (d === "batch" ? 1 : d));
      feeds[input.name] = new ort.Tensor("float32", new Float32Array(shape.reduce((a, b) => a * b, 1)), shape);
    }
    return feeds;
  }

  // one image; onToken(t, token) after every token; returns the tokens and the time taken
  async generate({ label, temperature, seed, onToken }) {
    const rand = random(seed);
    const startId = this.meta.start_token.id + (this.meta.start_token.per_class ? label : 0);
    let feeds = this.initialFeeds(startId);
    const tokens = new Int32Array(this.length);
    const start = performance.now();
    for (let t = 0; t < this.length; t++) {
      const out = await this.session.run(feeds);
      const token = choose(out.log_probs.data, temperature, rand);
      tokens[t] = token;
      await onToken(t, token);
      const next = { token: new ort.Tensor("int64", BigInt64Array.of(BigInt(token)), [1]), position: out.position_out };
      for (const [input, output] of this.meta.state_pairs) if (input !== "position") next[input] = out[output];
      feeds = next;
    }
    return { tokens: Array.from(tokens), seconds: (performance.now() - start) / 1000 };
  }
}

function pixelValue(level, levels) {
  return Math.floor((level * 255) / Math.max(levels - 1, 1)); // as data.levels_to_images
}

async function main() {
  const meta = await (await fetch(`${modelBase}.json`)).json();
  const session = await ort.InferenceSession.create(`${modelBase}.onnx`, { executionProviders: ["wasm"] });
  const gen = new Generator(meta, session);
  const canvas = $("pixels");
  canvas.width = gen.width;
  canvas.height = gen.height;
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(gen.width, gen.height);

  const nClasses = meta.model.n_classes;
  const digit = $("digit");
  for (let c = 0; c < Math.max(nClasses, 1); c++) digit.add(new Option(nClasses ? String(c) : "any", String(c)));
  digit.disabled = !nClasses;
  const temperature = $("temperature");
  temperature.addEventListener("input", () => ($("temperature-value").textContent = Number(temperature.value).toFixed(2)));
  const m = meta.model;
  $("model-info").textContent =
    `Model: ${m.n_layers} layers, ${m.n_heads} heads, d_model ${m.d_model}, ${m.attention} attention ` +
    `(feature map ${m.feature_map}); ${gen.height}×${gen.width} pixels, ${gen.levels} grey levels; ` +
    `state per layer ${meta.inputs[2].shape.slice(1).join("×")} + ${meta.inputs[3].shape.slice(1).join("×")}.`;

  async function run(options) {
    document.body.dataset.state = "running";
    $("generate").disabled = true;
    image.data.fill(0);
    for (let i = 3; i < image.data.length; i += 4) image.data[i] = 255;
    ctx.putImageData(image, 0, 0);
    const tick = performance.now();
    const result = await gen.generate({
      ...options,
      onToken: async (t, token) => {
        const pixel = Math.floor(t / gen.channels);
        const value = pixelValue(token, gen.levels);
        if (gen.channels === 1) image.data.fill(value, 4 * pixel, 4 * pixel + 3);
        else image.data[4 * pixel + (t % gen.channels)] = value;
        if ((t + 1) % (gen.width * gen.channels) === 0) {
          // a row done: show it and let the page repaint
          ctx.putImageData(image, 0, 0);
          $("stats").textContent = `${t + 1} / ${gen.length} tokens, ${((t + 1) / ((performance.now() - tick) / 1000)).toFixed(0)} tokens/s`;
          await new Promise((resolve) => setTimeout(resolve, 0));
        }
      },
    });
    ctx.putImageData(image, 0, 0);
    const rate = gen.length / result.seconds;
    $("stats").textContent = `${gen.length} tokens in ${result.seconds.toFixed(2)} s: ${rate.toFixed(0)} tokens/s (one WebAssembly thread, drawing included)`;
    $("status").textContent = `Done: ${nClasses ? `digit ${options.label}, ` : ""}temperature ${options.temperature}, seed ${options.seed}.`;
    $("generate").disabled = false;
    window.demo.last = { ...options, ...result, tokensPerSecond: rate };
    document.body.dataset.state = "done";
    return window.demo.last;
  }

  window.demo = { meta, run, last: null };
  $("controls").addEventListener("submit", (event) => {
    event.preventDefault();
    run({ label: Number(digit.value), temperature: Number(temperature.value), seed: Number($("seed").value) }).catch(fail);
  });
  $("generate").disabled = false;
  $("status").textContent = "Ready: pick a digit and press Generate.";
  document.body.dataset.state = "ready";
  // ?autostart (with &digit=3&temperature=0.8&seed=1): generate on load, without a click
  if (params.has("autostart")) {
    for (const [id, element] of [["digit", digit], ["temperature", temperature], ["seed", $("seed")]]) {
      if (params.has(id)) element.value = params.get(id);
    }
    $("controls").requestSubmit();
  }
}

function fail(error) {
  $("status").textContent = `Error: ${error.message}`;
  document.body.dataset.state = "error";
  console.error(error);
}

main().catch(fail);
