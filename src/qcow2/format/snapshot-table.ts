// Snapshot table entries: fixed 40-byte part, extra data, id, name, padding to 8 bytes.

import { QimgError, hex } from '../errors.js';
import { align, decodeString, encodeString, setU16, setU32, setU64, setU64n, u16, u32, u64n } from './bytes.js';
import * as L from './layout.js';

export interface SnapshotEntry {
  l1TableOffset: number;
  l1Size: number;
  id: string;
  name: string;
  dateSec: number;
  dateNsec: number;
  /** Guest run time in ns; u64 on disk (bigint so > 104 days stays exact). */
  vmClockNsec: bigint;
  /** The 32-bit vm_state_size field. */
  vmStateSize32: number;
  /** Extra data verbatim (fields QEMU knows are decoded below; the rest is preserved). */
  extraData: Uint8Array;
  vmStateSizeLarge: number | null;
  diskSize: number | null;
  /** null when absent or -1. */
  icount: bigint | null;
  /**
   * Fields past 2^53 exactly as stored (the numbers above are then only close to them). QEMU
   * lists such entries; qimg lists them too, writes them back unchanged, and refuses to follow
   * them (no table or size is that large).
   */
  wide?: { l1TableOffset?: bigint; vmStateSizeLarge?: bigint; diskSize?: bigint };
  /** The id and name exactly as stored (a name cut at 255 bytes may end mid-character). */
  idBytes?: Uint8Array;
  nameBytes?: Uint8Array;
}

/** VM state size as QEMU reports it: the 64-bit extra field when present. */
export function vmStateSize(e: SnapshotEntry): number {
  return e.vmStateSizeLarge ?? e.vmStateSize32;
}

export interface DecodedTable {
  entries: SnapshotEntry[];
  /** Bytes the table occupies (sum of padded entries). */
  byteLength: number;
}

const ICOUNT_NONE = 0xffffffffffffffffn;
const MAX_SAFE = BigInt(Number.MAX_SAFE_INTEGER);

/** Writes a u64 field: the exact stored value when the entry still holds the number read with it. */
function setField(buf: Uint8Array, off: number, v: number, exact: bigint | undefined): void {
  if (exact !== undefined && Number(exact) === v) setU64n(buf, off, exact);
  else setU64(buf, off, v);
}

/**
 * Decodes `count` entries from `buf` (which starts at snapshots_offset). Throws BAD_IMAGE naming
 * the entry when the table runs past `buf` or breaks a QEMU limit.
 */
export function decodeSnapshotTable(buf: Uint8Array, count: number, tableOffset: number): DecodedTable {
  if (count > L.MAX_SNAPSHOTS) throw new QimgError('BAD_IMAGE', 'Too many snapshots');
  const entries: SnapshotEntry[] = [];
  let off = 0;
  for (let i = 0; i < count; i++) {
    const at = `snapshot table entry ${i} at ${hex(tableOffset + off)}`;
    if (off + L.SN_HEADER_BYTES > buf.length) throw new QimgError('BAD_IMAGE', `Snapshot table is truncated (${at})`);
    const idSize = u16(buf, off + L.SN_ID_STR_SIZE);
    const nameSize = u16(buf, off + L.SN_NAME_SIZE);
    const extraSize = u32(buf, off + L.SN_EXTRA_DATA_SIZE);
    if (extraSize > L.MAX_SNAPSHOT_EXTRA_DATA) {
      throw new QimgError('BAD_IMAGE', `Too much extra metadata in snapshot table entry ${i}`);
    }
    const extraStart = off + L.SN_HEADER_BYTES;
    const idStart = extraStart + extraSize;
    const nameStart = idStart + idSize;
    const end = nameStart + nameSize;
    if (end > buf.length) throw new QimgError('BAD_IMAGE', `Snapshot table is truncated (${at})`);
    const extraData = buf.slice(extraStart, idStart);
    const wide: NonNullable<SnapshotEntry['wide']> = {};
    /** A u64 field as a number, kept exactly in `wide` when past 2^53. */
    const field = (b: Uint8Array, o: number, key: keyof typeof wide): number => {
      const v = u64n(b, o);
      if (v > MAX_SAFE) wide[key] = v;
      return Number(v);
    };
    const e: SnapshotEntry = {
      l1TableOffset: field(buf, off + L.SN_L1_TABLE_OFFSET, 'l1TableOffset'),
      l1Size: u32(buf, off + L.SN_L1_SIZE),
      id: decodeString(buf.subarray(idStart, nameStart)),
      name: decodeString(buf.subarray(nameStart, end)),
      dateSec: u32(buf, off + L.SN_DATE_SEC),
      dateNsec: u32(buf, off + L.SN_DATE_NSEC),
      vmClockNsec: u64n(buf, off + L.SN_VM_CLOCK_NSEC),
      vmStateSize32: u32(buf, off + L.SN_VM_STATE_SIZE),
      extraData,
      vmStateSizeLarge: extraSize >= 8 ? field(extraData, L.SN_EXTRA_VM_STATE_SIZE_LARGE, 'vmStateSizeLarge') : null,
      diskSize: extraSize >= 16 ? field(extraData, L.SN_EXTRA_DISK_SIZE, 'diskSize') : null,
      icount: null,
      idBytes: buf.slice(idStart, nameStart),
      nameBytes: buf.slice(nameStart, end),
    };
    if (Object.keys(wide).length) e.wide = wide;
    if (extraSize >= 24) {
      const ic = u64n(extraData, L.SN_EXTRA_ICOUNT);
      e.icount = ic === ICOUNT_NONE ? null : ic;
    }
    entries.push(e);
    off = align(end, 8);
    if (off > L.MAX_SNAPSHOT_TABLE_BYTES) throw new QimgError('BAD_IMAGE', 'Snapshot table too large');
  }
  return { entries, byteLength: off };
}

/** Size in bytes of one encoded entry (padded). */
export function snapshotEntryBytes(e: SnapshotEntry): number {
  return align(L.SN_HEADER_BYTES + extraFor(e).length + idOf(e).length + nameOf(e).length, 8);
}

function idOf(e: SnapshotEntry): Uint8Array {
  return e.idBytes ?? encodeString(e.id);
}

function nameOf(e: SnapshotEntry): Uint8Array {
  return e.nameBytes ?? encodeString(e.name);
}

/** Extra data as written: the known 24 bytes updated from the decoded fields, unknown bytes after kept. */
function extraFor(e: SnapshotEntry): Uint8Array {
  const len = Math.max(e.extraData.length, L.SN_EXTRA_BYTES_WRITTEN);
  const out = new Uint8Array(len);
  out.set(e.extraData);
  setField(out, L.SN_EXTRA_VM_STATE_SIZE_LARGE, e.vmStateSizeLarge ?? e.vmStateSize32, e.wide?.vmStateSizeLarge);
  if (e.diskSize === null) throw new QimgError('USAGE', `snapshot ${e.id} has no disk size to write`);
  setField(out, L.SN_EXTRA_DISK_SIZE, e.diskSize, e.wide?.diskSize);
  setU64n(out, L.SN_EXTRA_ICOUNT, e.icount ?? ICOUNT_NONE);
  return out;
}

export function encodeSnapshotTable(entries: SnapshotEntry[]): Uint8Array {
  const total = entries.reduce((n, e) => n + snapshotEntryBytes(e), 0);
  const buf = new Uint8Array(total);
  let off = 0;
  for (const e of entries) {
    const extra = extraFor(e);
    const id = idOf(e);
    const name = nameOf(e);
    setField(buf, off + L.SN_L1_TABLE_OFFSET, e.l1TableOffset, e.wide?.l1TableOffset);
    setU32(buf, off + L.SN_L1_SIZE, e.l1Size);
    setU16(buf, off + L.SN_ID_STR_SIZE, id.length);
    setU16(buf, off + L.SN_NAME_SIZE, name.length);
    setU32(buf, off + L.SN_DATE_SEC, e.dateSec);
    setU32(buf, off + L.SN_DATE_NSEC, e.dateNsec);
    setU64n(buf, off + L.SN_VM_CLOCK_NSEC, e.vmClockNsec);
    // QEMU stores the 32-bit field too, and 0 there when the size does not fit in it.
    const vmState = e.vmStateSizeLarge ?? e.vmStateSize32;
    setU32(buf, off + L.SN_VM_STATE_SIZE, vmState <= 0xffffffff ? vmState : 0);
    setU32(buf, off + L.SN_EXTRA_DATA_SIZE, extra.length);
    buf.set(extra, off + L.SN_HEADER_BYTES);
    buf.set(id, off + L.SN_HEADER_BYTES + extra.length);
    buf.set(name, off + L.SN_HEADER_BYTES + extra.length + id.length);
    off += snapshotEntryBytes(e);
  }
  return buf;
}
