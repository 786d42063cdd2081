// Bitmap directory entries (spec "Bitmap directory"): what `info` reports of persistent bitmaps.

import { QimgError, hex } from '../errors.js';
import { align, decodeString, u16, u32, u64 } from './bytes.js';
import { MAX_BITMAPS } from './layout.js';

export interface BitmapDirectoryEntry {
  bitmapTableOffset: number;
  bitmapTableSize: number;
  flags: number;
  type: number;
  granularityBits: number;
  name: string;
}

const BME_FIXED_BYTES = 24;
export const BME_FLAG_IN_USE = 1 << 0;
export const BME_FLAG_AUTO = 1 << 1;
/** QEMU's limit on a bitmap name, and on the whole directory. */
export const BME_MAX_NAME_SIZE = 1023;
export const BITMAP_DIR_MAX_BYTES = 64 * 1024 * 1024;

export function decodeBitmapDirectory(buf: Uint8Array, count: number, dirOffset: number): BitmapDirectoryEntry[] {
  if (count > MAX_BITMAPS) throw new QimgError('BAD_IMAGE', `Too many bitmaps (${count})`);
  const out: BitmapDirectoryEntry[] = [];
  let off = 0;
  for (let i = 0; i < count; i++) {
    if (off + BME_FIXED_BYTES > buf.length) throw new QimgError('BAD_IMAGE', `Bitmap directory at ${hex(dirOffset)} is truncated (entry ${i})`);
    const nameSize = u16(buf, off + 18);
    const extraSize = u32(buf, off + 20);
    const nameStart = off + BME_FIXED_BYTES + extraSize;
    if (nameSize > BME_MAX_NAME_SIZE || nameStart + nameSize > buf.length) {
      throw new QimgError('BAD_IMAGE', `Bitmap directory at ${hex(dirOffset)}: entry ${i} is malformed`);
    }
    out.push({
      bitmapTableOffset: u64(buf, off, 'bitmap_table_offset'),
      bitmapTableSize: u32(buf, off + 8),
      flags: u32(buf, off + 12),
      type: buf[off + 16]!,
      granularityBits: buf[off + 17]!,
      name: decodeString(buf.subarray(nameStart, nameStart + nameSize)),
    });
    off = align(nameStart + nameSize, 8);
  }
  return out;
}

/** qemu-img's flag names, in its order. */
export function bitmapFlagNames(flags: number): string[] {
  const names: string[] = [];
  if (flags & BME_FLAG_IN_USE) names.push('in-use');
  if (flags & BME_FLAG_AUTO) names.push('auto');
  return names;
}
