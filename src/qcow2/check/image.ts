// What the checker opens: the header validated the way QEMU opens an image for checking, the
// active L1 table, the refcount table and the snapshot table read with the checker's leniency.
//
// QEMU's check mode skips two open-time refusals (an empty refcount table, a bad snapshot
// table): the checker reports them instead, so this module does not use Qcow2Image.open().

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
  /** extra_data_size as read (cut to the limit by a repair). */
  extraSize: number;
  /** The stored entry, kept when a repair may rewrite the table. */
  raw?: SnapshotRaw;
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

  /**
   * Validates and reads what QEMU reads when it opens an image with BDRV_O_CHECK. `repaired`: the
   * double check after a repair, which QEMU runs on the image it already has open, so nothing is
   * validated again: the first open validated every field but the refcount table's, which only the
   * repair's rebuild changed, and it may have grown that table past the 8 MiB an open accepts.
   */
  static open(file: BlockFile, filename: string, repaired = false): CheckImage {
    const header = Qcow2Image.readHeader(file);
    // Check mode accepts an empty refcount table and defers the snapshot table to the check.
    const { snapshotsOffset: _deferredToCheck, ...wide } = header.wide ?? {};
    if (!repaired) validateHeader({ ...header, refcountTableClusters: header.refcountTableClusters || 1, nbSnapshots: 0, snapshotsOffset: 0, wide }, file.size(), { check: true, noSecrets: true });
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
/** QEMU keeps snapshot table offsets in a C int while reading. */
const INT_MAX = 0x7fffffff;
/** Snapshot table bytes read at once. */
const SN_WINDOW = 1 << 20;

/** What a repair needs to write an entry back (kept only when the table may be rewritten). */
export interface SnapshotRaw {
  /** The 40-byte fixed part as stored. */
  fixed: Uint8Array;
  /** Extra data as read: at most the first MAX_SNAPSHOT_EXTRA_DATA bytes. */
  extra: Uint8Array;
  /** id and name as C strings: the stored bytes up to the first NUL. */
  id: Uint8Array;
  name: Uint8Array;
}

export interface SnapshotReadResult {
  corruptions: number;
  corruptionsFixed: number;
}

/** Reads file bytes through a window, so a table of many small entries costs few reads. */
export class Window {
  private buf = new Uint8Array(0);
  private start = 0;
  constructor(private readonly file: BlockFile) {}
  /** `len` bytes at `pos` (a view valid until the next call); past the end of the file: zeros. */
  at(pos: number, len: number): Uint8Array {
    if (pos < this.start || pos + len > this.start + this.buf.length) {
      this.buf = new Uint8Array(Math.max(len, SN_WINDOW));
      this.start = pos;
      readAt(this.file, this.buf, pos);
    }
    return this.buf.subarray(pos - this.start, pos - this.start + len);
  }
}

/** A C string: the bytes up to the first NUL. */
function cString(b: Uint8Array): Uint8Array {
  const z = b.indexOf(0);
  return z < 0 ? b : b.subarray(0, z);
}

/**
 * Reads the snapshot table as `qemu-img check` does: limits become messages and a failed check
 * rather than an open error. Under -r all (`repair`) an overlong table or too many entries lose
 * their overhanging entries (nb_snapshots is rewritten at once: that only leaks the rest, which
 * the refcount pass then frees) and overlong extra data is cut to the limit; the caller rewrites
 * the table when the returned corruptions say so. Appends messages to `msgs`; throws CheckAbort
 * on failure.
 */
export function readSnapshotsForCheck(img: CheckImage, msgs: string[], prog: string, repair = false): SnapshotReadResult {
  let nb = img.header.nbSnapshots;
  const off = img.header.snapshotsOffset;
  const res: SnapshotReadResult = { corruptions: 0, corruptionsFixed: 0 };
  img.snapshots = [];
  img.snapshotsSize = 0;
  let overhang = 0;
  if (nb > L.MAX_SNAPSHOTS && repair) {
    msgs.push(`Discarding ${nb - L.MAX_SNAPSHOTS} overhanging snapshots`);
    overhang += nb - L.MAX_SNAPSHOTS;
    nb = L.MAX_SNAPSHOTS;
  }
  if (nb > L.MAX_SNAPSHOTS) {
    msgs.push(`${prog}: ERROR snapshot table too large`);
    msgs.push(`You can force-remove all ${nb - L.MAX_SNAPSHOTS} overhanging snapshots with ${prog} check -r all`);
    throw new CheckAbort('File too large');
  }
  // QEMU's table rule (aligned, ending by INT64_MAX); a table past 2^53 reads as zeros.
  const offBig = img.header.wide?.snapshotsOffset ?? BigInt(off);
  if (offBig % BigInt(img.clusterSize) !== 0n || offBig + BigInt(nb * SN_FIXED) > 2n ** 63n - 1n || BigInt(Number(offBig)) !== offBig) {
    msgs.push(`${prog}: ERROR snapshot table offset invalid`);
    throw new CheckAbort('Invalid argument');
  }
  const win = new Window(img.file);
  const dec = new TextDecoder();
  let dropped = 0;
  // Positions relative to the table: past 2^53 an absolute one would round (a 1 KiB ulp at
  // 2^62), losing the table's size; reads there are past the end of the file (zeros) anyway.
  let pos = 0;
  let tableLength = 0;
  for (let i = 0; i < nb; i++) {
    const pre = pos;
    tableLength = Math.ceil(tableLength / 8) * 8;
    pos = Math.ceil(pos / 8) * 8;
    const hdr = win.at(off + pos, SN_FIXED);
    pos += SN_FIXED;
    const l1Hi = u32(hdr, L.SN_L1_TABLE_OFFSET);
    const l1Lo = u32(hdr, L.SN_L1_TABLE_OFFSET + 4);
    const l1Size = u32(hdr, L.SN_L1_SIZE);
    const idSize = u16(hdr, L.SN_ID_STR_SIZE);
    const nameSize = u16(hdr, L.SN_NAME_SIZE);
    const fixed = repair ? hdr.slice() : null;
    let extraSize = u32(hdr, L.SN_EXTRA_DATA_SIZE);
    if (extraSize > L.MAX_SNAPSHOT_EXTRA_DATA) {
      if (!repair) {
        msgs.push(`${prog}: ERROR failed to read the snapshot table: Too much extra metadata in snapshot table entry ${i}`);
        msgs.push(`You can force-remove this extra metadata with ${prog} check -r all`);
        throw new CheckAbort('File too large');
      }
      msgs.push(`Discarding too much extra metadata in snapshot table entry ${i} (${extraSize} > ${L.MAX_SNAPSHOT_EXTRA_DATA})`);
      dropped++;
    }
    // The known fields, then any unknown extra data (cut at the limit); the id follows the
    // extra data as stored, however much of it was kept.
    const extraEnd = pos + extraSize;
    extraSize = Math.min(extraSize, L.MAX_SNAPSHOT_EXTRA_DATA);
    const extra = repair ? win.at(off + pos, extraSize).slice() : null;
    pos = extraEnd;
    const strs = win.at(off + pos, idSize + nameSize);
    const id = cString(strs.subarray(0, idSize));
    const name = cString(strs.subarray(idSize));
    pos += idSize + nameSize;
    tableLength += SN_FIXED + extraSize + idSize + nameSize;
    if (tableLength > L.MAX_SNAPSHOT_TABLE_BYTES || pos > INT_MAX) {
      if (!repair) {
        msgs.push(`${prog}: ERROR failed to read the snapshot table: Snapshot table is too big`);
        msgs.push(`You can force-remove all ${nb - i} overhanging snapshots with ${prog} check -r all`);
        throw new CheckAbort('File too large');
      }
      msgs.push(`Discarding ${nb - i} overhanging snapshots (snapshot table is too big)`);
      overhang += nb - i;
      nb = i;
      pos = pre;
      break;
    }
    const sn: CheckSnapshot = { id: dec.decode(id), name: dec.decode(name), l1Hi, l1Lo, l1Size, extraSize };
    if (repair) sn.raw = { fixed: fixed!, extra: extra!, id: id.slice(), name: name.slice() };
    img.snapshots.push(sn);
  }
  img.snapshotsSize = pos;
  res.corruptions += overhang + dropped;
  if (overhang) {
    // nb_snapshots first, on its own: the refcount pass counts the table the header describes.
    const b = new Uint8Array(4);
    new DataView(b.buffer).setUint32(0, nb);
    img.file.write(b, L.H_NB_SNAPSHOTS);
    img.file.flush();
    img.header.nbSnapshots = nb;
    res.corruptionsFixed += overhang;
    res.corruptions -= overhang;
  }
  if (img.header.version >= 3) {
    // v3 entries must carry at least vm_state_size_large and disk_size.
    for (let i = 0; i < img.snapshots.length; i++) {
      if (img.snapshots[i]!.extraSize < L.SN_EXTRA_V3_MIN_BYTES) {
        res.corruptions++;
        msgs.push(`${repair ? 'Repairing' : 'ERROR'} snapshot table entry ${i} is incomplete`);
      }
    }
  }
  return res;
}
