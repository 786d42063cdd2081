// The snapshot-table half of `check -r all`: writing back a table whose entries a repair read
// leniently (overlong extra data cut to the limit, v3 entries missing their 16 bytes of extra
// data), the way qemu-img's repair rewrites it.

import { setU16, setU32, u32 } from '../format/bytes.js';
import * as L from '../format/layout.js';
import { Refcounts } from '../engine/refcounts.js';
import type { CheckImage, CheckSnapshot, SnapshotRaw } from './image.js';

const TWO32 = 0x100000000;

/** Encoded size of one entry as a rewrite stores it (before the 8-byte padding). */
function entryBytes(r: SnapshotRaw): number {
  return L.SN_HEADER_BYTES + Math.max(L.SN_EXTRA_BYTES_WRITTEN, r.extra.length) + r.id.length + r.name.length;
}

/**
 * The table as QEMU writes it back: fixed fields as stored, at least the 24 known bytes of extra
 * data (vm_state_size_large, disk_size, icount; absent ones filled from the 32-bit state size, the
 * current disk size and "no icount"), any unknown extra data kept, id and name as C strings.
 */
export function encodeRepairedTable(snaps: CheckSnapshot[], diskSize: number): Uint8Array {
  let total = 0;
  for (const s of snaps) total = Math.ceil(total / 8) * 8 + entryBytes(s.raw!);
  const out = new Uint8Array(total);
  let off = 0;
  for (const s of snaps) {
    const r = s.raw!;
    off = Math.ceil(off / 8) * 8;
    const extraLen = Math.max(L.SN_EXTRA_BYTES_WRITTEN, r.extra.length);
    const e = off + L.SN_HEADER_BYTES;
    // vm_state_size: the 64-bit field when stored, else the 32-bit one.
    const big = r.extra.length >= 8;
    const vmHi = big ? u32(r.extra, L.SN_EXTRA_VM_STATE_SIZE_LARGE) : 0;
    const vmLo = big ? u32(r.extra, L.SN_EXTRA_VM_STATE_SIZE_LARGE + 4) : u32(r.fixed, L.SN_VM_STATE_SIZE);
    out.set(r.fixed.subarray(0, L.SN_ID_STR_SIZE), off); // l1_table_offset, l1_size
    out.set(r.fixed.subarray(L.SN_DATE_SEC, L.SN_VM_STATE_SIZE), off + L.SN_DATE_SEC); // dates, vm clock
    setU16(out, off + L.SN_ID_STR_SIZE, r.id.length);
    setU16(out, off + L.SN_NAME_SIZE, r.name.length);
    // A state size past 32 bits leaves the old field 0 (older readers see a disk-only snapshot).
    setU32(out, off + L.SN_VM_STATE_SIZE, vmHi === 0 ? vmLo : 0);
    setU32(out, off + L.SN_EXTRA_DATA_SIZE, extraLen);
    out.set(r.extra.subarray(0, Math.min(r.extra.length, extraLen)), e);
    setU32(out, e + L.SN_EXTRA_VM_STATE_SIZE_LARGE, vmHi);
    setU32(out, e + L.SN_EXTRA_VM_STATE_SIZE_LARGE + 4, vmLo);
    if (r.extra.length < L.SN_EXTRA_DISK_SIZE + 8) {
      setU32(out, e + L.SN_EXTRA_DISK_SIZE, Math.floor(diskSize / TWO32));
      setU32(out, e + L.SN_EXTRA_DISK_SIZE + 4, diskSize % TWO32);
    }
    if (r.extra.length < L.SN_EXTRA_ICOUNT + 8) out.fill(0xff, e + L.SN_EXTRA_ICOUNT, e + L.SN_EXTRA_ICOUNT + 8);
    out.set(r.id, e + extraLen);
    out.set(r.name, e + extraLen + r.id.length);
    off += entryBytes(r);
  }
  return out;
}

/**
 * The metadata QEMU's pre-write overlap check ("cached" mode) finds in the clusters of
 * [offset, offset + size), named as it names them, or null; tested in QEMU's order. A repair
 * allocates only clusters with refcount 0, so this matters where the refcount pass left metadata
 * uncounted: a region running one cluster or more past the end of the file is not counted.
 * `ignore`: the kind the write itself goes to (QEMU leaves it out of the check).
 */
export function metadataOverlap(img: CheckImage, offset: number, size: number, ignore: 'active L1 table' | 'active L2 table' | null = null): string | null {
  const cs = img.clusterSize;
  if (offset < cs) return 'qcow2_header';
  const start = Math.floor(offset / cs) * cs;
  const end = Math.ceil((offset + size) / cs) * cs;
  const hits = (at: number, bytes: number) => bytes > 0 && start < at + bytes && at < end;
  const entry = (t: Uint8Array, i: number) => (u32(t, i * 8) & L.OFFSET_MASK_HI) * TWO32 + ((u32(t, i * 8 + 4) & L.OFFSET_MASK_LO) >>> 0);
  if (ignore !== 'active L1 table' && hits(img.header.l1TableOffset, img.header.l1Size * 8)) return 'active L1 table';
  if (hits(img.reftableOffset, img.reftableClusters * cs)) return 'refcount table';
  if (hits(img.header.snapshotsOffset, img.snapshotsSize)) return 'snapshot table';
  for (const sn of img.snapshots) if (hits(sn.l1Hi * TWO32 + sn.l1Lo, sn.l1Size * 8)) return 'inactive L1 table';
  if (ignore !== 'active L2 table') for (let i = 0; i < img.l1.length / 8; i++) if (hits(entry(img.l1, i), entry(img.l1, i) ? cs : 0)) return 'active L2 table';
  // A refcount table entry's offset is all of bits 9-63 (QEMU's REFT_OFFSET_MASK), not the 56 bits
  // of an L1 or L2 entry: a block at 2^63 + X is not at X.
  const block = (i: number) => u32(img.reftable, i * 8) * TWO32 + ((u32(img.reftable, i * 8 + 4) & L.OFFSET_MASK_LO) >>> 0);
  for (let i = 0; i < img.reftableEntries; i++) if (hits(block(i), block(i) ? cs : 0)) return 'refcount block';
  return null;
}

/**
 * Writes the in-memory snapshot table to new clusters and points the header at it. Returns the
 * clusters of the old table whose refcount reached 0 (to be discarded by the caller) and why
 * freeing the old table was refused (strerror text; nothing freed then), or, when
 * the new clusters overlap metadata (see metadataOverlap), that metadata's name: nothing but the
 * new clusters' refcounts has been written then, as in QEMU, whose overlap check stops the write.
 *
 * Crash safety, QEMU's order: new clusters' refcounts up, flush; the entries, flush; the 12 header
 * bytes (nb_snapshots + snapshots_offset) in one write, flush; only then the old table's refcounts
 * down. A crash before the header write leaks the new clusters; after it, the old ones.
 */
export function rewriteSnapshotTable(img: CheckImage): { freed: number[]; freeFailed: string | null } | { overlap: string } {
  const cs = img.clusterSize;
  const table = encodeRepairedTable(img.snapshots, Math.floor(img.header.size / 512) * 512);
  const refs = new Refcounts(img.file, img.clusterBits, img.refcountOrder, img.reftableOffset, img.reftableClusters);
  const newOffset = table.length ? refs.alloc(Math.ceil(table.length / cs)) : 0;
  refs.writeIncreases();
  refs.writeTable();
  img.file.flush();
  if (refs.relocatedFrom) {
    // Growing the refcount table moved it: the header follows before anything relies on it.
    const rt = new Uint8Array(12);
    const dv = new DataView(rt.buffer);
    dv.setUint32(0, Math.floor(refs.location.offset / TWO32));
    dv.setUint32(4, refs.location.offset % TWO32);
    dv.setUint32(8, refs.location.clusters);
    img.file.write(rt, L.H_REFCOUNT_TABLE_OFFSET);
    img.file.flush();
    refs.releaseOldTable();
    img.reftableOffset = refs.location.offset;
    img.reftableClusters = refs.location.clusters;
    img.reftable = refs.reftable;
  }
  const overlap = table.length ? metadataOverlap(img, newOffset, table.length) : null;
  if (overlap) return { overlap };
  if (table.length) img.file.write(table, newOffset);
  img.file.flush();
  const hdr = new Uint8Array(12);
  const dv = new DataView(hdr.buffer);
  dv.setUint32(0, img.snapshots.length);
  dv.setUint32(4, Math.floor(newOffset / TWO32));
  dv.setUint32(8, newOffset % TWO32);
  img.file.write(hdr, L.H_NB_SNAPSHOTS);
  img.file.flush();
  // Free the old table, all or nothing as QEMU's update_refcount: when one of its clusters is
  // already at 0 (the refcount pass did not count a table running past the end of the file), the
  // others' refcounts are some other structure's references, and none is dropped.
  // QEMU meets the clusters in order: one without a refcount block fails with EAGAIN (after QEMU
  // has created that block: qimg does not, the file stays as it was), one at 0 with EINVAL.
  //
  // QEMU looks a cluster's refcount block up with its refcount table index cut to 32 bits, so a
  // table far enough past the end of the file (index 2^32 or more) finds the block of an
  // unrelated cluster: one at refcount 0 fails the free with EINVAL as above; one in use would
  // have that unrelated refcount dropped, which qimg does not do (the table's own clusters,
  // past the end of the file, have no refcount to drop).
  const freed: number[] = [];
  let freeFailed: string | null = null;
  const oldOffset = img.header.snapshotsOffset;
  if (img.snapshotsSize > 0) {
    // Exact past 2^53 (the offset itself is, being cluster aligned and checked when read).
    const first = BigInt(oldOffset) / BigInt(cs);
    const last = first + BigInt(Math.floor((img.snapshotsSize - 1) / cs));
    const per = BigInt(refs.perBlock);
    const drop: number[] = [];
    for (let ci = first; ci <= last && !freeFailed; ci++) {
      const seen = (((ci / per) & 0xffffffffn) * per) | (ci % per);
      const at = seen >= BigInt(img.reftableEntries) * per ? -1 : Number(seen);
      if (at < 0 || !refs.covers(at)) freeFailed = 'Resource temporarily unavailable';
      else if (refs.get(at) <= 0) freeFailed = 'Invalid argument';
      else if (seen === ci) drop.push(at);
    }
    for (const ci of freeFailed ? [] : drop) {
      refs.add(ci, -1);
      if (refs.get(ci) === 0) freed.push(ci);
    }
  }
  refs.writeFinal();
  img.file.flush();
  img.header.nbSnapshots = img.snapshots.length;
  img.header.snapshotsOffset = newOffset;
  img.snapshotsSize = table.length;
  return { freed, freeFailed };
}
