import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  computeArguments, contrastArguments, escapeMarkdown, groupSegments, levelColour, METHODS, nextGain, ordinal, SalienceResult, short, statusText, statusTooltip,
} from '../../src/heatmap';

const range = (l0: number, c0: number, l1: number, c1: number) => ({ start: { line: l0, character: c0 }, end: { line: l1, character: c1 } });

test('colours: hue by sign, opacity by level', () => {
  assert.equal(levelColour(8, 'positive'), 'rgba(30, 160, 70, 0.750)');
  assert.equal(levelColour(4, 'negative'), 'rgba(210, 50, 50, 0.375)');
  assert.equal(levelColour(0, 'unsigned'), 'rgba(40, 110, 220, 0.000)');
  assert.equal(levelColour(99, 'unsigned'), 'rgba(40, 110, 220, 0.750)');
});

test('segments grouped by sign and level; level 0 not painted', () => {
  const r: SalienceResult = {
    uri: 'file:///a.prompt.md', version: 1, model: 'm', method: 'grad_dot_input', signed: true, granularity: 'sentence', gain: 1,
    objective: -1, target: range(3, 0, 3, 5),
    segments: [
      { range: range(0, 0, 0, 5), score: 1, normalized: 1, level: 8, rank: 1, share: 0.5 },
      { range: range(1, 0, 1, 5), score: -0.5, normalized: -0.5, level: 4, rank: 2, share: 0.25 },
      { range: range(2, 0, 2, 5), score: 0.5, normalized: 0.5, level: 4, rank: 3, share: 0.25 },
      { range: range(2, 6, 2, 9), score: 0, normalized: 0, level: 0, rank: 4, share: 0 },
    ],
  };
  const g = groupSegments(r);
  assert.deepEqual([...g.keys()].sort(), ['negative:4', 'positive:4', 'positive:8']);
  const unsigned = groupSegments({ ...r, signed: false });
  assert.deepEqual([...unsigned.keys()].sort(), ['unsigned:4', 'unsigned:8']);
  assert.equal(unsigned.get('unsigned:4')!.length, 2);
});

test('the selection becomes the target unless empty', () => {
  assert.deepEqual(computeArguments('u'), { uri: 'u' });
  assert.deepEqual(computeArguments('u', range(1, 2, 1, 2)), { uri: 'u' });
  assert.deepEqual(computeArguments('u', range(1, 2, 1, 7)), { uri: 'u', range: range(1, 2, 1, 7) });
});

test('contrast steps and ordinals', () => {
  assert.equal(nextGain(1, true), 1.5);
  assert.equal(nextGain(1.5, false), 1);
  assert.equal(nextGain(0.1, false), 0.1);
  assert.deepEqual([1, 2, 3, 4, 11, 12, 13, 21, 22, 101].map(ordinal), ['1st', '2nd', '3rd', '4th', '11th', '12th', '13th', '21st', '22nd', '101st']);
});

const result = (extra: Partial<SalienceResult> = {}): SalienceResult => ({
  uri: 'file:///a.prompt.md', version: 1, model: 'm', method: 'grad_l2', signed: false, granularity: 'sentence', gain: 1,
  objective: -1, target: range(3, 0, 3, 5),
  segments: [
    { range: range(0, 0, 0, 5), score: 0.25, normalized: 1, level: 8, rank: 1, share: 0.5, before: 0.5 },
    { range: range(1, 0, 1, 5), score: -0.125, normalized: -0.5, level: 4, rank: 2, share: 0.25, before: null },
  ],
  ...extra,
});

test('a difference is signed even for an unsigned method', () => {
  assert.deepEqual([...groupSegments(result()).keys()].sort(), ['unsigned:4', 'unsigned:8']);
  assert.deepEqual([...groupSegments(result({ difference: true })).keys()].sort(), ['negative:4', 'positive:8']);
});

test('contrast arguments: selection as target, blank alternative is no command', () => {
  assert.deepEqual(contrastArguments('u', range(1, 2, 1, 7), 'It is green.'), { uri: 'u', range: range(1, 2, 1, 7), contrast: 'It is green.' });
  assert.deepEqual(contrastArguments('u', range(1, 2, 1, 2), 'green'), { uri: 'u', contrast: 'green' });
  assert.equal(contrastArguments('u', undefined, undefined), undefined);
  assert.equal(contrastArguments('u', undefined, '   '), undefined);
});

test('the method pick offers the perturbation methods', () => {
  assert.ok(METHODS.includes('leave_one_out') && METHODS.includes('ablation_surrogate'));
  assert.equal(METHODS[0], 'grad_l2');
});

test('status text and tooltip: contrast, difference, faithfulness', () => {
  assert.equal(statusText(undefined), '$(symbol-color) salience');
  assert.equal(statusText(result()), '$(symbol-color) grad_l2 · sentence · m');
  assert.equal(statusText(result({ contrast: 'It is  green,\nsurely and certainly blue', difference: true })),
    '$(symbol-color) grad_l2 · sentence · m · vs “It is green, surely and…” · Δ');
  assert.equal(statusText(result({ contrast: '$(x)' })), '$(symbol-color) grad_l2 · sentence · m · vs “$ (x)”');
  assert.ok(!statusTooltip(undefined).includes('Faithfulness'));
  assert.ok(statusTooltip(result()).endsWith('Faithfulness: not checked yet.'));
  const t = statusTooltip(result({ contrast: 'a *b*', faithfulness: 'removing the top 20 % raises F by 1.22', difference: true }));
  assert.ok(t.includes('rather than “a \\*b\\*”'), t);
  assert.ok(t.includes('change since the previous result'), t);
  assert.ok(t.endsWith('Faithfulness (sentences): removing the top 20 % raises F by 1.22'), t);
  assert.equal(short('abc', 3), 'abc');
  assert.equal(short('abcd', 3), 'ab…');
  assert.equal(escapeMarkdown('[x](y)'), '\\[x\\]\\(y\\)');
});
