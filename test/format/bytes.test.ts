// nonZeroEntries: the set entries of a refcount or L1 table, whole zero stretches skipped natively.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { nonZeroEntries } from '../../src/qcow2/format/bytes.js';

test('nonZeroEntries: every entry with any bit set, in order, across 4 KiB stretches', () => {
  const table = new Uint8Array(65536);
  assert.equal(nonZeroEntries(table), []);
  // First and last byte of an entry, both sides of a 4 KiB boundary, the very last entry.
  for (const [entry, byte] of [[0, 7], [1, 0], [511, 7], [512, 0], [4000, 3], [8191, 7]] as const) table[entry * 8 + byte] = 0x80;
  assert.equal(nonZeroEntries(table), [0, 1, 511, 512, 4000, 8191]);
  // A table that is not a whole number of 4 KiB stretches (an L1 table's exact length).
  const l1 = new Uint8Array(8 * 600);
  l1[8 * 599 + 4] = 1;
  assert.equal(nonZeroEntries(l1), [599]);
  assert.equal(nonZeroEntries(new Uint8Array(0)), []);
});

test.run();
