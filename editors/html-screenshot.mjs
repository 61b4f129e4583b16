// A screenshot of an HTML report in headless Chromium, as tall as the page (up to a limit).
// usage: node html-screenshot.mjs IN.html OUT.png [WIDTH [MAX_HEIGHT]]     env: PLAYWRIGHT_CORE (module path)
import path from 'node:path';
import fs from 'node:fs';
import os from 'node:os';

const [input, out, width = '1200', maxHeight = '1400'] = process.argv.slice(2);
const { chromium } = await import(process.env.PLAYWRIGHT_CORE);
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'html-shot-'));
const browser = await chromium.launchPersistentContext(dir, {
  executablePath: '/usr/bin/chromium', headless: true, viewport: { width: Number(width), height: 300 },
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
try {
  const page = browser.pages()[0] ?? await browser.newPage();
  await page.goto('file://' + path.resolve(input));
  await page.waitForLoadState('load');
  await page.waitForTimeout(500);
  const h = await page.evaluate(() => document.documentElement.scrollHeight);
  const height = Math.min(h + 20, Number(maxHeight));
  await page.setViewportSize({ width: Number(width), height });
  await page.waitForTimeout(300);
  await page.screenshot({ path: out });
  console.error(`${out}: ${width}x${height} (page ${h} px tall)`);
} finally {
  await browser.close();
  fs.rmSync(dir, { recursive: true, force: true });
}
