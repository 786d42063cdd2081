// What the checker opens: the header validated the way QEMU opens an image for checking, the
// active L1 table, the refcount table and the snapshot table read with the checker's leniency.
//
// QEMU's check mode skips two open-time refusals (an empty refcount table, a bad snapshot
// table): the checker reports them instead, so this module does not use Qcow2Image.open().

import { QimgError } from '../errors.js';
import { hasIncompat, validateHeader, type Header } from '../format/header.js';
import { u16, u32 } from '../format/bytes.js';
import * as L from '../format/layout.js';
import { readAt, type BlockFile } from '../io/file.js';
import { Qcow2Image } from '../engine/qcow2-image.js';

export interface CheckSnapshot {
  id: string;
  name: string;
  /** l1_table_offset as (hi, lo): a corrupt value may not fit a JS number exactly. */
  l1Hi: number;
  l1Lo: number;
  l1Size: number;
}

/** Thrown by the checker for qemu-img's `Check failed: REASON` (after any messages). */
export class CheckAbort extends Error {
  constructor(readonly reason: string) {
    super(`Check failed: ${reason}`);
  }
}

export class CheckImage {
  readonly clusterBits: number;
  readonly clusterSize: number;
  readonly extendedL2: boolean;
  /** Bytes per L2 entry (8, or 16 with extended L2). */
  readonly l2EntryBytes: number;
  readonly l2Entries: number;
  readonly refcountOrder: number;
  readonly hasDataFile: boolean;
  /** Mutable: a rebuild moves the refcount table. */
  reftableOffset: number;
  reftableClusters: number;
  reftable: Uint8Array;
  l1: Uint8Array;
  snapshots: CheckSnapshot[] = [];
  snapshotsSize = 0;

  constructor(
    readonly file: BlockFile,
    readonly filename: string,
    readonly header: Header,
  ) {
    this.clusterBits = header.clusterBits;
    this.clusterSize = 2 ** header.clusterBits;
    this.extendedL2 = hasIncompat(header, L.INCOMPAT_EXTL2);
    this.l2EntryBytes = this.extendedL2 ? 16 : 8;
    this.l2Entries = this.clusterSize / this.l2EntryBytes;
    this.refcountOrder = header.refcountOrder;
    this.hasDataFile = hasIncompat(header, L.INCOMPAT_DATA_FILE);
    this.reftableOffset = header.refcountTableOffset;
    this.reftableClusters = header.refcountTableClusters;
    this.reftable = new Uint8Array(0);
    this.l1 = new Uint8Array(0);
  }

  /** Validates and reads what QEMU reads when it opens an image with BDRV_O_CHECK. */
  static open(file: BlockFile, filename: string): CheckImage {
    const header = Qcow2Image.readHeader(file);
    // Check mode accepts an empty refcount table and defers the snapshot table to the check.
    validateHeader({ ...header, refcountTableClusters: header.refcountTableClusters || 1, nbSnapshots: 0, snapshotsOffset: 0 }, file.size());
    if (header.cryptMethod !== L.CRYPT_NONE) {
      throw new QimgError('UNSUPPORTED', "Parameter 'encrypt.key-secret' is required for cipher");
    }
    const img = new CheckImage(file, filename, header);
    img.l1 = new Uint8Array(header.l1Size * 8);
    readAt(file, img.l1, header.l1TableOffset);
    img.loadReftable();
    return img;
  }

  loadReftable(): void {
    this.reftable = new Uint8Array(this.reftableClusters * this.clusterSize);
    readAt(this.file, this.reftable, this.reftableOffset);
  }

  get reftableEntries(): number {
    return this.reftable.length / 8;
  }

  /** Refcount block entries per block, as a shift. */
  get refblockBits(): number {
    return this.clusterBits + 3 - this.refcountOrder;
  }
}

/** Bytes of a snapshot table entry's fixed part (QCowSnapshotHeader). */
const SN_FIXED = L.SN_HEADER_BYTES;

/**
 * Reads the snapshot table as `qemu-img check` does: limits become messages and a failed check
 * rather than an open error. Appends messages to `msgs`; throws CheckAbort on failure.
 */
export function readSnapshotsForCheck(img: CheckImage, msgs: string[], prog: string): void {
  const nb = img.header.nbSnapshots;
  const off = img.header.snapshotsOffset;
  img.snapshots = [];
  img.snapshotsSize = 0;
  if (nb > L.MAX_SNAPSHOTS) {
    msgs.push(`${prog}: ERROR snapshot table too large`);
    msgs.push(`You can force-remove all ${nb - L.MAX_SNAPSHOTS} overhanging snapshots with ${prog} check -r all`);
    throw new CheckAbort('File too large');
  }
  if (off % img.clusterSize !== 0 || off + nb * SN_FIXED > Number.MAX_SAFE_INTEGER) {
    msgs.push(`${prog}: ERROR snapshot table offset invalid`);
    throw new CheckAbort('Invalid argument');
  }
  const hdr = new Uint8Array(SN_FIXED);
  let pos = off;
  for (let i = 0; i < nb; i++) {
    readAt(img.file, hdr, pos);
    pos += SN_FIXED;
    const l1Hi = u32(hdr, L.SN_L1_TABLE_OFFSET);
    const l1Lo = u32(hdr, L.SN_L1_TABLE_OFFSET + 4);
    const l1Size = u32(hdr, L.SN_L1_SIZE);
    const idSize = u16(hdr, L.SN_ID_STR_SIZE);
    const nameSize = u16(hdr, L.SN_NAME_SIZE);
    const extra = u32(hdr, L.SN_EXTRA_DATA_SIZE);
    if (extra > L.MAX_SNAPSHOT_EXTRA_DATA) {
      msgs.push(`${prog}: ERROR failed to read the snapshot table: Too much extra metadata in snapshot table entry ${i}`);
      msgs.push(`You can force-remove this extra metadata with ${prog} check -r all`);
      throw new CheckAbort('File too large');
    }
    pos += extra;
    const strs = new Uint8Array(idSize + nameSize);
    readAt(img.file, strs, pos);
    pos += idSize + nameSize;
    const dec = new TextDecoder();
    img.snapshots.push({ id: dec.decode(strs.subarray(0, idSize)), name: dec.decode(strs.subarray(idSize)), l1Hi, l1Lo, l1Size });
    pos = off + Math.ceil((pos - off) / 8) * 8;
    if (pos - off > L.MAX_SNAPSHOT_TABLE_BYTES) {
      msgs.push(`${prog}: ERROR failed to read the snapshot table: Snapshot table exceeds the maximum size`);
      throw new CheckAbort('File too large');
    }
  }
  img.snapshotsSize = pos - off;
}
