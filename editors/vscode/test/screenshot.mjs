// A screenshot of the extension in real VS Code (code-server) driven by headless Chromium: open a
// copy of a prompt file, run a palette command, wait for the heatmap (and, optionally, for a text in
// the hover such as the background faithfulness verdict), hover a line and take the screenshot.
// The setup is e2e.mjs's; there are no checks. Env:
//   CODE_SERVER, PLAYWRIGHT_CORE (module path), VSIX, WORKDIR, SCREENSHOT   as for e2e.mjs
//   PROMPT        the prompt file (copied into the workspace; the file itself is never changed)
//   COMMAND       palette title to run (default "Prompt Salience: Compute salience")
//   HOVER_TEXT    text of the line to hover (default: the first painted span)
//   HOVER_OFFSET  lines below (+) or above (-) that line to hover instead (default 0)
//   SPLIT         1: after the heatmap, hide the side bar and split the editor; the hover opens in the right
//                 copy, so the left one shows the whole map uncovered
//   HOVER_WAIT    text the hover must contain before the screenshot (e.g. "faithfulness:"); default none
//   WAIT_S        the most seconds to wait for the heatmap and for HOVER_WAIT (default 240)
//   VIEWPORT      "W,H" (default 1280,1000)
//   SERVER_PATH   server binary for promptSalience.serverPath (default: the one in the .vsix)
import { spawn, execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';

const { chromium } = await import(process.env.PLAYWRIGHT_CORE);
const work = process.env.WORKDIR;
const port = 18000 + Math.floor(Math.random() * 1000);
const prompt = process.env.PROMPT;
const name = path.basename(prompt);
const waitS = Number(process.env.WAIT_S || 240);
const [vw, vh] = (process.env.VIEWPORT || '1280,1000').split(',').map(Number);
const log = (m) => console.error(`[${new Date().toISOString().slice(11, 19)}] ${m}`);

const ws = path.join(work, 'ws'), user = path.join(work, 'user'), exts = path.join(work, 'exts');
for (const d of [ws, path.join(user, 'User'), exts]) fs.mkdirSync(d, { recursive: true });
fs.copyFileSync(prompt, path.join(ws, name));
const settings = {
  'security.workspace.trust.enabled': false, 'workbench.startupEditor': 'none',
  'editor.semanticHighlighting.enabled': true, 'editor.hover.delay': 100, 'editor.hover.above': false,
  'editor.minimap.enabled': false, 'breadcrumbs.enabled': false, 'workbench.colorTheme': 'Default Light Modern',
  'workbench.tips.enabled': false, 'chat.commandCenter.enabled': false,
  // Markdown, not VS Code's built-in `prompt` language (Copilot prompt files), which underlines the
  // front matter's keys as unknown; the extension attaches by file pattern either way.
  'files.associations': { '*.prompt.md': 'markdown' },
};
if (process.env.SERVER_PATH) settings['promptSalience.serverPath'] = process.env.SERVER_PATH;
if (process.env.PROMPT_SALIENCE_CACHE) settings['promptSalience.cacheDir'] = process.env.PROMPT_SALIENCE_CACHE;
fs.writeFileSync(path.join(user, 'User', 'settings.json'), JSON.stringify(settings));
const config = path.join(work, 'config.yaml');
fs.writeFileSync(config, `bind-addr: 127.0.0.1:${port}\nauth: none\ncert: false\n`);
const base = ['--config', config, '--user-data-dir', user, '--extensions-dir', exts];
execFileSync(process.env.CODE_SERVER, [...base, '--install-extension', process.env.VSIX], { stdio: ['ignore', 'ignore', 'inherit'] });
const server = spawn(process.env.CODE_SERVER, [...base, '--disable-telemetry', '--disable-update-check',
  '--disable-workspace-trust', '--disable-getting-started-override'], { stdio: ['ignore', 'ignore', 'inherit'] });

let browser, ok = false;
try {
  for (let i = 0; i < 120; i++) {
    try { if ((await fetch(`http://127.0.0.1:${port}/healthz`)).status === 200) break; } catch {}
    await new Promise((r) => setTimeout(r, 500));
  }
  browser = await chromium.launchPersistentContext(fs.mkdtempSync(path.join(work, 'chrome-')), {
    executablePath: '/usr/bin/chromium', headless: true, viewport: { width: vw, height: vh },
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  const page = browser.pages()[0] ?? await browser.newPage();
  await page.goto(`http://127.0.0.1:${port}/?folder=${encodeURIComponent(ws)}`);
  await page.waitForSelector('.monaco-workbench', { timeout: 120000 });
  const row = page.locator('.explorer-folders-view .monaco-list-row', { hasText: name });
  await row.waitFor({ timeout: 60000 });
  await row.click();
  await page.waitForSelector('.monaco-editor .view-lines', { timeout: 60000 });
  await page.waitForTimeout(3000); // extension activation and server start
  const runCommand = async (title) => {
    await page.locator('.monaco-editor .view-lines').last().click();
    await page.keyboard.press('Control+Home');
    await page.keyboard.press('F1');
    await page.waitForSelector('.quick-input-widget:not([style*="display: none"]) input', { timeout: 10000 });
    await page.keyboard.type(title);
    await page.waitForTimeout(700);
    await page.keyboard.press('Enter');
    log(`ran "${title}"`);
  };
  await runCommand(process.env.COMMAND || 'Prompt Salience: Compute salience');
  // Decorations with a background render as overlay elements with generated `ced-` classes.
  const painted = async () => page.locator('.view-overlays div[class*="ced-"]').count();
  let n = 0;
  for (let i = 0; i < waitS * 2 && n < 1; i++) { await page.waitForTimeout(500); n = await painted(); }
  log(`${n} painted overlays`);
  if (n < 1) throw new Error('no heatmap decorations');
  const split = process.env.SPLIT === '1';
  if (split) {
    await runCommand('View: Toggle Primary Side Bar Visibility');
    await page.waitForTimeout(1000);
    await runCommand('View: Split Editor Right');
    for (let i = 0; i < 40 && (await painted()) < 2 * n; i++) await page.waitForTimeout(250);
    await page.waitForTimeout(1000);
  }
  // What to hover: the line with the given text, else the first painted span (in the right editor when split).
  const pick = (l) => (split ? l.last() : l.first());
  const line = process.env.HOVER_TEXT
    ? pick(page.locator('.view-lines .view-line', { hasText: process.env.HOVER_TEXT }))
    : pick(page.locator('.view-overlays div[class*="ced-"]'));
  const box = await line.boundingBox();
  const y = box.y + box.height / 2 + Number(process.env.HOVER_OFFSET || 0) * box.height;
  const want = process.env.HOVER_WAIT || '';
  let hover = '';
  const start = Date.now();
  do {
    // Move off and back on, so that the hover is asked for again.
    await page.mouse.move(box.x + 600, 5);
    await page.waitForTimeout(400);
    await page.mouse.move(box.x + Math.min(60, box.width / 2), y);
    for (let i = 0; i < 20 && !hover.includes('Salience'); i++) {
      await page.waitForTimeout(300);
      hover = (await page.locator('.monaco-hover:not(.hidden)').allInnerTexts()).join('\n');
    }
    if (hover.includes(want)) break;
    hover = '';
    await page.waitForTimeout(3000);
  } while (Date.now() - start < waitS * 1000);
  log(`hover:\n${hover}`);
  if (want && !hover.includes(want)) log(`the hover never showed "${want}"; taking the screenshot anyway`);
  await page.waitForTimeout(800);
  await page.screenshot({ path: process.env.SCREENSHOT });
  log(`wrote ${process.env.SCREENSHOT}`);
  ok = true;
} catch (e) {
  console.error('ERROR', e);
} finally {
  await browser?.close().catch(() => {});
  server.kill();
}
process.exit(ok ? 0 : 1);
