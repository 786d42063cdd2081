// One check pass over an open image, with qemu-img 7.2's findings, counters and message order:
// reference counting through every L1/L2 table, refcount-block checks, the comparison with the
// stored refcounts (and its repairs), and the OFLAG_COPIED checks.
//
// Speed comes from reading each distinct L2 table once, in file order, with large coalesced
// reads: a table's data references are added once per L1 table that reaches it, and its
// findings (rare) are kept as strings and replayed in QEMU's traversal order afterwards. The one
// order-dependent effect, a refcount saturating at the image's refcount width, is detected at the
// end and handled by re-running the count in traversal order ("exact" mode), as are in-place
// repairs of L2 entries.

import { decodeBitmapDirectory } from '../format/bitmaps.js';
import { u32 } from '../format/bytes.js';
import { getRefcount as getRefcountStrict, maxRefcount, setRefcount } from '../format/refblock.js';
import * as L from '../format/layout.js';
import { osReason, type QimgError } from '../errors.js';
import { readAt } from '../io/file.js';
import { CheckAbort, readSnapshotsForCheck, Window, type CheckImage } from './image.js';
import { RefArray } from './refarray.js';
import { metadataOverlap, rewriteSnapshotTable } from './snapshot-fix.js';
import { ioBuffer } from '../io/buffers.js';

/** QEMU's block layer: lengths are int64, and no image may exceed INT64_MAX rounded down to 1 GiB. */
const INT64_MAX = 2n ** 63n - 1n;
const MAX_IMAGE_LENGTH = INT64_MAX & ~(2n ** 30n - 1n);

export const FIX_LEAKS = 1;
export const FIX_ERRORS = 2;

export interface CheckCounts {
  corruptions: number;
  leaks: number;
  checkErrors: number;
  corruptionsFixed: number;
  leaksFixed: number;
  imageEndOffset: number;
  totalClusters: number;
  allocatedClusters: number;
  fragmentedClusters: number;
  compressedClusters: number;
}

/**
 * QEMU keeps the five counts in C ints, so sums past 2^31 wrap: 4294901759 + 65536 + 1 discarded
 * snapshots count as 0 corruptions fixed, and qemu-img then reports "No errors were found".
 */
function wrapToCInt(c: CheckCounts): void {
  c.corruptions |= 0;
  c.leaks |= 0;
  c.checkErrors |= 0;
  c.corruptionsFixed |= 0;
  c.leaksFixed |= 0;
}

export function emptyCounts(): CheckCounts {
  return {
    corruptions: 0,
    leaks: 0,
    checkErrors: 0,
    corruptionsFixed: 0,
    leaksFixed: 0,
    imageEndOffset: 0,
    totalClusters: 0,
    allocatedClusters: 0,
    fragmentedClusters: 0,
    compressedClusters: 0,
  };
}

export interface PassOptions {
  /** Largest single read of L2 tables, in bytes (default 8 MiB). */
  chunkBytes?: number;
  /** Program name for error_report-style lines. */
  prog?: string;
  /** Called with (done, total) L2 tables while scanning. */
  progress?: (done: number, total: number) => void;
  /** Force traversal-order counting (tests compare it with the streaming path). */
  exact?: boolean;
}

const DEFAULT_CHUNK = 4 * 1024 * 1024;
/** Tables closer than this are read together, the gap included. */
const MAX_GAP = 256 * 1024;
const TWO32 = 0x100000000;
const TWO63 = 1n << 63n;
const TWO64 = 1n << 64n;
/** Refcount blocks kept by a read-only pass (each one cluster). */
const READONLY_CACHED_BLOCKS = 16;
/** Snapshot L1 tables up to this size are read through a shared window. */
const SMALL_L1_BYTES = 64 * 1024;

const EMPTY = new Uint8Array(0);
const EMPTY32 = new Int32Array(0);
const cmpOut: [number, number] = [0, -1];

/** Whether typed-array views read memory little-endian (the word-at-a-time loops below assume it). */
const LE = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

/** Compares 16-bit stored refcounts with counted ones until the first difference: [stop, highest or -1]. */
function cmp16(b: Uint8Array, a: ArrayLike<number>, base: number, end: number): [number, number] {
  let highest = -1;
  let i = 0;
  if (LE && a instanceof Uint8Array && (b.byteOffset & 3) === 0 && ((a.byteOffset + base) & 3) === 0) {
    // Four entries per step: big-endian pairs (0, c0) .. (0, c3) read as two little-endian words
    // have zero high bytes (mask 0x00ff00ff) and carry c0..c3 in bytes 1 and 3 of each, which
    // must equal four byte counters read as one little-endian word.
    const quads = end >>> 2;
    const w = new Int32Array(b.buffer, b.byteOffset, quads * 2);
    const a32 = new Int32Array(a.buffer, a.byteOffset + base, quads);
    let k = 0;
    let hk = -1;
    for (; k < quads; k++) {
      const c = a32[k]!;
      const w0 = w[2 * k]!;
      const w1 = w[2 * k + 1]!;
      if (((w0 | w1) & 0x00ff00ff) !== 0) break;
      if ((((w0 >>> 8) & 0xff) | ((w0 >>> 16) & 0xff00) | ((w1 << 8) & 0xff0000) | (w1 & 0xff000000)) !== c) break;
      if (c !== 0) hk = k;
    }
    if (hk >= 0) {
      const c = a32[hk]!;
      highest = base + 4 * hk + (c >>> 24 !== 0 ? 3 : (c & 0xff0000) !== 0 ? 2 : (c & 0xff00) !== 0 ? 1 : 0);
    }
    i = 4 * k;
  }
  // The rest (and the quad that differed) one entry at a time, up to the first difference.
  const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
  for (; i < end; i++) {
    const r1 = dv.getUint16(i * 2);
    if (r1 !== a[base + i]) break;
    if (r1 !== 0) highest = base + i;
  }
  cmpOut[0] = i;
  cmpOut[1] = highest;
  return cmpOut;
}

/** Sets the bit of every cluster whose 16-bit stored refcount is 1 (base: a multiple of 8). */
function ones16(b: Uint8Array, ones: Uint8Array, base: number, end: number): void {
  let i = 0;
  if (LE && (b.byteOffset & 3) === 0 && (base & 7) === 0) {
    // Eight entries (four little-endian words) per bitmap byte; a stored 1 reads 0x0100.
    const w = new Int32Array(b.buffer, b.byteOffset, end >>> 1);
    const e8 = end & ~7;
    for (let k = 0, o = base >>> 3; i < e8; i += 8, k += 4, o++) {
      const w0 = w[k]!;
      const w1 = w[k + 1]!;
      const w2 = w[k + 2]!;
      const w3 = w[k + 3]!;
      if ((w0 | w1 | w2 | w3) === 0) continue;
      if (w0 === 0x01000100 && w1 === 0x01000100 && w2 === 0x01000100 && w3 === 0x01000100) {
        ones[o] = 0xff;
        continue;
      }
      ones[o] =
        ((w0 & 0xffff) === 0x100 ? 1 : 0) |
        (w0 >>> 16 === 0x100 ? 2 : 0) |
        ((w1 & 0xffff) === 0x100 ? 4 : 0) |
        (w1 >>> 16 === 0x100 ? 8 : 0) |
        ((w2 & 0xffff) === 0x100 ? 16 : 0) |
        (w2 >>> 16 === 0x100 ? 32 : 0) |
        ((w3 & 0xffff) === 0x100 ? 64 : 0) |
        (w3 >>> 16 === 0x100 ? 128 : 0);
    }
  }
  for (; i < end; i++) {
    if (((b[2 * i]! << 8) | b[2 * i + 1]!) === 1) {
      const c = base + i;
      ones[c >>> 3] = ones[c >>> 3]! | (1 << (c & 7));
    }
  }
}

/**
 * How many of the n clusters from c have their "stored refcount is 1" bit equal to `want`
 * (eight at a time where whole bitmap bytes agree).
 */
function copiedPrefix(ones: Uint8Array, c: number, n: number, want: number): number {
  let k = 0;
  while (k < n && ((c + k) & 7) !== 0) {
    if (((ones[(c + k) >>> 3]! >>> ((c + k) & 7)) & 1) !== want) return k;
    k++;
  }
  const full = want ? 0xff : 0;
  while (k + 8 <= n && ones[(c + k) >>> 3] === full) k += 8;
  while (k < n) {
    if (((ones[(c + k) >>> 3]! >>> ((c + k) & 7)) & 1) !== want) return k;
    k++;
  }
  return k;
}

/**
 * Adds `mult` to the counters of clusters [c, c+n) until one would pass `limit`; returns how many
 * it added to. With byte counters (`w32` their Int32Array view, else empty) four go per step
 * while every byte is below 128 (so adding mult < 128 cannot carry into the next one).
 */
function bumpRun(arr: ArrayLike<number> & { [i: number]: number }, w32: Int32Array, c: number, n: number, mult: number, limit: number): number {
  let k = c;
  const end = c + n;
  if (w32.length > 0 && mult < 128 && n >= 8) {
    for (; (k & 3) !== 0; k++) {
      const v = arr[k]! + mult;
      if (v > limit) return k - c;
      arr[k] = v;
    }
    const add = mult * 0x01010101;
    let j = k >>> 2;
    const jend = end >>> 2;
    for (; j < jend; j++) {
      const x = w32[j]!;
      if ((x & 0x80808080) !== 0) break;
      w32[j] = x + add;
    }
    k = j << 2;
  }
  for (; k < end; k++) {
    const v = arr[k]! + mult;
    if (v > limit) break;
    arr[k] = v;
  }
  return k - c;
}

/**
 * The streaming hot loop over standard L2 entries starting at buf[p]: handles the common
 * entries (unallocated, zero, aligned in-file data with no reserved bits and a consistent
 * OFLAG_COPIED) in int32 arithmetic and returns how many it consumed; the caller takes the next
 * entry through the general path. st = [allocated, fragmented, next contiguous offset].
 *
 * Data entries come in runs (a table mapping consecutive host clusters, as preallocation and
 * sequential writes leave them): a run is recognised by comparing raw words, its OFLAG_COPIED
 * bits are checked against the bitmap a byte at a time, and its counters are bumped in one
 * tight loop, so the per-entry work is two loads and two compares.
 */
export function fastRun(
  dv: DataView,
  p: number,
  count: number,
  arr: ArrayLike<number> & { [i: number]: number },
  mult: number,
  limit: number,
  lowMask: number,
  cb: number,
  cs: number,
  fileClusters: number,
  ones: Uint8Array,
  st: Float64Array,
  w32: Int32Array = EMPTY32,
  raw: Int32Array = EMPTY32,
): number {
  // One cluster more on a low word read in little-endian order (see the run below).
  const d = 1 << (8 * (3 - (cb >> 3)) + (cb & 7));
  let alloc = st[0]!;
  let frag = st[1]!;
  const next = st[2]!;
  // Next contiguous cluster: -1 unset (QEMU's 0), -2 after an unaligned entry (never matches).
  let nextC = next === 0 ? -1 : next % cs === 0 ? next / cs : -2;
  const checkCopied = ones.length > 0;
  const alen = Math.min(arr.length, fileClusters);
  const sh = 32 - cb;
  const ohMax = 1 << (cb - 1);
  let i = 0;
  while (i < count) {
    const h = dv.getInt32(p);
    const l = dv.getInt32(p + 4);
    if ((h | l) === 0) {
      i++;
      p += 8;
      // Unallocated stretches (most of a sparse table) four entries per step.
      if (raw.length > 0) {
        let k = p >> 2;
        while (i + 4 <= count && (raw[k]! | raw[k + 1]! | raw[k + 2]! | raw[k + 3]! | raw[k + 4]! | raw[k + 5]! | raw[k + 6]! | raw[k + 7]!) === 0) {
          i += 4;
          k += 8;
        }
        p = k << 2;
      }
      continue;
    }
    if (((h & 0x7f000000) | (l & lowMask)) !== 0) break;
    const oh = h & 0xffffff;
    if (oh >= ohMax) break;
    const c = (oh << sh) | (l >>> cb);
    if (c === 0 && (l & ~0x1ff) === 0) {
      // offset 0 (c is 0 exactly when oh is): unallocated or zero
      i++;
      p += 8;
      continue;
    }
    if (c >= alen) break;
    // The run: same high word, low word one cluster further each time (a wrap to 0 would be
    // 4 GiB back, so it ends the run).
    const max = Math.min(count - i, alen - c);
    let n = 1;
    if (raw.length > 0) {
      // The same on the host-order words: the high word is compared as is, and one cluster more
      // is `d` on the byte-swapped low word as long as that byte does not carry (a carry goes the
      // wrong way, so it can only end a run early, never match a wrong entry).
      const k = p >> 2;
      const hr = raw[k]!;
      let lr = raw[k + 1]!;
      let q = k + 2;
      while (n < max) {
        lr = (lr + d) | 0;
        if (raw[q + 1] !== lr || raw[q] !== hr) break;
        n++;
        q += 2;
      }
    } else {
      let q = p + 8;
      let nl = (l + cs) | 0;
      while (n < max && nl !== 0 && dv.getInt32(q + 4) === nl && dv.getInt32(q) === h) {
        n++;
        q += 8;
        nl = (nl + cs) | 0;
      }
    }
    if (checkCopied) n = copiedPrefix(ones, c, n, h >>> 31);
    const took = bumpRun(arr, w32, c, n, mult, limit);
    if (took === 0) break;
    alloc += took;
    if (c !== nextC && nextC !== -1) frag++;
    nextC = c + took;
    i += took;
    p += 8 * took;
  }
  st[0] = alloc;
  st[1] = frag;
  st[2] = nextC === -1 ? 0 : nextC === -2 ? next : nextC * cs;
  return i;
}

/**
 * Indices of the entries of an L2 table that are not all zero, when they are few (at most one
 * in eight); else null. Lets a table that many snapshots share be rescanned cheaply.
 */
function sparseEntries(t: Uint8Array, ew: number): Int32Array | null {
  const words = ew >> 2;
  const n = t.length / ew;
  const w = new Int32Array(t.buffer, t.byteOffset, t.length >> 2);
  const out = new Int32Array(n >> 3);
  let k = 0;
  for (let i = 0; i < n; i++) {
    let or = 0;
    for (let x = i * words, e = x + words; x < e; x++) or |= w[x]!;
    if (or !== 0) {
      if (k === out.length) return null;
      out[k++] = i;
    }
  }
  return out.subarray(0, k);
}

/** A stored refcount; 64-bit ones past 2^53 come back approximate (see rcText for printing). */
function getRefcount(b: Uint8Array, i: number, order: number): number {
  if (order === 6) return u32(b, i * 8) * TWO32 + u32(b, i * 8 + 4);
  return getRefcountStrict(b, i, order);
}

/** %PRIu64 of a stored refcount (exact for 64-bit entries). */
function rcText(v: number, b: Uint8Array | null, i: number, order: number): string {
  if (order !== 6 || v <= Number.MAX_SAFE_INTEGER || !b) return String(v);
  return ((BigInt(u32(b, i * 8)) << 32n) | BigInt(u32(b, i * 8 + 4))).toString();
}

/** %PRIx64 of a (hi, lo) word. */
function hx(hi: number, lo: number): string {
  return hi ? hi.toString(16) + (lo >>> 0).toString(16).padStart(8, '0') : (lo >>> 0).toString(16);
}
/** %#PRIx64: "0" for zero, else 0x-prefixed. */
function hxAlt(hi: number, lo: number): string {
  return hi === 0 && lo === 0 ? '0' : '0x' + hx(hi, lo);
}
function numHx(n: number): string {
  return hx(Math.floor(n / TWO32), n % TWO32);
}

interface TableFindings {
  msgs: string[];
  corruptions: number;
}

/**
 * What the pass does in traversal order. An L1 table QEMU's block layer refuses to read (`ioError`:
 * it ends past the largest image length) is counted, then stops the check; no step follows it.
 */
type Step = { kind: 'msg'; msg: string } | { kind: 'l1'; l1: Uint8Array; hi: number; lo: number; size: number; active: boolean; ioError?: true };

/**
 * One `bdrv_check` of a qcow2 image in a fix mode (0, FIX_LEAKS, FIX_LEAKS|FIX_ERRORS). Messages
 * (stderr lines, in order) go to `msgs`. Throws CheckAbort for "Check failed: REASON".
 */
export class CheckPass {
  readonly res = emptyCounts();
  private readonly cs: number;
  private readonly cb: number;
  private readonly refMax: number;
  private readonly prog: string;
  private readonly chunk: number;
  private fileLen: number;
  private fileClusters: number;
  /** QEMU's nb_clusters: the in-memory table's logical size (grows for references near EOF). */
  private nb = 0;
  private arr: RefArray;
  private steps: Step[] = [];
  // Distinct L2 tables (sorted offsets) and how many active / all L1 entries reference them.
  private uniq = new Float64Array(0);
  private mult = new Uint32Array(0);
  private activeMult = new Uint32Array(0);
  private findings = new Map<number, TableFindings>();
  private copiedFindings = new Map<number, string[]>();
  private repairable = false;
  /** Cluster is stored with refcount exactly 1 (bit set), for streaming OFLAG_COPIED checks. */
  private storedOne: Uint8Array | null = null;
  private storedErrBlocks = new Set<number>();
  private signaled = false;
  private blockCache = new Map<number, Uint8Array>();
  private highest = 0;
  private rebuild = false;
  private avoid = new Set<number>();

  constructor(
    private readonly img: CheckImage,
    private readonly fix: number,
    private readonly msgs: string[],
    private readonly opts: PassOptions = {},
  ) {
    this.cs = img.clusterSize;
    this.cb = img.clusterBits;
    this.refMax = maxRefcount(img.refcountOrder);
    this.prog = opts.prog ?? 'qimg';
    this.chunk = Math.max(opts.chunkBytes ?? DEFAULT_CHUNK, this.cs);
    this.fileLen = img.file.size();
    this.fileClusters = Math.ceil(this.fileLen / this.cs);
    // Sized by resetCounts(): allocating it here too would cost a second resident copy (the
    // allocator zero-fills reused heap memory).
    this.arr = new RefArray(0);
  }

  /** qcow2_co_check_locked: snapshot table, refcounts, then marking the image clean. */
  run(): CheckCounts {
    let snap;
    try {
      snap = readSnapshotsForCheck(this.img, this.msgs, this.prog, (this.fix & FIX_ERRORS) !== 0);
    } catch (err) {
      if (err instanceof CheckAbort) this.res.checkErrors++;
      throw err;
    }
    this.checkRefcounts();
    // qcow2_check_fix_snapshot_table: entries read leniently are written back once the refcounts
    // are sound (the new table needs clusters allocated).
    if (snap.corruptions && this.fix & FIX_ERRORS) {
      const rewritten = rewriteSnapshotTable(this.img);
      if ('overlap' in rewritten) {
        // The old table ran past the end of the file, so its clusters were free to allocate:
        // QEMU's overlap check refuses the write, marks the image corrupt and stops the check.
        this.refuseWrite(rewritten.overlap, 'ERROR failed to update snapshot table: Input/output error');
      }
      if (rewritten.freeFailed) this.msgs.push(`qcow2_free_clusters failed: ${rewritten.freeFailed}`);
      this.fileLen = this.img.file.size();
      if (rewritten.freed.length) this.discardClusters(rewritten.freed);
      snap.corruptionsFixed += snap.corruptions;
      snap.corruptions = 0;
    }
    this.res.corruptions += snap.corruptions;
    this.res.corruptionsFixed += snap.corruptionsFixed;
    wrapToCInt(this.res);
    if (this.fix && this.res.checkErrors === 0 && this.res.corruptions === 0) this.markCleanAndConsistent();
    return this.res;
  }

  // ---- qcow2_check_refcounts ------------------------------------------------------------

  private checkRefcounts(): void {
    const img = this.img;
    // QEMU's in-memory refcount table is indexed by int: a file of more clusters is refused
    // before anything is counted (a repair that grew the file meets this in the double check).
    if (this.fileClusters > 0x7fffffff) {
      this.res.checkErrors++;
      throw new CheckAbort('File too large');
    }
    // QEMU counts the clusters of the image's whole sectors (a size's last partial sector is lost).
    this.res.totalClusters = Math.ceil((Math.floor(img.header.size / 512) * 512) / this.cs);
    const recordCopied = this.fix === 0 && !this.opts.exact;
    if (recordCopied) this.loadStoredOnes();
    this.calculate(recordCopied);
    const pre = { ...this.res };
    this.compare(0);
    if (this.rebuild && this.fix & FIX_ERRORS) {
      const old = { ...this.res };
      let freshLeaks = 0;
      this.msgs.push('Rebuilding refcount structure');
      this.rebuildRefcountStructure();
      this.res.corruptions = 0;
      this.res.leaks = 0;
      this.rebuild = false;
      this.calculate(false);
      if (this.fix & FIX_LEAKS) {
        const saved = { ...this.res };
        Object.assign(this.res, emptyCounts());
        this.compare(FIX_LEAKS);
        if (this.rebuild) this.msgs.push('ERROR rebuilt refcount structure is still broken');
        freshLeaks = this.res.leaks;
        Object.assign(this.res, saved);
      }
      if (this.res.corruptions < old.corruptions) this.res.corruptionsFixed += old.corruptions - this.res.corruptions;
      if (this.res.leaks < old.leaks) this.res.leaksFixed += old.leaks - this.res.leaks;
      this.res.leaks += freshLeaks;
    } else if (this.fix) {
      if (this.rebuild) {
        this.msgs.push('ERROR need to rebuild refcount structures');
        this.res.checkErrors++;
        throw new CheckAbort('Input/output error');
      }
      if (this.res.leaks || this.res.corruptions) {
        Object.assign(this.res, pre);
        this.compare(this.fix);
      }
    }
    if (recordCopied && this.storedOne) this.replayCopied();
    else this.checkCopied();
    this.res.imageEndOffset = (this.highest + 1) * this.cs;
  }

  // ---- calculate_refcounts -----------------------------------------------------------------

  private calculate(recordCopied: boolean): void {
    const start = this.msgs.length;
    const saved = { ...this.res };
    this.buildSteps();
    let exact = !!this.opts.exact;
    if (!exact) {
      this.resetCounts();
      this.fastScan(recordCopied);
      if (this.fix & FIX_ERRORS && this.repairable) exact = true;
      else {
        try {
          this.replay(false);
        } catch (err) {
          // A snapshot L1 table that cannot be read ends the count; a counter that saturated
          // before it must still be reported where QEMU's traversal reaches it.
          if (!(err instanceof CheckAbort) || !this.overflowed()) throw err;
          exact = true;
        }
        if (!exact) {
          this.checkRefblocks();
          if (this.overflowed()) exact = true;
        }
      }
    }
    if (exact) {
      // Traversal order, one read per reference: saturation and in-place repairs happen exactly
      // where QEMU's would.
      this.msgs.length = start;
      Object.assign(this.res, saved);
      this.storedOne = null;
      this.resetCounts();
      this.replay(true);
      this.checkRefblocks();
    }
  }

  private resetCounts(): void {
    const n = this.fileClusters + 1;
    if (this.arr.length === n && this.arr.a instanceof Uint8Array) this.arr.clear();
    else this.arr = new RefArray(n);
    this.nb = this.fileClusters;
    this.findings.clear();
    this.copiedFindings.clear();
    this.repairable = false;
  }

  private overflowed(): boolean {
    if (this.arr.limit <= this.refMax) return false;
    const a = this.arr.a;
    const max = this.refMax;
    for (let i = 0; i < a.length; i++) if (a[i]! > max) return true;
    return false;
  }

  private buildSteps(): void {
    const img = this.img;
    const steps: Step[] = [];
    const h = img.header;
    steps.push({ kind: 'l1', l1: img.l1, hi: Math.floor(h.l1TableOffset / TWO32), lo: h.l1TableOffset % TWO32, size: h.l1Size, active: true });
    if (img.hasDataFile && img.snapshots.length) {
      steps.push({ kind: 'msg', msg: `ERROR ${img.snapshots.length} snapshots in image with data file` });
    }
    let win: Window | null = null;
    for (const sn of img.snapshots) {
      if (sn.l1Lo % this.cs !== 0) {
        steps.push({ kind: 'msg', msg: `ERROR snapshot ${sn.id} (${sn.name}) l1_offset=${hxAlt(sn.l1Hi, sn.l1Lo)}: L1 table is not cluster aligned; snapshot table entry corrupted` });
        continue;
      }
      if (sn.l1Size > L.MAX_L1_ENTRIES) {
        steps.push({ kind: 'msg', msg: `ERROR snapshot ${sn.id} (${sn.name}) l1_size=${hxAlt(0, sn.l1Size)}: L1 table is too large; snapshot table entry corrupted` });
        continue;
      }
      const off = sn.l1Hi * TWO32 + sn.l1Lo;
      // bdrv_pread's request check: an unsigned offset of 2^63 or more is negative to QEMU, and
      // no request may end past its largest image length; either is EIO, which ends the check.
      if (sn.l1Size && ((BigInt(sn.l1Hi) << 32n) | BigInt(sn.l1Lo)) + BigInt(sn.l1Size * 8) > MAX_IMAGE_LENGTH) {
        steps.push({ kind: 'l1', l1: EMPTY, hi: sn.l1Hi, lo: sn.l1Lo, size: sn.l1Size, active: false, ioError: true });
        break;
      }
      let l1: Uint8Array;
      if (sn.l1Size * 8 <= SMALL_L1_BYTES && off < this.fileLen) {
        // Small tables (typically one after another at the end of the file) through a window.
        l1 = (win ??= new Window(img.file)).at(off, sn.l1Size * 8).slice();
      } else {
        l1 = new Uint8Array(sn.l1Size * 8);
        if (sn.l1Size && off < this.fileLen) readAt(img.file, l1, off);
      }
      steps.push({ kind: 'l1', l1, hi: sn.l1Hi, lo: sn.l1Lo, size: sn.l1Size, active: false });
    }
    this.steps = steps;
  }

  /** Collects, sorts and reads every distinct L2 table once; adds its data references. */
  private fastScan(recordCopied: boolean): void {
    let n = 0;
    for (const s of this.steps) if (s.kind === 'l1' && !s.ioError) n += s.size;
    const refs = new Float64Array(n);
    const act = new Uint8Array(n);
    let k = 0;
    for (const s of this.steps) {
      if (s.kind !== 'l1' || s.ioError) continue;
      const t = s.l1;
      for (let i = 0; i < s.size; i++) {
        const hi = u32(t, i * 8);
        const lo = u32(t, i * 8 + 4);
        if (hi === 0 && lo === 0) continue;
        refs[k] = (hi & L.OFFSET_MASK_HI) * TWO32 + ((lo & L.OFFSET_MASK_LO) >>> 0);
        act[k++] = s.active ? 1 : 0;
      }
    }
    // Sort (offset, active) pairs by offset: pack active into the order via a permutation.
    const idx = new Uint32Array(k);
    for (let i = 0; i < k; i++) idx[i] = i;
    const offs = refs.subarray(0, k);
    idx.sort((a, b) => offs[a]! - offs[b]!);
    const uniq = new Float64Array(k);
    const mult = new Uint32Array(k);
    const am = new Uint32Array(k);
    let u = -1;
    for (let i = 0; i < k; i++) {
      const o = offs[idx[i]!]!;
      if (u < 0 || uniq[u] !== o) uniq[++u] = o;
      mult[u]!++;
      if (act[idx[i]!]) am[u]!++;
    }
    const count = u + 1;
    this.uniq = uniq.subarray(0, count);
    this.mult = mult.subarray(0, count);
    this.activeMult = am.subarray(0, count);

    const cs = this.cs;
    const buf = ioBuffer(this.chunk);
    let i = 0;
    while (i < count) {
      const start = this.uniq[i]!;
      let j = i + 1;
      let end = start + cs;
      while (j < count) {
        const o = this.uniq[j]!;
        if (o + cs - start > this.chunk || o - end > MAX_GAP) break;
        end = Math.max(end, o + cs);
        j++;
      }
      const len = end - start;
      const view = buf.subarray(0, len);
      if (start < this.fileLen) readAt(this.img.file, view, start);
      else view.fill(0);
      for (let t = i; t < j; t++) {
        const base = this.uniq[t]! - start;
        this.scanL2(view, base, this.uniq[t]!, this.mult[t]!, this.activeMult[t]!, false, recordCopied && this.activeMult[t]! > 0);
        if (this.curMsgs.length || this.curCorr) {
          this.findings.set(t, { msgs: this.curMsgs, corruptions: this.curCorr });
          this.curMsgs = [];
        }
        if (this.curCopied.length) {
          this.copiedFindings.set(t, this.curCopied);
          this.curCopied = [];
        }
        this.curCorr = 0;
      }
      this.opts.progress?.(j, count);
      i = j;
    }
  }

  private fastState = new Float64Array(3);
  private wordsOf: { a: ArrayLike<number> | null; w: Int32Array } = { a: null, w: EMPTY32 };

  /** An Int32Array over byte counters (for bumpRun), empty for wider ones. */
  private words(a: ArrayLike<number>): Int32Array {
    const c = this.wordsOf;
    if (c.a !== a) {
      c.a = a;
      c.w = a instanceof Uint8Array && (a.byteOffset & 3) === 0 ? new Int32Array(a.buffer, a.byteOffset, a.length >>> 2) : EMPTY32;
    }
    return c.w;
  }
  private curMsgs: string[] = [];
  private curCorr = 0;
  private curCopied: string[] = [];

  /**
   * check_refcounts_l2 over one table image at buf[base..]: adds `mult` references per data
   * cluster (exact mode: 1, saturating), statistics times `activeMult`, findings to curMsgs.
   */
  private scanL2(buf: Uint8Array, base: number, l2Offset: number, mult: number, activeMult: number, exact: boolean, copied: boolean, only: Int32Array | null = null): void {
    const img = this.img;
    const ew = img.l2EntryBytes;
    const n = img.l2Entries;
    const cb = this.cb;
    const cs = this.cs;
    const ext = img.extendedL2;
    const fileLen = this.fileLen;
    const dataFile = img.hasDataFile;
    const fixErrors = (this.fix & FIX_ERRORS) !== 0;
    const shiftHi = TWO32 / cs; // cluster index = hi * 2^(32-cb) + (lo >>> cb)
    let arr = this.arr.a;
    let limit = this.arr.limit;
    let alloc = 0;
    let frag = 0;
    let comp = 0;
    let next = 0;
    const ones = this.storedOne;
    // Fast path (standard L2, streaming): an aligned, in-file data cluster with no reserved bits,
    // all in int32 arithmetic (bit 31 set makes `>>> 0` values leave V8's small-integer range).
    // In exact (traversal-order) mode a counter must stop at the image's refcount width, where
    // the general path reports the overflow: the fast path's limit is that width too.
    const fast = !ext && !dataFile && (!exact || mult === 1);
    const refMax = exact ? this.refMax : Infinity;
    const lowMask = 0x1fe | ((cs - 1) & ~0x1ff);
    const fileClusters = this.fileClusters;
    const dv = fast ? new DataView(buf.buffer, buf.byteOffset, buf.byteLength) : null!;
    const raw = fast && LE && (buf.byteOffset & 3) === 0 ? new Int32Array(buf.buffer, buf.byteOffset, buf.byteLength >> 2) : EMPTY32;
    const checkCopied = copied && ones !== null;
    const st = this.fastState;
    // `only`: the entries that are not all zero (the rest change nothing), when known.
    const m = only ? only.length : n;
    for (let j = 0; j < m; j++) {
      let i = only ? only[j]! : j;
      let p = base + i * ew;
      if (fast) {
        st[0] = alloc;
        st[1] = frag;
        st[2] = next;
        const stop = fastRun(dv, p, only ? 1 : n - i, arr, mult, Math.min(limit, refMax), lowMask, cb, cs, fileClusters, checkCopied ? ones! : EMPTY, st, this.words(arr), raw);
        alloc = st[0]!;
        frag = st[1]!;
        next = st[2]!;
        if (only) {
          if (stop > 0) continue;
        } else {
          i += stop;
          j = i;
          if (i >= n) break;
          p = base + i * ew;
        }
      }
      const hi = ((buf[p]! << 24) | (buf[p + 1]! << 16) | (buf[p + 2]! << 8) | buf[p + 3]!) >>> 0;
      const lo = ((buf[p + 4]! << 24) | (buf[p + 5]! << 16) | (buf[p + 6]! << 8) | buf[p + 7]!) >>> 0;
      let bhi = 0;
      let blo = 0;
      if (ext) {
        bhi = ((buf[p + 8]! << 24) | (buf[p + 9]! << 16) | (buf[p + 10]! << 8) | buf[p + 11]!) >>> 0;
        blo = ((buf[p + 12]! << 24) | (buf[p + 13]! << 16) | (buf[p + 14]! << 8) | buf[p + 15]!) >>> 0;
      }
      if (hi === 0 && lo === 0 && bhi === 0 && blo === 0) continue;
      if (hi & L.OFLAG_COMPRESSED_HI) {
        let ehi = hi;
        if (hi & L.OFLAG_COPIED_HI) {
          const mask = (1 << (62 - (cb - 8) - 32)) - 1;
          this.curMsgs.push(`ERROR: coffset=0x${hx(hi & mask, lo)}: copied flag must never be set for compressed clusters`);
          ehi = (hi & ~L.OFLAG_COPIED_HI) >>> 0;
          this.curCorr++;
        }
        if (dataFile) {
          this.curMsgs.push(`ERROR compressed cluster ${i} with data file, entry=0x${hx(ehi, lo)}`);
          this.curCorr++;
          continue;
        }
        if (bhi || blo) {
          this.curMsgs.push(`ERROR compressed cluster ${i} with non-zero subcluster allocation bitmap, entry=0x${hx(ehi, lo)}`);
          this.curCorr++;
          continue;
        }
        const sbits = 62 - (cb - 8) - 32;
        const coff = (ehi & ((1 << sbits) - 1)) * TWO32 + lo;
        const sectors = ((ehi >>> sbits) & ((1 << (cb - 8)) - 1)) + 1;
        const csize = sectors * 512 - (lo & 511);
        this.incData(coff, csize, mult, exact, hx(ehi & ((1 << sbits) - 1), lo));
        arr = this.arr.a;
        limit = this.arr.limit;
        alloc++;
        comp++;
        frag++;
        continue;
      }
      if (lo & L.L2E_RESERVED_LO || hi & L.L2E_RESERVED_HI) {
        this.curMsgs.push(`ERROR found l2 entry with reserved bits set: ${hx(hi, lo)}`);
        this.curCorr++;
      }
      const ohi = hi & L.OFFSET_MASK_HI;
      const olo = (lo & L.OFFSET_MASK_LO) >>> 0;
      const zero = !ext && (lo & L.OFLAG_ZERO_LO) !== 0;
      if (ohi === 0 && olo === 0) {
        // ZERO_PLAIN or UNALLOCATED
        if (!zero && ext && blo) {
          this.curCorr++;
          this.curMsgs.push('ERROR: Unallocated cluster has non-zero subcluster allocation map');
        }
        continue;
      }
      // NORMAL or ZERO_ALLOC
      const offset = ohi * TWO32 + olo;
      if (ext && bhi & blo) {
        this.curCorr++;
        this.curMsgs.push(`ERROR offset=${hx(ohi, olo)}: Allocated cluster has corrupted subcluster allocation bitmap`);
      }
      if (olo & (cs - 1)) {
        this.curCorr++;
        const containsData = ext ? blo !== 0 : !zero;
        if (!containsData) {
          if (fixErrors) {
            this.repairable = true;
            if (exact) {
              this.curMsgs.push(`Repairing offset=${hx(ohi, olo)}: Preallocated cluster is not properly aligned; L2 entry corrupted.`);
              // QEMU's overlap check guards this write like any other (an L2 offset inside the
              // header cluster would have the repair write over the header).
              const overlap = metadataOverlap(img, l2Offset + i * ew, ew, activeMult > 0 ? 'active L2 table' : null);
              if (overlap) {
                this.res.checkErrors++;
                this.refuseWrite(overlap, 'ERROR: Overlap check failed');
              }
              const e = new Uint8Array(ew);
              if (!ext) e[7] = 1;
              buf.set(e, p);
              img.file.write(e, l2Offset + i * ew);
              img.file.flush();
              this.curCorr--;
              this.res.corruptionsFixed++;
              continue;
            }
          }
          this.curMsgs.push(`ERROR offset=${hx(ohi, olo)}: Preallocated cluster is not properly aligned; L2 entry corrupted.`);
        } else {
          this.curMsgs.push(`ERROR offset=${hx(ohi, olo)}: Data cluster is not properly aligned; L2 entry corrupted.`);
        }
      }
      alloc++;
      if (next !== 0 && offset !== next) frag++;
      next = offset + cs;
      if (dataFile) {
        if (copied && !(hi & L.OFLAG_COPIED_HI)) this.curCopied.push(`ERROR OFLAG_COPIED data cluster: l2_entry=${hx(hi, lo)} refcount=1`);
        continue;
      }
      const ci = ohi * shiftHi + Math.floor(olo / cs);
      if (offset >= fileLen || exact || ci >= arr.length || olo & (cs - 1)) {
        this.incData(offset, cs, mult, exact, hx(ohi, olo));
        arr = this.arr.a;
        limit = this.arr.limit;
      } else {
        const v = arr[ci]! + mult;
        if (v > limit) {
          this.arr.add(ci, mult);
          arr = this.arr.a;
          limit = this.arr.limit;
        } else arr[ci] = v;
      }
      if (copied) {
        // OFLAG_COPIED must be set exactly where the stored refcount is 1.
        const one = ci < ones!.length * 8 ? (ones![ci >>> 3]! >>> (ci & 7)) & 1 : -1;
        const isCopied = (hi & L.OFLAG_COPIED_HI) !== 0;
        if (one === -1 || (one === 1) !== isCopied) {
          const rc = this.storedQuiet(ci);
          if (rc >= 0 && (rc === 1) !== isCopied) this.curCopied.push(`ERROR OFLAG_COPIED data cluster: l2_entry=${hx(hi, lo)} refcount=${this.rcStr(ci, rc)}`);
        }
      }
    }
    if (activeMult) {
      this.res.allocatedClusters += alloc * activeMult;
      this.res.fragmentedClusters += frag * activeMult;
      this.res.compressedClusters += comp * activeMult;
    }
  }

  /**
   * The file's length as QEMU's block layer reports it (whole 512-byte sectors), which
   * qcow2_inc_refcounts_imrt tests regions against: a table ending in a partial last sector
   * may reach that much further.
   */
  private get sectorEnd(): number {
    return Math.ceil(this.fileLen / 512) * 512;
  }

  /** qcow2_inc_refcounts_imrt for a data range found in an L2 table (findings go to curMsgs). */
  private incData(offset: number, size: number, mult: number, exact: boolean, offHex: string): void {
    if (offset + size - this.sectorEnd >= this.cs) {
      this.curMsgs.push(`ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x${offHex} size 0x${size.toString(16)}`);
      this.curCorr++;
      return;
    }
    this.incClusters(offset, size, mult, exact, this.curMsgs);
  }

  private incClusters(offset: number, size: number, mult: number, exact: boolean, out: string[]): void {
    const first = Math.floor(offset / this.cs);
    const last = Math.floor((offset + size - 1) / this.cs);
    for (let k = first; k <= last; k++) {
      if (k >= this.nb) this.nb = k + 1;
      this.arr.ensure(k + 1);
      if (exact) {
        if (this.arr.a[k]! >= this.refMax) {
          out.push(`ERROR: overflow cluster offset=0x${numHx(k * this.cs)}`);
          out.push(`Use ${this.prog} amend to increase the refcount entry width or ${this.prog} convert to create a clean copy if the image cannot be opened for writing`);
          if (out === this.curMsgs) this.curCorr++;
          else this.res.corruptions++;
          continue;
        }
        this.arr.add(k, 1);
      } else this.arr.add(k, mult);
    }
  }

  /** qcow2_inc_refcounts_imrt for metadata (messages straight to the output). */
  private inc(offset: number, size: number, exact: boolean, offHex?: string): void {
    if (size <= 0) return;
    if (offHex !== undefined && offHex.length === 16 && offHex >= '8') {
      // At or past 2^63 the offset is negative in QEMU's int64 test against the end of the
      // file, which only fires where the sum wraps around; otherwise the in-memory refcount
      // array is grown to the offset's cluster index, an allocation that cannot succeed.
      let past = BigInt(`0x${offHex}`) - TWO64 + BigInt(size) - BigInt(this.sectorEnd);
      if (past < -TWO63) past += TWO64;
      if (past < BigInt(this.cs)) {
        this.res.checkErrors++;
        throw new CheckAbort('Cannot allocate memory');
      }
    }
    if (offset + size - this.sectorEnd >= this.cs) {
      this.msgs.push(`ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x${offHex ?? numHx(offset)} size 0x${size.toString(16)}`);
      this.res.corruptions++;
      return;
    }
    this.incClusters(offset, size, 1, exact, this.msgs);
  }

  /** The traversal: header, L1 tables and their L2 tables, snapshot table, refcount table, bitmaps. */
  private replay(exact: boolean): void {
    const img = this.img;
    const cs = this.cs;
    this.inc(0, cs, exact);
    const scratch = exact ? new Uint8Array(cs) : null;
    let lastL2 = -1;
    let nonZero: Int32Array | null = null;
    for (const s of this.steps) {
      if (s.kind === 'msg') {
        this.msgs.push(s.msg);
        this.res.corruptions++;
        continue;
      }
      if (s.size === 0) continue;
      this.inc(s.hi * TWO32 + s.lo, s.size * 8, exact, hx(s.hi, s.lo));
      if (s.ioError) {
        this.msgs.push('ERROR: I/O error in check_refcounts_l1');
        this.res.checkErrors++;
        throw new CheckAbort('Input/output error');
      }
      const t = s.l1;
      for (let i = 0; i < s.size; i++) {
        const hi = u32(t, i * 8);
        const lo = u32(t, i * 8 + 4);
        if (hi === 0 && lo === 0) continue;
        if (hi & L.L1E_RESERVED_HI || lo & L.L1E_RESERVED_LO) {
          this.msgs.push(`ERROR found L1 entry with reserved bits set: ${hx(hi, lo)}`);
          this.res.corruptions++;
        }
        const ohi = hi & L.OFFSET_MASK_HI;
        const olo = (lo & L.OFFSET_MASK_LO) >>> 0;
        const l2 = ohi * TWO32 + olo;
        this.inc(l2, cs, exact, hx(ohi, olo));
        if (olo & (cs - 1)) {
          this.msgs.push(`ERROR l2_offset=${hx(ohi, olo)}: Table is not cluster aligned; L1 entry corrupted`);
          this.res.corruptions++;
        }
        if (exact) {
          // The same table as the last reference (snapshots sharing it): the scratch copy is
          // current, in-place repairs included.
          if (l2 !== lastL2) {
            if (l2 < this.fileLen) readAt(img.file, scratch!, l2);
            else scratch!.fill(0);
            lastL2 = l2;
            nonZero = sparseEntries(scratch!, img.l2EntryBytes);
          }
          this.curMsgs = this.msgs;
          this.curCorr = 0;
          this.scanL2(scratch!, 0, l2, 1, s.active ? 1 : 0, true, false, nonZero);
          this.res.corruptions += this.curCorr;
          this.curMsgs = [];
          this.curCorr = 0;
        } else {
          const f = this.findings.get(this.tableIndex(l2));
          if (f) {
            for (const m of f.msgs) this.msgs.push(m);
            this.res.corruptions += f.corruptions;
          }
        }
      }
    }
    this.inc(img.header.snapshotsOffset, img.snapshotsSize, exact);
    this.inc(img.reftableOffset, img.reftableClusters * cs, exact);
    this.bitmaps(exact);
  }

  private tableIndex(off: number): number {
    const u = this.uniq;
    let lo = 0;
    let hi = u.length - 1;
    while (lo <= hi) {
      const m = (lo + hi) >>> 1;
      const v = u[m]!;
      if (v === off) return m;
      if (v < off) lo = m + 1;
      else hi = m - 1;
    }
    return -1;
  }

  private bitmaps(exact: boolean): void {
    const b = this.img.header.bitmaps;
    if (!b || b.nbBitmaps === 0) return;
    this.inc(b.bitmapDirectoryOffset, b.bitmapDirectorySize, exact);
    const dirBuf = new Uint8Array(b.bitmapDirectorySize);
    readAt(this.img.file, dirBuf, b.bitmapDirectoryOffset);
    let dir;
    try {
      dir = decodeBitmapDirectory(dirBuf, b.nbBitmaps, b.bitmapDirectoryOffset);
    } catch {
      this.res.corruptions++;
      throw new CheckAbort('Invalid argument');
    }
    for (const bm of dir) {
      this.inc(bm.bitmapTableOffset, bm.bitmapTableSize * 8, exact);
      const t = new Uint8Array(bm.bitmapTableSize * 8);
      readAt(this.img.file, t, bm.bitmapTableOffset);
      for (let i = 0; i < bm.bitmapTableSize; i++) {
        const hi = u32(t, i * 8);
        const lo = u32(t, i * 8 + 4);
        // Reserved: bits 1-8 and 56-63; with an offset, bit 0 too; offsets are cluster aligned.
        const ohi = hi & 0x00ffffff;
        const olo = (lo & 0xfffffe00) >>> 0;
        const hasOff = ohi !== 0 || olo !== 0;
        if (hi & 0xff000000 || lo & 0x1fe || (hasOff && (lo & 1 || olo % this.cs))) {
          this.res.corruptions++;
          continue;
        }
        if (!hasOff) continue;
        this.inc(ohi * TWO32 + olo, this.cs, exact);
      }
    }
  }

  // ---- check_refblocks ----------------------------------------------------------------------

  private checkRefblocks(): void {
    const img = this.img;
    const rt = img.reftable;
    const cs = this.cs;
    for (let i = 0; i < img.reftableEntries; i++) {
      const hi = u32(rt, i * 8);
      const lo = u32(rt, i * 8 + 4);
      const offset = hi * TWO32 + ((lo & ~0x1ff) >>> 0);
      const cluster = Math.floor(offset / cs);
      if (lo & L.REFT_RESERVED_LO) {
        this.msgs.push(`ERROR refcount table entry ${i} has reserved bits set`);
        this.res.corruptions++;
        this.rebuild = true;
        continue;
      }
      if (offset % cs) {
        this.msgs.push(`ERROR refcount block ${i} is not cluster aligned; refcount table entry corrupted`);
        this.res.corruptions++;
        this.rebuild = true;
        continue;
      }
      if (cluster >= this.nb) {
        this.res.corruptions++;
        const fixing = (this.fix & FIX_ERRORS) !== 0;
        this.msgs.push(`${fixing ? 'Repairing' : 'ERROR'} refcount block ${i} is outside image`);
        if (fixing) {
          const failed = this.growForRefblock(hi, lo, cs);
          if (failed) {
            // As QEMU: the corruption stays counted and the rebuild puts the block elsewhere.
            this.rebuild = true;
            this.msgs.push(`ERROR could not resize image: ${failed}`);
            continue;
          }
          this.fileLen = img.file.size();
          const newNb = Math.ceil(this.fileLen / cs);
          this.fileClusters = newNb;
          if (newNb > this.nb) {
            this.arr.ensure(newNb + 1);
            this.nb = newNb;
          }
          this.res.corruptions--;
          this.res.corruptionsFixed++;
          this.inc(offset, cs, true);
        }
        continue;
      }
      if (offset !== 0) {
        this.inc(offset, cs, true);
        const rc = this.arr.a[cluster]!;
        if (rc !== 1) {
          this.msgs.push(`ERROR refcount block ${i} refcount=${rc}`);
          this.res.corruptions++;
          this.rebuild = true;
        }
      }
    }
  }

  /**
   * Grows the file so a refcount block past its end (table entry hi:lo) is inside it, as QEMU's
   * repair does. Returns the strerror() text of a refusal (after any message QEMU's block layer
   * prints for it), or null when the file grew. The limits are QEMU's: offset + cluster size must
   * fit in int64 (EINVAL) and not exceed its largest image length, INT64_MAX rounded down to
   * 1 GiB (EIO); past 2^53 no host file system qimg runs on can grow that far (EFBIG).
   */
  private growForRefblock(hi: number, lo: number, cs: number): string | null {
    const end = ((BigInt(hi) << 32n) | BigInt((lo & ~0x1ff) >>> 0)) + BigInt(cs);
    if (end > INT64_MAX) return 'Invalid argument';
    if (end > MAX_IMAGE_LENGTH) {
      this.msgs.push(`${this.prog}: offset(${end}) exceeds maximum(${MAX_IMAGE_LENGTH})`);
      return 'Input/output error';
    }
    let reason: string | null = null;
    if (end > BigInt(Number.MAX_SAFE_INTEGER)) reason = osReason({ code: 'EFBIG' } as NodeJS.ErrnoException);
    else {
      try {
        this.img.file.truncate(Number(end));
      } catch (err) {
        const errno = (err as QimgError).data?.errno;
        reason = osReason({ code: typeof errno === 'string' ? errno : undefined, message: (err as Error).message } as NodeJS.ErrnoException);
      }
    }
    if (reason !== null) this.msgs.push(`${this.prog}: Could not resize file: ${reason}`);
    return reason;
  }

  // ---- stored refcounts -----------------------------------------------------------------------

  /**
   * Whether this pass marked the image corrupt (a repair's fatal corruption event). QEMU then
   * drops the image's driver: its repairs go on, but nothing more is checked through it.
   */
  get markedCorrupt(): boolean {
    return this.signaled && this.img.file.writable;
  }

  /**
   * qcow2_signal_corruption: the first event is reported; on a writable image it is fatal and
   * marks a v3 image corrupt (a successful repair clears the bit again). Later events are silent.
   */
  private signalCorruption(what: string): void {
    if (this.signaled) return;
    this.signaled = true;
    const fatal = this.img.file.writable;
    // Version 2 headers have no feature bits: QEMU marks nothing on disk there.
    if (fatal && this.img.header.version >= 3) {
      const f = new Uint8Array(1);
      readAt(this.img.file, f, L.H_INCOMPATIBLE_FEATURES + 7);
      f[0] = f[0]! | (1 << L.INCOMPAT_CORRUPT);
      this.img.file.write(f, L.H_INCOMPATIBLE_FEATURES + 7);
      this.img.file.flush();
    }
    this.msgs.push(
      fatal
        ? `qcow2: Marking image as corrupt: ${what}; further corruption events will be suppressed`
        : `qcow2: Image is corrupt: ${what}; further non-fatal corruption events will be suppressed`,
    );
  }

  /**
   * QEMU's pre-write overlap check refusing a repair write onto `overlap`: the image is marked
   * corrupt, `msg` says which write failed, and the check fails.
   */
  private refuseWrite(overlap: string, msg: string | null): never {
    this.signalCorruption(`Preventing invalid write on metadata (overlaps with ${overlap})`);
    if (msg !== null) this.msgs.push(msg);
    throw new CheckAbort('Input/output error');
  }

  /** Before a rebuild writes a refcount block or table: metadata it could not count may be there. */
  private checkRebuildWrite(offset: number, size: number, what: 'refblock' | 'reftable'): void {
    const overlap = metadataOverlap(this.img, offset, size);
    if (overlap) this.refuseWrite(overlap, `${this.prog}: ERROR writing ${what}: Input/output error`);
  }

  /** The refcount block for reftable index t: bytes, null (none: all zero) or 'err' (unaligned). */
  private refblock(t: number, cache: boolean): Uint8Array | null | 'err' {
    const img = this.img;
    if (t >= img.reftableEntries) return null;
    const hi = u32(img.reftable, t * 8);
    const lo = u32(img.reftable, t * 8 + 4);
    const off = hi * TWO32 + ((lo & ~0x1ff) >>> 0);
    if (off === 0) return null;
    if (((lo & ~0x1ff) >>> 0) % this.cs) {
      // From the words, not `off`: past 2^53 the number has lost the low bits QEMU prints.
      this.signalCorruption(`Refblock offset 0x${hx(hi, (lo & ~0x1ff) >>> 0)} unaligned (reftable index: ${hxAlt(0, t)})`);
      return 'err';
    }
    if (this.unreadable(hi, lo)) return 'err';
    let b = this.blockCache.get(t);
    if (b) return b;
    if (cache && !this.fix && this.blockCache.size >= READONLY_CACHED_BLOCKS) {
      // Read-only: a few blocks are enough (lookups go in cluster order), and the oldest one's
      // buffer is reused rather than left for the GC (hundreds of them on a big image).
      const oldest = this.blockCache.keys().next().value!;
      b = this.blockCache.get(oldest)!;
      this.blockCache.delete(oldest);
    } else b = new Uint8Array(this.cs);
    if (off < this.fileLen) readAt(img.file, b, off);
    else b.fill(0);
    if (cache) this.blockCache.set(t, b);
    return b;
  }

  /**
   * A refcount block QEMU's block layer refuses to read (bdrv_pread: an offset of 2^63 or more,
   * or a block ending past its largest image length): every lookup in it is an I/O error, as an
   * unaligned one is, but without a corruption event. (Offsets this far out are exact only as
   * bigints; the block's alignment was tested on the low word, which a cluster size divides.)
   */
  private unreadable(hi: number, lo: number): boolean {
    if (hi < 0x3fffffff) return false; // below 2^62: far inside the limit
    return ((BigInt(hi) << 32n) | BigInt((lo & ~0x1ff) >>> 0)) + BigInt(this.cs) > MAX_IMAGE_LENGTH;
  }

  /** qcow2_get_refcount: the stored refcount of cluster ci, or -1 when it cannot be read. */
  private storedAt(ci: number): number {
    const bits = this.img.refblockBits;
    const t = Math.floor(ci / 2 ** bits);
    const b = this.refblock(t, true);
    if (b === 'err') return -1;
    if (b === null) return 0;
    return getRefcount(b, ci - t * 2 ** bits, this.img.refcountOrder);
  }

  /** storedAt without signalling corruption (the scan runs before QEMU's first lookup would). */
  private storedQuiet(ci: number): number {
    const bits = this.img.refblockBits;
    const t = Math.floor(ci / 2 ** bits);
    const b = this.peekRefblock(t);
    if (b === 'err') return -1;
    if (b === null) return 0;
    return getRefcount(b, ci - t * 2 ** bits, this.img.refcountOrder);
  }

  /** A stored refcount for a message: exact even past 2^53. */
  private rcStr(ci: number, rc: number): string {
    if (rc <= Number.MAX_SAFE_INTEGER) return String(rc);
    const bits = this.img.refblockBits;
    const t = Math.floor(ci / 2 ** bits);
    const b = this.peekRefblock(t);
    return b instanceof Uint8Array ? rcText(rc, b, ci - t * 2 ** bits, this.img.refcountOrder) : String(rc);
  }

  /** Bit per cluster: stored refcount == 1 (streamed once, for the OFLAG_COPIED checks in the scan). */
  private loadStoredOnes(): void {
    const n = this.fileClusters + 1;
    const ones = new Uint8Array(Math.ceil(n / 8));
    const per = 2 ** this.img.refblockBits;
    const order = this.img.refcountOrder;
    for (let t = 0; t * per < n; t++) {
      const b = this.peekRefblock(t);
      if (b === null) continue;
      if (b === 'err') {
        this.storedErrBlocks.add(t);
        continue;
      }
      const end = Math.min(per, n - t * per);
      const base = t * per;
      if (order === 4) ones16(b, ones, base, end);
      else {
        for (let i = 0; i < end; i++) if (getRefcount(b, i, order) === 1) ones[(base + i) >>> 3]! |= 1 << ((base + i) & 7);
      }
    }
    this.storedOne = ones;
  }

  /** For the read-only compare: the scratch block, signalling an unaligned one as QEMU does. */
  private peekOrSignal(t: number): Uint8Array | null | 'err' {
    const b = this.peekRefblock(t);
    return b === 'err' ? this.refblock(t, false) : b;
  }

  /** A refblock without caching and without signalling corruption (signalled when QEMU would). */
  private peekRefblock(t: number): Uint8Array | null | 'err' {
    const img = this.img;
    if (t >= img.reftableEntries) return null;
    const hi = u32(img.reftable, t * 8);
    const lo = u32(img.reftable, t * 8 + 4);
    const off = hi * TWO32 + ((lo & ~0x1ff) >>> 0);
    if (off === 0) return null;
    if (((lo & ~0x1ff) >>> 0) % this.cs || this.unreadable(hi, lo)) return 'err';
    const b = this.scratchBlock ?? (this.scratchBlock = new Uint8Array(this.cs));
    if (off < this.fileLen) readAt(img.file, b, off);
    else b.fill(0);
    return b;
  }
  private scratchBlock: Uint8Array | null = null;

  /** Writes cluster ci's refcount into its (existing) refcount block. */
  private writeStored(b: Uint8Array, t: number, i: number, value: number): void {
    const img = this.img;
    setRefcount(b, i, img.refcountOrder, value);
    const hi = u32(img.reftable, t * 8);
    const lo = u32(img.reftable, t * 8 + 4);
    const off = hi * TWO32 + ((lo & ~0x1ff) >>> 0);
    const bitsPer = 2 ** img.refcountOrder;
    const first = Math.floor((i * bitsPer) / 8);
    const bytes = Math.max(1, bitsPer / 8);
    img.file.write(b.subarray(first, first + bytes), off + first);
  }

  // ---- compare_refcounts ------------------------------------------------------------------------

  private compare(fix: number): void {
    const per = 2 ** this.img.refblockBits;
    const order = this.img.refcountOrder;
    const nb = this.nb;
    const a = this.arr.a;
    let highest = 0;
    let wrote = false;
    const discards: number[] = [];
    for (let t = 0; t * per < nb; t++) {
      const b = fix ? this.refblock(t, true) : this.peekOrSignal(t);
      const base = t * per;
      const end = Math.min(per, nb - base);
      if (b === 'err') {
        for (let i = 0; i < end; i++) {
          this.msgs.push(`Can't get refcount for cluster ${base + i}: Input/output error`);
          this.res.checkErrors++;
        }
        continue;
      }
      let i0 = 0;
      if (b === null) {
        // No stored block: only counted clusters can differ (refcount 0 against a reference).
        i0 = this.arr.nextNonZero(base, base + end) - base;
      } else if (order === 4 && a.length >= base + end) {
        // Fast path: 16-bit refcounts, stop at the first difference.
        const h = cmp16(b, a, base, end);
        i0 = h[0];
        if (h[1] >= 0) highest = h[1];
      }
      for (let i = i0; i < end; i++) {
        const r1 = b === null ? 0 : order === 4 ? (b[2 * i]! << 8) | b[2 * i + 1]! : getRefcount(b, i, order);
        const r2 = a[base + i] ?? 0;
        if (r1 > 0 || r2 > 0) highest = base + i;
        if (r1 === r2) continue;
        let fixed: 'leaks' | 'corr' | null = null;
        if (r1 === 0) this.rebuild = true;
        else if (r1 > r2 && fix & FIX_LEAKS) fixed = 'leaks';
        else if (r1 < r2 && fix & FIX_ERRORS) fixed = 'corr';
        const ci = base + i;
        this.msgs.push(`${fixed ? 'Repairing' : r1 < r2 ? 'ERROR' : 'Leaked'} cluster ${ci} refcount=${rcText(r1, b, i, order)} reference=${r2}`);
        if (fixed && b !== null) {
          this.writeStored(b, t, i, r2);
          wrote = true;
          if (r2 === 0) discards.push(ci);
          if (fixed === 'leaks') this.res.leaksFixed++;
          else this.res.corruptionsFixed++;
          continue;
        }
        if (r1 < r2) this.res.corruptions++;
        else this.res.leaks++;
      }
    }
    if (wrote) this.img.file.flush();
    if (discards.length) this.discardClusters(discards);
    this.highest = highest;
  }

  /**
   * Freed clusters read back as zeros afterwards, as QEMU's discard (hole punching) leaves them.
   * Runs after the refcount writes are flushed: nothing references these clusters any more.
   */
  private discardClusters(clusters: number[]): void {
    const cs = this.cs;
    const zeros = new Uint8Array(Math.min(this.chunk, 1 << 20));
    let i = 0;
    while (i < clusters.length) {
      let j = i + 1;
      while (j < clusters.length && clusters[j] === clusters[j - 1]! + 1) j++;
      const start = clusters[i]! * cs;
      const end = Math.min((clusters[j - 1]! + 1) * cs, this.fileLen);
      for (let off = start; off < end; off += zeros.length) {
        this.img.file.write(zeros.subarray(0, Math.min(zeros.length, end - off)), off);
      }
      i = j;
    }
    this.img.file.flush();
  }

  // ---- check_oflag_copied -------------------------------------------------------------------------

  /** The streaming form: findings gathered during the scan, emitted in active-L1 order. */
  private replayCopied(): void {
    const l1 = this.img.l1;
    const size = this.img.header.l1Size;
    for (let i = 0; i < size; i++) {
      const hi = u32(l1, i * 8);
      const lo = u32(l1, i * 8 + 4);
      const ohi = hi & L.OFFSET_MASK_HI;
      const olo = (lo & L.OFFSET_MASK_LO) >>> 0;
      if (ohi === 0 && olo === 0) continue;
      const l2 = ohi * TWO32 + olo;
      const rc = this.storedAt(Math.floor(l2 / this.cs));
      if (rc < 0) continue;
      if ((rc === 1) !== ((hi & L.OFLAG_COPIED_HI) !== 0)) {
        this.res.corruptions++;
        this.msgs.push(`ERROR OFLAG_COPIED L2 cluster: l1_index=${i} l1_entry=${hx(hi, lo)} refcount=${this.rcStr(Math.floor(l2 / this.cs), rc)}`);
      }
      const f = this.copiedFindings.get(this.tableIndex(l2));
      if (f) {
        for (const m of f) this.msgs.push(m);
        this.res.corruptions += f.length;
      }
    }
  }

  /** check_oflag_copied as QEMU runs it: per active L1 entry, re-reading the L2 table (and repairing). */
  private checkCopied(): void {
    const img = this.img;
    const cs = this.cs;
    const repair = this.fix & FIX_ERRORS ? true : this.fix & FIX_LEAKS ? !this.res.checkErrors && !this.res.corruptions && !this.res.leaks : false;
    const l1 = img.l1;
    const size = img.header.l1Size;
    const ew = img.l2EntryBytes;
    const t = new Uint8Array(cs);
    // Each fix flips one flag in place and none depends on another, so one flush at the end
    // orders them all before the header is marked clean (a flush per table cost an fsync each).
    let written = false;
    for (let i = 0; i < size; i++) {
      const hi = u32(l1, i * 8);
      const lo = u32(l1, i * 8 + 4);
      const ohi = hi & L.OFFSET_MASK_HI;
      const olo = (lo & L.OFFSET_MASK_LO) >>> 0;
      if (ohi === 0 && olo === 0) continue;
      const l2 = ohi * TWO32 + olo;
      let rc = this.storedAt(Math.floor(l2 / cs));
      if (rc < 0) continue;
      if ((rc === 1) !== ((hi & L.OFLAG_COPIED_HI) !== 0)) {
        this.res.corruptions++;
        this.msgs.push(`${repair ? 'Repairing' : 'ERROR'} OFLAG_COPIED L2 cluster: l1_index=${i} l1_entry=${hx(hi, lo)} refcount=${this.rcStr(Math.floor(l2 / this.cs), rc)}`);
        if (repair) {
          const nhi = (rc === 1 ? hi | L.OFLAG_COPIED_HI : hi & ~L.OFLAG_COPIED_HI) >>> 0;
          const at = img.header.l1TableOffset + i * 8;
          // QEMU writes the one entry after its overlap check; a refusal ends the check.
          const overlap = metadataOverlap(img, at, 8, 'active L1 table');
          if (overlap) {
            if (written) img.file.flush();
            this.res.checkErrors++;
            this.refuseWrite(overlap, null);
          }
          l1[i * 8] = nhi >>> 24;
          img.file.write(l1.subarray(i * 8, i * 8 + 8), at);
          written = true;
          this.res.corruptions--;
          this.res.corruptionsFixed++;
        }
      }
      if (l2 < this.fileLen) readAt(img.file, t, l2);
      else t.fill(0);
      let dirty = 0;
      for (let j = 0; j < img.l2Entries; j++) {
        const ehi = u32(t, j * ew);
        const elo = u32(t, j * ew + 4);
        if (ehi & L.OFLAG_COMPRESSED_HI) continue;
        const dhi = ehi & L.OFFSET_MASK_HI;
        const dlo = (elo & L.OFFSET_MASK_LO) >>> 0;
        if (dhi === 0 && dlo === 0) continue;
        if (img.hasDataFile) rc = 1;
        else {
          rc = this.storedAt(Math.floor((dhi * TWO32 + dlo) / cs));
          if (rc < 0) continue;
        }
        const dci = Math.floor((dhi * TWO32 + dlo) / cs);
        if ((rc === 1) !== ((ehi & L.OFLAG_COPIED_HI) !== 0)) {
          this.res.corruptions++;
          this.msgs.push(`${repair ? 'Repairing' : 'ERROR'} OFLAG_COPIED data cluster: l2_entry=${hx(ehi, elo)} refcount=${this.rcStr(dci, rc)}`);
          if (repair) {
            t[j * ew] = (rc === 1 ? ehi | L.OFLAG_COPIED_HI : ehi & ~L.OFLAG_COPIED_HI) >>> 24;
            dirty++;
          }
        }
      }
      if (dirty > 0) {
        const overlap = metadataOverlap(img, l2, cs, 'active L2 table');
        if (overlap) {
          if (written) img.file.flush();
          this.res.checkErrors++;
          this.refuseWrite(overlap, 'ERROR: Could not write L2 table; metadata overlap check failed: Input/output error');
        }
        img.file.write(t, l2);
        written = true;
        this.res.corruptions -= dirty;
        this.res.corruptionsFixed += dirty;
      }
    }
    if (written) img.file.flush();
  }

  // ---- rebuild_refcount_structure -------------------------------------------------------------------

  /**
   * Writes a new refcount table and blocks describing exactly the counted references (the old
   * structures are left in place and freed by the leak pass that follows). New clusters come from
   * the first free ones in the counted refcounts, as QEMU picks them: nothing references them, so
   * a crash before the header switch leaves the old structures in charge and at most leaks.
   * Ordering: refblocks, reftable, flush, then the 12 header bytes in one write, flush.
   */
  private rebuildRefcountStructure(): void {
    const img = this.img;
    const cs = this.cs;
    const bits = img.refblockBits;
    const per = 2 ** bits;
    this.blockCache.clear();
    // Clusters the old reftable still names (even through a broken entry QEMU did not count)
    // are never reused: until the header switch they are live metadata. QEMU reuses them and
    // then fails its own overlap check; here the rebuild goes elsewhere and succeeds.
    this.avoid.clear();
    const rtOld = img.reftable;
    for (let i = 0; i < img.reftableEntries; i++) {
      const hi = u32(rtOld, i * 8);
      const lo = u32(rtOld, i * 8 + 4);
      if (hi === 0 && lo === 0) continue;
      const c = Math.floor((hi * TWO32 + ((lo & ~0x1ff) >>> 0)) / cs);
      if (c > 0 && !this.arr.a[c]) this.avoid.add(c);
    }
    const state = { reftable: [] as number[], entries: 0 };
    let grown = this.writeRefblocks(0, this.nb, state);
    let reftableOffset = -1;
    let reftableClusters = 0;
    while (grown) {
      const first = { v: 0 };
      reftableClusters = Math.ceil((state.entries * 8) / cs);
      reftableOffset = this.allocImrt(reftableClusters, first);
      const start = reftableOffset / cs;
      grown = this.writeRefblocks(start, start + reftableClusters, state);
    }
    void per;
    const table = new Uint8Array(state.entries * 8);
    for (let i = 0; i < state.entries; i++) {
      const v = state.reftable[i] ?? 0;
      const hi = Math.floor(v / TWO32);
      const lo = v % TWO32;
      table[i * 8] = hi >>> 24;
      table[i * 8 + 1] = (hi >>> 16) & 0xff;
      table[i * 8 + 2] = (hi >>> 8) & 0xff;
      table[i * 8 + 3] = hi & 0xff;
      table[i * 8 + 4] = lo >>> 24;
      table[i * 8 + 5] = (lo >>> 16) & 0xff;
      table[i * 8 + 6] = (lo >>> 8) & 0xff;
      table[i * 8 + 7] = lo & 0xff;
    }
    this.checkRebuildWrite(reftableOffset, table.length, 'reftable');
    img.file.write(table, reftableOffset);
    img.file.flush();
    const hdr = new Uint8Array(12);
    const dv = new DataView(hdr.buffer);
    dv.setUint32(0, Math.floor(reftableOffset / TWO32));
    dv.setUint32(4, reftableOffset % TWO32);
    dv.setUint32(8, reftableClusters);
    img.file.write(hdr, L.H_REFCOUNT_TABLE_OFFSET);
    img.file.flush();
    img.reftableOffset = reftableOffset;
    img.reftableClusters = reftableClusters;
    const rt = new Uint8Array(reftableClusters * cs);
    rt.set(table);
    img.reftable = rt;
    this.fileLen = img.file.size();
    this.fileClusters = Math.ceil(this.fileLen / cs);
  }

  /** alloc_clusters_imrt: first run of `count` free clusters at or after first.v (may grow nb). */
  private allocImrt(count: number, first: { v: number }): number {
    let cluster = first.v;
    let run = 0;
    let firstGap = true;
    const a = () => this.arr.a;
    for (; cluster < this.nb && run < count; cluster++) {
      if (!a()[cluster] && !this.avoid.has(cluster)) {
        run++;
        if (firstGap) {
          first.v = cluster;
          firstGap = false;
        }
      } else if (run) run = 0;
    }
    if (run < count) {
      const n = cluster + count - run;
      this.arr.ensure(n + 1);
      this.nb = Math.max(this.nb, n);
    }
    cluster -= run;
    for (let i = 0; i < count; i++) this.arr.set(cluster + i, 1);
    return cluster * this.cs;
  }

  /** rebuild_refcounts_write_refblocks: returns true when the reftable had to grow. */
  private writeRefblocks(firstCluster: number, endCluster: number, state: { reftable: number[]; entries: number }): boolean {
    const img = this.img;
    const cs = this.cs;
    const bits = img.refblockBits;
    const per = 2 ** bits;
    const order = img.refcountOrder;
    let grown = false;
    const first = { v: 0 };
    for (let cluster = firstCluster; cluster < endCluster; cluster++) {
      cluster = this.arr.nextNonZero(cluster, endCluster);
      if (cluster >= endCluster) break;
      const idx = Math.floor(cluster / per);
      const start = idx * per;
      let off: number;
      if (state.entries > idx && state.reftable[idx]) off = state.reftable[idx]!;
      else {
        if (first.v < start) first.v = start;
        off = this.allocImrt(1, first);
        const oc = off / cs;
        if (oc >= endCluster) endCluster = oc + 1;
        if (state.entries <= idx) {
          state.entries = Math.ceil(((idx + 1) * 8) / cs) * (cs / 8);
          grown = true;
        }
        state.reftable[idx] = off;
      }
      const block = new Uint8Array(cs);
      const a = this.arr.a;
      for (let i = 0; i < per; i++) {
        const v = a[start + i] ?? 0;
        if (v) setRefcount(block, i, order, v);
      }
      this.checkRebuildWrite(off, cs, 'refblock');
      img.file.write(block, off);
      cluster = start + per - 1;
    }
    return grown;
  }

  // ---- qcow2_mark_clean / qcow2_mark_consistent -----------------------------------------------------

  private markCleanAndConsistent(): void {
    const img = this.img;
    // Version 2 has no feature bits: bytes 72-79 there belong to the first header extension.
    if (img.header.version < 3) return;
    const buf = new Uint8Array(8);
    readAt(img.file, buf, L.H_INCOMPATIBLE_FEATURES);
    const low = buf[7]!;
    const mask = (1 << L.INCOMPAT_DIRTY) | (1 << L.INCOMPAT_CORRUPT);
    if (low & mask) {
      img.file.flush();
      buf[7] = low & ~mask;
      img.file.write(buf.subarray(7, 8), L.H_INCOMPATIBLE_FEATURES + 7);
      img.file.flush();
    }
  }
}
