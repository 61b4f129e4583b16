// Prompt Salience for VS Code: a thin client. The language server does the work; this starts
// it, passes the selection as the target, and paints `promptSalience/result` as backgrounds.
import * as fs from 'fs';
import * as path from 'path';
import * as vscode from 'vscode';
import { LanguageClient, LanguageClientOptions, ServerOptions } from 'vscode-languageclient/node';
import {
  computeArguments, contrastArguments, groupSegments, levelColour, LspRange, METHODS, nextGain, SalienceResult, statusText, statusTooltip,
} from './heatmap';

let client: LanguageClient | undefined;
let output: vscode.OutputChannel;
let status: vscode.StatusBarItem;
const results = new Map<string, SalienceResult>();
const decorations = new Map<string, vscode.TextEditorDecorationType>();
let targetDecoration: vscode.TextEditorDecorationType;

const SELECTOR = [{ scheme: 'file', pattern: '**/*.prompt.md' }, { scheme: 'untitled', pattern: '**/*.prompt.md' }];

function serverPath(context: vscode.ExtensionContext): string {
  const configured = vscode.workspace.getConfiguration('promptSalience').get<string>('serverPath');
  if (configured) return configured;
  const bundled = path.join(context.extensionPath, 'bin', process.platform === 'win32' ? 'prompt-salience.exe' : 'prompt-salience');
  if (!fs.existsSync(bundled)) return 'prompt-salience';
  // A .vsix is a zip: the executable bit does not survive installation.
  try {
    fs.accessSync(bundled, fs.constants.X_OK);
  } catch {
    fs.chmodSync(bundled, 0o755);
  }
  return bundled;
}

function settings(): Record<string, unknown> {
  const c = vscode.workspace.getConfiguration('promptSalience');
  const out: Record<string, unknown> = {};
  for (const key of ['model', 'method', 'granularity', 'gain', 'igSteps', 'maxNewTokens', 'cacheDir', 'allowNetwork', 'inlayHints', 'backgroundFaithfulness']) {
    const v = c.get(key);
    if (v !== undefined && v !== null && v !== '') out[key] = v;
  }
  return out;
}

function decorationFor(key: string): vscode.TextEditorDecorationType {
  let d = decorations.get(key);
  if (!d) {
    const [sign, level] = key.split(':');
    d = vscode.window.createTextEditorDecorationType({
      backgroundColor: levelColour(Number(level), sign as 'positive' | 'negative' | 'unsigned'),
      borderRadius: '2px',
    });
    decorations.set(key, d);
  }
  return d;
}

function toRange(r: { start: { line: number; character: number }; end: { line: number; character: number } }): vscode.Range {
  return new vscode.Range(r.start.line, r.start.character, r.end.line, r.end.character);
}

function paint(editor: vscode.TextEditor) {
  const r = results.get(editor.document.uri.toString());
  for (const d of decorations.values()) editor.setDecorations(d, []);
  editor.setDecorations(targetDecoration, []);
  if (!r || r.version !== editor.document.version) return;
  for (const [key, segs] of groupSegments(r)) {
    editor.setDecorations(
      decorationFor(key),
      // No hoverMessage: the server's hover says the same and more (rank, target, verdict);
      // both showed at once.
      segs.map((s) => ({ range: toRange(s.range) })),
    );
  }
  if (r.target) editor.setDecorations(targetDecoration, [{ range: toRange(r.target), hoverMessage: 'Salience target' }]);
}

function repaintAll() {
  for (const e of vscode.window.visibleTextEditors) paint(e);
  const active = vscode.window.activeTextEditor;
  const r = active ? results.get(active.document.uri.toString()) : undefined;
  status.text = statusText(r);
  status.tooltip = new vscode.MarkdownString(statusTooltip(r));
}

async function exec(command: string, args: Record<string, unknown>) {
  if (!client) return;
  try {
    return await client.sendRequest('workspace/executeCommand', { command, arguments: [args] });
  } catch (e) {
    vscode.window.showErrorMessage(`Prompt Salience: ${(e as Error).message}`);
  }
}

function activeDoc(): vscode.TextEditor | undefined {
  const e = vscode.window.activeTextEditor;
  if (!e || !e.document.fileName.endsWith('.prompt.md')) {
    vscode.window.showWarningMessage('Prompt Salience works on *.prompt.md files.');
    return undefined;
  }
  return e;
}

async function startClient(context: vscode.ExtensionContext) {
  const command = serverPath(context);
  output.appendLine(`starting ${command} lsp`);
  const serverOptions: ServerOptions = { command, args: ['lsp'] };
  const clientOptions: LanguageClientOptions = {
    documentSelector: SELECTOR,
    outputChannel: output,
    initializationOptions: settings(),
    synchronize: { configurationSection: 'promptSalience' },
  };
  client = new LanguageClient('promptSalience', 'Prompt Salience', serverOptions, clientOptions);
  client.onNotification('promptSalience/result', (r: SalienceResult) => {
    const old = results.get(r.uri);
    results.set(r.uri, r);
    if (r.generatedResponse && r.generatedResponse !== old?.generatedResponse) {
      output.appendLine(`explained the generated response (not in the file): ${r.generatedResponse}`);
    }
    if (r.contrast && r.contrast !== old?.contrast) output.appendLine(`contrast: why the target rather than "${r.contrast}"`);
    // The verdict comes in a second notification once the background check is done, and
    // again with every re-render: log it when it is new.
    if (r.faithfulness && r.faithfulness !== old?.faithfulness) {
      output.appendLine(`faithfulness (${r.granularity}s): ${r.faithfulness}`);
    }
    repaintAll();
  });
  await client.start();
}

export async function activate(context: vscode.ExtensionContext) {
  output = vscode.window.createOutputChannel('Prompt Salience');
  status = vscode.window.createStatusBarItem(vscode.StatusBarAlignment.Right, 100);
  status.command = 'promptSalience.granularity';
  status.tooltip = new vscode.MarkdownString(statusTooltip(undefined));
  status.text = statusText(undefined);
  status.show();
  targetDecoration = vscode.window.createTextEditorDecorationType({ border: '1px solid', borderColor: new vscode.ThemeColor('editor.foreground'), fontWeight: 'bold' });
  const register = (name: string, f: (...a: unknown[]) => unknown) => context.subscriptions.push(vscode.commands.registerCommand(name, f));

  const selectionOf = (e: vscode.TextEditor): LspRange => ({
    start: { line: e.selection.start.line, character: e.selection.start.character },
    end: { line: e.selection.end.line, character: e.selection.end.character },
  });
  const compute = (args: Record<string, unknown>, title: string) =>
    vscode.window.withProgress({ location: vscode.ProgressLocation.Notification, title, cancellable: true }, async (_p, token) => {
      const cts = new vscode.CancellationTokenSource();
      token.onCancellationRequested(() => cts.cancel());
      try {
        await client?.sendRequest('workspace/executeCommand', { command: 'promptSalience.compute', arguments: [args] }, cts.token);
      } catch (err) {
        if (!token.isCancellationRequested) vscode.window.showErrorMessage(`Prompt Salience: ${(err as Error).message}`);
      }
    });

  // The server's own commands (promptSalience.compute, …) are registered by the language
  // client for code lenses; the palette commands have ids of their own.
  register('promptSalience.computeSalience', async () => {
    const e = activeDoc();
    if (!e) return;
    await compute(computeArguments(e.document.uri.toString(), selectionOf(e)), 'Computing salience');
  });
  register('promptSalience.computeContrast', async () => {
    const e = activeDoc();
    if (!e) return;
    const selection = selectionOf(e);
    const previous = results.get(e.document.uri.toString())?.contrast ?? undefined;
    const contrast = await vscode.window.showInputBox({
      title: 'Compute salience against…',
      prompt: `Why the ${e.selection.isEmpty ? 'response' : 'selection'} rather than this text? (the alternative completion)`,
      placeHolder: 'e.g. It is green.',
      value: previous,
      validateInput: (v) => (v.trim() === '' ? 'Type the alternative text' : undefined),
    });
    const args = contrastArguments(e.document.uri.toString(), selection, contrast);
    if (args) await compute(args, 'Computing contrastive salience');
  });
  register('promptSalience.faithfulness', async () => {
    const e = activeDoc();
    if (!e) return;
    const res = (await vscode.window.withProgress(
      { location: vscode.ProgressLocation.Window, title: 'Checking faithfulness' },
      () => exec('promptSalience.checkFaithfulness', { uri: e.document.uri.toString() }),
    )) as { faithfulness?: { verdict?: string; reason?: string; summary?: string; level?: string } } | undefined;
    const f = res?.faithfulness;
    if (f?.verdict) {
      // The output channel has it from the result notification.
      vscode.window.showInformationMessage(`Prompt Salience: faithfulness (${f.level}s): ${f.summary ?? `${f.verdict}: ${f.reason ?? ''}`}`);
    }
  });
  register('promptSalience.toggleDifference', async () => {
    const e = activeDoc();
    if (!e) return;
    const on = !results.get(e.document.uri.toString())?.difference;
    await exec('promptSalience.showDifference', { uri: e.document.uri.toString(), value: on });
  });
  register('promptSalience.generateResponse', async () => {
    const e = activeDoc();
    if (e) await exec('promptSalience.generate', { uri: e.document.uri.toString() });
  });
  register('promptSalience.granularity', async () => {
    const e = activeDoc();
    if (!e) return;
    const pick = await vscode.window.showQuickPick(['token', 'word', 'sentence', 'line', 'paragraph', 'block', 'custom'], { placeHolder: 'Granularity (custom: the file\'s salience.separators)' });
    if (pick) await exec('promptSalience.setGranularity', { uri: e.document.uri.toString(), granularity: pick });
  });
  register('promptSalience.method', async () => {
    const e = activeDoc();
    if (!e) return;
    const pick = await vscode.window.showQuickPick([...METHODS], { placeHolder: 'Method (leave_one_out and ablation_surrogate run the model on edited prompts: slower)' });
    if (pick) await exec('promptSalience.setMethod', { uri: e.document.uri.toString(), method: pick });
  });
  for (const [name, up] of [['promptSalience.increaseGain', true], ['promptSalience.decreaseGain', false]] as const) {
    register(name, async () => {
      const e = activeDoc();
      if (!e) return;
      const r = results.get(e.document.uri.toString());
      await exec('promptSalience.setGain', { uri: e.document.uri.toString(), gain: nextGain(r?.gain ?? 1, up) });
    });
  }
  register('promptSalience.clearHighlights', async () => {
    const e = activeDoc();
    if (!e) return;
    results.delete(e.document.uri.toString());
    repaintAll();
    await exec('promptSalience.clear', { uri: e.document.uri.toString() });
  });
  register('promptSalience.restart', async () => {
    await client?.stop();
    await startClient(context);
  });
  context.subscriptions.push(
    vscode.window.onDidChangeVisibleTextEditors(repaintAll),
    vscode.window.onDidChangeActiveTextEditor(repaintAll),
    // On an edit the decorations move with the text by themselves; the server then sends the
    // map for the new version, with the segments the edit touched left unpainted.
    output,
    status,
  );
  await startClient(context);
}

export async function deactivate() {
  await client?.stop();
}
