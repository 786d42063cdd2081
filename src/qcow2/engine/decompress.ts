// Decompression of one compressed cluster: raw deflate (QEMU's "zlib", no header) or zstd.

import { createRequire } from 'node:module';
import { QimgError, hex } from '../errors.js';
import { COMPRESSION_ZSTD } from '../format/layout.js';

// Loaded on first use: most commands never decompress, and start-up time matters for them.
const require = createRequire(import.meta.url);
let zlib: typeof import('node:zlib') | null = null;
let fzstd: typeof import('fzstd') | null = null;

/**
 * Inflates `input` into exactly `clusterSize` bytes. The compressed run may hold trailing bytes
 * of the next cluster's sector, so decoding stops once a cluster is produced.
 */
export function decompressCluster(input: Uint8Array, clusterSize: number, compressionType: number, hostOffset: number): Uint8Array {
  try {
    if (compressionType === COMPRESSION_ZSTD) return zstdCluster(input, clusterSize);
    zlib ??= require('node:zlib') as typeof import('node:zlib');
    const out = zlib.inflateRawSync(input, { finishFlush: zlib.constants.Z_SYNC_FLUSH, maxOutputLength: clusterSize });
    if (out.length !== clusterSize) throw new Error(`inflated to ${out.length} bytes`);
    return out;
  } catch (err) {
    if (err instanceof QimgError) throw err;
    const why = (err as Error).message ?? String(err);
    throw new QimgError('CORRUPT', `compressed cluster at ${hex(hostOffset)} cannot be decompressed (${why})`);
  }
}

function zstdCluster(input: Uint8Array, clusterSize: number): Uint8Array {
  // The descriptor covers whole sectors, so the frame may be followed by bytes of the next
  // cluster; stream it and stop once a cluster has been produced.
  const out = new Uint8Array(clusterSize);
  let got = 0;
  fzstd ??= require('fzstd') as typeof import('fzstd');
  const d = new fzstd.Decompress((chunk: Uint8Array) => {
    const n = Math.min(chunk.length, clusterSize - got);
    out.set(chunk.subarray(0, n), got);
    got += n;
  });
  try {
    d.push(input, true);
  } catch (err) {
    if (got < clusterSize) throw err;
  }
  if (got !== clusterSize) throw new Error(`zstd produced ${got} bytes`);
  return out;
}
