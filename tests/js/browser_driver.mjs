// Drives browser.html in headless Chromium (Debian's /usr/bin/chromium, no downloaded
// browser) with playwright-core, for tests/test_js_sdk.py.
//
//   node browser_driver.mjs --page http://127.0.0.1:PAGE/browser.html?url=...&token=... \
//       --user-data-dir DIR [--chromium /usr/bin/chromium] [--timeout 60]
//
// Stdout: one JSON object per line. Every event the page reports is passed through as is
// ({"event": "connected", ...}); the driver adds {"event": "console"|"pageerror", ...} for the
// page's console output and errors, {"event": "ready"} once the page has loaded, and finally
// {"event": "final", "received": [...], "events": [...], "state": ..., "timeout": bool}.
// The final line is printed when a line "finish" arrives on stdin (or stdin closes), or
// after --timeout seconds (exit status 2 then).
import {chromium} from 'playwright-core';
import readline from 'node:readline';

const args = {chromium: '/usr/bin/chromium', timeout: '60'};
for (let i = 2; i < process.argv.length; i += 2) {
  args[process.argv[i].replace(/^--/, '')] = process.argv[i + 1];
}
if (!args.page || !args['user-data-dir']) {
  console.error('usage: node browser_driver.mjs --page URL --user-data-dir DIR [--chromium PATH] [--timeout S]');
  process.exit(64);
}

const emit = (obj) => console.log(JSON.stringify(obj));

// As root in a container: no sandbox; and nothing that talks to the network on its own.
const flags = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
  '--disable-dev-shm-usage',
];

const context = await chromium.launchPersistentContext(args['user-data-dir'], {
  executablePath: args.chromium,
  headless: true,
  args: flags,
  timeout: 30000,
});

let closing = false;
const finish = async (timedOut) => {
  if (closing) return;
  closing = true;
  let snapshot = {received: null, events: null, state: null};
  try {
    snapshot = await page.evaluate(() => ({
      received: window.received, events: window.events, state: window.state,
    }));
  } catch (e) {
    emit({event: 'driver_error', message: String(e)});
  }
  emit({event: 'final', timeout: timedOut, ...snapshot});
  try {
    await context.close();
  } finally {
    process.exit(timedOut ? 2 : 0);
  }
};

const page = context.pages()[0] ?? await context.newPage();
await page.exposeFunction('tidegateReport', (line) => {
  if (!closing) console.log(line);
});
page.on('console', (msg) => emit({event: 'console', type: msg.type(), text: msg.text()}));
page.on('pageerror', (err) => emit({event: 'pageerror', message: String(err)}));

setTimeout(() => finish(true), Number(args.timeout) * 1000).unref();
readline.createInterface({input: process.stdin}).on('line', (line) => {
  if (line.trim() === 'finish') finish(false);
}).on('close', () => finish(false));

await page.goto(args.page, {waitUntil: 'load', timeout: 30000});
emit({event: 'ready', url: page.url()});
