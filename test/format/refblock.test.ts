// Refcount entries of every width (refcount_order 0..6) read and written on byte literals:
// sub-byte widths pack least significant bits first, wider ones are big-endian.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { getRefcount, maxRefcount, refblockEntries, setRefcount } from '../../src/qcow2/format/refblock.js';
import { QimgError } from '../../src/qcow2/errors.js';

const all = (block: Uint8Array, order: number, n: number): number[] =>
  Array.from({ length: n }, (_, i) => getRefcount(block, i, order));

test('order 0 (1 bit): LSB first', () => {
  const b = new Uint8Array([
    0b00000101, // entries 0..7: 1 0 1 0 0 0 0 0
    0b10000000, // entries 8..15: only 15
  ]);
  assert.equal(all(b, 0, 16), [1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
});

test('order 1 (2 bits): LSB first', () => {
  const b = new Uint8Array([
    0b11100100, // entries 0..3: 0, 1, 2, 3
    0b00000010, // entries 4..7: 2, 0, 0, 0
  ]);
  assert.equal(all(b, 1, 8), [0, 1, 2, 3, 2, 0, 0, 0]);
});

test('order 2 (4 bits): low nibble first', () => {
  const b = new Uint8Array([
    0x21, // entries 0, 1: 1, 2
    0xf0, // entries 2, 3: 0, 15
  ]);
  assert.equal(all(b, 2, 4), [1, 2, 0, 15]);
});

test('order 3 (8 bits)', () => {
  assert.equal(all(new Uint8Array([0x00, 0x01, 0xff, 0x80]), 3, 4), [0, 1, 255, 128]);
});

test('order 4 (16 bits): big-endian', () => {
  const b = new Uint8Array([
    0x00, 0x01, // entry 0: 1
    0x12, 0x34, // entry 1: 0x1234
    0xff, 0xff, // entry 2: 65535
  ]);
  assert.equal(all(b, 4, 3), [1, 0x1234, 0xffff]);
});

test('order 5 (32 bits): big-endian, unsigned', () => {
  const b = new Uint8Array([
    0x00, 0x00, 0x00, 0x02, // entry 0: 2
    0xff, 0xff, 0xff, 0xff, // entry 1: 2^32 - 1
    0x80, 0x00, 0x00, 0x01, // entry 2: 2^31 + 1
  ]);
  assert.equal(all(b, 5, 3), [2, 0xffffffff, 0x80000001]);
});

test('order 6 (64 bits): big-endian; above 2^53 is an error, not a rounded number', () => {
  const b = new Uint8Array([
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x03, // entry 0: 3
    0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, // entry 1: 2^32
    0x00, 0x1f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, // entry 2: 2^53 - 1
    0x00, 0x20, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // entry 3: 2^53
  ]);
  assert.equal(all(b, 6, 3), [3, 2 ** 32, Number.MAX_SAFE_INTEGER]);
  let caught: unknown;
  try {
    getRefcount(b, 3, 6);
  } catch (e) {
    caught = e;
  }
  assert.instance(caught, QimgError);
});

// Each case: order, starting bytes, index, value, bytes after. Neighbours keep their values.
const SETS: Array<[number, number[], number, number, number[]]> = [
  [0, [0xff, 0xff], 9, 0, [0xff, 0xfd]],
  [0, [0x00, 0x00], 7, 1, [0x80, 0x00]],
  [1, [0xff], 2, 0, [0xcf]],
  [1, [0x00, 0x00], 5, 2, [0x00, 0x08]],
  [2, [0xab, 0xcd], 1, 0x5, [0x5b, 0xcd]],
  [2, [0xab, 0xcd], 2, 0x0, [0xab, 0xc0]],
  [3, [1, 2, 3], 1, 0xfe, [1, 0xfe, 3]],
  [4, [0xaa, 0xaa, 0xbb, 0xbb, 0xcc, 0xcc], 1, 0x1234, [0xaa, 0xaa, 0x12, 0x34, 0xcc, 0xcc]],
  [5, [0xaa, 0xaa, 0xaa, 0xaa, 0, 0, 0, 0, 0xcc, 0xcc, 0xcc, 0xcc], 1, 0xfedcba98, [0xaa, 0xaa, 0xaa, 0xaa, 0xfe, 0xdc, 0xba, 0x98, 0xcc, 0xcc, 0xcc, 0xcc]],
  [
    6,
    [0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0, 0, 0, 0, 0, 0, 0, 0, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc],
    1,
    0x123456789abcd,
    [0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0x00, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc],
  ],
];

for (const [order, before, index, value, after] of SETS) {
  test(`setRefcount order ${order}: entry ${index} = ${value} leaves its neighbours alone`, () => {
    const b = new Uint8Array(before);
    setRefcount(b, index, order, value);
    assert.equal(Array.from(b), after);
    assert.is(getRefcount(b, index, order), value);
  });
}

test('setRefcount then getRefcount on every entry of a small block, every order', () => {
  for (let order = 0; order <= 6; order++) {
    const bits = 2 ** order;
    const n = 16;
    const b = new Uint8Array((n * bits) / 8);
    const max = maxRefcount(order);
    const want = Array.from({ length: n }, (_, i) => (i * 7 + 3) % (Math.min(max, 1000) + 1));
    want.forEach((v, i) => setRefcount(b, i, order, v));
    assert.equal(all(b, order, n), want, `order ${order}`);
    // Overwriting with the maximum, then zero, leaves the others unchanged.
    setRefcount(b, 5, order, max);
    assert.is(getRefcount(b, 5, order), max);
    setRefcount(b, 5, order, 0);
    assert.equal(all(b, order, n), want.map((v, i) => (i === 5 ? 0 : v)), `order ${order} after overwrite`);
  }
});

test('maxRefcount per width', () => {
  assert.equal([0, 1, 2, 3, 4, 5].map(maxRefcount), [1, 3, 15, 255, 65535, 0xffffffff]);
  assert.is(maxRefcount(6), Number.MAX_SAFE_INTEGER);
});

test('setting a value the width cannot hold throws', () => {
  const cases: Array<[number, number]> = [
    [0, 2],
    [1, 4],
    [2, 16],
    [3, 256],
    [4, 65536],
    [5, 2 ** 32],
    [6, 2 ** 53],
    [4, -1],
    [4, 1.5],
  ];
  for (const [order, value] of cases) {
    const b = new Uint8Array(16).fill(0x5a);
    let caught: unknown;
    try {
      setRefcount(b, 0, order, value);
    } catch (e) {
      caught = e;
    }
    assert.instance(caught, QimgError, `order ${order} value ${value}`);
    assert.is((caught as QimgError).code, 'USAGE');
    assert.ok(b.every((x) => x === 0x5a), 'block untouched');
  }
});

test('refblockEntries: cluster bits x 8 / entry width', () => {
  assert.is(refblockEntries(16, 4), 32768); // 64 KiB of 16-bit entries
  assert.is(refblockEntries(16, 0), 524288);
  assert.is(refblockEntries(16, 6), 8192);
  assert.is(refblockEntries(9, 6), 64);
  assert.is(refblockEntries(9, 0), 4096);
  assert.is(refblockEntries(21, 4), 1048576);
});

test.run();
