// End to end in real VS Code (code-server) driven by headless Chromium: open a prompt file, run
// "Compute salience" from the palette, see the heatmap and a hover score, take a screenshot;
// then a contrast from the input box, a faithfulness check and the difference toggle.
// Env: CODE_SERVER, PLAYWRIGHT_CORE (module path), VSIX, WORKDIR, SCREENSHOT.
import { spawn, execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';

const { chromium } = await import(process.env.PLAYWRIGHT_CORE);
const work = process.env.WORKDIR;
const port = 18000 + Math.floor(Math.random() * 1000);
let passed = 0, failed = 0;
const check = (name, cond, detail) => {
  if (cond) { passed++; console.error(`ok   ${name}`); }
  else { failed++; console.error(`FAIL ${name}${detail !== undefined ? ': ' + JSON.stringify(detail) : ''}`); }
};

const ws = path.join(work, 'ws'), user = path.join(work, 'user'), exts = path.join(work, 'exts');
for (const d of [ws, path.join(user, 'User'), exts]) fs.mkdirSync(d, { recursive: true });
fs.writeFileSync(path.join(ws, 'sky.prompt.md'), [
  // Signed maps; the granularity is the default, sentence.
  '---', 'salience:', '  max_new_tokens: 8', '  method: grad_dot_input', '---',
  'You are a careful assistant. Answer in one word.', '', 'What colour is the sky on a clear day?', '',
].join('\n'));
fs.writeFileSync(path.join(user, 'User', 'settings.json'), JSON.stringify({
  'security.workspace.trust.enabled': false, 'workbench.startupEditor': 'none',
  'editor.semanticHighlighting.enabled': true, 'editor.hover.delay': 100, 'editor.hover.above': false,
  'breadcrumbs.enabled': false, 'workbench.colorTheme': 'Default Light Modern',
}));
const config = path.join(work, 'config.yaml');
fs.writeFileSync(config, `bind-addr: 127.0.0.1:${port}\nauth: none\ncert: false\n`);
const base = ['--config', config, '--user-data-dir', user, '--extensions-dir', exts];
execFileSync(process.env.CODE_SERVER, [...base, '--install-extension', process.env.VSIX], { stdio: 'inherit' });
const server = spawn(process.env.CODE_SERVER, [...base, '--disable-telemetry', '--disable-update-check',
  '--disable-workspace-trust', '--disable-getting-started-override'], { stdio: ['ignore', 'ignore', 'inherit'] });

let browser;
try {
  for (let i = 0; i < 120; i++) {
    try { if ((await fetch(`http://127.0.0.1:${port}/healthz`)).status === 200) break; } catch {}
    await new Promise((r) => setTimeout(r, 500));
  }
  browser = await chromium.launchPersistentContext(fs.mkdtempSync(path.join(work, 'chrome-')), {
    executablePath: '/usr/bin/chromium', headless: true, viewport: { width: 1280, height: 720 },
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  const page = browser.pages()[0] ?? await browser.newPage();
  await page.goto(`http://127.0.0.1:${port}/?folder=${encodeURIComponent(ws)}`);
  await page.waitForSelector('.monaco-workbench', { timeout: 120000 });
  const row = page.locator('.explorer-folders-view .monaco-list-row', { hasText: 'sky.prompt.md' });
  await row.waitFor({ timeout: 60000 });
  await row.click();
  await page.waitForSelector('.monaco-editor .view-lines', { timeout: 60000 });
  await page.waitForTimeout(3000); // extension activation and server start
  const runCommand = async (title) => {
    await page.locator('.monaco-editor .view-lines').first().click();
    await page.keyboard.press('Control+Home');
    await page.keyboard.press('F1');
    await page.waitForSelector('.quick-input-widget:not([style*="display: none"]) input', { timeout: 10000 });
    await page.keyboard.type(title);
    await page.waitForTimeout(700);
    if (process.env.DEBUG_SHOTS) await page.screenshot({ path: path.join(work, 'palette.png') });
    await page.keyboard.press('Enter');
  };
  await runCommand('Prompt Salience: Compute salience');
  if (process.env.DEBUG_SHOTS) { await page.waitForTimeout(1500); await page.screenshot({ path: path.join(work, 'after-command.png') }); }
  // Decorations with a background render as overlay elements with generated `ced-` classes.
  const painted = async () => page.locator('.view-overlays div[class*="ced-"]').count();
  let n = 0;
  for (let i = 0; i < 240 && n < 3; i++) { await page.waitForTimeout(500); n = await painted(); }
  check('heatmap decorations appear', n >= 3, n);
  // The status bar is updated by a separate notification; it may land a moment after the paint.
  const statusIncludes = async (text, tries = 240) => {
    let t = '';
    for (let i = 0; i < tries && !t.includes(text); i++) { await page.waitForTimeout(500); t = await page.locator('.statusbar').innerText(); }
    return t;
  };
  const statusText = await statusIncludes('grad_dot_input', 40);
  check('status bar shows method and granularity', statusText.includes('grad_dot_input') && statusText.includes('sentence'), statusText);
  // Hover over the first sentence.
  const line = page.locator('.view-lines .view-line', { hasText: 'You are a careful assistant' }).first();
  const box = await line.boundingBox();
  await page.mouse.move(box.x + 40, box.y + box.height / 2);
  let hover = '';
  for (let i = 0; i < 20 && !hover.includes('Salience'); i++) {
    await page.waitForTimeout(300);
    hover = (await page.locator('.monaco-hover:not(.hidden)').allInnerTexts()).join('\n');
  }
  check('hover shows a score', /Salience\s+[-+]?\d/.test(hover) && hover.includes('sentences'), hover);
  await page.mouse.move(box.x + 600, box.y + 300);
  await page.waitForTimeout(800);
  await page.screenshot({ path: process.env.SCREENSHOT });
  check('screenshot written', fs.existsSync(process.env.SCREENSHOT));
  // Granularity switch through the command (quick pick).
  await runCommand('Prompt Salience: Granularity');
  await page.waitForTimeout(800);
  await page.keyboard.type('word');
  await page.keyboard.press('Enter');
  let words = 0;
  for (let i = 0; i < 20 && words <= n; i++) { await page.waitForTimeout(300); words = await painted(); }
  check('granularity switch repaints by word', words > n, { words, sentences: n });
  // Contrast: the alternative comes from an input box; the status bar names it.
  await runCommand('Prompt Salience: Compute salience against');
  await page.waitForTimeout(1000);
  await page.waitForSelector('.quick-input-widget:not([style*="display: none"]) input', { timeout: 10000 });
  await page.keyboard.type('It is green.');
  await page.keyboard.press('Enter');
  const withContrast = await statusIncludes('vs “It is green.”');
  check('contrast compute shows the alternative in the status bar', withContrast.includes('vs “It is green.”'), withContrast);
  // Faithfulness on demand: a notification with the verdict.
  await runCommand('Prompt Salience: Check faithfulness');
  let toast = '';
  for (let i = 0; i < 240 && !toast.includes('faithfulness ('); i++) {
    await page.waitForTimeout(500);
    toast = (await page.locator('.notifications-toasts').allInnerTexts()).join('\n');
  }
  check('check faithfulness shows the verdict', /faithfulness \(sentences\): (faithful|not faithful|inconclusive): deleting the top/.test(toast), toast);
  // The same contrast again: a map comparable with the one before (same target, method and
  // contrast), so the change since then can be painted; then back to the scores.
  await runCommand('Prompt Salience: Compute salience against');
  await page.waitForTimeout(1000);
  await page.waitForSelector('.quick-input-widget:not([style*="display: none"]) input', { timeout: 10000 });
  await page.keyboard.press('Control+a');
  await page.keyboard.type('It is green.');
  await page.keyboard.press('Enter');
  await page.waitForTimeout(3000);
  await statusIncludes('vs “It is green.”');
  await runCommand('Prompt Salience: Show difference from previous result');
  const diffOn = await statusIncludes('Δ', 40);
  check('show difference marks the status bar', diffOn.includes('Δ'), diffOn);
  await runCommand('Prompt Salience: Show difference from previous result');
  let diffOff = diffOn;
  for (let i = 0; i < 40 && diffOff.includes('Δ'); i++) { await page.waitForTimeout(500); diffOff = await page.locator('.statusbar').innerText(); }
  check('show difference toggles back', !diffOff.includes('Δ') && diffOff.includes('It is green.'), diffOff);
  // An edit inside the first sentence: the map follows the text; that sentence goes stale.
  const paintedBefore = await painted();
  const first = page.locator('.view-lines .view-line', { hasText: 'careful assistant' }).first();
  await first.click();
  await page.keyboard.press('Home');
  for (let i = 0; i < 4; i++) await page.keyboard.press('ArrowRight');
  await page.keyboard.type('x');
  await page.waitForTimeout(2000);
  const paintedAfter = await painted();
  check('an edit keeps the rest of the map painted', paintedAfter > 0 && paintedAfter < paintedBefore + 1, { paintedBefore, paintedAfter });
  const firstBox = await first.boundingBox();
  await page.mouse.move(firstBox.x + 60, firstBox.y + firstBox.height / 2);
  let staleHover = '';
  for (let i = 0; i < 20 && !staleHover.includes('Edited since computed'); i++) {
    await page.waitForTimeout(300);
    staleHover = (await page.locator('.monaco-hover:not(.hidden)').allInnerTexts()).join('\n');
  }
  check('hover on the edited sentence says it is stale', staleHover.includes('Edited since computed'), staleHover);
} catch (e) {
  failed++;
  console.error('ERROR', e);
} finally {
  await browser?.close().catch(() => {});
  server.kill();
}
console.error(`${passed} passed, ${failed} failed`);
process.exit(failed > 0 ? 1 : 0);
