// Pure logic of the extension (no vscode import), unit-tested: colours and command arguments.

export interface LspPosition { line: number; character: number }
export interface LspRange { start: LspPosition; end: LspPosition }

export interface Segment {
  range: LspRange;
  score: number;
  normalized: number;
  level: number;
  rank: number;
  share: number;
  /** The segment's score in the previous result, where it existed there. */
  before?: number | null;
}

export interface SalienceResult {
  uri: string;
  version: number;
  model: string;
  method: string;
  signed: boolean;
  granularity: string;
  gain: number;
  objective: number;
  /** null when the target is a response generated in memory (not in the file). */
  target: LspRange | null;
  generatedResponse?: string | null;
  /** The contrastive alternative: why the target rather than this text. */
  contrast?: string | null;
  /** The segments show the change since the previous result, not the scores. */
  difference?: boolean;
  /** The faithfulness check's one-line verdict, once it has run. */
  faithfulness?: string | null;
  segments: Segment[];
}

/** The methods of `promptSalience.method`: gradients first, then perturbation. */
/** The method pick, the default (the server's) first. */
export const METHODS = ['grad_l2', 'grad_dot_input', 'integrated_gradients', 'leave_one_out', 'ablation_surrogate'] as const;

export const LEVELS = 8;
const POSITIVE = [30, 160, 70];
const NEGATIVE = [210, 50, 50];
const UNSIGNED = [40, 110, 220];

/** Background for a level: green raises the target, red lowers it, blue is unsigned. */
export function levelColour(level: number, sign: 'positive' | 'negative' | 'unsigned'): string {
  const rgb = sign === 'positive' ? POSITIVE : sign === 'negative' ? NEGATIVE : UNSIGNED;
  const alpha = Math.max(0, Math.min(LEVELS, level)) / LEVELS * 0.75;
  return `rgba(${rgb[0]}, ${rgb[1]}, ${rgb[2]}, ${alpha.toFixed(3)})`;
}

export function signOf(result: SalienceResult, s: Segment): 'positive' | 'negative' | 'unsigned' {
  // A change since the previous result has a sign even for an unsigned method.
  if (!result.signed && !result.difference) return 'unsigned';
  return s.score >= 0 ? 'positive' : 'negative';
}

/** Segments grouped by decoration key `sign:level` (level 0 is not painted). */
export function groupSegments(result: SalienceResult): Map<string, Segment[]> {
  const groups = new Map<string, Segment[]>();
  for (const s of result.segments) {
    if (s.level <= 0) continue;
    const key = `${signOf(result, s)}:${Math.min(LEVELS, s.level)}`;
    const list = groups.get(key) ?? [];
    list.push(s);
    groups.set(key, list);
  }
  return groups;
}

/** Arguments of `promptSalience.compute`: the selection is the target when not empty. */
export function computeArguments(uri: string, selection?: LspRange): { uri: string; range?: LspRange } {
  if (!selection) return { uri };
  const empty = selection.start.line === selection.end.line && selection.start.character === selection.end.character;
  return empty ? { uri } : { uri, range: selection };
}

/** Arguments of a contrastive compute; undefined when the alternative is blank. */
export function contrastArguments(uri: string, selection: LspRange | undefined, contrast: string | undefined): { uri: string; range?: LspRange; contrast: string } | undefined {
  if (contrast === undefined || contrast.trim() === '') return undefined;
  return { ...computeArguments(uri, selection), contrast };
}

export function ordinal(n: number): string {
  const s = ['th', 'st', 'nd', 'rd'];
  const v = n % 100;
  return n + (s[(v - 20) % 10] || s[v] || s[0]);
}

/** Next gain for the contrast commands. */
export function nextGain(gain: number, up: boolean): number {
  const g = up ? gain * 1.5 : gain / 1.5;
  return Math.min(16, Math.max(0.1, Math.round(g * 1000) / 1000));
}

/** One line, at most `n` characters (an ellipsis when cut). */
export function short(text: string, n: number): string {
  const one = text.replace(/\s+/g, ' ').trim();
  return one.length <= n ? one : one.slice(0, n - 1) + '…';
}

/** Text shown literally in Markdown. */
export function escapeMarkdown(text: string): string {
  return text.replace(/[\\`*_{}[\]()#+\-.!|<>~]/g, '\\$&');
}

export function statusText(r: SalienceResult | undefined): string {
  if (!r) return '$(symbol-color) salience';
  let text = `$(symbol-color) ${r.method} · ${r.granularity} · ${r.model}`;
  // `$(` would start an icon in the status bar.
  if (r.contrast) text += ` · vs “${short(r.contrast, 24).replace(/\$\(/g, '$ (')}”`;
  if (r.difference) text += ' · Δ';
  return text;
}

export const LEGEND = `Prompt salience: green raises the target's probability, red lowers it, blue is unsigned (grad_l2); stronger colour, larger |score| (${LEVELS} levels).`;

/** Status bar tooltip (Markdown): the legend, then what the result is (contrast, difference, faithfulness). */
export function statusTooltip(r: SalienceResult | undefined): string {
  const lines = [LEGEND];
  if (!r) return lines.join('\n\n');
  if (r.contrast) lines.push(`Contrast: why the target rather than “${escapeMarkdown(short(r.contrast, 200))}”.`);
  if (r.difference) lines.push('Showing the change since the previous result (green rose, red fell).');
  if (r.faithfulness) lines.push(`Faithfulness (${r.granularity}s): ${r.faithfulness}`);
  else lines.push('Faithfulness: not checked yet.');
  return lines.join('\n\n');
}
