// A snapshot table entry as the library reports it (what `info` and `snapshot -l` print).

import { vmStateSize, type SnapshotEntry } from '../format/snapshot-table.js';
import type { SnapshotInfo } from './types.js';

export function snapshotInfo(e: SnapshotEntry): SnapshotInfo {
  const exact = e.vmStateSizeLarge !== null ? e.wide?.vmStateSizeLarge : undefined;
  return {
    ...(exact !== undefined ? { vmStateSizeExact: exact } : {}),
    id: e.id,
    name: e.name,
    vmStateSize: vmStateSize(e),
    dateSec: e.dateSec,
    dateNsec: e.dateNsec,
    vmClockNsec: Number(e.vmClockNsec),
    icount: e.icount === null ? null : Number(e.icount),
    diskSize: e.diskSize,
    l1TableOffset: e.l1TableOffset,
    l1Size: e.l1Size,
  };
}

