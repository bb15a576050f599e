// Bundle step of the web demo: copy onnxruntime-web's WebAssembly build (installed by `npm ci`
// from the npm registry) into vendor/, so the page loads nothing from a CDN at run time.
import { copyFileSync, existsSync, mkdirSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const dist = join(here, "node_modules", "onnxruntime-web", "dist");
const vendor = join(here, "vendor");
// the ES module with its WebAssembly glue bundled in, and the SIMD build it loads
const files = ["ort.wasm.bundle.min.mjs", "ort-wasm-simd-threaded.wasm"];

if (!existsSync(dist)) {
  console.error(`build: ${dist} is missing; run \`npm ci\` in ${here} first`);
  process.exit(1);
}
mkdirSync(vendor, { recursive: true });
for (const f of files) {
  copyFileSync(join(dist, f), join(vendor, f));
}
console.log(`build: copied ${files.join(", ")} into ${vendor}`);
