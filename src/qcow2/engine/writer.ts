// Changing a qcow2 image: guest writes with copy-on-write, zero writes, discard, compressed
// clusters, resize — and commit(), the ONE function that owns the on-disk write order.

import { createRequire } from 'node:module';
import { QimgError, hex } from '../errors.js';
import { LITTLE_ENDIAN_HOST, ints32, nonZeroEntries, setU32, setU64, u32 } from '../format/bytes.js';
import { ClusterKind, classifyL2, compressedByteLength, compressedOffset, encodeCompressed, encodeOffset, entryOffset, refcountTableEntryOffset } from '../format/entries.js';
import { buildExtensions, encodeHeader, hasIncompat, l1EntriesFor, type Header } from '../format/header.js';
import * as L from '../format/layout.js';
import type { BlockFile } from '../io/file.js';
import { StagedFile } from '../io/staged-file.js';
import { Qcow2Image } from './qcow2-image.js';
import { Refcounts } from './refcounts.js';
import { forEachL2 } from './tree.js';

/** Largest run of fresh clusters allocated and written at once. */
const MAX_RUN_CLUSTERS = 512;

/** Commit on our own once this many L2 tables are dirty, so memory stays bounded. */
const MAX_DIRTY_L2 = 512;

/** Header byte ranges a writer may change, each written in one write (one sector: atomic). */
const HDR_SIZE: [number, number] = [L.H_SIZE, L.H_SIZE + 8];
const HDR_L1: [number, number] = [L.H_L1_SIZE, L.H_L1_TABLE_OFFSET + 8];
const HDR_REFTABLE: [number, number] = [L.H_REFCOUNT_TABLE_OFFSET, L.H_REFCOUNT_TABLE_CLUSTERS + 4];
export const HDR_SNAPSHOTS: [number, number] = [L.H_NB_SNAPSHOTS, L.H_SNAPSHOTS_OFFSET + 8];
const HDR_FEATURES: [number, number] = [L.H_INCOMPATIBLE_FEATURES, L.H_AUTOCLEAR_FEATURES + 8];

export type Compressor = (data: Uint8Array) => Uint8Array;

export class ImageWriter {
  readonly refs: Refcounts;
  readonly header: Header;
  readonly clusterSize: number;
  private dirtyL1 = new Set<number>();
  /** The whole active L1 was replaced: written in one write at commit. */
  private l1Replaced = false;
  private oldL1: { offset: number; size: number } | null = null;
  private dirtyHeader: Array<[number, number]> = [];
  private failed: unknown = null;
  /** Byte cursor inside a cluster being filled with compressed data. */
  private compCursor: number | null = null;

  /** Every write of this writer goes through here: coalesced, in order, fsynced at flush(). */
  readonly io: StagedFile;

  constructor(
    readonly img: Qcow2Image,
    opts: { durable?: boolean } = {},
  ) {
    const h = img.header;
    this.io = new StagedFile(img.file, opts.durable ?? true);
    if (!img.file.writable) throw new QimgError('READ_ONLY', `'${img.filename}' is open read-only`);
    if (hasIncompat(h, L.INCOMPAT_CORRUPT)) {
      throw new QimgError('READ_ONLY', `Could not open '${img.filename}': qcow2: Image is corrupt; cannot be opened read/write`);
    }
    if (hasIncompat(h, L.INCOMPAT_DIRTY)) {
      // openWriter repairs dirty images first; a writer built directly on one would trust bad refcounts.
      throw new QimgError('UNSUPPORTED', `Could not open '${img.filename}': the image was not cleanly shut down (dirty bit); open it with openWriter() to repair it`);
    }
    if (h.cryptMethod !== L.CRYPT_NONE) throw new QimgError('UNSUPPORTED', `Could not open '${img.filename}': writing encrypted images is not supported`);
    this.header = h;
    this.clusterSize = img.clusterSize;
    this.refs = new Refcounts(this.io, h.clusterBits, h.refcountOrder, h.refcountTableOffset, h.refcountTableClusters);
    this.protectMetadata();
    this.assertRefcountStructures();
    this.assertTreeClear(img.l1, 'active L1 table');
    // The last line of QEMU's overlap check: nothing but the header is ever written to cluster 0.
    this.io.guard = (pos) => {
      if (pos < this.clusterSize && !this.writingHeader) {
        throw new QimgError('CORRUPT', `'${img.filename}': refusing to write metadata at ${hex(pos)}, inside the image header; the image is corrupt, run 'qimg check -r all'`);
      }
    };
    // Unknown autoclear bits must be cleared before the first write (spec).
    const known = (1n << BigInt(L.AUTOCLEAR_BITMAPS)) | (1n << BigInt(L.AUTOCLEAR_DATA_FILE_RAW));
    if ((h.autoclearFeatures & ~known) !== 0n) {
      h.autoclearFeatures &= known;
      this.dirtyHeader.push(HDR_FEATURES);
    }
  }

  /**
   * QEMU's overlap check, as an allocator rule: clusters that hold metadata now are never handed
   * out, even when a corrupt refcount says they are free (the operation is refused instead).
   */
  private protectMetadata(): void {
    const { img, refs, header: h } = this;
    refs.protectRefcountStructures();
    refs.protect(h.l1TableOffset, h.l1Size * 8);
    for (let i = 0; i * 8 < img.l1.length; i++) {
      const off = entryOffset(u32(img.l1, i * 8), u32(img.l1, i * 8 + 4));
      if (off !== 0) refs.protect(off, img.clusterSize);
    }
    refs.protect(h.snapshotsOffset, img.snapshotTableBytes);
    for (const sn of img.snapshots) {
      if (sn.l1Size <= L.MAX_L1_ENTRIES) refs.protect(sn.l1TableOffset, sn.l1Size * 8);
      else refs.fence(sn.l1TableOffset, sn.l1Size * 8, { file: img.filename, table: `the L1 table of snapshot ${sn.id}, whose l1_size ${hex(sn.l1Size)} is too large` });
    }
  }

  /**
   * Refuses an L1 table whose entries a write could follow onto something that is not an L2
   * table: an entry with flags but no offset (QEMU would take the header for its L2 table), an
   * unaligned offset, one past the end of the file, or one naming the header, the refcount table,
   * a refcount block, an L1 table or the snapshot table. Writes that rewrite L2 tables (guest
   * writes, OFLAG_COPIED passes) would otherwise overwrite that metadata; QEMU's overlap check
   * refuses them one write at a time, qimg before the first write.
   */
  assertTreeClear(l1: Uint8Array, what: string): void {
    const cs = this.clusterSize;
    const other = this.otherMetadata();
    for (let i = 0; i * 8 < l1.length; i++) {
      const hi = u32(l1, i * 8);
      const lo = u32(l1, i * 8 + 4);
      const off = entryOffset(hi, lo);
      const bad =
        off === 0
          ? hi !== 0 || lo !== 0
            ? `has flags set (${hex(hi * 2 ** 32 + lo)}) but no L2 table offset`
            : null
          : off % cs !== 0
            ? `points to unaligned L2 table offset ${hex(off)}`
            : off + cs > this.img.fileSize
              ? `points to L2 table offset ${hex(off)} past the end of the file`
              : other.has(off / cs)
                ? `points to ${hex(off)}, which holds the ${other.get(off / cs)}`
                : null;
      if (bad) throw new QimgError('CORRUPT', `'${this.img.filename}': ${what}: entry ${i} ${bad}; the image is corrupt, run 'qimg check -r all'`);
    }
  }

  private writingHeader = false;

  /**
   * Refuses a refcount change that would free metadata still in use: clusters in `zeros` (now at
   * refcount 0) that hold the header, a refcount structure, an L1 table (but `allowed`, the one
   * being dropped) or the snapshot table, or (`activeL2Freeable` false) an active L2 table.
   */
  assertFreesNoMetadata(zeros: readonly number[], allowed: string | null, activeL2Freeable: boolean): void {
    const { img } = this;
    const cs = this.clusterSize;
    const other = this.otherMetadata();
    const activeL2 = activeL2Freeable ? new Set<number>() : this.activeL2Clusters();
    for (const ci of zeros) {
      const holds = other.get(ci) ?? (activeL2.has(ci) ? 'active L2 table' : undefined);
      if (holds !== undefined && holds !== allowed) {
        throw new QimgError('CORRUPT', `'${img.filename}': cluster ${hex(ci * cs)} holds the ${holds} but its refcount would drop to 0 (a table entry names it as data); the image is corrupt, run 'qimg check -r all'`);
      }
    }
  }

  /**
   * Refuses refcounts (as they stand in memory, mid-edit) that the active tree contradicts: a
   * data cluster named by a shared active L2 table is reached by every L1 table sharing it, so
   * its refcount must be at least 2. A damaged snapshot entry naming such a cluster makes a
   * delete lower it once more than its references drop: qemu-img 7.2 then sets OFLAG_COPIED on
   * it while it is still shared (the next guest write would change a snapshot's data in place),
   * and recomputeCopied does not look into shared tables. `unsharedToo` (some cluster reached 0):
   * the unshared tables are read as well, and their data clusters must keep a refcount of 1.
   */
  assertActiveDataCounted(unsharedToo: boolean): void {
    const { img, refs } = this;
    const cs = this.clusterSize;
    const shared = new Map<number, number>();
    const tables: number[] = [];
    for (let i = 0; i * 8 < img.l1.length; i++) {
      const off = entryOffset(u32(img.l1, i * 8), u32(img.l1, i * 8 + 4));
      if (off === 0) continue;
      const rc = refs.get(off / cs);
      if (rc >= 2) shared.set(off, rc);
      if (rc >= 2 || unsharedToo) tables.push(off);
    }
    const ew = this.entryWidth();
    forEachL2(img, tables, (off, table) => {
      const sharers = shared.get(off);
      const e = firstUncounted(table, refs, img.clusterBits, ew, sharers === undefined ? 1 : 2);
      if (e < 0) return;
      const data = entryOffset(u32(table, e * ew), u32(table, e * ew + 4));
      const held = sharers === undefined ? `the active L2 table at ${hex(off)}` : `the active L2 table at ${hex(off)}, which ${sharers} L1 tables share,`;
      throw new QimgError('CORRUPT', `'${img.filename}': cluster ${hex(data)} is data of ${held} but its refcount would be ${refs.get(Math.floor(data / cs))} (another table entry names it without counting it); the image is corrupt, run 'qimg check -r all'`);
    });
  }

  /**
   * Refuses snapshot entries whose L1 table reaches past the end of the file or into other
   * metadata (an active L2 table included): a snapshot operation writes new tables into free
   * clusters, and such an entry would then read them as its own L1 entries.
   */
  assertSnapshotsClear(): void {
    const { img } = this;
    const cs = this.clusterSize;
    const other = this.otherMetadata();
    const activeL2 = this.activeL2Clusters();
    for (const sn of img.snapshots) {
      if (sn.l1Size === 0 || sn.l1Size > L.MAX_L1_ENTRIES) continue; // the operations refuse oversized tables themselves
      const own = `L1 table of snapshot ${sn.id}`;
      const fail = (what: string) => {
        throw new QimgError('CORRUPT', `'${img.filename}': snapshot ${sn.id}: its L1 table at ${hex(sn.l1TableOffset)} (${sn.l1Size} entries) ${what}; the image is corrupt, run 'qimg check -r all'`);
      };
      const end = sn.l1TableOffset + sn.l1Size * 8;
      if (sn.l1TableOffset % cs !== 0) fail('is unaligned');
      if (end > img.fileSize) fail('reaches past the end of the file');
      for (let c = sn.l1TableOffset / cs; c * cs < end; c++) {
        const holds = other.get(c);
        if (holds !== undefined && holds !== own) fail(`overlaps the ${holds}`);
        if (activeL2.has(c)) fail('overlaps an active L2 table');
      }
    }
  }

  /**
   * Refuses refcount structures a write would follow onto other data: a refcount table not
   * wholly inside the file, or a refcount block that is unaligned, past the end of the file, or
   * in the header, the refcount table, an L1 table, the snapshot table or an active L2 table.
   * (Writing such a block's refcounts would overwrite what is really there.)
   */
  private assertRefcountStructures(): void {
    const { img, refs } = this;
    const cs = this.clusterSize;
    const fail = (what: string) => {
      throw new QimgError('CORRUPT', `'${img.filename}': ${what}; the image is corrupt, run 'qimg check -r all'`);
    };
    if (refs.location.offset + refs.location.clusters * cs > img.fileSize) fail(`the refcount table at ${hex(refs.location.offset)} lies past the end of the file`);
    const other = this.otherMetadata();
    const activeL2 = this.activeL2Clusters();
    const rt = refs.reftable;
    for (const t of nonZeroEntries(rt)) {
      const off = refcountTableEntryOffset(u32(rt, t * 8), u32(rt, t * 8 + 4));
      if (off === 0) continue;
      const where = `refcount table entry ${t} (refcount block at ${hex(off)})`;
      if (off % cs !== 0) fail(`${where} is unaligned`);
      if (off + cs > img.fileSize) fail(`${where} lies past the end of the file`);
      const holds = other.get(off / cs);
      if (holds !== undefined && holds !== 'refcount block') fail(`${where} overlaps the ${holds}`);
      if (activeL2.has(off / cs)) fail(`${where} overlaps an L2 table`);
    }
  }

  /** Host cluster indices of the active tree's L2 tables. */
  private activeL2Clusters(): Set<number> {
    const { l1 } = this.img;
    const out = new Set<number>();
    for (let i = 0; i * 8 < l1.length; i++) {
      const off = entryOffset(u32(l1, i * 8), u32(l1, i * 8 + 4));
      if (off !== 0) out.add(off / this.clusterSize);
    }
    return out;
  }

  /**
   * Host clusters of the metadata that is not an L2 table, with what each holds. Built afresh
   * each time: operations move the snapshot table and add L1 tables and refcount blocks.
   */
  private otherMetadata(): Map<number, string> {
    const { img, header: h } = this;
    const cs = this.clusterSize;
    const m = new Map<number, string>();
    const mark = (off: number, bytes: number, what: string) => {
      if (off === 0 && bytes === 0) return;
      const end = Math.min(off + Math.max(bytes, 1), img.fileSize + cs);
      for (let c = Math.floor(off / cs); c * cs < end; c++) if (!m.has(c)) m.set(c, what);
    };
    mark(0, cs, 'image header');
    const rt = this.refs.reftable;
    mark(this.refs.location.offset, this.refs.location.clusters * cs, 'refcount table');
    for (const t of nonZeroEntries(rt)) {
      const off = refcountTableEntryOffset(u32(rt, t * 8), u32(rt, t * 8 + 4));
      if (off !== 0) mark(off, cs, 'refcount block');
    }
    mark(h.l1TableOffset, h.l1Size * 8, 'active L1 table');
    if (h.nbSnapshots) mark(h.snapshotsOffset, img.snapshotTableBytes, 'snapshot table');
    for (const sn of img.snapshots) if (sn.l1Size <= L.MAX_L1_ENTRIES) mark(sn.l1TableOffset, sn.l1Size * 8, `L1 table of snapshot ${sn.id}`);
    return m;
  }

  get file(): BlockFile {
    return this.io;
  }

  /** Guest data writes: refused for external data files (their clusters are not refcounted). */
  private dataGuard(): void {
    this.guard();
    if (hasIncompat(this.header, L.INCOMPAT_DATA_FILE)) {
      throw new QimgError('UNSUPPORTED', `'${this.img.filename}': writing guest data of an image with an external data file is not supported yet`);
    }
    // Guest writes rewrite active tables and allocate: a snapshot L1 table lying on them (or
    // past the end of the file, where new clusters go) would take those changes as its own.
    // QEMU's overlap check refuses such writes one at a time; qimg before the first.
    if (!this.snapshotsCleared) {
      this.assertSnapshotsClear();
      this.snapshotsCleared = true;
    }
  }
  private snapshotsCleared = false;

  private guard(): void {
    if (this.failed) throw new QimgError('IO', `'${this.img.filename}': an earlier write failed; the image was left crash-consistent and must be reopened`);
  }

  // ---------------------------------------------------------------- guest writes

  /** Writes guest bytes; nothing reaches the tables on disk before commit(). */
  write(data: Uint8Array, offset: number): void {
    this.dataGuard();
    this.checkRange(offset, data.length);
    const cs = this.clusterSize;
    let done = 0;
    while (done < data.length) {
      const pos = offset + done;
      const gc = Math.floor(pos / cs);
      const inCluster = pos - gc * cs;
      if (inCluster === 0 && data.length - done >= 2 * cs && !this.img.extendedL2) {
        const n = this.writeFreshRun(gc, data.subarray(done, done + Math.min(data.length - done, MAX_RUN_CLUSTERS * cs)));
        if (n > 0) {
          done += n * cs;
          this.maybeCommit();
          continue;
        }
      }
      const n = Math.min(cs - inCluster, data.length - done);
      this.writeCluster(gc, inCluster, data.subarray(done, done + n));
      done += n;
      this.maybeCommit();
    }
  }

  /**
   * Whole clusters that hold no data of their own (unallocated or plain zero) take new,
   * contiguous host clusters written with ONE write — how a large guest write fills an image.
   * Returns how many clusters it wrote (0: the first one does not qualify).
   */
  private writeFreshRun(gc: number, run: Uint8Array): number {
    const cs = this.clusterSize;
    const runs = this.placeFresh(gc, Math.floor(run.length / cs));
    let n = 0;
    for (const r of runs) {
      // Only the in-memory tables point at the clusters yet: the data lands before commit() writes them.
      this.hostWrite(run.subarray((r.gc - gc) * cs, (r.gc - gc + r.count) * cs), r.host);
      n += r.count;
    }
    return n;
  }

  /**
   * For a caller that writes guest data itself (convert's overlapped copy): whole guest clusters
   * from `gc` on that hold no data of their own get fresh host clusters, contiguous where the
   * allocator allows, and the in-memory tables point at them. Returns the host runs (covering
   * `count` clusters or fewer: the first that holds data stops it; [] for extended L2 images,
   * which take write()). Every run's data must be written before the next commit(), which is
   * when the tables reach the file; no commit happens in here. A last cluster cut by the
   * virtual size is placed whole: write all of it (zero padded).
   */
  placeClusters(gc: number, count: number): Array<{ gc: number; host: number; count: number }> {
    this.dataGuard();
    const cs = this.clusterSize;
    this.checkRange(gc * cs, Math.min(count * cs, this.img.virtualSize - gc * cs));
    if (this.img.extendedL2) return [];
    const runs = this.placeFresh(gc, count);
    for (const r of runs) this.noteWrite(r.host + r.count * cs);
    return runs;
  }

  private placeFresh(gc: number, max: number): Array<{ gc: number; host: number; count: number }> {
    const cs = this.clusterSize;
    const l2Entries = this.img.l2Entries;
    const slots: Array<{ table: Uint8Array; index: number }> = [];
    // One table lookup per L2 table the run crosses, not one per cluster.
    let table: Uint8Array | null = null;
    let tableL1 = -1;
    for (let k = 0; k < max; k++) {
      const g = gc + k;
      if (Math.floor(g / l2Entries) !== tableL1) {
        table = this.l2ForWrite(g).table;
        tableL1 = Math.floor(g / l2Entries);
      }
      const index = g % l2Entries;
      const kind = classifyL2(u32(table!, index * 8), u32(table!, index * 8 + 4), this.img.zeroFlag);
      if (kind !== ClusterKind.Unallocated && kind !== ClusterKind.ZeroPlain) break;
      slots.push({ table: table!, index });
    }
    const runs: Array<{ gc: number; host: number; count: number }> = [];
    for (let k = 0; k < slots.length; ) {
      const { offset, count } = this.refs.allocUpTo(slots.length - k);
      for (let j = 0; j < count; j++) {
        const slot = slots[k + j]!;
        const [h2, l2] = encodeOffset(offset + j * cs, true);
        this.setEntry(slot.table, slot.index, h2, l2);
      }
      runs.push({ gc: gc + k, host: offset, count });
      k += count;
    }
    return runs;
  }

  /** True when enough tables are dirty that the caller should commit() (see placeClusters). */
  get commitDue(): boolean {
    return this.img.dirtyL2.size >= MAX_DIRTY_L2;
  }

  private checkRange(offset: number, length: number): void {
    if (offset < 0 || length < 0 || offset + length > this.img.virtualSize) {
      throw new QimgError('USAGE', `write of ${length} bytes at ${hex(offset)} lies outside the image (${this.img.virtualSize} bytes)`);
    }
  }

  private maybeCommit(): void {
    if (this.img.dirtyL2.size >= MAX_DIRTY_L2) this.commit();
  }

  private noteWrite(end: number): void {
    if (end > this.img.fileSize) this.img.fileSize = end;
  }

  private hostWrite(buf: Uint8Array, pos: number): void {
    this.file.write(buf, pos);
    this.noteWrite(pos + buf.length);
  }

  /** The entry slot for guest cluster `gc` in a table only the active L1 references. */
  private l2ForWrite(gc: number): { table: Uint8Array; index: number } {
    const img = this.img;
    const cs = this.clusterSize;
    const l1Index = Math.floor(gc / img.l2Entries);
    if (l1Index * 8 >= img.l1.length) throw new QimgError('USAGE', `guest cluster ${gc} lies beyond the L1 table`);
    const off = entryOffset(u32(img.l1, l1Index * 8), u32(img.l1, l1Index * 8 + 4));
    const index = gc % img.l2Entries;
    if (off === 0) {
      const fresh = this.refs.alloc(1);
      const table = new Uint8Array(cs);
      img.dirtyL2.set(fresh, table);
      this.setL1(l1Index, fresh);
      return { table, index };
    }
    const table = img.l2Table(off);
    if (this.refs.get(off / cs) === 1) {
      img.dirtyL2.set(off, table);
      return { table, index };
    }
    // Shared with a snapshot: the active tree gets its own copy. Data refcounts already count
    // every L1 that reaches a cluster, so only the table's own refcount moves.
    const copy = table.slice();
    const fresh = this.refs.alloc(1);
    img.dirtyL2.set(fresh, copy);
    this.setL1(l1Index, fresh);
    this.refs.add(off / cs, -1);
    return { table: copy, index };
  }

  private setL1(index: number, l2Offset: number): void {
    const [hi, lo] = encodeOffset(l2Offset, l2Offset !== 0);
    setU32(this.img.l1, index * 8, hi);
    setU32(this.img.l1, index * 8 + 4, lo);
    this.dirtyL1.add(index);
  }

  private entryWidth(): number {
    return this.img.extendedL2 ? 16 : 8;
  }

  private setEntry(table: Uint8Array, index: number, hi: number, lo: number): void {
    const w = this.entryWidth();
    setU32(table, index * w, hi);
    setU32(table, index * w + 4, lo);
  }

  /** Drops the active tree's reference held by an L2 entry (data or compressed clusters). */
  private releaseEntry(hi: number, lo: number): void {
    const kind = classifyL2(hi, lo, this.img.zeroFlag);
    switch (kind) {
      case ClusterKind.Normal:
      case ClusterKind.ZeroAlloc:
        this.refs.add(entryOffset(hi, lo) / this.clusterSize, -1);
        return;
      case ClusterKind.Compressed: {
        const off = compressedOffset(hi, lo, this.img.clusterBits);
        this.refs.freeBytes(off - (off % L.COMPRESSED_SECTOR_SIZE), compressedByteLength(hi, lo, this.img.clusterBits) + (off % L.COMPRESSED_SECTOR_SIZE));
        this.dropCompressedCache(off);
        return;
      }
      case ClusterKind.Unallocated:
        if (this.img.extendedL2 && entryOffset(hi, lo) !== 0) this.refs.add(entryOffset(hi, lo) / this.clusterSize, -1);
        return;
      case ClusterKind.ZeroPlain:
        return;
    }
  }

  private dropCompressedCache(off: number): void {
    if (this.img.lastCompressed?.offset === off) this.img.lastCompressed = null;
  }

  /** Current guest content of cluster `gc` (backing, zeros, compressed or data), read before any change. */
  private guestCluster(gc: number): Uint8Array {
    this.io.drain(); // the reader reads the file directly: staged writes must land first
    const buf = new Uint8Array(this.clusterSize);
    this.img.read(buf, gc * this.clusterSize);
    return buf;
  }

  private writeCluster(gc: number, inCluster: number, data: Uint8Array): void {
    if (this.img.extendedL2) return this.writeSubclusters(gc, inCluster, data);
    const cs = this.clusterSize;
    // Read the old guest content first: the partial-write fill must see the state before this write.
    const whole = data.length === cs;
    const { table, index } = this.l2ForWrite(gc);
    const hi = u32(table, index * 8);
    const lo = u32(table, index * 8 + 4);
    const kind = classifyL2(hi, lo, this.img.zeroFlag);
    const host = entryOffset(hi, lo);
    if ((kind === ClusterKind.Normal || kind === ClusterKind.ZeroAlloc) && this.refs.get(host / cs) === 1) {
      if (kind === ClusterKind.Normal) {
        this.hostWrite(data, host + inCluster);
      } else {
        const full = new Uint8Array(cs);
        full.set(data, inCluster);
        this.hostWrite(full, host);
        const [h2, l2] = encodeOffset(host, true);
        this.setEntry(table, index, h2, l2);
      }
      return;
    }
    let full: Uint8Array;
    if (whole) full = data;
    else {
      full = this.guestCluster(gc);
      full.set(data, inCluster);
    }
    const fresh = this.refs.alloc(1);
    this.hostWrite(full, fresh); // data lands before any table points at it
    const [h2, l2] = encodeOffset(fresh, true);
    this.setEntry(table, index, h2, l2);
    this.releaseEntry(hi, lo);
  }

  /** Extended L2: only the touched subclusters are allocated; the rest keep their state. */
  private writeSubclusters(gc: number, inCluster: number, data: Uint8Array): void {
    const cs = this.clusterSize;
    const scs = this.img.subclusterSize;
    const guestBase = gc * cs;
    // Fill data for partially covered, not yet allocated subclusters comes from the old state.
    const first = Math.floor(inCluster / scs);
    const last = Math.floor((inCluster + data.length - 1) / scs);
    const old = this.guestCluster(gc);
    const { table, index } = this.l2ForWrite(gc);
    const hi = u32(table, index * 16);
    const lo = u32(table, index * 16 + 4);
    let zeroBits = u32(table, index * 16 + 8);
    let allocBits = u32(table, index * 16 + 12);
    let host = (hi & L.OFLAG_COMPRESSED_HI) ? 0 : entryOffset(hi, lo);
    let target: number;
    if (hi & L.OFLAG_COMPRESSED_HI) {
      // A compressed cluster has no subclusters: it becomes a normal cluster holding all of it.
      target = this.refs.alloc(1);
      this.hostWrite(old, target);
      this.releaseEntry(hi, lo);
      allocBits = 0xffffffff;
      zeroBits = 0;
    } else if (host !== 0 && this.refs.get(host / cs) === 1) {
      target = host;
    } else {
      target = this.refs.alloc(1);
      if (host !== 0) {
        // Shared: copy the allocated subclusters' host bytes, then drop our reference.
        const bytes = new Uint8Array(cs);
        this.file.read(bytes, host);
        this.hostWrite(bytes, target);
        this.refs.add(host / cs, -1);
      }
    }
    host = target;
    for (let sc = first; sc <= last; sc++) {
      const scStart = sc * scs;
      const from = Math.max(inCluster, scStart);
      const to = Math.min(inCluster + data.length, scStart + scs);
      const bit = 1 << sc;
      if (allocBits & bit) {
        this.hostWrite(data.subarray(from - inCluster, to - inCluster), host + from);
      } else {
        const sub = old.slice(scStart, scStart + scs);
        sub.set(data.subarray(from - inCluster, to - inCluster), from - scStart);
        this.hostWrite(sub, host + scStart);
      }
      allocBits = (allocBits | bit) >>> 0;
      zeroBits = (zeroBits & ~bit) >>> 0;
    }
    void guestBase;
    const [h2, l2] = encodeOffset(host, true);
    this.setEntry(table, index, h2, l2);
    setU32(table, index * 16 + 8, zeroBits);
    setU32(table, index * 16 + 12, allocBits);
  }

  /**
   * Makes guest bytes read as zero. Whole clusters become zero entries (v3) or are released
   * (v2 without a backing file); partial clusters are written with zeros. `unmap` releases the
   * host cluster instead of keeping it preallocated.
   */
  writeZeroes(offset: number, length: number, unmap = false): void {
    this.dataGuard();
    this.checkRange(offset, length);
    const cs = this.clusterSize;
    let pos = offset;
    const end = offset + length;
    while (pos < end) {
      const gc = Math.floor(pos / cs);
      const inCluster = pos - gc * cs;
      const n = Math.min(cs - inCluster, end - pos);
      const wholeCluster = n === cs || (inCluster === 0 && gc * cs + n >= this.img.virtualSize);
      if (!wholeCluster || !this.zeroWholeCluster(gc, unmap)) {
        if (!this.readsZero(pos, n)) this.writeCluster(gc, inCluster, new Uint8Array(n));
      }
      pos += n;
      this.maybeCommit();
    }
  }

  private readsZero(pos: number, n: number): boolean {
    const ext = this.img.extent(pos, n);
    return ext.kind === 'zero' && ext.length >= n;
  }

  /** Returns false when the format cannot express a zero cluster here (caller writes zeros). */
  private zeroWholeCluster(gc: number, unmap: boolean): boolean {
    const img = this.img;
    if (img.extendedL2) {
      const { table, index } = this.l2ForWrite(gc);
      const hi = u32(table, index * 16);
      const lo = u32(table, index * 16 + 4);
      const host = (hi & L.OFLAG_COMPRESSED_HI) ? 0 : entryOffset(hi, lo);
      if (hi & L.OFLAG_COMPRESSED_HI || (unmap && host !== 0)) {
        this.releaseEntry(hi, lo);
        this.setEntry(table, index, 0, 0);
      }
      setU32(table, index * 16 + 8, 0xffffffff);
      setU32(table, index * 16 + 12, 0);
      return true;
    }
    if (!img.zeroFlag) {
      // v2 has no zero flag: releasing works only when nothing shows through from a backing file.
      if (img.backing) return false;
      const { table, index } = this.l2ForWrite(gc);
      this.releaseEntry(u32(table, index * 8), u32(table, index * 8 + 4));
      this.setEntry(table, index, 0, 0);
      return true;
    }
    const { table, index } = this.l2ForWrite(gc);
    const hi = u32(table, index * 8);
    const lo = u32(table, index * 8 + 4);
    const kind = classifyL2(hi, lo, true);
    const host = entryOffset(hi, lo);
    if (!unmap && (kind === ClusterKind.Normal || kind === ClusterKind.ZeroAlloc) && this.refs.get(host / this.clusterSize) === 1) {
      const [h2, l2] = encodeOffset(host, true, true);
      this.setEntry(table, index, h2, l2);
      return true;
    }
    this.releaseEntry(hi, lo);
    this.setEntry(table, index, 0, L.OFLAG_ZERO_LO);
    return true;
  }

  /** Discards whole clusters in the range (partial ones are left alone, as QEMU does). */
  discard(offset: number, length: number): void {
    this.dataGuard();
    this.checkRange(offset, length);
    const cs = this.clusterSize;
    const first = Math.ceil(offset / cs);
    const endGc = Math.floor((offset + length) / cs) + (offset + length === this.img.virtualSize ? 1 : 0);
    for (let gc = first; gc < endGc && gc * cs < this.img.virtualSize; gc++) {
      const img = this.img;
      const l1Index = Math.floor(gc / img.l2Entries);
      const l2Off = l1Index * 8 < img.l1.length ? entryOffset(u32(img.l1, l1Index * 8), u32(img.l1, l1Index * 8 + 4)) : 0;
      if (l2Off === 0 && !img.backing) continue;
      if (img.zeroFlag || img.extendedL2) {
        // v3: a discarded cluster must read as zero, not as the backing file's data.
        if (img.backing || img.extendedL2) this.zeroWholeCluster(gc, true);
        else {
          const { table, index } = this.l2ForWrite(gc);
          this.releaseEntry(u32(table, index * 8), u32(table, index * 8 + 4));
          this.setEntry(table, index, 0, 0);
        }
      } else {
        const { table, index } = this.l2ForWrite(gc);
        this.releaseEntry(u32(table, index * 8), u32(table, index * 8 + 4));
        this.setEntry(table, index, 0, 0);
      }
      this.maybeCommit();
    }
  }

  /**
   * Writes one whole guest cluster compressed (falls back to a normal write when it does not
   * shrink). Compressed clusters are packed byte after byte; every host cluster a compressed
   * cluster touches holds one reference for it.
   */
  writeCompressed(gc: number, data: Uint8Array, compress: Compressor = deflateCompressor): void {
    this.dataGuard();
    const cs = this.clusterSize;
    if (data.length !== cs) throw new QimgError('USAGE', 'compressed writes take exactly one cluster');
    this.checkRange(gc * cs, Math.min(cs, this.img.virtualSize - gc * cs));
    this.writeCompressedPacked(gc, data, compress(data));
  }

  /** writeCompressed with the compression already done (`packed` is compress(data)), e.g. on other threads. */
  writeCompressedPacked(gc: number, data: Uint8Array, packed: Uint8Array): void {
    this.dataGuard();
    const cs = this.clusterSize;
    if (data.length !== cs) throw new QimgError('USAGE', 'compressed writes take exactly one cluster');
    this.checkRange(gc * cs, Math.min(cs, this.img.virtualSize - gc * cs));
    if (packed.length >= cs) return this.write(data.subarray(0, Math.min(cs, this.img.virtualSize - gc * cs)), gc * cs);
    const { table, index } = this.l2ForWrite(gc);
    const w = this.entryWidth();
    const hi = u32(table, index * w);
    const lo = u32(table, index * w + 4);
    const off = this.allocBytes(packed.length);
    this.hostWrite(packed, off);
    const sectors = Math.floor((off + packed.length - 1) / 512) - Math.floor(off / 512) + 1;
    const [h2, l2] = encodeCompressed(off, sectors, this.img.clusterBits);
    this.releaseEntry(hi, lo);
    this.setEntry(table, index, h2, l2);
    if (this.img.extendedL2) {
      setU32(table, index * 16 + 8, 0);
      setU32(table, index * 16 + 12, 0);
    }
    this.maybeCommit();
  }

  private allocBytes(len: number): number {
    const cs = this.clusterSize;
    const cur = this.compCursor;
    if (cur !== null && cur % cs !== 0) {
      const ci = Math.floor(cur / cs);
      const remain = cs - (cur % cs);
      // A cluster whose refcount is at the width's maximum cannot take another user.
      const rc = this.refs.get(ci);
      if (rc > 0 && rc < this.refs.maxValue) {
        if (len <= remain) {
          this.refs.add(ci, 1);
          this.compCursor = cur + len;
          return cur;
        }
        const extra = Math.ceil((len - remain) / cs);
        if (this.refs.tryAllocAt(ci + 1, extra)) {
          this.refs.add(ci, 1);
          this.compCursor = cur + len;
          return cur;
        }
      }
    }
    const start = this.refs.alloc(Math.ceil(len / cs));
    this.compCursor = start + len;
    return start;
  }

  // ---------------------------------------------------------------- resize

  /** Grows or shrinks the virtual size. Shrinking frees every cluster past the new end. */
  resize(newSize: number): void {
    this.dataGuard();
    const img = this.img;
    const cs = this.clusterSize;
    if (newSize < img.virtualSize) {
      const keepClusters = Math.ceil(newSize / cs);
      const keepL1 = l1EntriesFor(newSize, img.clusterBits, img.extendedL2);
      const oldClusters = Math.min(Math.ceil(img.virtualSize / cs), keepL1 * img.l2Entries);
      // A partially kept last cluster keeps its data; guests never see past the size.
      for (let gc = keepClusters; gc < oldClusters; gc++) {
        const l1Index = Math.floor(gc / img.l2Entries);
        const l2Off = entryOffset(u32(img.l1, l1Index * 8), u32(img.l1, l1Index * 8 + 4));
        if (l2Off === 0) {
          gc = (l1Index + 1) * img.l2Entries - 1;
          continue;
        }
        const { table, index } = this.l2ForWrite(gc);
        const w = this.entryWidth();
        this.releaseEntry(u32(table, index * w), u32(table, index * w + 4));
        table.fill(0, index * w, index * w + w);
      }
      // L2 tables wholly past the end go too (their clusters with them).
      for (let i = keepL1; i * 8 < img.l1.length; i++) {
        const off = entryOffset(u32(img.l1, i * 8), u32(img.l1, i * 8 + 4));
        if (off === 0) continue;
        const table = img.l2Table(off);
        // The active L1 stops reaching these clusters (shared table or not: refcounts count L1s).
        const w = this.entryWidth();
        for (let e = 0; e < img.l2Entries; e++) this.releaseEntry(u32(table, e * w), u32(table, e * w + 4));
        img.dirtyL2.delete(off);
        img.uncacheL2(off);
        this.refs.add(off / cs, -1);
        this.setL1Zero(i);
      }
    } else {
      const need = l1EntriesFor(newSize, img.clusterBits, img.extendedL2);
      if (need * 8 > img.l1.length) this.growL1(need);
    }
    img.virtualSize = newSize;
    this.header.size = newSize;
    this.dirtyHeader.push(HDR_SIZE);
  }

  private setL1Zero(index: number): void {
    setU32(this.img.l1, index * 8, 0);
    setU32(this.img.l1, index * 8 + 4, 0);
    this.dirtyL1.add(index);
  }

  /** A larger L1 table in new clusters; the header switches to it at commit, then the old one is freed. */
  private growL1(entries: number): void {
    if (entries > L.MAX_L1_ENTRIES) throw new QimgError('UNSUPPORTED', 'Active L1 table too large');
    const img = this.img;
    const cs = this.clusterSize;
    const bytes = entries * 8;
    const clusters = Math.ceil(bytes / cs);
    const offset = this.refs.alloc(clusters);
    const table = new Uint8Array(bytes);
    table.set(img.l1);
    this.oldL1 ??= { offset: this.header.l1TableOffset, size: this.header.l1Size };
    img.l1 = table;
    this.header.l1TableOffset = offset;
    this.header.l1Size = entries;
  }

  // ---------------------------------------------------------------- tables for snapshot operations

  /** Replaces the active L1 contents (padded/cut to its size); written in one write at commit. */
  replaceL1(entries: Uint8Array): void {
    this.guard();
    const l1 = this.img.l1;
    l1.fill(0);
    l1.set(entries.subarray(0, l1.length));
    this.l1Replaced = true;
  }

  /** Makes the active L1 at least `entries` long (a new table, switched to at commit). */
  ensureL1(entries: number): void {
    if (entries * 8 > this.img.l1.length) this.growL1(entries);
  }

  /** Sets the virtual size recorded in the header (no data is touched). */
  setVirtualSize(size: number): void {
    this.img.virtualSize = size;
    this.header.size = size;
    this.dirtyHeader.push(HDR_SIZE);
  }

  /**
   * Names a new backing file (null: none) and its format. The header, its extensions and the name
   * are rewritten at the next commit in ONE write from offset 0, padded with zeros over the old
   * name's bytes (as QEMU does), after every table of that commit is durable: data copied for the
   * new backing file is in place before the header names it.
   */
  setBacking(name: string | null, format: string | null): void {
    this.guard();
    const h = this.header;
    const oldEnd = Math.max(encodeHeader(h).length, h.backingFile !== null ? h.backingFileOffset + h.backingFileSize : 0);
    const was = { backingFile: h.backingFile, backingFormat: h.backingFormat, extensions: h.extensions };
    h.backingFile = name;
    h.backingFormat = name === null ? null : format;
    h.extensions = buildExtensions(h);
    let bytes: Uint8Array;
    try {
      bytes = encodeHeader(h);
    } catch (err) {
      Object.assign(h, was); // the name does not fit: nothing changes
      throw err;
    }
    const nameBytes = name === null ? 0 : new TextEncoder().encode(name).length;
    h.backingFileOffset = name === null ? 0 : bytes.length - nameBytes;
    h.backingFileSize = nameBytes;
    const sector = 512; // the rewrite covers whole sectors, never past cluster 0
    const end = Math.min(this.clusterSize, Math.ceil(Math.max(oldEnd, bytes.length) / sector) * sector);
    this.dirtyHeader.push([0, end]);
  }

  /**
   * Writes a new snapshot table into fresh clusters and makes the header name it at commit;
   * the old table's clusters are released after the header switched (QEMU's order).
   * `allocated`: the clusters the caller already took for it (refs.alloc), else taken here.
   */
  replaceSnapshotTable(table: Uint8Array, count: number, allocated?: number): void {
    this.guard();
    const cs = this.clusterSize;
    const old = { offset: this.header.snapshotsOffset, bytes: this.img.snapshotTableBytes };
    let offset = 0;
    if (count > 0) {
      offset = allocated ?? this.refs.alloc(Math.ceil(table.length / cs));
      this.hostWrite(table, offset);
    }
    this.header.nbSnapshots = count;
    this.header.snapshotsOffset = offset;
    this.dirtyHeader.push(HDR_SNAPSHOTS);
    if (old.offset !== 0 && old.bytes > 0) this.refs.freeBytes(old.offset, old.bytes);
    this.img.snapshotTableBytes = table.length;
  }

  /**
   * Sets OFLAG_COPIED in the active tree exactly where the refcount is 1 and clears it elsewhere
   * (QEMU recomputes the whole active tree after a snapshot apply or delete). `allAtOne`: L2
   * tables in which every data cluster is known to have refcount 1 now (the walk that just
   * lowered them saw each at 1 and none reached 0 after): every allocated, uncompressed entry
   * of those gets the flag without a refcount lookup.
   */
  recomputeCopied(allAtOne: ReadonlySet<number> = new Set()): void {
    this.guard();
    // Setting a flag is safe once the refcount of 1 it claims is on disk: commit first.
    this.commit();
    const img = this.img;
    const cs = this.clusterSize;
    const refs = this.refs;
    const tables: number[] = [];
    for (let i = 0; i * 8 < img.l1.length; i++) {
      const hi = u32(img.l1, i * 8);
      const lo = u32(img.l1, i * 8 + 4);
      const off = entryOffset(hi, lo);
      if (off === 0) continue;
      const want = refs.get(off / cs) === 1;
      // A shared table (refcount > 1) has every data cluster shared too, so all its flags must be
      // clear. The snapshot that first shared it left them so, but a damaged table may not say
      // so (an entry with the flag set naming a cluster it under-counts), and a flag wrongly set
      // lets the next guest write overwrite shared data in place: shared tables are read too.
      tables.push(off);
      if (want !== ((hi & L.OFLAG_COPIED_HI) !== 0)) {
        setU32(img.l1, i * 8, want ? (hi | L.OFLAG_COPIED_HI) >>> 0 : (hi & ~L.OFLAG_COPIED_HI) >>> 0);
        this.dirtyL1.add(i);
      }
    }
    const ew = this.entryWidth();
    const cb = img.clusterBits;
    this.rewriteL2InPlace(tables, (table, off) =>
      refs.get(off / cs) !== 1 ? clearAllCopied(table, ew) : allAtOne.has(off) ? setAllCopied(table, ew) : copiedFixes(table, refs, cb, ew),
    );
  }

  /**
   * Clears OFLAG_COPIED in the whole active tree (before a snapshot shares it), on disk at once:
   * the tables are rewritten in place and flushed here, because a refcount raised to 2 while a
   * flag still says 1 is a corruption, so the flags must be durable before the +1s that a
   * snapshot create has pending in memory are committed. Clearing is safe at any moment (it only
   * costs an extra copy on the next guest write).
   */
  clearCopied(): void {
    this.guard();
    const img = this.img;
    // The tables and the L1 written below must be the ones on disk plus flags: commit other
    // pending table changes first (refcount changes alone may stay pending: see above).
    if (img.dirtyL2.size || this.dirtyL1.size || this.oldL1 || this.l1Replaced) this.commit();
    const ew = this.entryWidth();
    const tables: number[] = [];
    let l1Changed = false;
    for (let i = 0; i * 8 < img.l1.length; i++) {
      const hi = u32(img.l1, i * 8);
      const off = entryOffset(hi, u32(img.l1, i * 8 + 4));
      if (off === 0) continue;
      tables.push(off);
      if (hi & L.OFLAG_COPIED_HI) {
        setU32(img.l1, i * 8, (hi & ~L.OFLAG_COPIED_HI) >>> 0);
        l1Changed = true;
      }
    }
    this.rewriteL2InPlace(tables, (table) => clearAllCopied(table, ew));
    if (l1Changed) {
      this.file.write(img.l1, this.header.l1TableOffset);
      this.dirtyL1.clear();
    }
    this.file.flush();
  }

  /**
   * Rewrites L2 tables in place, streaming: each run of tables is read, fixed by `fix` (true:
   * changed) and written straight back, never held in memory. Only for OFLAG_COPIED changes,
   * which callers make safe: clearing is safe at any moment, setting once the refcounts are on disk.
   */
  private rewriteL2InPlace(tables: number[], fix: (table: Uint8Array, offset: number) => boolean): void {
    forEachL2(this.img, tables, (off, table) => {
      if (!fix(table, off)) return;
      this.hostWrite(table, off);
      this.img.uncacheL2(off);
    });
  }

  // ---------------------------------------------------------------- commit: the write order

  /**
   * Puts every pending change on disk in the order that keeps the qcow2 crash invariant
   * (on-disk refcounts never below the true number of references):
   *   1. refcounts that go UP (and new refcount blocks), flush; then the refcount table entries
   *      for new blocks (or a moved table and the header fields naming it), flush;
   *   2. children before parents: L2 tables, flush; the L1 table (a new one, then the header
   *      naming it), flush; other header fields, flush;
   *   3. refcounts that go DOWN, flush — only now does nothing on disk point at freed clusters.
   * Guest data was written to clusters nothing referenced yet (or in place), before step 1's flush.
   * On a failed write the writer refuses further work: the file is crash-consistent, memory is not.
   * The one exception to "only commit() writes tables": OFLAG_COPIED rewrites of whole trees
   * (clearCopied, recomputeCopied) stream tables straight back to disk, because holding 128 MiB
   * of flag changes for a 1 TiB image is what they would cost otherwise; each states why its
   * flag change is safe at that moment (clearing: always; setting: right after a commit).
   */
  commit(): void {
    this.guard();
    const f = this.file;
    try {
      this.refs.writeIncreases();
      f.flush();
      this.refs.writeTable();
      f.flush();
      if (this.refs.relocatedFrom) {
        this.header.refcountTableOffset = this.refs.location.offset;
        this.header.refcountTableClusters = this.refs.location.clusters;
        this.writeHeaderRange(HDR_REFTABLE);
        f.flush();
        this.refs.releaseOldTable();
      }

      for (const [off, table] of this.img.dirtyL2) this.hostWrite(table, off);
      this.img.adoptDirtyL2();
      f.flush();

      if (this.oldL1) {
        this.hostWrite(this.img.l1, this.header.l1TableOffset);
        f.flush();
        this.writeHeaderRange(HDR_L1);
        f.flush();
        const old = this.oldL1;
        this.oldL1 = null;
        if (old.size > 0) this.refs.freeBytes(old.offset, old.size * 8);
      } else if (this.l1Replaced) {
        f.write(this.img.l1, this.header.l1TableOffset);
        f.flush();
      } else if (this.dirtyL1.size) {
        for (const i of [...this.dirtyL1].sort((a, b) => a - b)) {
          f.write(this.img.l1.subarray(i * 8, i * 8 + 8), this.header.l1TableOffset + i * 8);
        }
        f.flush();
      }
      this.dirtyL1.clear();
      this.l1Replaced = false;
      if (this.dirtyHeader.length) {
        for (const r of this.dirtyHeader) this.writeHeaderRange(r);
        this.dirtyHeader = [];
        f.flush();
      }

      this.refs.writeFinal();
      f.flush();
    } catch (err) {
      this.failed = err;
      throw err;
    }
  }

  /** Writes header bytes [from, to) from the in-memory header in one write. */
  writeHeaderRange([from, to]: [number, number]): void {
    let bytes = encodeHeader(this.header);
    if (to > bytes.length) {
      const padded = new Uint8Array(to); // zeros past the encoded header (setBacking's region)
      padded.set(bytes);
      bytes = padded;
    }
    this.writingHeader = true;
    try {
      this.file.write(bytes.subarray(from, to), from);
    } finally {
      this.writingHeader = false;
    }
  }

  /** Marks a header range to be written at the next commit (after tables, before decreases). */
  touchHeader(range: [number, number]): void {
    this.dirtyHeader.push(range);
  }

  async close(): Promise<void> {
    if (!this.failed) this.commit();
    this.io.drain();
    await this.io.settle(); // no background fdatasync may outlive the descriptor
    await this.img.close();
  }

  /** Closes without writing what is pending (after an error): the file is as the last commit left it. */
  async abandon(): Promise<void> {
    this.failed ??= new Error('abandoned');
    await this.io.settle();
    await this.img.close();
  }
}

/**
 * One L2 table's OFLAG_COPIED corrections, made in place (the hot loop of recomputeCopied):
 * true when anything changed.
 */
function copiedFixes(table: Uint8Array, refs: Refcounts, cb: number, ew: number): boolean {
  const words = ints32(table);
  if (words !== null && LITTLE_ENDIAN_HOST && refs.refcountOrder === 4) return copiedFixes16(words, refs, cb, ew >>> 2);
  const cs = 2 ** cb;
  let changed = false;
  for (let e = 0; e < table.length; e += ew) {
    const hi = u32(table, e);
    const lo = u32(table, e + 4);
    if (hi & L.OFLAG_COMPRESSED_HI) continue;
    const off = entryOffset(hi, lo);
    if (off === 0) continue;
    const want = refs.get(off / cs) === 1;
    if (want === ((hi & L.OFLAG_COPIED_HI) !== 0)) continue;
    setU32(table, e, want ? (hi | L.OFLAG_COPIED_HI) >>> 0 : (hi & ~L.OFLAG_COPIED_HI) >>> 0);
    changed = true;
  }
  return changed;
}

/**
 * The first allocated, uncompressed entry of an L2 table whose cluster's refcount is below
 * `need` (-1: none), for assertActiveDataCounted; 16-bit refcounts on a little-endian host take
 * copiedFixes16's path.
 */
function firstUncounted(table: Uint8Array, refs: Refcounts, cb: number, ew: number, need: number): number {
  const words = ints32(table);
  if (words !== null && LITTLE_ENDIAN_HOST && refs.refcountOrder === 4) return firstUncounted16(words, refs, cb, ew >>> 2, need);
  for (let e = 0; e < table.length; e += ew) {
    const hi = u32(table, e);
    if (hi & L.OFLAG_COMPRESSED_HI) continue;
    const ci = Math.floor(entryOffset(hi, u32(table, e + 4)) / 2 ** cb);
    if (ci !== 0 && refs.get(ci) < need) return e / ew;
  }
  return -1;
}

/** firstUncounted for 16-bit refcounts, written as copiedFixes16 (below) is. */
function firstUncounted16(words: Int32Array, refs: Refcounts, cb: number, step: number, need: number): number {
  const hiShift = 32 - cb;
  const intHi = 2 ** (cb - 1);
  const per = refs.perBlock;
  const shift = Math.log2(per);
  const mask = per - 1;
  const COMPRESSED = L.OFLAG_COMPRESSED_HI;
  const MASK_HI = L.OFFSET_MASK_HI;
  const MASK_LO = L.OFFSET_MASK_LO;
  let lastT = -1;
  let m16: Uint16Array | null = null;
  for (let w = 0; w < words.length; w += step) {
    const a = words[w]!;
    const b = words[w + 1]!;
    if ((a | b) === 0) continue;
    const hi = ((a & 0xff) << 24) | ((a & 0xff00) << 8) | ((a >>> 8) & 0xff00) | (a >>> 24);
    const lo = ((b & 0xff) << 24) | ((b & 0xff00) << 8) | ((b >>> 8) & 0xff00) | (b >>> 24);
    if (hi & COMPRESSED) continue;
    const hiOff = hi & MASK_HI;
    let rc: number;
    if (hiOff < intHi) {
      const ci = (hiOff << hiShift) | ((lo & MASK_LO) >>> cb);
      if (ci === 0) continue;
      const t = ci >>> shift;
      if (t !== lastT) {
        lastT = t;
        const mem = refs.memOf(t);
        m16 = mem ? new Uint16Array(mem.buffer, mem.byteOffset, mem.length >>> 1) : null;
      }
      const r = m16 !== null ? m16[ci & mask]! : 0;
      rc = ((r & 0xff) << 8) | (r >>> 8);
    } else rc = refs.get(Math.floor(entryOffset(hi >>> 0, lo >>> 0) / 2 ** cb)); // past 2^31 clusters
    if (rc < need) return w / step;
  }
  return -1;
}

/** OFLAG_COPIED on every allocated, uncompressed entry (all their refcounts are known to be 1). */
/** Clears OFLAG_COPIED in every entry of an L2 table (its top bit: bit 7 of the entry's first byte); true if any was set. */
function clearAllCopied(table: Uint8Array, ew: number): boolean {
  let changed = false;
  for (let e = 0; e < table.length; e += ew) {
    if (table[e]! & 0x80) {
      table[e] = table[e]! & 0x7f;
      changed = true;
    }
  }
  return changed;
}

function setAllCopied(table: Uint8Array, ew: number): boolean {
  const words = ints32(table);
  let changed = false;
  if (words !== null && LITTLE_ENDIAN_HOST) {
    // Host-order words of big-endian entries: the flag byte is the low byte of the first word,
    // and the offset bits are masked as they lie in memory.
    const step = ew >>> 2;
    for (let w = 0; w < words.length; w += step) {
      const a = words[w]!;
      if ((a & 0xc0) !== 0) continue; // flag set already, or compressed
      if (((a & ~0xff) | (words[w + 1]! & 0x00feffff)) === 0) continue; // unallocated
      words[w] = a | 0x80;
      changed = true;
    }
    return changed;
  }
  for (let e = 0; e < table.length; e += ew) {
    const b0 = table[e]!;
    if (b0 & 0x80) continue;
    if (b0 & 0x40) continue; // compressed
    const hi = u32(table, e);
    const lo = u32(table, e + 4);
    if ((hi & L.OFFSET_MASK_HI) === 0 && (lo & L.OFFSET_MASK_LO) === 0) continue; // unallocated
    table[e] = b0 | 0x80;
    changed = true;
  }
  return changed;
}

/**
 * copiedFixes for 16-bit refcounts on a little-endian host, the common case, written like
 * tree.ts applyTable16: byte swaps spelled out, integer cluster indices below 2^31, refcount
 * blocks read through Uint16Array views. OFLAG_COPIED is bit 7 of a table word's first byte,
 * which is the low byte of the host-order word.
 */
function copiedFixes16(words: Int32Array, refs: Refcounts, cb: number, step: number): boolean {
  const hiShift = 32 - cb;
  const intHi = 2 ** (cb - 1);
  const per = refs.perBlock;
  const shift = Math.log2(per);
  const mask = per - 1;
  const COMPRESSED = L.OFLAG_COMPRESSED_HI;
  const MASK_HI = L.OFFSET_MASK_HI;
  const MASK_LO = L.OFFSET_MASK_LO;
  let lastT = -1;
  let m16: Uint16Array | null = null;
  let changed = false;
  for (let w = 0; w < words.length; w += step) {
    const a = words[w]!;
    const b = words[w + 1]!;
    if ((a | b) === 0) continue;
    const hi = ((a & 0xff) << 24) | ((a & 0xff00) << 8) | ((a >>> 8) & 0xff00) | (a >>> 24);
    const lo = ((b & 0xff) << 24) | ((b & 0xff00) << 8) | ((b >>> 8) & 0xff00) | (b >>> 24);
    if (hi & COMPRESSED) continue;
    const hiOff = hi & MASK_HI;
    let rc: number;
    if (hiOff < intHi) {
      const ci = (hiOff << hiShift) | ((lo & MASK_LO) >>> cb);
      if (ci === 0) continue;
      const t = ci >>> shift;
      if (t !== lastT) {
        lastT = t;
        const mem = refs.memOf(t);
        m16 = mem ? new Uint16Array(mem.buffer, mem.byteOffset, mem.length >>> 1) : null;
      }
      const r = m16 !== null ? m16[ci & mask]! : 0;
      rc = ((r & 0xff) << 8) | (r >>> 8);
    } else rc = refs.get(entryOffset(hi >>> 0, lo >>> 0) / 2 ** cb); // past 2^31 clusters
    if ((rc === 1) === ((a & 0x80) !== 0)) continue;
    words[w] = rc === 1 ? a | 0x80 : a & ~0x80;
    changed = true;
  }
  return changed;
}

// Loaded on first use, as in decompress.ts: node:zlib brings Node's whole streams stack (~3 ms
// at every start of a command that opens a writer), and most writes compress nothing.
const require = createRequire(import.meta.url);
let zlib: typeof import('node:zlib') | null = null;

/** QEMU's "zlib" type: raw deflate, no zlib header. */
export function deflateCompressor(data: Uint8Array): Uint8Array {
  zlib ??= require('node:zlib') as typeof import('node:zlib');
  return zlib.deflateRawSync(data);
}

export { setU64 };

export interface OpenWriterOptions {
  backing?: import('./open.js').BackingPolicy;
  /** Snapshot operations never read the backing chain. */
  openBacking?: boolean;
  /** The message for a raw image (each command words it as qemu-img does). */
  rawError?: string;
  /** Receives the repair log when a dirty image is repaired on open (qemu-img prints it on stderr). */
  onRepair?: (messages: string[]) => void;
  /**
   * false: never fsync (write order is kept). Only for a NEW file nobody relies on yet, such as a
   * convert output — qemu-img convert writes its output the same way (cache mode "unsafe").
   */
  durable?: boolean;
}

/**
 * Opens a qcow2 image for writing (write lock; backing chain read-only under `backing`).
 * A dirty image (not cleanly shut down, lazy refcounts) is repaired first, as QEMU does on a
 * read-write open: its refcounts are rebuilt from the tables before anything else is written.
 */
export async function openWriter(path: string, opts: OpenWriterOptions = {}): Promise<ImageWriter> {
  const { openImage } = await import('./open.js');
  const layer = await openImage(path, { writable: true, backing: opts.backing ?? { follow: 'any' }, openBacking: opts.openBacking });
  if (!(layer instanceof Qcow2Image)) {
    await layer.close();
    throw new QimgError('UNSUPPORTED', opts.rawError ?? `'${path}' is not a qcow2 image`);
  }
  return writerFor(layer, opts.onRepair, opts.durable);
}

/** An ImageWriter on an image already open read-write (and locked); repairs a dirty image first. */
export async function writerFor(layer: Qcow2Image, onRepair?: (messages: string[]) => void, durable = true): Promise<ImageWriter> {
  let img = layer;
  try {
    if (hasIncompat(img.header, L.INCOMPAT_DIRTY) && !hasIncompat(img.header, L.INCOMPAT_CORRUPT)) {
      img = await repairOnOpen(img, onRepair);
    }
    return new ImageWriter(img, { durable });
  } catch (err) {
    await img.close();
    throw err;
  }
}

async function repairOnOpen(img: Qcow2Image, onRepair?: (messages: string[]) => void): Promise<Qcow2Image> {
  const { repairRefcounts } = await import('../check/index.js');
  const { counts, messages } = repairRefcounts({ file: img.file, filename: img.filename });
  onRepair?.(messages);
  if (counts.corruptions - counts.corruptionsFixed > 0 || counts.checkErrors) {
    throw new QimgError('CORRUPT', `Could not open '${img.filename}': the image was not cleanly shut down and its refcounts could not be repaired`);
  }
  // The rebuild may have moved the refcount table: read the image afresh from the same file
  // (same descriptor, so the lock stays), keeping the chain and the lock-releasing close.
  const fresh = Qcow2Image.open(img.file, img.filename);
  fresh.backing = img.backing;
  fresh.dataFile = img.dataFile;
  fresh.close = img.close.bind(img);
  return fresh;
}
