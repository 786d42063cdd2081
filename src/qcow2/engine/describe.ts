// What `info` reports: an ImageInfo built from an open layer's header, snapshots and extensions.

import { QimgError } from '../errors.js';
import { bitmapFlagNames, decodeBitmapDirectory, BITMAP_DIR_MAX_BYTES } from '../format/bitmaps.js';
import { hasAutoclear, hasCompat, hasIncompat } from '../format/header.js';
import * as L from '../format/layout.js';
import { readAt } from '../io/file.js';
import type { Layer } from './layer.js';
import { resolveBackingPath } from './open.js';
import { Qcow2Image } from './qcow2-image.js';
import type { BitmapInfo, ImageInfo, Qcow2Specific } from './types.js';
import { snapshotInfo } from './snapshot-info.js';

export function describeLayer(layer: Layer): ImageInfo {
  const file = (layer as unknown as { file: { allocatedBytes(): number } }).file;
  const info: ImageInfo = {
    filename: layer.filename,
    format: layer.format,
    virtualSize: layer.virtualSize,
    actualSize: file.allocatedBytes(),
    encrypted: false,
    dirty: false,
    snapshots: [],
  };
  if (!(layer instanceof Qcow2Image)) return info;
  const h = layer.header;
  info.clusterSize = layer.clusterSize;
  info.encrypted = h.cryptMethod !== L.CRYPT_NONE;
  info.dirty = hasIncompat(h, L.INCOMPAT_DIRTY);
  if (h.backingFile !== null) {
    info.backingFilename = h.backingFile;
    info.fullBackingFilename = resolveBackingPath(layer.filename, h.backingFile);
    if (h.backingFormat !== null) info.backingFilenameFormat = h.backingFormat;
  }
  info.snapshots = layer.snapshots.map(snapshotInfo);
  const spec: Qcow2Specific = {
    compat: h.version >= 3 ? '1.1' : '0.10',
    compressionType: h.compressionType === L.COMPRESSION_ZSTD ? 'zstd' : 'zlib',
    refcountBits: 2 ** h.refcountOrder,
  };
  if (h.version >= 3) {
    spec.lazyRefcounts = hasCompat(h, L.COMPAT_LAZY_REFCOUNTS);
    if (h.bitmaps && hasAutoclear(h, L.AUTOCLEAR_BITMAPS)) spec.bitmaps = readBitmaps(layer);
    spec.corrupt = hasIncompat(h, L.INCOMPAT_CORRUPT);
    spec.extendedL2 = hasIncompat(h, L.INCOMPAT_EXTL2);
    if (hasIncompat(h, L.INCOMPAT_DATA_FILE) && h.dataFile !== null) {
      spec.dataFile = h.dataFile;
      spec.dataFileRaw = hasAutoclear(h, L.AUTOCLEAR_DATA_FILE_RAW);
    }
  }
  if (h.cryptMethod === L.CRYPT_AES) spec.encrypt = { format: 'aes' };
  if (h.cryptMethod === L.CRYPT_LUKS && h.crypto) spec.encrypt = readLuks(layer);
  info.formatSpecific = spec;
  return info;
}

function readBitmaps(img: Qcow2Image): BitmapInfo[] {
  const ext = img.header.bitmaps!;
  if (ext.bitmapDirectorySize > BITMAP_DIR_MAX_BYTES) throw new QimgError('BAD_IMAGE', 'Bitmap directory is too large');
  const buf = img.readTable(ext.bitmapDirectoryOffset, ext.bitmapDirectorySize, 'Bitmap directory');
  return decodeBitmapDirectory(buf, ext.nbBitmaps, ext.bitmapDirectoryOffset).map((b) => ({
    name: b.name,
    granularity: 2 ** b.granularityBits,
    flags: bitmapFlagNames(b.flags),
  }));
}

/** LUKS1 headers are small; qemu reads the fixed part and the key slot table. */
const LUKS_HEADER_READ_BYTES = 4096;

function readLuks(img: Qcow2Image): Qcow2Specific['encrypt'] {
  const { offset } = img.header.crypto!;
  const buf = new Uint8Array(LUKS_HEADER_READ_BYTES);
  readAt(img.file, buf, offset);
  return luksDecoder!(buf);
}

type LuksDecoder = (buf: Uint8Array) => NonNullable<Qcow2Specific['encrypt']>;
let luksDecoder: LuksDecoder | null = null;
/** The LUKS decoder is loaded only for encrypted images (start-up cost for the rest). */
export async function loadLuksDecoder(): Promise<void> {
  if (luksDecoder) return;
  const m = await import('../format/luks.js');
  luksDecoder = m.decodeLuksHeader as LuksDecoder;
}
