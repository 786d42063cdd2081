// L1/L2 entry codecs on hand-written 64-bit words: classification, offset masking, compressed
// descriptors at every cluster size boundary (x = 62 - (cluster_bits - 8), computed by hand below).
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import {
  ClusterKind,
  SubclusterKind,
  classifyL2,
  compressedByteLength,
  compressedOffset,
  compressedSectors,
  compressedSizeShift,
  encodeCompressed,
  encodeOffset,
  entryOffset,
  refcountTableEntryOffset,
  isCompressed,
  isCopied,
  l2EntryProblem,
  readEntry,
  subclusterKind,
} from '../../src/qcow2/format/entries.js';

// ---------- classification ----------

// [hi, lo] words and what each is on v3 (zero flag honoured) and v2 (bit 0 has no meaning).
const CASES: Array<[string, number, number, ClusterKind, ClusterKind]> = [
  ['all zero', 0x00000000, 0x00000000, ClusterKind.Unallocated, ClusterKind.Unallocated],
  ['COPIED only', 0x80000000, 0x00000000, ClusterKind.Unallocated, ClusterKind.Unallocated],
  ['zero flag, no offset', 0x00000000, 0x00000001, ClusterKind.ZeroPlain, ClusterKind.Unallocated],
  ['zero flag + offset 0x50000', 0x80000000, 0x00050001, ClusterKind.ZeroAlloc, ClusterKind.Normal],
  ['zero flag + offset above 2^32', 0x00000001, 0x00000001, ClusterKind.ZeroAlloc, ClusterKind.Normal],
  ['offset 0x50000 + COPIED', 0x80000000, 0x00050000, ClusterKind.Normal, ClusterKind.Normal],
  ['offset 0x200 (lowest offset bit)', 0x00000000, 0x00000200, ClusterKind.Normal, ClusterKind.Normal],
  ['offset 2^55 (highest offset bit)', 0x00800000, 0x00000000, ClusterKind.Normal, ClusterKind.Normal],
  ['compressed', 0x40000000, 0x00012345, ClusterKind.Compressed, ClusterKind.Compressed],
  ['compressed with bit 0 set', 0x40000000, 0x00000001, ClusterKind.Compressed, ClusterKind.Compressed],
  // Reserved bits alone (1-8, 56-61) are not an offset.
  ['reserved bits only', 0x3f000000, 0x000001fe, ClusterKind.Unallocated, ClusterKind.Unallocated],
  ['reserved bits + zero flag', 0x3f000000, 0x000001ff, ClusterKind.ZeroPlain, ClusterKind.Unallocated],
];

for (const [name, hi, lo, v3, v2] of CASES) {
  test(`classifyL2: ${name}`, () => {
    assert.is(classifyL2(hi, lo, true), v3, 'v3');
    assert.is(classifyL2(hi, lo, false), v2, 'v2');
  });
}

test('isCopied / isCompressed read bits 63 and 62', () => {
  assert.ok(isCopied(0x80000000));
  assert.not.ok(isCopied(0x40000000));
  assert.ok(isCompressed(0x40000000));
  assert.not.ok(isCompressed(0x80000000));
  assert.ok(isCopied(0xc0000000) && isCompressed(0xc0000000));
});

// ---------- offsets ----------

test('entryOffset takes bits 9-55 and masks flags and reserved bits', () => {
  assert.is(entryOffset(0x00000000, 0x00050000), 0x50000);
  // Every bit set: only 9..55 survive.
  assert.is(entryOffset(0xffffffff, 0xffffffff), 2 ** 56 - 512);
  assert.is(entryOffset(0xff000000, 0x000001ff), 0);
  assert.is(entryOffset(0x80000000, 0x000301fe), 0x30000);
});

test('refcountTableEntryOffset takes bits 9-63: only bits 0-8 are reserved in a refcount table entry', () => {
  assert.is(refcountTableEntryOffset(0x00000000, 0x00050000), 0x50000);
  assert.is(refcountTableEntryOffset(0x00000000, 0x000501ff), 0x50000);
  // 2^56 + 0x50000 is not 0x50000 (entryOffset's answer): it lies past the end of any file.
  assert.is(refcountTableEntryOffset(0x01000000, 0x00050000), 2 ** 56 + 0x50000);
  assert.is(entryOffset(0x01000000, 0x00050000), 0x50000);
  assert.is(refcountTableEntryOffset(0x80000000, 0x00020000), 2 ** 63 + 0x20000);
  assert.ok(refcountTableEntryOffset(0xffffffff, 0xfffffe00) >= 2 ** 64 - 2 ** 12);
});

test('a 64-bit offset above 2^32', () => {
  // 0x12_3456_0000 with COPIED: hi word 0x80000012, lo word 0x34560000.
  assert.is(entryOffset(0x80000012, 0x34560000), 0x1234560000);
  assert.is(entryOffset(0x00abcdef, 0xfffffe00), 0xabcdeffffffe00);
  assert.equal(encodeOffset(0x1234560000, true), [0x80000012, 0x34560000]);
  assert.equal(encodeOffset(0x1234560000, false), [0x00000012, 0x34560000]);
});

test('encodeOffset: flags and round trip', () => {
  assert.equal(encodeOffset(0x50000, false), [0, 0x50000]);
  assert.equal(encodeOffset(0x50000, true, true), [0x80000000, 0x00050001]);
  assert.equal(encodeOffset(0, false, true), [0, 1]);
  // lo word with bit 31 set stays an unsigned value.
  assert.equal(encodeOffset(0x80000000, false), [0, 0x80000000]);
  for (const off of [0, 0x200, 0x10000, 0x80000000, 0xfffffe00, 0x100000000, 2 ** 52, 2 ** 53 - 512]) {
    for (const copied of [false, true]) {
      const [hi, lo] = encodeOffset(off, copied);
      assert.ok(hi >= 0 && lo >= 0, 'unsigned words');
      assert.is(entryOffset(hi, lo), off);
      assert.is(isCopied(hi), copied);
      assert.is(classifyL2(hi, lo, true), off ? ClusterKind.Normal : ClusterKind.Unallocated);
    }
  }
});

test('readEntry reads big-endian words from a table', () => {
  const table = new Uint8Array([
    0x80, 0x00, 0x00, 0x00, 0x00, 0x05, 0x00, 0x00, // entry 0: COPIED | 0x50000
    0x40, 0x00, 0x00, 0x12, 0x34, 0x56, 0x78, 0x9a, // entry 1: compressed
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, // entry 2: zero
  ]);
  assert.equal(readEntry(table, 0), [0x80000000, 0x00050000]);
  assert.equal(readEntry(table, 1), [0x40000012, 0x3456789a]);
  assert.equal(readEntry(table, 2), [0, 1]);
});

// ---------- compressed descriptors ----------

test('compressedSizeShift is x = 62 - (cluster_bits - 8)', () => {
  assert.is(compressedSizeShift(9), 61);
  assert.is(compressedSizeShift(12), 58);
  assert.is(compressedSizeShift(16), 54);
  assert.is(compressedSizeShift(21), 49);
});

// Hand-built descriptors: [cluster_bits, hi, lo, host offset, total sectors, bytes to read].
const COMPRESSED: Array<[number, number, number, number, number, number]> = [
  // cluster_bits 9: x = 61, offset bits 0-60, 1 sector bit at 61 (hi bit 29).
  // 0x60000001 = flag(30) | additional 1 (29) | offset bit 32.
  [9, 0x60000001, 0x00000200, 0x100000200, 2, 1024],
  [9, 0x40000000, 0x000001ff, 0x1ff, 1, 1],
  // Offset bits up to 60 are offset, bit 61 is not: hi 0x5fffffff has every offset bit.
  [9, 0x5fffffff, 0x00000000, 0x1fffffff00000000, 1, 512],
  // cluster_bits 12: x = 58, 4 sector bits 58-61 (hi bits 26-29). 0x7c000003: 15 additional, offset hi 3.
  [12, 0x7c000003, 0xfffffe10, 0x3fffffe10, 16, 16 * 512 - 0x10],
  // cluster_bits 16: x = 54, 8 sector bits 54-61 (hi bits 22-29). 5 << 22 = 0x01400000.
  [16, 0x41400012, 0x3456789a, 0x123456789a, 6, 6 * 512 - 0x9a],
  // bit 53 (hi bit 21) is still offset.
  [16, 0x40200000, 0x00000000, 2 ** 53, 1, 512],
  // cluster_bits 21: x = 49, 13 sector bits 49-61 (hi bits 17-29). 0x1fff << 17 = 0x3ffe0000;
  // offset bit 48 = hi bit 16. COPIED (bit 63) set as well and ignored.
  [21, 0xffff0000, 0x00001234, 0x1000000001234, 8192, 8192 * 512 - 0x34],
  [21, 0x40020000, 0x00000400, 0x400, 2, 1024],
];

for (const [bits, hi, lo, offset, sectors, length] of COMPRESSED) {
  test(`compressed descriptor, cluster_bits ${bits}: hi 0x${hi.toString(16)} lo 0x${lo.toString(16)}`, () => {
    assert.is(classifyL2(hi, lo, true), ClusterKind.Compressed);
    assert.is(compressedOffset(hi, lo, bits), offset, 'offset');
    assert.is(compressedSectors(hi, bits), sectors, 'sectors');
    assert.is(compressedByteLength(hi, lo, bits), length, 'byte length');
    if (offset <= Number.MAX_SAFE_INTEGER) {
      const [ehi, elo] = encodeCompressed(offset, sectors, bits);
      assert.is(ehi, (hi & 0x7fffffff) >>> 0, 'encoded hi (without COPIED)');
      assert.is(elo, lo, 'encoded lo');
    }
  });
}

test('encodeCompressed / decode round trip at the field limits', () => {
  for (const bits of [9, 12, 16, 21]) {
    const x = 62 - (bits - 8);
    const maxSectors = 2 ** (bits - 8);
    // The largest offset x bits can hold, capped to an exact JS number.
    const maxOffset = Math.min(2 ** x - 1, Number.MAX_SAFE_INTEGER);
    for (const offset of [0, 0x1ff, 0x12345, 0xffffffff, 0x100000000, maxOffset]) {
      for (const sectors of [1, 2, maxSectors]) {
        const [hi, lo] = encodeCompressed(offset, sectors, bits);
        assert.ok(hi >= 0 && lo >= 0, 'unsigned words');
        assert.ok(isCompressed(hi));
        assert.not.ok(isCopied(hi));
        assert.is(compressedOffset(hi, lo, bits), offset, `offset ${offset} bits ${bits}`);
        assert.is(compressedSectors(hi, bits), sectors, `sectors ${sectors} bits ${bits}`);
      }
    }
  }
});

// ---------- extended L2 subclusters ----------

test('subclusterKind: allocated, zero, unallocated, including subcluster 31', () => {
  // alloc word 0x80000005: subclusters 0, 2, 31 allocated; zero word 0x0000000a: 1, 3 read zero.
  const alloc = 0x80000005;
  const zero = 0x0000000a;
  assert.is(subclusterKind(alloc, zero, 0), SubclusterKind.Allocated);
  assert.is(subclusterKind(alloc, zero, 1), SubclusterKind.Zero);
  assert.is(subclusterKind(alloc, zero, 2), SubclusterKind.Allocated);
  assert.is(subclusterKind(alloc, zero, 3), SubclusterKind.Zero);
  assert.is(subclusterKind(alloc, zero, 4), SubclusterKind.Unallocated);
  assert.is(subclusterKind(alloc, zero, 30), SubclusterKind.Unallocated);
  assert.is(subclusterKind(alloc, zero, 31), SubclusterKind.Allocated);
  assert.is(subclusterKind(0, 0x80000000, 31), SubclusterKind.Zero);
  assert.is(subclusterKind(0xffffffff, 0, 17), SubclusterKind.Allocated);
  assert.is(subclusterKind(0, 0xffffffff, 17), SubclusterKind.Zero);
});

// ---------- entry problems ----------

test('l2EntryProblem: unaligned offsets and bit 0 on extended L2', () => {
  assert.is(l2EntryProblem(0, 0x00050000, 0x10000, false), null);
  assert.is(l2EntryProblem(0, 0x00050200, 0x10000, false), 'offset 0x50200 is not aligned to the cluster size');
  assert.is(l2EntryProblem(0, 0x00050001, 0x10000, false), null);
  assert.is(l2EntryProblem(0, 0x00050001, 0x10000, true), 'reserved bit 0 is set');
  // Compressed entries have byte offsets.
  assert.is(l2EntryProblem(0x40000000, 0x00050123, 0x10000, false), null);
});

test.run();
