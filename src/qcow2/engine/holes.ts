// Which host bytes under a data cluster read as zero without being read: holes in the host file
// and bytes past its end, as SEEK_DATA/SEEK_HOLE report them (QEMU's "want_zero" question to the
// file under an image).

import type { BlockFile } from '../io/file.js';

/**
 * With want_zero, QEMU asks the file under a data extent about [host, host + length): a hole
 * there, or the end of the file, reads as zero (a preallocation=metadata image is all such
 * extents). The file node's length is counted in whole sectors. Returns the extent's new length
 * and whether it reads as zero; null when the file cannot tell (it is then data, unchanged).
 */
export function hostZero(file: BlockFile, host: number, length: number): { zero: boolean; length: number } | null {
  if (!file.dataRun) return null;
  const size = file.size();
  const sectors = Math.ceil(size / 512) * 512;
  // At or past the end (the partial last sector included): zero, all of it.
  if (host >= size) return { zero: true, length };
  const run = file.dataRun(host);
  if (run === null) return { zero: false, length: Math.min(length, sectors - host) };
  if (!run.data) {
    // A hole running to the end of the file is the end of the file: zero, all of it.
    if (host + run.length >= size) return { zero: true, length };
    return { zero: true, length: Math.min(length, run.length) };
  }
  return { zero: false, length: Math.min(length, run.length) };
}

/**
 * hostZero for a reader walking files it does not change (convert's source): each answer covers
 * a whole run of the file and is kept, so a file that is one run of data costs one question, and
 * a preallocated image's holes are skipped without reading them. A file that cannot tell is data.
 */
export class HoleCache {
  private file: BlockFile | null = null;
  private start = 0;
  private end = 0;
  private zero = false;

  /** Whether [host, host + length) begins with bytes that read as zero, and for how many (1..length). */
  probe(file: BlockFile, host: number, length: number): { zero: boolean; length: number } {
    if (file !== this.file || host < this.start || host >= this.end) {
      this.file = file;
      const z = hostZero(file, host, Number.MAX_SAFE_INTEGER - host);
      this.start = host;
      this.end = z ? host + z.length : Number.MAX_SAFE_INTEGER;
      this.zero = z?.zero ?? false;
      // "Cannot tell" is asked once per file: everything from here on is data.
      if (!z) this.start = 0;
    }
    return { zero: this.zero, length: Math.min(length, this.end - host) };
  }
}
