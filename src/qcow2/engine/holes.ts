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
 * Runs that reach past the file's end are unbounded (Infinity), never host + a length: a damaged
 * entry can put `host` past 2^53, where that sum stops moving (a fuzz case spun on it forever).
 */
export class HoleCache {
  private file: BlockFile | null = null;
  private start = 0;
  private end = 0;
  private zero = false;

  /** Whether [host, host + length) begins with bytes that read as zero, and for how many (1..length). */
  probe(file: BlockFile, host: number, length: number): { zero: boolean; length: number } {
    if (file !== this.file || !(host >= this.start && host < this.end)) this.ask(file, host);
    const n = Math.min(length, this.end - host);
    // Never an empty (or NaN) answer, whatever `host` is: the callers' loops advance by it.
    return n >= 1 ? { zero: this.zero, length: n } : { zero: false, length };
  }

  private ask(file: BlockFile, host: number): void {
    this.file = file;
    this.start = host;
    this.end = Infinity;
    this.zero = false;
    if (!file.dataRun) {
      this.start = 0; // "cannot tell" is asked once per file: all of it is data
      return;
    }
    const size = file.size();
    if (host >= size) {
      this.zero = true; // at or past the end
      return;
    }
    const run = file.dataRun(host);
    if (run === null) {
      this.start = 0;
      return;
    }
    this.zero = !run.data;
    // A run reaching the end: a hole there is the end of the file (zero from here on); data
    // ends where the file does.
    if (host + run.length < size) this.end = host + run.length;
    else if (run.data) this.end = size;
  }
}
