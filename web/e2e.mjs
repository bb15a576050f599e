// End-to-end check of the demo in headless Chromium, driven by playwright-core with the system's
// Chromium (no browser download): open the page and, for each run, pick a digit, a temperature and
// a seed in the form, press Generate, wait for the image and read the canvas pixels back; then save
// a screenshot. Prints one JSON line, {runs: [{rgba, width, height, last: {tokens, ...}}, ...],
// errors}, for the caller (tests/test_web.py) to compare with PyTorch.
//
//   node e2e.mjs --url http://127.0.0.1:8000/ --runs 3:1:7,5:0:0 --screenshot shot.png
//   (each run is digit:temperature:seed; --autostart 3:1:7 first opens the page with
//   ?autostart&digit=3&temperature=1&seed=7 and records what it generates without a click)
import { parseArgs } from "node:util";
import { chromium } from "playwright-core";

const { values: opt } = parseArgs({
  options: {
    url: { type: "string" },
    runs: { type: "string", default: "3:1:0" },
    autostart: { type: "string", default: "" },
    screenshot: { type: "string", default: "screenshot.png" },
    chromium: { type: "string", default: process.env.CHROMIUM || "/usr/bin/chromium" },
    timeout: { type: "string", default: "120000" },
  },
});
const timeout = Number(opt.timeout);

const browser = await chromium.launch({
  executablePath: opt.chromium,
  headless: true,
  // this machine has no network: keep Chromium from trying to reach its services
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage({ viewport: { width: 900, height: 900 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  page.on("console", (m) => m.type() === "error" && errors.push(m.text()));
  const state = (wanted) =>
    page.waitForFunction((w) => w.includes(document.body.dataset.state), wanted, { timeout });
  const record = () =>
    page.evaluate(() => {
      const canvas = document.getElementById("pixels");
      const rgba = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
      return {
        state: document.body.dataset.state,
        status: document.getElementById("status").textContent,
        stats: document.getElementById("stats").textContent,
        width: canvas.width,
        height: canvas.height,
        rgba: Array.from(rgba),
        last: window.demo.last,
      };
    });
  let autostarted = null;
  if (opt.autostart) {
    const [digit, temperature, seed] = opt.autostart.split(":");
    await page.goto(`${opt.url}?autostart&digit=${digit}&temperature=${temperature}&seed=${seed}`);
    await state(["done", "error"]);
    autostarted = await record();
  }
  await page.goto(opt.url);
  await state(["ready", "error"]);
  if ((await page.evaluate(() => document.body.dataset.state)) === "error") {
    throw new Error(`the page failed to load: ${await page.textContent("#status")} ${errors.join("; ")}`);
  }
  const runs = [];
  for (const run of opt.runs.split(",")) {
    const [digit, temperature, seed] = run.split(":");
    if (await page.isEnabled("#digit")) await page.selectOption("#digit", digit); // unconditional: disabled
    await page.locator("#temperature").evaluate((el, v) => {
      el.value = v;
      el.dispatchEvent(new Event("input", { bubbles: true }));
    }, temperature);
    await page.fill("#seed", seed);
    await page.click("#generate");
    await state(["done", "error"]);
    runs.push(await record());
  }
  await page.evaluate(() => window.scrollTo(0, 0));
  await page.screenshot({ path: opt.screenshot, fullPage: true });
  console.log(JSON.stringify({ runs, autostarted, errors, screenshot: opt.screenshot }));
} finally {
  await browser.close();
}
