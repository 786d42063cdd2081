// In-memory refcounts over the on-disk refcount table and blocks, and the cluster allocator.
//
// Every block keeps two copies: `disk` (what the file holds) and `mem` (the target). The write
// order lives in ImageWriter.commit(); this class offers its two refcount phases:
//   writeIncreases(): per entry max(disk, mem) — refcounts only go up, before anything new
//                     points at a cluster;
//   writeFinal():     mem as is — decreases land only after no on-disk table references
//                     the freed clusters.
// Clusters freed since the last commit are not handed out again before it: until the new
// tables are on disk, the old ones still point at them.

import { QimgError, hex } from '../errors.js';
import { refcountTableEntryOffset } from '../format/entries.js';
import { nonZeroEntries, setU64, u32 } from '../format/bytes.js';
import { getRefcount, maxRefcount, refblockEntries, setRefcount } from '../format/refblock.js';
import { MAX_REFTABLE_BYTES } from '../format/layout.js';
import { readAt, type BlockFile } from '../io/file.js';

interface Block {
  offset: number;
  disk: Uint8Array;
  mem: Uint8Array;
  dirty: boolean;
  /** Not yet referenced from the on-disk reftable: written whole in the increase phase. */
  fresh: boolean;
  /** Some entry went down since the last commit (else the increase phase writes `mem` as is). */
  decreased: boolean;
  /** Some entry went up since the last commit (else the increase phase has nothing to write). */
  increased: boolean;
}

/** Bytes of back-to-back refcount blocks loaded by one read. */
const MAX_BLOCK_READ_BYTES = 4 * 1024 * 1024;

/** Clean refcount blocks kept after a commit (64 KiB clusters: 64 MiB of cache). */
const MAX_CACHED_BLOCKS = 1024;

export interface ReftableLocation {
  offset: number;
  clusters: number;
}

export class Refcounts {
  readonly clusterSize: number;
  readonly perBlock: number;
  readonly maxValue: number;
  reftable: Uint8Array;
  location: ReftableLocation;
  private blocks = new Map<number, Block>();
  private dirtyEntries = new Set<number>();
  /** Set when the reftable moved: the header must point at `location` after it is written. */
  relocatedFrom: ReftableLocation | null = null;
  private freed = new ClusterBits();
  private freeHint = 0;
  /** First cluster index past the file and everything allocated. */
  endCluster: number;
  /**
   * Clusters holding metadata when the image was opened (header, tables, refcount blocks). A
   * corrupt refcount of 0 on one must not make the allocator hand it out: like QEMU's overlap
   * check, the write is refused instead. A cluster freed through add() leaves the set.
   */
  private metadata = new Set<number>();
  /**
   * Cluster ranges [first, end) where nothing may be allocated: a snapshot L1 table whose
   * declared size is too large (it may reach far past the file). QEMU's overlap check takes the
   * declared size at its word and refuses every write into it; so does qimg, before writing.
   */
  private fences: Array<{ first: number; end: number; what: { file: string; table: string } }> = [];

  constructor(
    private readonly file: BlockFile,
    readonly clusterBits: number,
    readonly refcountOrder: number,
    reftableOffset: number,
    reftableClusters: number,
  ) {
    this.clusterSize = 2 ** clusterBits;
    this.perBlock = refblockEntries(clusterBits, refcountOrder);
    this.maxValue = maxRefcount(refcountOrder);
    this.location = { offset: reftableOffset, clusters: reftableClusters };
    this.reftable = new Uint8Array(reftableClusters * this.clusterSize);
    readAt(file, this.reftable, reftableOffset);
    this.endCluster = Math.ceil(file.size() / this.clusterSize);
  }

  /** Marks host bytes [offset, offset+bytes) as metadata the allocator must never return. */
  protect(offset: number, bytes: number): void {
    if (bytes <= 0) return;
    const first = Math.floor(offset / this.clusterSize);
    // Clusters past the end of the file can hold nothing yet; this also bounds the set.
    const last = Math.min(Math.floor((offset + bytes - 1) / this.clusterSize), this.endCluster - 1);
    for (let ci = first; ci <= last; ci++) this.metadata.add(ci);
  }

  /** Refuses any allocation in host bytes [offset, offset+bytes), past the end of the file too; `what` names the file and the table. */
  fence(offset: number, bytes: number, what: { file: string; table: string }): void {
    if (bytes <= 0) return;
    this.fences.push({ first: Math.floor(offset / this.clusterSize), end: Math.ceil((offset + bytes) / this.clusterSize), what });
  }

  private refuseFenced(ci: number): void {
    for (const f of this.fences) {
      if (ci >= f.first && ci < f.end) {
        throw new QimgError('CORRUPT', `'${f.what.file}': preventing invalid write on metadata at ${hex(ci * this.clusterSize)} (overlaps with ${f.what.table}); the image is corrupt`);
      }
    }
  }

  /** Protects cluster 0, the refcount table and every refcount block it names. */
  protectRefcountStructures(): void {
    this.protect(0, this.clusterSize);
    this.protect(this.location.offset, this.location.clusters * this.clusterSize);
    for (const t of nonZeroEntries(this.reftable)) {
      const off = refcountTableEntryOffset(u32(this.reftable, t * 8), u32(this.reftable, t * 8 + 4));
      if (off !== 0) this.protect(off, this.clusterSize);
    }
  }

  private refuseMetadata(ci: number): never {
    throw new QimgError(
      'CORRUPT',
      `refcount of cluster ${hex(ci * this.clusterSize)} is 0 but it holds qcow2 metadata: the refcounts are corrupt; nothing was allocated there (repair with 'qemu-img check -r all')`,
    );
  }

  private get tableEntries(): number {
    return this.reftable.length / 8;
  }

  private blockOffset(t: number): number {
    if (t >= this.tableEntries) return 0;
    const off = refcountTableEntryOffset(u32(this.reftable, t * 8), u32(this.reftable, t * 8 + 4));
    if (off % this.clusterSize !== 0) throw new QimgError('CORRUPT', `Refcount table: entry ${t} has unaligned refcount block offset ${hex(off)}`);
    return off;
  }

  /** Whether a refcount block covers cluster ci (a missing one reads as all zeros). */
  covers(ci: number): boolean {
    return this.block(Math.floor(ci / this.perBlock)) !== null;
  }

  private block(t: number): Block | null {
    const b = this.blocks.get(t);
    if (b) return b;
    const off = this.blockOffset(t);
    if (off === 0) return null;
    // Blocks usually lie back to back (one per range, in order): load the following ones that
    // do in the same read, as a whole-image walk will want them next.
    const cs = this.clusterSize;
    let n = 1;
    while ((n + 1) * cs <= MAX_BLOCK_READ_BYTES && t + n < this.tableEntries && !this.blocks.has(t + n) && this.rawBlockOffset(t + n) === off + n * cs) n++;
    const disk = new Uint8Array(n * cs);
    readAt(this.file, disk, off);
    const mem = disk.slice();
    for (let k = 0; k < n; k++) {
      const part = (a: Uint8Array) => a.subarray(k * cs, (k + 1) * cs);
      this.blocks.set(t + k, { offset: off + k * cs, disk: part(disk), mem: part(mem), dirty: false, fresh: false, decreased: false, increased: false });
    }
    return this.blocks.get(t)!;
  }

  /** A reftable entry's block offset without the alignment check (0 when unaligned or absent). */
  private rawBlockOffset(t: number): number {
    const off = refcountTableEntryOffset(u32(this.reftable, t * 8), u32(this.reftable, t * 8 + 4));
    return off % this.clusterSize === 0 ? off : 0;
  }

  get(ci: number): number {
    const b = this.block(Math.floor(ci / this.perBlock));
    return b ? getRefcount(b.mem, ci % this.perBlock, this.refcountOrder) : 0;
  }

  /** Adds `delta` to cluster `ci`'s refcount; a cluster reaching 0 is held back until commit. */
  add(ci: number, delta: number): void {
    const t = Math.floor(ci / this.perBlock);
    const b = this.block(t);
    if (!b) throw new QimgError('CORRUPT', `cluster ${hex(ci * this.clusterSize)} has no refcount block`);
    const i = ci % this.perBlock;
    const v = getRefcount(b.mem, i, this.refcountOrder) + delta;
    if (v < 0) throw new QimgError('CORRUPT', `refcount of cluster ${hex(ci * this.clusterSize)} would drop below zero`);
    if (v > this.maxValue) throw this.overflow(ci);
    if (v === delta && delta > 0 && this.fences.length > 0) this.refuseFenced(ci); // 0 -> in use: an allocation
    setRefcount(b.mem, i, this.refcountOrder, v);
    b.dirty = true;
    if (delta > 0) b.increased = true;
    if (delta < 0) {
      b.decreased = true;
      this.fullBlocks.delete(t);
    }
    if (v === 0) {
      this.freed.add(ci);
      this.metadata.delete(ci);
    } else if (ci + 1 > this.endCluster) this.endCluster = ci + 1;
  }

  /** Frees host bytes [offset, offset+bytes): -1 on every cluster they touch. */
  freeBytes(offset: number, bytes: number): void {
    const first = Math.floor(offset / this.clusterSize);
    const last = Math.floor((offset + bytes - 1) / this.clusterSize);
    for (let ci = first; ci <= last; ci++) this.add(ci, -1);
  }

  private isFree(ci: number): boolean {
    return !this.freed.has(ci) && this.get(ci) === 0;
  }

  /**
   * Allocates `n` contiguous clusters (refcount 1) and returns the byte offset of the first.
   * Refcount blocks missing on the way are created first, so they never collide with the run.
   */
  alloc(n: number): number {
    let ci = this.freeHint;
    for (;;) {
      const t = Math.floor(ci / this.perBlock);
      if (!this.block(t)) {
        this.createBlock(t);
        continue;
      }
      // Jump to the next entry reading 0 with a tight scan of the block (full blocks are skipped).
      const next = this.nextZero(t, ci);
      if (next < 0) {
        ci = (t + 1) * this.perBlock;
        continue;
      }
      ci = next;
      let run = 0;
      while (run < n) {
        const tt = Math.floor((ci + run) / this.perBlock);
        if (!this.block(tt)) {
          // A range without a refcount block is free throughout; its block is placed after the
          // run (coverRun). Creating it here, at the range's first cluster, would cut every run
          // longer than one block's range: such a request could never be met.
          run = Math.min(n, (tt + 1) * this.perBlock - ci);
          continue;
        }
        if (!this.isFree(ci + run)) break;
        run++;
      }
      if (run === n) {
        this.coverRun(ci, n);
        for (let k = 0; k < n; k++) if (this.metadata.has(ci + k)) this.refuseMetadata(ci + k);
        for (let k = 0; k < n; k++) this.add(ci + k, 1);
        if (n === 1 || ci === this.freeHint) this.freeHint = ci + n;
        return ci * this.clusterSize;
      }
      ci += run + 1;
    }
  }

  /**
   * Allocates up to `n` contiguous clusters (at least one): the run starts at the first free
   * cluster and stops before anything that is not free or would need a new refcount block.
   */
  allocUpTo(n: number): { offset: number; count: number } {
    const first = this.alloc(1) / this.clusterSize;
    let count = 1;
    while (count < n) {
      const ci = first + count;
      const t = Math.floor(ci / this.perBlock);
      if (!this.block(t) || !this.isFree(ci) || this.metadata.has(ci)) break;
      this.add(ci, 1);
      count++;
    }
    if (first + count > this.freeHint && first <= this.freeHint) this.freeHint = first + count;
    return { offset: first * this.clusterSize, count };
  }

  /** Blocks with no entry reading 0: the allocator's scan skips them (a decrease clears the mark). */
  private fullBlocks = new Set<number>();

  /** The first cluster >= `from` in block `t` whose refcount reads 0 and may be handed out, or -1. */
  private nextZero(t: number, from: number): number {
    if (this.fullBlocks.has(t)) return -1;
    const b = this.block(t)!;
    const mem = b.mem;
    const base = t * this.perBlock;
    const order = this.refcountOrder;
    let i = from - base;
    const end = this.perBlock;
    const words = zeroScanView(mem, order);
    if (words) {
      // A native indexOf finds the next entry reading 0 (byte order does not matter for 0).
      for (;;) {
        i = words.indexOf(0, i);
        if (i < 0) break;
        if (!this.freed.has(base + i)) return base + i;
        i++;
      }
    } else {
      for (; i < end; i++) {
        if (getRefcount(mem, i, order) === 0 && !this.freed.has(base + i)) return base + i;
      }
    }
    if (from === base) this.fullBlocks.add(t);
    return -1;
  }

  /** Allocates exactly clusters [ci, ci+n) if all are free and their blocks exist; else false. */
  tryAllocAt(ci: number, n: number): boolean {
    for (let k = 0; k < n; k++) {
      if (!this.block(Math.floor((ci + k) / this.perBlock)) || !this.isFree(ci + k) || this.metadata.has(ci + k)) return false;
    }
    for (let k = 0; k < n; k++) this.add(ci + k, 1);
    return true;
  }

  /** Creates the refcount blocks that the free run [ci, ci + n) lacks, each outside the run. */
  private coverRun(ci: number, n: number): void {
    const end = ci + n;
    const last = Math.floor((end - 1) / this.perBlock);
    const missing: number[] = [];
    for (let t = Math.floor(ci / this.perBlock); t <= last; t++) if (!this.block(t)) missing.push(t);
    if (!missing.length) return;
    // A grown refcount table goes past the run too.
    this.endCluster = Math.max(this.endCluster, end);
    const place = (t: number, at: number) => {
      if (t >= this.tableEntries) this.growTable(t);
      if (this.blocks.has(t) || this.blockOffset(t) !== 0) return false; // growTable placed it
      this.installBlock(t, at);
      this.add(at, 1);
      return true;
    };
    let p = end;
    // The run's last range can hold its own block right after the run.
    if (missing[missing.length - 1] === last && end % this.perBlock !== 0) {
      missing.pop();
      if (place(last, end)) p = end + 1;
    }
    for (const t of missing) {
      // The first free cluster past the run: ranges there start after it, so a block created
      // for one of them (at its first cluster) is outside the run as well.
      for (;; p++) {
        const tp = Math.floor(p / this.perBlock);
        if (!this.block(tp)) this.createBlock(tp);
        if (this.isFree(p)) break;
      }
      if (place(t, p)) p++;
    }
  }

  /** A new refcount block for range `t`, placed in its own range so it describes itself. */
  private createBlock(t: number): void {
    if (t >= this.tableEntries) this.growTable(t);
    if (this.blocks.has(t) || this.blockOffset(t) !== 0) return; // growTable placed it
    const ci = t * this.perBlock; // the range has no block, so every cluster in it is free
    this.installBlock(t, ci);
    this.add(ci, 1);
  }

  private installBlock(t: number, ci: number): void {
    const mem = new Uint8Array(this.clusterSize);
    this.blocks.set(t, { offset: ci * this.clusterSize, disk: new Uint8Array(this.clusterSize), mem, dirty: true, fresh: true, decreased: false, increased: true });
    this.setTableEntry(t, ci * this.clusterSize);
    if (ci + 1 > this.endCluster) this.endCluster = ci + 1;
  }

  private setTableEntry(t: number, offset: number): void {
    setU64(this.reftable, t * 8, offset);
    this.dirtyEntries.add(t);
  }

  /**
   * Moves the reftable to the end of the file with room for entry `needed`, together with the
   * refcount blocks that the new table's own clusters need.
   */
  private growTable(needed: number): void {
    const cs = this.clusterSize;
    let entries = Math.max(needed + 1, Math.ceil(this.tableEntries * 1.5));
    for (;;) {
      const tableClusters = Math.ceil((entries * 8) / cs);
      if (tableClusters * cs > MAX_REFTABLE_BYTES) throw new QimgError('UNSUPPORTED', 'Reference count table would exceed 8 MiB');
      let start = this.endCluster;
      // Blocks for the area [start, start + tableClusters + nBlocks) that do not exist yet.
      let missing: number[] = [];
      for (let guard = 0; guard < 64; guard++) {
        const end = start + tableClusters + missing.length;
        const next: number[] = [];
        for (let t = Math.floor(start / this.perBlock); t <= Math.floor((end - 1) / this.perBlock); t++) {
          if (!this.block(t)) next.push(t);
        }
        if (next.length === missing.length) break;
        missing = next;
      }
      if (missing.some((t) => t >= entries) || needed >= entries) {
        entries = Math.max(entries * 2, ...missing.map((t) => t + 1));
        continue;
      }
      const old = this.location;
      const table = new Uint8Array(tableClusters * cs);
      table.set(this.reftable);
      this.reftable = table;
      this.location = { offset: start * cs, clusters: tableClusters };
      if (this.relocatedFrom) {
        // `old` is a table from this same transaction that nothing on disk names: drop it now.
        this.freeBytes(old.offset, old.clusters * cs);
      } else this.relocatedFrom = old;
      this.endCluster = Math.max(this.endCluster, start + tableClusters);
      missing.forEach((t, i) => this.installBlock(t, start + tableClusters + i));
      for (let ci = start; ci < start + tableClusters + missing.length; ci++) this.add(ci, 1);
      // The whole new table is written; entries need no separate tracking.
      this.dirtyEntries.clear();
      return;
    }
  }

  /** Phase 1: refcounts only go up (max of disk and target), new blocks written whole. */
  writeIncreases(): void {
    for (const b of this.blocks.values()) {
      if (!b.dirty) continue;
      if (!b.fresh && b.decreased && !b.increased) continue; // only decreases: they wait for writeFinal
      if (b.fresh || !b.decreased) {
        if (b.fresh || !equalBytes(b.disk, b.mem)) this.file.write(b.mem, b.offset);
        b.disk.set(b.mem);
        b.fresh = false;
        continue;
      }
      if (raiseToMax(b.disk, b.mem, this.perBlock, this.refcountOrder)) this.file.write(b.disk, b.offset);
    }
  }

  /** Phase 1b: reftable entries for new blocks (children are on disk), or the whole moved table. */
  writeTable(): void {
    if (this.relocatedFrom) {
      this.file.write(this.reftable, this.location.offset);
      return;
    }
    for (const t of this.dirtyEntries) this.file.write(this.reftable.subarray(t * 8, t * 8 + 8), this.location.offset + t * 8);
    this.dirtyEntries.clear();
  }

  /** After the header points at a moved table: the old table's clusters can be released. */
  releaseOldTable(): void {
    const old = this.relocatedFrom;
    if (!old) return;
    this.relocatedFrom = null;
    this.freeBytes(old.offset, old.clusters * this.clusterSize);
  }

  /** Phase 3: decreases, once nothing on disk points at freed clusters. */
  writeFinal(): void {
    for (const b of this.blocks.values()) {
      if (!b.dirty) continue;
      if (!equalBytes(b.disk, b.mem)) {
        this.file.write(b.mem, b.offset);
        b.disk.set(b.mem);
      }
      b.dirty = false;
      b.decreased = false;
      b.increased = false;
    }
    this.evictClean();
    if (this.freed.size > 0) {
      if (this.freed.min < this.freeHint) this.freeHint = this.freed.min;
      for (const t of this.freed.ranges(this.perBlock)) this.fullBlocks.delete(t); // allocatable again from now on
      this.freed.clear();
    }
  }

  /** Keeps memory bounded on huge images: clean blocks are re-read when needed again. */
  private evictClean(): void {
    if (this.blocks.size <= MAX_CACHED_BLOCKS) return;
    for (const [t, b] of this.blocks) if (!b.dirty) this.blocks.delete(t);
  }

  /**
   * Adds deltas[ci] to every cluster's refcount in one pass over the refcount blocks: each
   * block is read and modified once. The streaming path for snapshot operations.
   */
  applyDeltas(deltas: Int32Array, validated = false): void {
    if (!validated) this.validateDeltas(deltas);
    const order = this.refcountOrder;
    const zeros: number[] = [];
    this.forBlocksWithDeltas(deltas, (base, end, mem, t) => {
      const b = this.blocks.get(t)!;
      const r = applyBlock(deltas, base, end, mem, order, zeros);
      for (const ci of zeros) {
        this.freed.add(ci);
        this.metadata.delete(ci);
      }
      zeros.length = 0;
      if (r.lastUp + 1 > this.endCluster) this.endCluster = r.lastUp + 1;
      const down = r.down;
      b.dirty = true;
      if (r.lastUp >= 0) b.increased = true;
      if (down) {
        b.decreased = true;
        this.fullBlocks.delete(t);
      }
    });
  }

  /**
   * Throws (changing nothing) if applying `deltas` would take any refcount out of range, or add
   * a reference to a cluster whose refcount is 0 (a corruption one more reference would hide).
   */
  validateDeltas(deltas: Int32Array): void {
    this.forBlocksWithDeltas(deltas, (base, end, mem) => {
      const bad = firstInvalid(deltas, base, end, mem, this.refcountOrder, this.maxValue);
      if (bad < 0) return;
      const d = deltas[bad]!;
      const cur = getRefcount(mem, bad - base, this.refcountOrder);
      if (d > 0 && cur === 0) {
        throw new QimgError('CORRUPT', `cluster ${hex(bad * this.clusterSize)} is referenced but its refcount is 0 (repair with 'qemu-img check -r all')`);
      }
      this.rangeError(bad, cur + d);
    });
  }

  /** Calls `fn` for every refcount block whose range has a non-zero delta (blocks must exist). */
  private forBlocksWithDeltas(deltas: Int32Array, fn: (base: number, end: number, mem: Uint8Array, t: number) => void): void {
    const per = this.perBlock;
    for (let t = 0; t * per < deltas.length; t++) {
      const base = t * per;
      const end = Math.min(deltas.length, base + per);
      let first = -1;
      for (let ci = base; ci < end; ci++) {
        if (deltas[ci] !== 0) {
          first = ci;
          break;
        }
      }
      if (first < 0) continue;
      const b = this.block(t);
      if (!b) throw new QimgError('CORRUPT', `cluster ${hex(first * this.clusterSize)} is referenced but has no refcount block`);
      fn(base, end, b.mem, t);
    }
  }

  private rangeError(ci: number, v: number): never {
    if (v < 0) throw new QimgError('CORRUPT', `refcount of cluster ${hex(ci * this.clusterSize)} would drop below zero`);
    throw this.overflow(ci);
  }

  /**
   * A refcount past its width's maximum. QEMU fails such an update with EINVAL, which is all
   * qemu-img prints; `data.refcountOverflow` lets a command word it as qemu-img does.
   */
  private overflow(ci: number): QimgError {
    return new QimgError('UNSUPPORTED', `refcount of cluster ${hex(ci * this.clusterSize)} would exceed ${this.maxValue}`, { errno: 'EINVAL', refcountOverflow: true });
  }

  /** A reader for hot loops: caches the last block looked at. */
  reader(): (ci: number) => number {
    let lastT = -1;
    let mem: Uint8Array | null = null;
    const per = this.perBlock;
    const order = this.refcountOrder;
    return (ci: number) => {
      const t = Math.floor(ci / per);
      if (t !== lastT) {
        lastT = t;
        mem = this.block(t)?.mem ?? null;
      }
      if (!mem) return 0;
      const i = ci - t * per;
      return order === 4 ? (mem[i * 2]! << 8) | mem[i * 2 + 1]! : getRefcount(mem, i, order);
    };
  }

  /** The in-memory (target) bytes of refcount block `t`, loaded on demand; null when the table has none. */
  memOf(t: number): Uint8Array | null {
    return this.block(t)?.mem ?? null;
  }

  /** Starts a batch of reference changes applied straight to the in-memory refcounts (see RefcountEdit). */
  edit(): RefcountEdit {
    return new RefcountEdit(this, this.perBlock, this.refcountOrder, this.maxValue);
  }

  /** RefcountEdit's bookkeeping when a batch lands: blocks to write, clusters freed, file end. */
  settleEdit(touched: Iterable<number>, increased: boolean, decreased: boolean, zeros: number[], lastUp: number): void {
    for (const t of touched) {
      const b = this.blocks.get(t)!;
      b.dirty = true;
      if (increased) b.increased = true;
      if (decreased) {
        b.decreased = true;
        this.fullBlocks.delete(t);
      }
    }
    for (const ci of zeros) {
      this.freed.add(ci);
      this.metadata.delete(ci);
    }
    if (lastUp + 1 > this.endCluster) this.endCluster = lastUp + 1;
  }

  /** RefcountEdit's undo: block `t` back to `before`, or to its on-disk bytes when it was clean. */
  restoreBlock(t: number, before: Uint8Array | null): void {
    const b = this.blocks.get(t)!;
    b.mem.set(before ?? b.disk);
  }

  /** Whether block `t` has changes not yet written (an edit must then save it before touching it). */
  blockDirty(t: number): boolean {
    return this.blocks.get(t)?.dirty ?? false;
  }

  /** The error for a reference change that would take cluster `ci` from `cur` to `cur + d`. */
  invalidChange(ci: number, cur: number, d: number): QimgError {
    if (d > 0 && cur === 0) {
      return new QimgError('CORRUPT', `cluster ${hex(ci * this.clusterSize)} is referenced but its refcount is 0 (repair with 'qemu-img check -r all')`);
    }
    if (cur + d < 0) return new QimgError('CORRUPT', `refcount of cluster ${hex(ci * this.clusterSize)} would drop below zero`);
    return this.overflow(ci);
  }

  /** The error for a reference to a cluster whose range has no refcount block. */
  noBlock(ci: number): QimgError {
    return new QimgError('CORRUPT', `cluster ${hex(ci * this.clusterSize)} is referenced but has no refcount block`);
  }

  /** Everything written? (for tests and assertions) */
  get pending(): boolean {
    for (const b of this.blocks.values()) if (b.dirty) return true;
    return this.dirtyEntries.size > 0 || this.relocatedFrom !== null;
  }
}

function equalBytes(a: Uint8Array, b: Uint8Array): boolean {
  return Buffer.compare(a, b) === 0;
}

// Hot loops over whole refcount blocks, kept as plain functions of their arguments (no closure
// state) with a fast path for 16-bit refcounts, the common width.

/** The first cluster in [base, end) whose delta would be invalid (see validateDeltas), or -1. */
function firstInvalid(deltas: Int32Array, base: number, end: number, mem: Uint8Array, order: number, max: number): number {
  for (let ci = base; ci < end; ci++) {
    const d = deltas[ci]!;
    if (d === 0) continue;
    const i = ci - base;
    const cur = order === 4 ? (mem[i * 2]! << 8) | mem[i * 2 + 1]! : getRefcount(mem, i, order);
    const v = cur + d;
    if ((d > 0 && cur === 0) || v < 0 || v > max) return ci;
  }
  return -1;
}

/** Adds the deltas of [base, end) into `mem`; pushes clusters that reach 0 onto `zeros`. */
function applyBlock(deltas: Int32Array, base: number, end: number, mem: Uint8Array, order: number, zeros: number[]): { down: boolean; lastUp: number } {
  let down = false;
  let lastUp = -1;
  for (let ci = base; ci < end; ci++) {
    const d = deltas[ci]!;
    if (d === 0) continue;
    const i = ci - base;
    let v: number;
    if (order === 4) {
      v = ((mem[i * 2]! << 8) | mem[i * 2 + 1]!) + d;
      mem[i * 2] = v >>> 8;
      mem[i * 2 + 1] = v & 0xff;
    } else {
      v = getRefcount(mem, i, order) + d;
      setRefcount(mem, i, order, v);
    }
    if (d < 0) {
      down = true;
      if (v === 0) zeros.push(ci);
    } else lastUp = ci;
  }
  return { down, lastUp };
}

/** disk[i] = max(disk[i], mem[i]) for every entry; true when anything changed. */
function raiseToMax(disk: Uint8Array, mem: Uint8Array, entries: number, order: number): boolean {
  let changed = false;
  if (order === 4) {
    for (let i = 0; i < entries * 2; i += 2) {
      const m = (mem[i]! << 8) | mem[i + 1]!;
      if (m > ((disk[i]! << 8) | disk[i + 1]!)) {
        disk[i] = mem[i]!;
        disk[i + 1] = mem[i + 1]!;
        changed = true;
      }
    }
    return changed;
  }
  for (let i = 0; i < entries; i++) {
    const m = getRefcount(mem, i, order);
    if (m > getRefcount(disk, i, order)) {
      setRefcount(disk, i, order, m);
      changed = true;
    }
  }
  return changed;
}

/** A word view in which an entry reading 0 is a 0 element (orders 3..5), or null. */
function zeroScanView(mem: Uint8Array, order: number): Uint8Array | Uint16Array | Uint32Array | null {
  if (order === 3) return mem;
  if (mem.byteOffset % 4 !== 0) return null;
  if (order === 4) return new Uint16Array(mem.buffer, mem.byteOffset, mem.length >>> 1);
  if (order === 5) return new Uint32Array(mem.buffer, mem.byteOffset, mem.length >>> 2);
  return null;
}

/**
 * A set of cluster indices as a bitmap that grows with the highest member: millions of freed
 * clusters cost one bit each, not a hash-set entry each.
 */
export class ClusterBits {
  private bits = new Uint8Array(0);
  size = 0;
  min = Infinity;
  private max = -1;

  add(ci: number): void {
    const byte = Math.floor(ci / 8);
    if (byte >= this.bits.length) {
      const grown = new Uint8Array(Math.max(byte + 1, this.bits.length * 2, 4096));
      grown.set(this.bits);
      this.bits = grown;
    }
    const m = 1 << ci % 8;
    if (this.bits[byte]! & m) return;
    this.bits[byte] = this.bits[byte]! | m;
    this.size++;
    if (ci < this.min) this.min = ci;
    if (ci > this.max) this.max = ci;
  }

  has(ci: number): boolean {
    if (this.size === 0) return false;
    const byte = Math.floor(ci / 8);
    return byte < this.bits.length && (this.bits[byte]! & (1 << ci % 8)) !== 0;
  }

  /** The refcount-block ranges (index / perBlock) holding a member, ascending. */
  ranges(perBlock: number): number[] {
    const out: number[] = [];
    for (let t = Math.floor(this.min / perBlock); t * perBlock <= this.max; t++) {
      const from = Math.max(t * perBlock, this.min);
      const to = Math.min((t + 1) * perBlock - 1, this.max);
      for (let ci = from; ci <= to; ci++) {
        if (ci % 8 === 0 && ci + 7 <= to && this.bits[ci / 8] === 0) {
          ci += 7;
          continue;
        }
        if (this.has(ci)) {
          out.push(t);
          break;
        }
      }
    }
    return out;
  }

  clear(): void {
    if (this.size === 0) return;
    this.bits.fill(0, Math.floor(this.min / 8), Math.floor(this.max / 8) + 1);
    this.size = 0;
    this.min = Infinity;
    this.max = -1;
  }
}

/**
 * Reference changes applied straight to the in-memory refcounts while a tree is walked, and
 * checked as they land: no per-cluster delta array, no second pass. A change that would take a
 * refcount out of range (or add a reference to a cluster whose refcount is 0) stops the batch:
 * fail() puts every touched block back as it was and throws, so nothing reaches the disk.
 * finish() hands the touched blocks to the next commit.
 */
export class RefcountEdit {
  /** log2 of the entries per block, and the mask of an index within its block. */
  readonly shift: number;
  readonly mask: number;
  private touched = new Map<number, Uint8Array | null>();
  private zeros: number[] = [];
  /**
   * L2 tables (by offset) walked with a decrease in which every data cluster ended at refcount 1
   * (applyTreeRefs fills it): after a snapshot delete their OFLAG_COPIED flags are all known.
   */
  readonly endedAtOne = new Set<number>();
  /** Highest cluster whose refcount went up (the file end may move past it). */
  private lastUp = -1;
  private decreased = false;
  private increased = false;
  private lastT = -1;
  private lastMem: Uint8Array = new Uint8Array(0);

  constructor(
    private readonly refs: Refcounts,
    readonly perBlock: number,
    readonly order: number,
    readonly max: number,
  ) {
    this.shift = Math.log2(perBlock);
    this.mask = perBlock - 1;
  }

  /** Block `t`'s in-memory bytes, remembered as touched (its prior state kept for fail()). */
  mem(t: number, ci: number): Uint8Array {
    if (t === this.lastT) return this.lastMem;
    const m = this.refs.memOf(t);
    if (!m) throw this.undo(this.refs.noBlock(ci));
    if (!this.touched.has(t)) this.touched.set(t, this.refs.blockDirty(t) ? m.slice() : null);
    this.lastT = t;
    this.lastMem = m;
    return m;
  }

  /** Adds `d` to cluster `ci` (any refcount width); throws after undoing the batch when invalid. */
  add(ci: number, d: number): void {
    const t = Math.floor(ci / this.perBlock);
    const m = this.mem(t, ci);
    const i = ci - t * this.perBlock;
    const cur = getRefcount(m, i, this.order);
    const v = cur + d;
    if ((d > 0 && cur === 0) || v < 0 || v > this.max) this.fail(ci, cur, d);
    setRefcount(m, i, this.order, v);
    this.noteResult(ci, d, v);
  }

  /** Bookkeeping after a hot loop changed cluster `ci` by `d` to `v` (it calls this itself). */
  noteResult(ci: number, d: number, v: number): void {
    if (d < 0) {
      this.decreased = true;
      if (v === 0) this.zeros.push(ci);
    } else {
      this.increased = true;
      if (ci > this.lastUp) this.lastUp = ci;
    }
  }

  /** Undoes the batch and throws the error for cluster `ci` going from `cur` by `d`. */
  fail(ci: number, cur: number, d: number): never {
    throw this.undo(this.refs.invalidChange(ci, cur, d));
  }

  /** Undoes the batch and throws: a reference at or past the end of what the refcounts cover. */
  outOfRange(ci: number): never {
    throw this.undo(new QimgError('CORRUPT', `cluster ${hex(ci)} referenced past the end of the image's refcount coverage`));
  }

  /** The clusters that reached refcount 0 so far in this batch. */
  get zeroClusters(): readonly number[] {
    return this.zeros;
  }

  /** How many clusters reached refcount 0 so far in this batch. */
  get zeroCount(): number {
    return this.zeros.length;
  }

  /** Undoes the batch (after any error of the walk feeding it). */
  cancel(): void {
    this.undo(new QimgError('CORRUPT', 'cancelled'));
  }

  /** Undoes the batch and returns `err` for the caller to throw (a broken table entry). */
  abort(err: QimgError): QimgError {
    return this.undo(err);
  }

  private undo(err: QimgError): QimgError {
    for (const [t, before] of this.touched) this.refs.restoreBlock(t, before);
    this.touched.clear();
    this.zeros = [];
    this.lastT = -1;
    this.lastUp = -1;
    this.increased = false;
    this.decreased = false;
    this.endedAtOne.clear();
    return err;
  }

  /** The batch is complete: its blocks are written at the next commit. */
  finish(): void {
    this.refs.settleEdit(this.touched.keys(), this.increased, this.decreased, this.zeros, this.lastUp);
    this.touched.clear();
    this.zeros = [];
    this.lastT = -1;
  }
}
