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
  segments: Segment[];
}

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
  if (!result.signed) return 'unsigned';
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

export function statusText(r: SalienceResult | undefined): string {
  if (!r) return '$(symbol-color) salience';
  return `$(symbol-color) ${r.method} · ${r.granularity} · ${r.model}`;
}
