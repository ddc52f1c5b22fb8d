// Drives the operator console at / in headless Chromium through playwright-core: open (the
// token prompt), list, filter, open a failed event and read its log lines, the dead letters,
// the handlers, deploy a fixed version from the page, retry the event and see it complete,
// retry the remaining dead letters as a set. A screenshot of each view goes to $SCREENSHOTS.
//
// Run by tests/tests/browser.rs, which starts the host, seeds the events and passes:
//   CONSOLE_URL, CONSOLE_TOKEN, CHROMIUM, PLAYWRIGHT_CORE, SCREENSHOTS,
//   HOSTILE_ID (completed; its sku is markup), TRANSIENT_ID (failed after retries, with log lines), BIG_ID (failed: quantity too large),
//   COMPONENT and MANIFEST (the version to deploy from the page, which accepts BIG_ID).
"use strict";
const path = require("node:path");
const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};
const { chromium } = require(env("PLAYWRIGHT_CORE"));
const fs = require("node:fs");

const PATIENCE = 60_000;
const url = env("CONSOLE_URL");
const shots = env("SCREENSHOTS");
fs.mkdirSync(shots, { recursive: true });
let shotNumber = 0;
let stepName = "start";

async function main() {
  const browser = await chromium.launch({
    executablePath: env("CHROMIUM"),
    headless: true,
    args: ["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"],
  });
  const page = await browser.newPage({ viewport: { width: 1400, height: 900 }, locale: "en-US" });
  page.setDefaultTimeout(PATIENCE);
  const pageErrors = [];
  page.on("pageerror", (error) => pageErrors.push(String(error)));
  page.on("dialog", (dialog) => dialog.accept());
  const step = (name) => { stepName = name; console.log(`step: ${name}`); };
  const shot = async (name) => {
    shotNumber += 1;
    const file = path.join(shots, `${String(shotNumber).padStart(2, "0")}-${name}.png`);
    await page.screenshot({ path: file, fullPage: true });
    console.log(`screenshot: ${file}`);
  };
  const rows = "#event-rows tr[data-id]";
  const rowCount = (selector, expected) =>
    page.waitForFunction(([s, n]) => document.querySelectorAll(s).length === n, [selector, expected]);

  try {
    step("open: the host wants a token");
    await page.goto(url + "/");
    await page.locator("#token-dialog").waitFor({ state: "visible" });
    await shot("token-prompt");
    await page.fill("#token-input", env("CONSOLE_TOKEN"));
    await page.click("#token-ok");

    step("recent events on open, with the activity chart");
    await page.waitForFunction((s) => document.querySelectorAll(s).length >= 4, rows);
    await page.waitForFunction(() => document.querySelectorAll("#chart svg polyline").length === 4);
    await shot("events");

    step("a hostile payload renders as text and runs nothing");
    await page.click(`${rows}[data-id="${env("HOSTILE_ID")}"]`);
    await page.locator("#event-payload", { hasText: "<img src=x onerror" }).waitFor();
    await page.locator("#derived tr[data-id]", { hasText: "shop.orders.validated" }).waitFor();
    const injected = await page.evaluate(() => ({
      pwned: window.pwned === 1,
      images: document.querySelectorAll("main img").length,
    }));
    if (injected.pwned || injected.images) throw new Error(`event data ran as HTML: ${JSON.stringify(injected)}`);
    await shot("event-hostile-payload-as-text");
    await page.click('header nav a[data-view="events"]');
    await page.waitForFunction((s) => document.querySelectorAll(s).length >= 4, rows);

    step("filter: failed events of the payload validator");
    await page.selectOption("#filters select[name=status]", "failed");
    await page.fill("#filters input[name=type]", "shop.orders.*");
    await page.selectOption("#filters select[name=handler]", "payload-validator");
    await page.click("#filters button[type=submit]");
    await rowCount(rows, 2);
    const statuses = await page.$$eval(rows, (trs) => trs.map((tr) => tr.dataset.status));
    if (statuses.some((s) => s !== "failed")) throw new Error(`filter shows ${statuses}`);
    await shot("events-filtered");

    step("open the failed event: its log lines");
    await page.click(`${rows}[data-id="${env("TRANSIENT_ID")}"]`);
    const logs = page.locator('pre[data-logs="payload-validator"]');
    await logs.waitFor();
    const logText = await logs.textContent();
    if (!logText.includes("inventory service unavailable")) throw new Error(`log lines: ${logText}`);
    await page.locator('#outcomes tr[data-handler="payload-validator"]', { hasText: "retry" }).waitFor();
    await shot("event-failed-with-logs");

    step("dead letters");
    await page.click('header nav a[data-view="dead"]');
    await rowCount(rows, 2);
    await page.locator(rows, { hasText: "outside 1..=100" }).waitFor();
    await shot("dead-letters");

    step("handlers: version, limits, counters, percentiles");
    await page.click('header nav a[data-view="handlers"]');
    const validator = page.locator('#handler-rows tr[data-handler="payload-validator"]');
    await validator.waitFor();
    const text = await validator.textContent();
    for (const want of ["active", "shop.orders.create", "fuel 10,000,000", "ok 1", "fail 1", " / "]) {
      if (!text.includes(want)) throw new Error(`handler row lacks ${JSON.stringify(want)}: ${text}`);
    }
    await shot("handlers");

    step("deploy a version that accepts larger orders, from the page");
    await page.fill("#deploy-form input[name=name]", "payload-validator");
    await page.setInputFiles("#deploy-form input[name=component]", env("COMPONENT"));
    await page.fill("#deploy-form textarea[name=manifest]", fs.readFileSync(env("MANIFEST"), "utf8"));
    await page.click("#deploy-form button[type=submit]");
    await page.locator("#deploy-result", { hasText: "deployed payload-validator" }).waitFor();
    // The table shows the new version's settings (the manifest is part of the deploy).
    await page.waitForFunction(() => {
      const row = document.querySelector('#handler-rows tr[data-handler="payload-validator"]');
      return row && Number(row.dataset.loads) >= 2;
    });
    await shot("handler-deployed");

    step("retry the oversized order: it completes and derives an event");
    await page.goto(`${url}/#/event/${encodeURIComponent(env("BIG_ID"))}`);
    await page.locator("[data-field=status]", { hasText: "failed" }).waitFor();
    await page.click("#retry-one");
    await page.locator("[data-field=status]", { hasText: "completed" }).waitFor();
    await page.locator("#derived tr[data-id]", { hasText: "shop.orders.validated" }).waitFor();
    await shot("event-retried-completed");

    step("follow the derived event to its cause");
    await page.click("#derived tr[data-id]");
    await page.locator("#cause a", { hasText: env("BIG_ID") }).waitFor();
    await shot("derived-event");

    step("retry the remaining dead letters as a filtered set");
    await page.click('header nav a[data-view="dead"]');
    await rowCount(rows, 1);
    await page.click("#retry-set");
    await page.locator("#toast", { hasText: "retried 1" }).waitFor();
    await shot("dead-letters-retried");

    if (pageErrors.length) throw new Error(`errors in the page: ${pageErrors.join("; ")}`);
    console.log("console flow passed");
  } catch (error) {
    await shot(`failed-at-${stepName.split(":")[0].replace(/\W+/g, "-")}`).catch(() => {});
    throw error;
  } finally {
    await browser.close();
  }
}

main().catch((error) => {
  console.error(`console test failed at step "${stepName}": ${error.stack || error}`);
  process.exit(1);
});
