// A qcow2 image opened for reading: header, active L1, snapshot table, and guest reads through L1/L2.

import { QimgError, hex } from '../errors.js';
import { decodeHeader, hasIncompat, l2Entries, validateHeader, HEADER_PROBE_BYTES, type Header } from '../format/header.js';
import { ClusterKind, classifyL2, compressedByteLength, compressedOffset, entryOffset, SubclusterKind, subclusterKind } from '../format/entries.js';
import { u32 } from '../format/bytes.js';
import * as L from '../format/layout.js';
import { decodeSnapshotTable, type SnapshotEntry } from '../format/snapshot-table.js';
import { readAt, type BlockFile } from '../io/file.js';
import { decompressCluster } from './decompress.js';
import type { Extent, Layer, Location } from './layer.js';

/** Bytes read at a time while measuring the snapshot table entry by entry. */
const SNAPSHOT_SCAN_WINDOW = 64 * 1024;
/** L2 tables kept decoded at once; bounded so a huge image never grows memory. */
const L2_CACHE_TABLES = 64;

export class Qcow2Image implements Layer {
  readonly format = 'qcow2' as const;
  readonly clusterSize: number;
  readonly clusterBits: number;
  readonly l2Entries: number;
  readonly extendedL2: boolean;
  /** Bit 0 of a standard descriptor means "reads as zero" (v3 without extended L2). */
  readonly zeroFlag: boolean;
  readonly subclusterSize: number;
  /** Guest clusters live in an external data file (offset 0 is then a valid cluster). */
  readonly hasDataFile: boolean;
  snapshots: SnapshotEntry[] = [];
  snapshotTableBytes = 0;
  /** The L1 table this view reads through (active, or a snapshot's). */
  l1: Uint8Array;
  virtualSize: number;
  backing: Layer | null = null;
  /** Where guest clusters live: the image itself, or its external data file. */
  dataFile: BlockFile;
  private l2Cache = new Map<number, Uint8Array>();
  /** L2 tables changed by a writer and not yet committed: never evicted, consulted first. */
  readonly dirtyL2 = new Map<number, Uint8Array>();
  lastCompressed: { offset: number; data: Uint8Array } | null = null;
  /** Host file size as last known; a writer updates it as it extends the file. */
  fileSize: number;

  private constructor(
    readonly file: BlockFile,
    readonly filename: string,
    readonly header: Header,
  ) {
    this.clusterBits = header.clusterBits;
    this.clusterSize = 2 ** header.clusterBits;
    this.extendedL2 = hasIncompat(header, L.INCOMPAT_EXTL2);
    this.zeroFlag = header.version >= 3 && !this.extendedL2;
    this.l2Entries = l2Entries(this.clusterBits, this.extendedL2);
    this.hasDataFile = hasIncompat(header, L.INCOMPAT_DATA_FILE);
    this.subclusterSize = this.extendedL2 ? this.clusterSize / L.SUBCLUSTERS_PER_CLUSTER : this.clusterSize;
    this.virtualSize = header.size;
    this.l1 = new Uint8Array(0);
    this.dataFile = file;
    this.fileSize = file.size();
  }

  /** Reads and validates the header only (what `info` needs even when the rest cannot be read). */
  static readHeader(file: BlockFile): Header {
    const probe = new Uint8Array(Math.min(HEADER_PROBE_BYTES, Math.max(file.size(), 0)));
    readAt(file, probe, 0);
    // The header (header_length, extensions, backing name) may fill the whole first cluster:
    // decode it from all of cluster 0 when the cluster is larger than the probe, reading zeros
    // past the end of a shorter file as QEMU does. An invalid cluster_bits is left for
    // decodeHeader to name (a valid one bounds the buffer at 2 MiB).
    const bits = probe.length >= L.H_CLUSTER_BITS + 4 ? u32(probe, L.H_CLUSTER_BITS) : 0;
    if (bits >= L.MIN_CLUSTER_BITS && bits <= L.MAX_CLUSTER_BITS && 2 ** bits > probe.length) {
      const c0 = new Uint8Array(2 ** bits);
      readAt(file, c0, 0);
      return decodeHeader(c0);
    }
    return decodeHeader(probe);
  }

  /** Opens the qcow2 structures of `file` (already opened and locked by the caller). */
  static open(file: BlockFile, filename: string): Qcow2Image {
    const header = Qcow2Image.readHeader(file);
    validateHeader(header, file.size());
    const img = new Qcow2Image(file, filename, header);
    img.l1 = img.readTable(header.l1TableOffset, header.l1Size * 8, 'L1 table');
    img.loadSnapshots();
    return img;
  }

  private loadSnapshots(): void {
    const h = this.header;
    if (h.nbSnapshots === 0) return;
    // nb_snapshots and every entry's sizes are untrusted: measure the table by walking the
    // fixed entry headers (as QEMU reads it) before allocating anything for it.
    const bytes = this.snapshotTableLength();
    const buf = new Uint8Array(bytes);
    readAt(this.file, buf, h.snapshotsOffset);
    const t = decodeSnapshotTable(buf, h.nbSnapshots, h.snapshotsOffset);
    this.snapshots = t.entries;
    this.snapshotTableBytes = t.byteLength;
  }

  /** Bytes of the snapshot table; throws QEMU's refusals (too large, past EOF, extra data). */
  private snapshotTableLength(): number {
    const h = this.header;
    const start = h.snapshotsOffset;
    const window = new Uint8Array(SNAPSHOT_SCAN_WINDOW);
    let winStart = -1;
    let winLen = 0;
    let pos = start;
    let dataEnd = start;
    for (let i = 0; i < h.nbSnapshots; i++) {
      if (pos + L.SN_HEADER_BYTES > this.fileSize) {
        throw new QimgError('BAD_IMAGE', `Snapshot table lies past the end of the file (entry ${i} at ${hex(pos)})`, { field: 'snapshots_offset' });
      }
      if (winStart < 0 || pos + L.SN_HEADER_BYTES > winStart + winLen) {
        winStart = pos;
        winLen = readAt(this.file, window, pos);
      }
      const o = pos - winStart;
      const extra = u32(window, o + L.SN_EXTRA_DATA_SIZE);
      if (extra > L.MAX_SNAPSHOT_EXTRA_DATA) throw new QimgError('BAD_IMAGE', `Too much extra metadata in snapshot table entry ${i}`);
      const idSize = (window[o + L.SN_ID_STR_SIZE]! << 8) | window[o + L.SN_ID_STR_SIZE + 1]!;
      const nameSize = (window[o + L.SN_NAME_SIZE]! << 8) | window[o + L.SN_NAME_SIZE + 1]!;
      dataEnd = pos + L.SN_HEADER_BYTES + extra + idSize + nameSize;
      pos += Math.ceil((L.SN_HEADER_BYTES + extra + idSize + nameSize) / 8) * 8;
      if (pos - start > L.MAX_SNAPSHOT_TABLE_BYTES) throw new QimgError('BAD_IMAGE', 'Snapshot table too large', { field: 'nb_snapshots' });
    }
    // The last entry's padding may lie past the end of the file (qemu-img leaves it so).
    if (dataEnd > this.fileSize) throw new QimgError('BAD_IMAGE', 'Snapshot table lies past the end of the file', { field: 'snapshots_offset' });
    return pos - start;
  }

  /** Reads a table that must lie inside the file (QEMU fails the open otherwise). */
  readTable(offset: number, bytes: number, what: string): Uint8Array {
    if (bytes === 0) return new Uint8Array(0);
    if (offset + bytes > this.fileSize) {
      throw new QimgError('CORRUPT', `${what} at ${hex(offset)} (${bytes} bytes) lies past the end of the file`);
    }
    const buf = new Uint8Array(bytes);
    readAt(this.file, buf, offset);
    return buf;
  }

  /** A read-only view of this image as it was at a snapshot. Shares the file; closing it closes nothing. */
  snapshotView(sn: SnapshotEntry): Qcow2Image {
    const view = Object.create(Qcow2Image.prototype) as Qcow2Image;
    Object.assign(view, this);
    view.l2Cache = new Map();
    (view as { dirtyL2: Map<number, Uint8Array> }).dirtyL2 = new Map();
    view.lastCompressed = null;
    if (sn.l1Size > L.MAX_L1_ENTRIES) throw new QimgError('BAD_IMAGE', `Snapshot L1 table too large (snapshot ${sn.id})`);
    if (sn.l1TableOffset % this.clusterSize !== 0) {
      throw new QimgError('BAD_IMAGE', `Snapshot L1 table offset ${hex(sn.l1TableOffset)} is not cluster aligned (snapshot ${sn.id})`);
    }
    view.l1 = this.readTable(sn.l1TableOffset, sn.l1Size * 8, `L1 table of snapshot ${sn.id}`);
    // Like QEMU's temporary snapshot load: the current size; past the snapshot's tables reads zero.
    view.virtualSize = this.virtualSize;
    view.close = async () => {};
    return view;
  }

  /** Host offset of the L2 table for guest cluster `gc`, or 0. */
  private l2OffsetFor(gc: number): number {
    const l1Index = Math.floor(gc / this.l2Entries);
    if (l1Index * 8 >= this.l1.length) return 0;
    const hi = u32(this.l1, l1Index * 8);
    const lo = u32(this.l1, l1Index * 8 + 4);
    const off = entryOffset(hi, lo);
    if (off !== 0 && off % this.clusterSize !== 0) {
      throw new QimgError('CORRUPT', `L1 table: entry ${l1Index} points to unaligned L2 table offset ${hex(off)}`);
    }
    return off;
  }

  /** The L2 table at `offset` (a writer's uncommitted copy when there is one). */
  l2Table(offset: number): Uint8Array {
    return this.loadL2(offset);
  }

  /** Forgets cached clean tables and decompressed data (after clusters were freed in bulk). */
  dropCaches(): void {
    this.l2Cache.clear();
    this.lastCompressed = null;
  }

  /** After a commit: the written tables become clean cache entries. */
  adoptDirtyL2(): void {
    for (const [off, t] of this.dirtyL2) {
      if (this.l2Cache.size >= L2_CACHE_TABLES) this.l2Cache.delete(this.l2Cache.keys().next().value!);
      this.l2Cache.set(off, t);
    }
    this.dirtyL2.clear();
  }

  /** Forgets a cached clean copy (after a writer committed or freed the table). */
  uncacheL2(offset: number): void {
    this.l2Cache.delete(offset);
  }

  private loadL2(offset: number): Uint8Array {
    let t = this.dirtyL2.get(offset) ?? this.l2Cache.get(offset);
    if (t) return t;
    if (offset + this.clusterSize > this.fileSize) {
      throw new QimgError('CORRUPT', `L2 table at ${hex(offset)} lies past the end of the file`);
    }
    t = new Uint8Array(this.clusterSize);
    readAt(this.file, t, offset);
    if (this.l2Cache.size >= L2_CACHE_TABLES) this.l2Cache.delete(this.l2Cache.keys().next().value!);
    this.l2Cache.set(offset, t);
    return t;
  }

  /**
   * Classifies guest bytes [offset, offset+len) within ONE cluster (or subcluster run) and calls
   * back with the plan; the plan never crosses a cluster boundary, except that an unallocated run
   * (no L2 table, or empty standard entries) is one plan up to the end of its L2 table's span.
   */
  private plan(offset: number, maxLen: number): Plan {
    const cs = this.clusterSize;
    const gc = Math.floor(offset / cs);
    const inCluster = offset - gc * cs;
    let len = Math.min(maxLen, cs - inCluster);
    const l2Off = this.l2OffsetFor(gc);
    const idx = gc % this.l2Entries;
    if (l2Off === 0) {
      // No L2 table: its whole span reads through, as one plan rather than one per cluster.
      return { kind: PlanKind.Unallocated, length: Math.min(maxLen, (this.l2Entries - idx) * cs - inCluster), host: 0 };
    }
    const t = this.loadL2(l2Off);
    const ew = this.extendedL2 ? 16 : 8;
    const hi = u32(t, idx * ew);
    const lo = u32(t, idx * ew + 4);
    if (hi === 0 && lo === 0 && !this.extendedL2) {
      // A run of empty entries is one unallocated plan (chains and maps walk them by the GiB).
      // Zero tests need no byte order: whole 32-bit words of the table, two per entry.
      const words = new Int32Array(t.buffer, t.byteOffset, t.length >>> 2);
      const last = Math.min(this.l2Entries, idx + Math.ceil((maxLen + inCluster) / cs));
      let e = idx + 1;
      while (e < last && words[2 * e] === 0 && words[2 * e + 1] === 0) e++;
      return { kind: PlanKind.Unallocated, length: Math.min(maxLen, (e - idx) * cs - inCluster), host: 0 };
    }
    const kind = classifyL2(hi, lo, this.zeroFlag);
    switch (kind) {
      case ClusterKind.Compressed:
        return { kind: PlanKind.Compressed, length: len, host: compressedOffset(hi, lo, this.clusterBits), hi, lo, inCluster };
      case ClusterKind.ZeroPlain:
        return { kind: PlanKind.Zero, length: len, host: 0 };
      case ClusterKind.ZeroAlloc:
        // The preallocated host cluster is not read, but `map` reports it.
        return { kind: PlanKind.Zero, length: len, host: entryOffset(hi, lo) + inCluster };
      case ClusterKind.Unallocated:
      case ClusterKind.Normal: {
        const host = entryOffset(hi, lo);
        if (host % cs !== 0) {
          throw new QimgError('CORRUPT', `L2 table at ${hex(l2Off)}: entry ${idx} has unaligned cluster offset ${hex(host)}`);
        }
        if (!this.extendedL2) {
          // With an external data file, host offset 0 is a real cluster when COPIED is set.
          const data = kind === ClusterKind.Normal || (this.hasDataFile && (hi & L.OFLAG_COPIED_HI) !== 0);
          return data ? { kind: PlanKind.Data, length: len, host: host + inCluster } : { kind: PlanKind.Unallocated, length: len, host: 0 };
        }
        // Extended L2: the run of subclusters with the same state as the first one.
        const alloc = u32(t, idx * ew + 12);
        const zero = u32(t, idx * ew + 8);
        const sc = Math.floor(inCluster / this.subclusterSize);
        const state = subclusterKind(alloc, zero, sc);
        let end = sc + 1;
        while (end < L.SUBCLUSTERS_PER_CLUSTER && subclusterKind(alloc, zero, end) === state) end++;
        len = Math.min(len, end * this.subclusterSize - inCluster);
        if (state === SubclusterKind.Allocated) {
          if (host === 0 && !this.hasDataFile) throw new QimgError('CORRUPT', `L2 table at ${hex(l2Off)}: entry ${idx} has allocated subclusters but no cluster offset`);
          return { kind: PlanKind.Data, length: len, host: host + inCluster };
        }
        if (state === SubclusterKind.Zero) return { kind: PlanKind.Zero, length: len, host: host === 0 ? 0 : host + inCluster };
        return { kind: PlanKind.Unallocated, length: len, host: 0 };
      }
    }
  }

  /** Encrypted images are described, never read: qimg holds no keys and has no ciphers. */
  assertReadable(): void {
    if (this.header.cryptMethod !== L.CRYPT_NONE) {
      throw new QimgError('UNSUPPORTED', `Could not open '${this.filename}': the image is encrypted; qimg describes encrypted images but never reads their data`);
    }
    this.backing?.assertReadable();
  }

  read(buf: Uint8Array, offset: number): void {
    if (this.header.cryptMethod !== L.CRYPT_NONE) this.assertReadable();
    let done = 0;
    const end = Math.min(buf.length, Math.max(0, this.virtualSize - offset));
    while (done < end) {
      const p = this.plan(offset + done, end - done);
      let len = p.length;
      const out = buf.subarray(done, done + len);
      switch (p.kind) {
        case PlanKind.Zero:
          out.fill(0);
          break;
        case PlanKind.Unallocated:
          if (this.backing) this.backing.read(out, offset + done);
          else out.fill(0);
          break;
        case PlanKind.Compressed: {
          const data = this.compressedCluster(p.hi!, p.lo!);
          out.set(data.subarray(p.inCluster!, p.inCluster! + len));
          break;
        }
        case PlanKind.Data: {
          // Coalesce following clusters that are contiguous on the host into one read.
          let host = p.host;
          while (done + len < end) {
            const q = this.plan(offset + done + len, end - done - len);
            if (q.kind !== PlanKind.Data || q.host !== host + len) break;
            len += q.length;
          }
          const n = this.dataFile.read(buf.subarray(done, done + len), host);
          if (n < len) buf.fill(0, done + n, done + len); // data past EOF reads as zeros, as in QEMU
          host = 0;
          break;
        }
      }
      done += len;
    }
    if (end < buf.length) buf.fill(0, Math.max(end, 0));
  }

  private compressedCluster(hi: number, lo: number): Uint8Array {
    const off = compressedOffset(hi, lo, this.clusterBits);
    if (this.lastCompressed?.offset === off) return this.lastCompressed.data;
    const clen = compressedByteLength(hi, lo, this.clusterBits);
    if (off + 1 > this.fileSize) throw new QimgError('CORRUPT', `compressed cluster at ${hex(off)} lies past the end of the file`);
    const input = new Uint8Array(Math.min(clen, this.fileSize - off));
    readAt(this.file, input, off);
    const data = decompressCluster(input, this.clusterSize, this.header.compressionType, off);
    this.lastCompressed = { offset: off, data };
    return data;
  }

  /**
   * How THIS layer alone maps guest bytes at `offset` (one cluster or subcluster run at most):
   * 'unallocated' (falls through to the backing file), 'zero', 'data' or 'compressed', with the
   * host offset where there is one (zero clusters keep a preallocated one). For `map`.
   */
  mapping(offset: number, maxLength: number): { kind: 'unallocated' | 'zero' | 'data' | 'compressed'; length: number; host: number | null } {
    const p = this.plan(offset, Math.min(maxLength, this.virtualSize - offset));
    switch (p.kind) {
      case PlanKind.Unallocated:
        return { kind: 'unallocated', length: p.length, host: null };
      case PlanKind.Zero:
        return { kind: 'zero', length: p.length, host: p.host === 0 ? null : p.host };
      case PlanKind.Data:
        return { kind: 'data', length: p.length, host: p.host };
      case PlanKind.Compressed:
        return { kind: 'compressed', length: p.length, host: null };
    }
  }

  extent(offset: number, maxLength: number): Extent {
    let len = 0;
    let kind: 'zero' | 'data' | null = null;
    const end = Math.min(offset + maxLength, this.virtualSize);
    while (offset + len < end) {
      const p = this.plan(offset + len, end - offset - len);
      let k: 'zero' | 'data';
      let plen = p.length;
      if (p.kind === PlanKind.Unallocated) {
        if (!this.backing || offset + len >= this.backing.virtualSize) k = 'zero';
        else {
          const b = this.backing.extent(offset + len, Math.min(plen, this.backing.virtualSize - offset - len));
          k = b.kind;
          plen = b.length;
        }
      } else k = p.kind === PlanKind.Zero ? 'zero' : 'data';
      if (kind === null) kind = k;
      else if (k !== kind) break;
      len += plen;
    }
    return { kind: kind ?? 'zero', length: Math.max(len, 0) };
  }

  locate(offset: number, maxLength: number): Location {
    const end = Math.min(offset + maxLength, this.virtualSize);
    if (this.header.cryptMethod !== L.CRYPT_NONE) return { kind: 'read', length: end - offset };
    const p = this.plan(offset, end - offset);
    switch (p.kind) {
      case PlanKind.Compressed:
        return { kind: 'read', length: p.length };
      case PlanKind.Unallocated:
      case PlanKind.Zero: {
        if (p.kind === PlanKind.Unallocated && this.backing && offset < this.backing.virtualSize) {
          return this.backing.locate(offset, Math.min(p.length, this.backing.virtualSize - offset));
        }
        // Nothing below (or past its end): reads as zero.
        let len = p.length;
        while (offset + len < end) {
          const q = this.plan(offset + len, end - offset - len);
          const zero = q.kind === PlanKind.Zero || (q.kind === PlanKind.Unallocated && (!this.backing || offset + len >= this.backing.virtualSize));
          if (!zero) break;
          len += q.length;
        }
        return { kind: 'zero', length: len };
      }
      case PlanKind.Data: {
        // Following clusters contiguous on the host become one run (one read).
        let len = p.length;
        while (offset + len < end) {
          const q = this.plan(offset + len, end - offset - len);
          if (q.kind !== PlanKind.Data || q.host !== p.host + len) break;
          len += q.length;
        }
        return { kind: 'host', length: len, file: this.dataFile, host: p.host };
      }
    }
  }

  async close(): Promise<void> {
    if (this.backing) await this.backing.close();
    await this.file.settle?.(); // a background writeback must not outlive the descriptor
    if (this.dataFile !== this.file) this.dataFile.close();
    this.file.close();
  }
}

const PlanKind = { Unallocated: 0, Zero: 1, Data: 2, Compressed: 3 } as const;
type PlanKind = (typeof PlanKind)[keyof typeof PlanKind];

interface Plan {
  kind: PlanKind;
  length: number;
  /** Host offset of the first byte (Data), or of the compressed stream (Compressed). */
  host: number;
  hi?: number;
  lo?: number;
  inCluster?: number;
}
