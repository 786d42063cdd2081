// Internal snapshots: create, apply (revert), delete, and what deleting one would free.
//
// Each operation is a short sequence of ImageWriter.commit() calls in QEMU's order, so a crash
// at any point leaves leaked clusters at most. Reference changes are accumulated for a whole
// tree at once (tree.ts) and applied with one read-modify-write per refcount block.
// OFLAG_COPIED is only ever left CLEAR where it could be set (costs an extra copy later), never
// set where a cluster is shared.

import { QimgError } from '../errors.js';
import { decodeString, encodeString } from '../format/bytes.js';
import { hasIncompat, l1EntriesFor } from '../format/header.js';
import * as L from '../format/layout.js';
import { encodeSnapshotTable, type SnapshotEntry } from '../format/snapshot-table.js';
import type { BackingPolicy } from './open.js';
import { Qcow2Image } from './qcow2-image.js';
import { Refcounts, type RefcountEdit } from './refcounts.js';
import { accumulateTree, applyTreeRefs, assertTreeInFile } from './tree.js';
import { openWriter, type ImageWriter } from './writer.js';

/** How a snapshot is named on the command line. */
export type SnapshotRef = { idOrName: string } | { name: string } | { id: string };

function describeRef(ref: SnapshotRef): string {
  return 'idOrName' in ref ? ref.idOrName : 'name' in ref ? ref.name : ref.id;
}

export function findSnapshotEntry(snaps: SnapshotEntry[], ref: SnapshotRef): SnapshotEntry | null {
  if ('id' in ref) return snaps.find((s) => s.id === ref.id) ?? null;
  if ('name' in ref) return snaps.find((s) => s.name === ref.name) ?? null;
  return snaps.find((s) => s.id === ref.idOrName) ?? snaps.find((s) => s.name === ref.idOrName) ?? null;
}

/** Clusters a tree may reference: the file and everything allocated (past that is corruption). */
function clusterLimit(w: ImageWriter): number {
  const img = w.img;
  return Math.max(w.refs.endCluster, Math.ceil(img.fileSize / img.clusterSize)) + 1;
}

/**
 * `d` on every cluster each tree reaches (by its L1 table), applied to the in-memory refcounts
 * and checked. Returns the L2 tables whose data clusters all ended at refcount 1 — when no
 * cluster reached 0, so that those values are final (see ImageWriter.recomputeCopied).
 * `frees.activeData`: the active tree stays, so its data must stay counted (a delete).
 */
function changeTreeRefs(
  w: ImageWriter,
  trees: Array<[Uint8Array, number]>,
  also?: (e: RefcountEdit) => void,
  frees: { allowed: string | null; activeL2: boolean; activeData?: boolean } = { allowed: null, activeL2: false },
): Set<number> {
  const e = w.refs.edit();
  applyTreeRefs(w.img, trees, e, clusterLimit(w));
  const final = e.zeroCount === 0;
  also?.(e);
  // A damaged entry can name metadata, or data the active tree uses, as its own data cluster;
  // dropping that reference must not free it, nor leave shared data counted as unshared.
  try {
    if (e.zeroCount) w.assertFreesNoMetadata(e.zeroClusters, frees.allowed, frees.activeL2);
    if (frees.activeData) w.assertActiveDataCounted(!final);
  } catch (err) {
    e.cancel();
    throw err;
  }
  e.finish();
  return final ? e.endedAtOne : new Set();
}

function refuseDataFile(img: Qcow2Image, verb: string, what: string): void {
  if (hasIncompat(img.header, L.INCOMPAT_DATA_FILE)) {
    throw new QimgError('UNSUPPORTED', `Could not ${verb} snapshot '${what}': -95 (Operation not supported)`);
  }
}

/** The next ID: one more than the highest numeric ID (QEMU's rule). */
export function nextSnapshotId(snaps: SnapshotEntry[]): string {
  let max = 0;
  for (const s of snaps) {
    const n = /^\d+$/.test(s.id) ? Number(s.id) : 0;
    if (n > max) max = n;
  }
  return String(max + 1);
}

/** Current wall time in microseconds, as QEMU stamps snapshots. */
function nowMicros(): number {
  return Math.floor((performance.timeOrigin + performance.now()) * 1000);
}

export interface NewSnapshot {
  name: string;
  /** Microseconds since the epoch (defaults to now). */
  dateMicros?: number;
}

/**
 * QEMU's create order: (1) clear OFLAG_COPIED in the active tree; (2) the L1 copy in fresh
 * clusters and +1 on everything the active tree references; (3) the new snapshot table and
 * the header naming it. A crash before (3) lands leaves only leaks. The +1s are applied in
 * memory first (refusing an overflow before anything is written) and land with (1): raising
 * refcounts early is as safe as raising them late, as long as it is before (3).
 */
export function createSnapshotOn(w: ImageWriter, snap: NewSnapshot): SnapshotEntry {
  const img = w.img;
  refuseDataFile(img, 'create', snap.name);
  w.assertSnapshotsClear();
  if (img.snapshots.length >= L.MAX_SNAPSHOTS) throw new QimgError('UNSUPPORTED', `Could not create snapshot '${snap.name}': Too many snapshots`);
  w.commit();
  // Refuse before changing anything if a refcount would overflow.
  changeTreeRefs(w, [[img.l1, +1]]);
  // Both new cluster runs are taken now, in memory, so that an allocation QEMU's overlap check
  // would refuse (refs.fence) fails before the first write. On disk their refcounts land with
  // the first commit, ahead of anything naming them: a crash leaves them leaked, no worse.
  const cs = img.clusterSize;
  const l1 = img.l1.slice();
  const l1Offset = l1.length > 0 ? w.refs.alloc(Math.ceil(l1.length / cs)) : 0;
  const entries = [...img.snapshots, newEntry(img, snap, l1Offset, l1.length / 8)];
  const table = encodeSnapshotTable(entries);
  const tableOffset = w.refs.alloc(Math.ceil(table.length / cs));
  w.clearCopied();

  if (l1.length > 0) {
    w.file.write(l1, l1Offset); // nothing references it until the table lands
    if (l1Offset + l1.length > img.fileSize) img.fileSize = l1Offset + l1.length;
  }
  w.commit();

  w.replaceSnapshotTable(table, entries.length, tableOffset);
  w.commit();
  img.snapshots = entries;
  return entries[entries.length - 1]!;
}

/** The table entry of a snapshot being created now, of the active tree at `l1Offset`. */
function newEntry(img: Qcow2Image, snap: NewSnapshot, l1Offset: number, l1Size: number): SnapshotEntry {
  const nameBytes = encodeString(snap.name).subarray(0, L.MAX_SNAPSHOT_NAME_BYTES);
  const us = snap.dateMicros ?? nowMicros();
  const entry: SnapshotEntry = {
    l1TableOffset: l1Offset,
    l1Size,
    id: nextSnapshotId(img.snapshots),
    name: decodeString(nameBytes),
    nameBytes: nameBytes.slice(),
    dateSec: Math.floor(us / 1e6),
    dateNsec: (us % 1e6) * 1000,
    vmClockNsec: 0n,
    vmStateSize32: 0,
    extraData: new Uint8Array(L.SN_EXTRA_BYTES_WRITTEN),
    vmStateSizeLarge: 0,
    diskSize: img.virtualSize,
    icount: 0n,
  };
  entry.idBytes = encodeString(entry.id);
  return entry;
}

/**
 * QEMU's apply order: (1) +1 on the snapshot's tree; (2) the active L1 overwritten in one write
 * with the snapshot's (flags clear), then -1 on the old active tree; (3) OFLAG_COPIED set where
 * the refcount is 1. The virtual size goes back to the snapshot's.
 * qimg nets (1) and (2) in memory and lets commit() write them: refcounts that end higher are
 * raised before the L1 write, those that end lower drop after it, and those the two trees share
 * (+1 -1) are not written at all. On disk every refcount stays >= its true count throughout,
 * as with QEMU's order; what differs is only that shared clusters never pass through +1. (A
 * shared cluster already at the maximum refcount therefore does not fail the apply as in QEMU.)
 */
export function applySnapshotOn(w: ImageWriter, ref: SnapshotRef): SnapshotEntry {
  const img = w.img;
  const what = describeRef(ref);
  const sn = findSnapshotEntry(img.snapshots, ref);
  if (!sn) throw new QimgError('NOT_FOUND', `Could not apply snapshot '${what}': Failed to load snapshot: No such file or directory`);
  w.assertSnapshotsClear();
  refuseDataFile(img, 'apply', what);
  if (sn.l1Size > L.MAX_L1_ENTRIES) throw new QimgError('BAD_IMAGE', `Could not apply snapshot '${what}': Snapshot L1 table too large`);
  // The size goes back to the snapshot's, as a resize would take it (QEMU truncates first): the
  // active L1 must then cover it even where the snapshot's own L1 table does not (a damaged
  // disk_size), or the image could no longer be opened.
  const size = sn.diskSize !== null && sn.diskSize !== img.virtualSize ? sn.diskSize : null;
  let l1Entries = sn.l1Size;
  if (size !== null) {
    const failed = (why: string) => new QimgError('BAD_IMAGE', `Could not apply snapshot '${what}': Failed to load snapshot: ${why}`);
    if (size % 512 !== 0) throw failed('The new size must be a multiple of 512');
    const need = l1EntriesFor(size, img.clusterBits, img.extendedL2);
    if (need > L.MAX_L1_ENTRIES) throw failed('Failed to grow the L1 table: File too large');
    l1Entries = Math.max(l1Entries, need);
  }
  w.commit();
  const snL1 = img.readTable(sn.l1TableOffset, sn.l1Size * 8, `L1 table of snapshot ${sn.id}`);
  // It becomes the active tree, whose L2 tables the OFLAG_COPIED pass below rewrites.
  w.assertTreeClear(snL1, `L1 table of snapshot ${sn.id}`);
  // Re-count first: a tree that cannot be re-counted refuses the apply with nothing written.
  changeTreeRefs(
    w,
    [
      [snL1, +1],
      [img.l1, -1],
    ],
    undefined,
    { allowed: null, activeL2: true }, // the old active tree's own tables may go
  );
  w.ensureL1(l1Entries);
  if (size !== null) w.setVirtualSize(size);
  const fresh = snL1.slice();
  for (let i = 0; i < fresh.length; i += 8) fresh[i] = fresh[i]! & 0x7f; // COPIED recomputed below
  w.replaceL1(fresh);
  img.dropCaches();
  w.commit();

  w.recomputeCopied();
  w.commit();
  return sn;
}

/**
 * QEMU's delete order: (1) the table without the entry; (2) -1 on the snapshot's tree and its
 * L1 table; (3) OFLAG_COPIED set in the active tree where refcounts dropped to 1.
 */
export function deleteSnapshotOn(w: ImageWriter, ref: SnapshotRef): SnapshotEntry {
  const img = w.img;
  const what = describeRef(ref);
  const sn = findSnapshotEntry(img.snapshots, ref);
  if (!sn) throw new QimgError('NOT_FOUND', `Could not delete snapshot '${what}': snapshot not found`);
  if (sn.l1Size > L.MAX_L1_ENTRIES) throw new QimgError('BAD_IMAGE', `Could not delete snapshot '${what}': Snapshot L1 table too large`);
  w.assertSnapshotsClear();
  w.commit();
  const snL1 = img.readTable(sn.l1TableOffset, sn.l1Size * 8, `L1 table of snapshot ${sn.id}`);
  // Walk (and so validate) the snapshot's tree before anything changes: a tree that cannot be
  // read refuses the delete with the file untouched, instead of after the entry is gone.
  // The -1s are applied in memory now, so a tree that cannot be re-counted refuses the delete
  // before anything is written; commit() writes decreases only after the header names the new
  // table, which is QEMU's order.
  assertTreeInFile(img, img.l1); // the OFLAG_COPIED pass at the end reads the active tree
  const atOne = changeTreeRefs(w, [[snL1, -1]], (e) => addL1Clusters(e, sn, img.clusterSize, -1), { allowed: `L1 table of snapshot ${sn.id}`, activeL2: false, activeData: true });

  const entries = img.snapshots.filter((s) => s !== sn);
  w.replaceSnapshotTable(encodeSnapshotTable(entries), entries.length);
  img.dropCaches();
  w.commit();
  img.snapshots = entries;

  w.recomputeCopied(atOne);
  w.commit();
  return sn;
}

function addL1Clusters(e: RefcountEdit, sn: SnapshotEntry, cs: number, d: number): void {
  if (sn.l1Size === 0) return;
  const first = Math.floor(sn.l1TableOffset / cs);
  const last = Math.floor((sn.l1TableOffset + sn.l1Size * 8 - 1) / cs);
  for (let c = first; c <= last; c++) e.add(c, d);
}

/** Table entries and clusters snapshotFreedBytes may visit in all (about a second of work). */
export const FREED_BYTES_WORK_BUDGET = 1 << 25;

/**
 * Bytes deleting each snapshot would free: every host cluster whose refcount would drop to
 * zero (data only it reaches, L2 tables only it references, its own L1 table).
 */
export function snapshotFreedBytes(img: Qcow2Image): Map<string, number> {
  const out = new Map<string, number>();
  if (img.snapshots.length === 0) return out;
  const h = img.header;
  const refs = new Refcounts(img.file, h.clusterBits, h.refcountOrder, h.refcountTableOffset, h.refcountTableClusters);
  const rc = refs.reader();
  const n = Math.max(refs.endCluster, Math.ceil(img.fileSize / img.clusterSize)) + 1;
  // Snapshots sharing an L1 table free the same bytes; distinct trees cost a walk each, so the
  // total walk is budgeted and snapshots past the budget get no figure (an image with 65,536
  // snapshots must still list in seconds).
  const memo = new Map<string, number>();
  let work = 0;
  for (const sn of img.snapshots) {
    const key = `${sn.l1TableOffset}:${sn.l1Size}`;
    const known = memo.get(key);
    if (known !== undefined) {
      out.set(sn.id, known);
      continue;
    }
    work += sn.l1Size + n;
    if (work > FREED_BYTES_WORK_BUDGET) break;
    const deltas = new Int32Array(n);
    const l1 = img.readTable(sn.l1TableOffset, sn.l1Size * 8, `L1 table of snapshot ${sn.id}`);
    for (let i = 0; i < l1.length; i += 8) if (l1[i + 1] || l1[i + 2] || l1[i + 3] || l1[i + 4] || l1[i + 5] || l1[i + 6]) work += img.l2Entries;
    if (work > FREED_BYTES_WORK_BUDGET) break;
    accumulateTree(img, l1, deltas, -1);
    if (sn.l1Size > 0) {
      const cs = img.clusterSize;
      for (let c = Math.floor(sn.l1TableOffset / cs); c <= Math.floor((sn.l1TableOffset + sn.l1Size * 8 - 1) / cs); c++) deltas[c] = deltas[c]! - 1;
    }
    let freed = 0;
    for (let c = 0; c < n; c++) {
      const d = deltas[c]!;
      if (d !== 0 && rc(c) + d <= 0) freed++;
    }
    out.set(sn.id, freed * img.clusterSize);
    memo.set(key, freed * img.clusterSize);
  }
  return out;
}

// ---------------------------------------------------------------- whole-command entry points

export interface SnapshotWriteOptions {
  backing?: BackingPolicy;
}

export interface SnapshotOpOptions {
  /** Receives the repair log when a dirty image is repaired on open (qemu-img prints it). */
  onRepair?: (messages: string[]) => void;
}

/**
 * Runs one snapshot operation on a writer. `rawError` is qemu-img's refusal for a raw image;
 * `einval` its words after the "Could not ... 'x': " prefix when QEMU's refcount update fails with
 * EINVAL (a refcount past its width's maximum), where qimg knows, and refuses, before writing.
 */
async function withWriter<T>(path: string, rawError: string, einval: string, opts: SnapshotOpOptions, fn: (w: ImageWriter) => T): Promise<T> {
  const w = await openWriter(path, { openBacking: false, rawError, onRepair: opts.onRepair });
  try {
    const r = fn(w);
    await w.close();
    return r;
  } catch (err) {
    await w.abandon();
    // "Could not create snapshot 'x': <reason>", as qemu-img words a failed operation.
    const verb = rawError.slice(0, rawError.indexOf("':") + 2);
    if (err instanceof QimgError && err.data.refcountOverflow) throw new QimgError(err.code, `${verb} ${einval}`, { ...err.data, detail: err.message });
    if (err instanceof QimgError && !err.message.startsWith('Could not')) throw new QimgError(err.code, `${verb} ${err.message}`, err.data);
    throw err;
  }
}

export function createSnapshot(path: string, snap: NewSnapshot, opts: SnapshotOpOptions = {}): Promise<SnapshotEntry> {
  return withWriter(path, `Could not create snapshot '${snap.name}': -95 (Operation not supported)`, '-22 (Invalid argument)', opts, (w) => createSnapshotOn(w, snap));
}

export function applySnapshot(path: string, ref: SnapshotRef, opts: SnapshotOpOptions = {}): Promise<SnapshotEntry> {
  return withWriter(path, `Could not apply snapshot '${describeRef(ref)}': Block driver does not support snapshots`, 'Failed to load snapshot: Invalid argument', opts, (w) => applySnapshotOn(w, ref));
}

export function deleteSnapshot(path: string, ref: SnapshotRef, opts: SnapshotOpOptions = {}): Promise<SnapshotEntry> {
  return withWriter(path, `Could not delete snapshot '${describeRef(ref)}': snapshot not found`, 'Failed to free the cluster and L1 table: Invalid argument', opts, (w) => deleteSnapshotOn(w, ref));
}
