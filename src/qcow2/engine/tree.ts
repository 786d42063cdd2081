// Walking L1 trees in file order: every distinct L2 table read once, in large sequential reads,
// and the per-cluster reference deltas a snapshot operation needs.

import { QimgError, hex } from '../errors.js';
import { LITTLE_ENDIAN_HOST, be32, ints32, u32, words32 } from '../format/bytes.js';
import { getRefcount } from '../format/refblock.js';
import { compressedByteLength, compressedOffset, corruptEntry, entryOffset, l2EntryProblem } from '../format/entries.js';
import * as L from '../format/layout.js';
import { readAt } from '../io/file.js';
import type { Qcow2Image } from './qcow2-image.js';
import type { RefcountEdit } from './refcounts.js';
import { ioBuffer } from '../io/buffers.js';

/** Largest single read when L2 tables are adjacent on disk. */
const MAX_COALESCED_READ = 8 * 1024 * 1024;

/** Offsets of the L2 tables an L1 table references, in entry order (0 for unused entries skipped). */
export function l2Offsets(img: Qcow2Image, l1: Uint8Array): number[] {
  const out: number[] = [];
  for (let i = 0; i * 8 < l1.length; i++) {
    const off = entryOffset(u32(l1, i * 8), u32(l1, i * 8 + 4));
    if (off === 0) continue;
    if (off % img.clusterSize !== 0) throw new QimgError('CORRUPT', `L1 table: entry ${i} points to unaligned L2 table offset ${hex(off)}`);
    out.push(off);
  }
  return out;
}

/** Throws unless every L2 table `l1` names lies inside the file (checked before a write starts). */
export function assertTreeInFile(img: Qcow2Image, l1: Uint8Array): void {
  for (const off of l2Offsets(img, l1)) {
    if (off + img.clusterSize > img.fileSize) throw new QimgError('CORRUPT', `L2 table at ${hex(off)} lies past the end of the file`);
  }
}

/**
 * Calls `visit` for each distinct L2 table in `offsets`, in file-offset order, reading runs of
 * adjacent tables with one read. Tables a writer holds uncommitted are taken from its cache.
 * The table handed to `visit` lives in a reused buffer: copy it to keep it.
 */
export function forEachL2(img: Qcow2Image, offsets: number[], visit: (offset: number, table: Uint8Array) => void): void {
  const cs = img.clusterSize;
  const sorted = [...new Set(offsets)].sort((a, b) => a - b);
  let scratch = new Uint8Array(0);
  let i = 0;
  while (i < sorted.length) {
    const start = sorted[i]!;
    const dirty = img.dirtyL2.get(start);
    if (dirty) {
      visit(start, dirty);
      i++;
      continue;
    }
    let j = i + 1;
    while (j < sorted.length && sorted[j] === start + (j - i) * cs && (j - i + 1) * cs <= MAX_COALESCED_READ && !img.dirtyL2.has(sorted[j]!)) j++;
    const n = j - i;
    if (start + n * cs > img.fileSize) throw new QimgError('CORRUPT', `L2 table at ${hex(start)} lies past the end of the file`);
    // One reused read buffer: visitors must copy a table they want to keep (they do: slice()).
    if (scratch.length < n * cs) scratch = ioBuffer(Math.min(MAX_COALESCED_READ, Math.max(n * cs, scratch.length * 2)));
    const buf = scratch.subarray(0, n * cs);
    readAt(img.file, buf, start);
    for (let k = 0; k < n; k++) visit(start + k * cs, buf.subarray(k * cs, (k + 1) * cs));
    i = j;
  }
}

/**
 * Adds `d` to deltas[c] for every host cluster a tree reaches through `l1`: each L2 table once
 * per L1 entry naming it, each data cluster once per L2 entry, and every cluster a compressed
 * cluster's sectors touch.
 */
export function accumulateTree(img: Qcow2Image, l1: Uint8Array, deltas: Int32Array, d: number, strict = false): void {
  const cs = img.clusterSize;
  // Writers refuse trees they would copy or re-count with broken entries (QEMU refuses the
  // unaligned ones with EIO and marks the image corrupt); readers (freed-bytes) tolerate them.
  if (strict) {
    for (let i = 0; i * 8 < l1.length; i++) {
      const hi = u32(l1, i * 8);
      const lo = u32(l1, i * 8 + 4);
      if ((hi & L.L1E_RESERVED_HI) !== 0 || (lo & L.L1E_RESERVED_LO) !== 0) throw corruptEntry('L1 table', 0, i, 'has reserved bits set');
    }
  }
  const offsets = l2Offsets(img, l1);
  const uses = new Map<number, number>();
  for (const off of offsets) uses.set(off, (uses.get(off) ?? 0) + 1);
  const ew = img.extendedL2 ? 16 : 8;
  const extL2 = img.extendedL2;
  const cb = img.clusterBits;
  forEachL2(img, offsets, (off, table) => {
    const dd = d * uses.get(off)!;
    bump(deltas, off / cs, dd);
    accumulateTable(table, off, deltas, dd, cb, ew, strict, extL2);
  });
}

/**
 * The hot loop of every snapshot operation: one L2 table's references into `deltas`. Kept a
 * plain function of its arguments (no closure state) and on integer arithmetic so V8 keeps it
 * tight: host-order words, byte-swapped only when non-zero.
 */
function accumulateTable(table: Uint8Array, off: number, deltas: Int32Array, dd: number, cb: number, ew: number, strict: boolean, extL2: boolean): void {
  const cs = 2 ** cb;
  const hiScale = 0x100000000 / cs;
  const lowMask = cs - 1;
  // Module-namespace constants read into locals: the loop then compiles to plain immediates.
  const COMPRESSED = L.OFLAG_COMPRESSED_HI;
  const MASK_LO = L.OFFSET_MASK_LO;
  const MASK_HI = L.OFFSET_MASK_HI;
  const ZERO = L.OFLAG_ZERO_LO;
  const words = words32(table);
  const step = ew >>> 2;
  const nWords = table.length >>> 2;
  for (let w = 0; w < nWords; w += step) {
    let hi: number;
    let lo: number;
    if (words !== null) {
      const a = words[w]!;
      const b = words[w + 1]!;
      if (a === 0 && b === 0) continue;
      hi = be32(a);
      lo = be32(b);
    } else {
      hi = u32(table, w * 4);
      lo = u32(table, w * 4 + 4);
      if (hi === 0 && lo === 0) continue;
    }
    if (hi & COMPRESSED) {
      const co = compressedOffset(hi, lo, cb);
      const len = compressedByteLength(hi, lo, cb);
      const first = Math.floor(co / cs);
      const last = Math.floor((co + len - 1) / cs);
      for (let c = first; c <= last; c++) bump(deltas, c, dd);
      continue;
    }
    const offLo = (lo & MASK_LO) >>> 0;
    if (strict && ((offLo & lowMask) !== 0 || (extL2 && (lo & ZERO) !== 0))) {
      throw corruptEntry('L2 table', off, (w * 4) / ew, l2EntryProblem(hi, lo, cs, extL2) ?? 'is invalid');
    }
    const hiOff = hi & MASK_HI;
    if (hiOff === 0 && offLo === 0) continue;
    const ci = hiOff * hiScale + (offLo >>> cb);
    if (ci >= deltas.length) bump(deltas, ci, dd); // throws
    deltas[ci] = deltas[ci]! + dd;
  }
}

function bump(deltas: Int32Array, ci: number, d: number): void {
  if (ci >= deltas.length) throw new QimgError('CORRUPT', `cluster ${hex(ci)} referenced past the end of the image's refcount coverage`);
  deltas[ci] = deltas[ci]! + d;
}

/**
 * Adds `d` to the refcount of every host cluster each of `trees` reaches through its L1 table
 * (same counting as accumulateTree), straight into the in-memory refcount blocks through
 * `edit`, checking each change as it lands: one pass over the L2 tables, no per-cluster delta
 * array. An L2 table reached from several trees is walked once with the sum of their changes,
 * and not at all when they cancel (a snapshot apply between trees that share tables). A broken
 * entry, a reference at or past cluster `limit`, or a refcount out of range undoes the edit and
 * throws. The caller adds anything else and calls edit.finish().
 */
export function applyTreeRefs(img: Qcow2Image, trees: Array<[l1: Uint8Array, d: number]>, edit: RefcountEdit, limit: number): void {
  const cs = img.clusterSize;
  const net = new Map<number, number>();
  for (const [l1, d] of trees) {
    for (let i = 0; i * 8 < l1.length; i++) {
      const hi = u32(l1, i * 8);
      const lo = u32(l1, i * 8 + 4);
      if ((hi & L.L1E_RESERVED_HI) !== 0 || (lo & L.L1E_RESERVED_LO) !== 0) throw corruptEntry('L1 table', 0, i, 'has reserved bits set');
    }
    for (const off of l2Offsets(img, l1)) net.set(off, (net.get(off) ?? 0) + d);
  }
  const offsets = [...net].filter(([, dd]) => dd !== 0).map(([off]) => off);
  const ew = img.extendedL2 ? 16 : 8;
  const cb = img.clusterBits;
  const fast16 = edit.order === 4 && LITTLE_ENDIAN_HOST; // byte swaps written out for little-endian hosts
  const walk = (checked: boolean) =>
    forEachL2(img, offsets, (off, table) => {
      const dd = net.get(off)!;
      edit.add(checkedCluster(off / cs, limit, edit), dd);
      const words = ints32(table);
      if (!checked && fast16 && words !== null) {
        const r = applyTable16(words, off, edit, dd, cb, ew >>> 2, img.extendedL2, limit);
        if (r === INVALID) throw RECHECK;
        if (r === ALL_AT_ONE && dd < 0) edit.endedAtOne.add(off);
      } else applyTableAny(table, off, edit, dd, cb, ew, img.extendedL2, limit);
    });
  try {
    try {
      walk(false);
    } catch (err) {
      if (err !== RECHECK) throw err;
      // The fast loop only knows that some change was invalid: undo, and walk again checking
      // each change in order, which throws for the first bad one exactly as it should.
      edit.cancel();
      walk(true);
    }
  } catch (err) {
    edit.cancel(); // a table past the end of the file, say: nothing of the batch stays
    throw err;
  }
}

/** applyTable16's answers, and the signal for walking again with every change checked. */
const INVALID = -1;
const ALL_AT_ONE = 1;
const RECHECK = new Error('recheck');

function checkedCluster(ci: number, limit: number, edit: RefcountEdit): number {
  if (ci >= limit) edit.outOfRange(ci);
  return ci;
}

/**
 * The hot loop of snapshot create/apply/delete for 16-bit refcounts (the default width) on a
 * little-endian host: one L2 table's references applied to the refcount blocks through
 * Uint16Array views with the byte swaps written out (a host-order test inside the loop costs
 * ~40%), integer math while the cluster index fits in 31 bits. Tables mostly hold runs of
 * consecutive clusters: a run is recognised on the raw words (same high word, low word one
 * cluster further) and its refcounts updated in a tight inner loop. Validity is folded into
 * sign bits and tested once at the end: INVALID asks the caller to undo and redo the walk with
 * each change checked (only a corrupt or saturated image pays for that). ALL_AT_ONE: every data
 * cluster (not compressed) it changed ended at refcount 1.
 */
function applyTable16(words: Int32Array, off: number, edit: RefcountEdit, dd: number, cb: number, step: number, extL2: boolean, limit: number): number {
  const hiShift = 32 - cb;
  const intHi = 2 ** (cb - 1); // hiOff below this: the cluster index is under 2^31, integer math
  const alignMask = (2 ** cb - 1) & L.OFFSET_MASK_LO; // offset bits below the cluster size
  const shift = edit.shift;
  const mask = edit.mask;
  const max = edit.max;
  const COMPRESSED = L.OFLAG_COMPRESSED_HI;
  const MASK_HI = L.OFFSET_MASK_HI;
  const ZERO = extL2 ? L.OFLAG_ZERO_LO : 0;
  const runMask = alignMask | ZERO;
  // One cluster further, as it shows in the host-order low word: bit (cb % 8) of big-endian
  // byte 3 - cb/8, which sits at bits 8 * (3 - cb/8) of the host word.
  const stepShift = 8 * (3 - (cb >>> 3));
  const stepInc = 1 << (cb & 7);
  const stepB = stepInc * 2 ** stepShift;
  let lastT = -1;
  let m16: Uint16Array = new Uint16Array(0);
  let top = -1;
  let bad = 0; // sign bit set once any refcount left its range (or a cluster was at 0)
  let low = 0; // sign bit set once any refcount reached 0
  let notOne = 0; // non-zero once any refcount ended other than 1
  // The high word of the last plain data entry, and its part of the cluster index: entries
  // sharing that word (flags and offset bits 32..55, the usual case) skip its decoding. It
  // starts as 0, which decodes the same way (no flags, offset below 4 GiB).
  let runA = 0;
  let runBase = 0;
  const n = words.length;
  for (let w = 0; w < n; w += step) {
    const a = words[w]!;
    const b = words[w + 1]!;
    // Big-endian words as int32s (sign bits are fine: only masked bits are used).
    const lo = ((b & 0xff) << 24) | ((b & 0xff00) << 8) | ((b >>> 8) & 0xff00) | (b >>> 24);
    let ci: number;
    if (a === runA && (lo & runMask) === 0) {
      ci = runBase | (lo >>> cb);
    } else {
      if ((a | b) === 0) continue;
      const hi = ((a & 0xff) << 24) | ((a & 0xff00) << 8) | ((a >>> 8) & 0xff00) | (a >>> 24);
      if (hi & COMPRESSED) {
        compressedRefs(hi >>> 0, lo >>> 0, cb, edit, dd, limit);
        continue;
      }
      if ((lo & runMask) !== 0) {
        throw edit.abort(corruptEntry('L2 table', off, w / step, l2EntryProblem(hi >>> 0, lo >>> 0, 2 ** cb, extL2) ?? 'is invalid'));
      }
      const hiOff = hi & MASK_HI;
      if (hiOff >= intHi) {
        edit.add(checkedCluster(entryOffset(hi >>> 0, lo >>> 0) / 2 ** cb, limit, edit), dd); // past 2^31 clusters
        notOne = 1;
        continue;
      }
      runA = a;
      runBase = hiOff << hiShift;
      ci = runBase | (lo >>> cb);
    }
    if (ci === 0) continue;
    if (ci >= limit) return INVALID;
    const t = ci >>> shift;
    if (t !== lastT) {
      const m = edit.mem(t, ci);
      m16 = new Uint16Array(m.buffer, m.byteOffset, m.length >>> 1);
      lastT = t;
    }
    const i = ci & mask;
    // How far the run may go: no carry out of the byte that counts clusters, inside this block,
    // below the limit, inside the table.
    const last = i + Math.min(((0xff - ((b >>> stepShift) & 0xff)) / stepInc) | 0, mask - i, limit - 1 - ci);
    let j = i;
    let expect = b;
    let next = w + step;
    for (;;) {
      const r = m16[j]!;
      const cur = ((r & 0xff) << 8) | (r >>> 8);
      const v = cur + dd;
      bad |= (cur - 1) | v | (max - v);
      low |= v - 1;
      notOne |= v ^ 1;
      m16[j] = ((v & 0xff) << 8) | (v >>> 8);
      expect = (expect + stepB) | 0; // words are int32s; the counting byte never carries (see last)
      if (j === last || next >= n || words[next] !== a || words[next + 1] !== expect) break;
      j++;
      next += step;
    }
    if (ci + j - i > top) top = ci + j - i;
    w = next - step;
  }
  if (bad < 0) return INVALID;
  if (low < 0) collectZeros(words, edit, cb, step);
  if (dd < 0) edit.noteResult(-1, dd, 1);
  else if (top >= 0) edit.noteResult(top, dd, 1);
  return notOne === 0 ? ALL_AT_ONE : 0;
}

/** The clusters of a table whose refcount is now 0, reported to `edit` (the rare path of applyTable16). */
function collectZeros(words: Int32Array, edit: RefcountEdit, cb: number, step: number): void {
  for (let w = 0; w < words.length; w += step) {
    const hi = be32(words[w]!);
    const lo = be32(words[w + 1]!);
    if (hi & L.OFLAG_COMPRESSED_HI) continue;
    const hostOff = entryOffset(hi, lo);
    if (hostOff === 0) continue;
    const ci = hostOff / 2 ** cb;
    const t = Math.floor(ci / edit.perBlock);
    if (getRefcount(edit.mem(t, ci), ci - t * edit.perBlock, 4) === 0) edit.noteResult(ci, -1, 0);
  }
}

/** The same for any refcount width or an unaligned table buffer (through edit.add). */
function applyTableAny(table: Uint8Array, off: number, edit: RefcountEdit, dd: number, cb: number, ew: number, extL2: boolean, limit: number): void {
  const cs = 2 ** cb;
  for (let e = 0; e < table.length; e += ew) {
    const hi = u32(table, e);
    const lo = u32(table, e + 4);
    if (hi === 0 && lo === 0) continue;
    if (hi & L.OFLAG_COMPRESSED_HI) {
      compressedRefs(hi, lo, cb, edit, dd, limit);
      continue;
    }
    const offLo = (lo & L.OFFSET_MASK_LO) >>> 0;
    if (offLo % cs !== 0 || (extL2 && (lo & L.OFLAG_ZERO_LO) !== 0)) {
      throw edit.abort(corruptEntry('L2 table', off, e / ew, l2EntryProblem(hi, lo, cs, extL2) ?? 'is invalid'));
    }
    const hostOff = entryOffset(hi, lo);
    if (hostOff === 0) continue;
    edit.add(checkedCluster(hostOff / cs, limit, edit), dd);
  }
}

/** Every host cluster a compressed cluster's sectors touch. */
function compressedRefs(hi: number, lo: number, cb: number, edit: RefcountEdit, dd: number, limit: number): void {
  const cs = 2 ** cb;
  const co = compressedOffset(hi, lo, cb);
  const len = compressedByteLength(hi, lo, cb);
  const first = Math.floor(co / cs);
  const last = Math.floor((co + len - 1) / cs);
  for (let c = first; c <= last; c++) edit.add(checkedCluster(c, limit, edit), dd);
}
