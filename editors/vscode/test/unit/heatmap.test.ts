import { test } from 'node:test';
import assert from 'node:assert/strict';
import { computeArguments, groupSegments, levelColour, nextGain, ordinal, SalienceResult } from '../../src/heatmap';

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
