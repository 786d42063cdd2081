// The public shapes the library returns: image descriptions and snapshot records.

/** One internal snapshot, as `qemu-img info` / `snapshot -l` describe it. */
export interface SnapshotInfo {
  id: string;
  name: string;
  /** Bytes of saved VM state (vm_state_size_large when present, else the 32-bit field). */
  vmStateSize: number;
  /** The same, exactly, when it is past 2^53 (vmStateSize is then only close to it). */
  vmStateSizeExact?: bigint;
  dateSec: number;
  dateNsec: number;
  vmClockNsec: number;
  /** null when the image stores -1 (icount disabled) or no icount field. */
  icount: number | null;
  /** Virtual disk size recorded with the snapshot; null when the entry has no such field. */
  diskSize: number | null;
  l1TableOffset: number;
  l1Size: number;
}

export interface BitmapInfo {
  name: string;
  granularity: number;
  /** qemu-img's flag names, in its order: "in-use", "auto". */
  flags: string[];
}

/** LUKS header facts `qemu-img info` prints under `encrypt:`. */
export interface LuksInfo {
  format: 'luks';
  ivgenAlg: string;
  ivgenHashAlg?: string;
  hashAlg: string;
  detachedHeader?: boolean;
  cipherAlg: string;
  uuid: string;
  cipherMode: string;
  slots: Array<{ active: boolean; iters?: number; stripes?: number; keyOffset: number }>;
  payloadOffset: number;
  masterKeyIters: number;
}

export interface Qcow2Specific {
  compat: '0.10' | '1.1';
  compressionType: 'zlib' | 'zstd';
  /** v3 only (undefined on v2). */
  lazyRefcounts?: boolean;
  bitmaps?: BitmapInfo[];
  refcountBits: number;
  /** v3 only. */
  corrupt?: boolean;
  /** v3 only. */
  extendedL2?: boolean;
  dataFile?: string;
  dataFileRaw?: boolean;
  encrypt?: LuksInfo | { format: 'aes' };
}

/** Everything `qemu-img info` reports about one image. */
export interface ImageInfo {
  filename: string;
  format: 'qcow2' | 'raw';
  virtualSize: number;
  /** Bytes the host file occupies on disk (allocated blocks). */
  actualSize: number;
  clusterSize?: number;
  encrypted: boolean;
  dirty: boolean;
  backingFilename?: string;
  /** The path the backing file name resolves to (relative names are taken from the image's directory). */
  fullBackingFilename?: string;
  backingFilenameFormat?: string;
  snapshots: SnapshotInfo[];
  formatSpecific?: Qcow2Specific;
}
