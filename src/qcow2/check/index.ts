// The checker's public API: check(path) -> CheckReport as `qemu-img check` computes it, and
// repairRefcounts() for an engine that must repair a dirty image it has open read-write.

import { closeSync, openSync, readSync, statSync } from 'node:fs';
import { QimgError, ioError } from '../errors.js';
import { isQcow2 } from '../format/header.js';
import { u32 } from '../format/bytes.js';
import { NodeFile, type BlockFile } from '../io/file.js';
import { resolveBackingPath } from '../engine/open.js';
import { CheckPass, FIX_ERRORS, FIX_LEAKS, emptyCounts, type CheckCounts, type PassOptions } from './checker.js';
import { CheckAbort, CheckImage } from './image.js';

export { renderCheckHuman, renderCheckJson, renderCheckJsonArray, renderCheckStderr } from './render.js';
export { CheckPass, FIX_ERRORS, FIX_LEAKS, type CheckCounts } from './checker.js';

export interface CheckOptions {
  format?: 'qcow2' | 'raw';
  /** -r leaks | -r all */
  repair?: 'leaks' | 'all';
  /** -U: no locks. */
  forceShare?: boolean;
  /**
   * Whether another process holds a file open for writing (given by check(), which locks):
   * qemu-img opens the backing file with a shared lock, which a writer refuses.
   */
  backingHeld?: (fd: number) => boolean;
  /** Largest coalesced L2 read (bytes). */
  chunkBytes?: number;
  /** Count in traversal order instead of streaming (for tests). */
  exact?: boolean;
  /** Program name in error lines (default "qimg"). */
  prog?: string;
  progress?: (done: number, total: number) => void;
}

export interface CheckReport extends CheckCounts {
  filename: string;
  format: string;
  /** stderr lines in order, without newlines (error lines carry the program-name prefix). */
  messages: string[];
  /** Set when a repair fixed something: qemu-img prints the "following inconsistencies" block. */
  repaired: { leaks: number; corruptions: number } | null;
  /** Whether the report (human block / JSON) is printed; false when the check could not run. */
  hasReport: boolean;
  /** The final error line without the program prefix ("Check failed", "Could not open ..."), if any. */
  error: string | null;
  /** qemu-img's exit code: 0 clean, 1 failed, 2 corruptions, 3 leaks only, 63 format not checkable. */
  exitCode: number;
}

function baseReport(filename: string): CheckReport {
  return { ...emptyCounts(), filename, format: 'qcow2', messages: [], repaired: null, hasReport: false, error: null, exitCode: 1 };
}

/** Checks (and with `repair`, repairs) the image at `path` the way `qemu-img check` does. */
export async function check(path: string, opts: CheckOptions = {}): Promise<CheckReport> {
  const report = baseReport(path);
  const writable = opts.repair !== undefined;
  let file: NodeFile;
  try {
    file = NodeFile.open(path, writable);
  } catch (err) {
    // qemu-img names the file twice: the block layer's message inside its own.
    if (err instanceof QimgError) report.error = `Could not open '${path}': ${err.message}`;
    else throw err;
    return report;
  }
  let lock: { release(): Promise<void> } | null = null;
  try {
    let backingHeld: ((fd: number) => boolean) | undefined;
    if (!opts.forceShare && file.fd !== null) {
      const { lockImage, heldForWritingSync } = await import('../io/lock.js');
      lock = await lockImage(file.fd, path, writable ? 'write' : 'read');
      backingHeld = heldForWritingSync;
    }
    return checkFile(file, path, { ...opts, backingHeld }, report);
  } catch (err) {
    return fail(report, err);
  } finally {
    if (lock) await lock.release();
    file.close();
  }
}

function fail(report: CheckReport, err: unknown): CheckReport {
  if (err instanceof QimgError) {
    report.error = err.message.startsWith('Could not open') ? err.message : `Could not open '${report.filename}': ${err.message}`;
    report.exitCode = 1;
    return report;
  }
  throw err;
}

/** The check on an already open (and locked) file. */
export function checkFile(file: BlockFile, path: string, opts: CheckOptions = {}, report = baseReport(path)): CheckReport {
  const prog = opts.prog ?? 'qimg';
  const head = new Uint8Array(QCOW1_HEADER_BYTES);
  const n = file.read(head, 0);
  const magic = n >= 4 && isQcow2(head);
  if (opts.format === 'qcow2' && !magic) {
    report.error = `Could not open '${path}': Image is not in qcow2 format`;
    return report;
  }
  // QEMU's probe: the qcow2 magic with version >= 2 is qcow2, with version 1 (and a whole
  // 48-byte header) the old qcow format; anything else is raw.
  const version = n >= 8 ? u32(head, 4) : 0;
  const probed = !magic ? 'raw' : version >= 2 ? 'qcow2' : version === 1 && n === QCOW1_HEADER_BYTES ? 'qcow' : 'raw';
  if (!opts.format && probed === 'qcow') return checkQcow1(head, path, report);
  if (opts.format === 'raw' || (!opts.format && probed === 'raw')) {
    if (!opts.format && opts.repair) report.messages.push(...rawProbeWarning(path));
    report.format = 'raw';
    report.error = 'This image format does not support checks';
    report.exitCode = 63;
    return report;
  }
  let img: CheckImage;
  try {
    img = CheckImage.open(file, path);
    const backing = img.header.backingFile;
    if (backing) checkBackingOpens(path, backing, img.header.backingFormat, opts.repair !== undefined, opts.backingHeld);
  } catch (err) {
    return fail(report, err);
  }
  const fix = opts.repair === 'all' ? FIX_LEAKS | FIX_ERRORS : opts.repair === 'leaks' ? FIX_LEAKS : 0;
  const msgs = report.messages;
  const passOpts: PassOptions = { chunkBytes: opts.chunkBytes, prog, progress: opts.progress, exact: opts.exact };
  let counts: CheckCounts;
  try {
    const pass = new CheckPass(img, fix, msgs, passOpts);
    counts = pass.run();
    if (counts.corruptionsFixed || counts.leaksFixed) {
      report.repaired = { leaks: counts.leaksFixed, corruptions: counts.corruptionsFixed };
      // A repair that marked the image corrupt: QEMU's double check finds no driver behind the
      // image (its corruption event dropped it), and the corrupt bit a v3 image now carries
      // stays until a later `-r all` ends without errors.
      if (pass.markedCorrupt) {
        report.error = 'Check failed: No medium found';
        report.exitCode = 1;
        return report;
      }
      const again = new CheckPass(CheckImage.open(file, path, true), 0, msgs, passOpts).run();
      again.leaksFixed = counts.leaksFixed;
      again.corruptionsFixed = counts.corruptionsFixed;
      counts = again;
    }
  } catch (err) {
    if (err instanceof CheckAbort) {
      report.error = err.message;
      report.exitCode = 1;
      return report;
    }
    if (err instanceof QimgError) {
      report.error = `Check failed: ${err.message}`;
      report.exitCode = 1;
      return report;
    }
    throw err;
  }
  Object.assign(report, counts);
  report.hasReport = true;
  if (counts.checkErrors) {
    report.error = 'Check failed';
    report.exitCode = 1;
  } else report.exitCode = counts.corruptions ? 2 : counts.leaks ? 3 : 0;
  return report;
}

/** Bytes of the old qcow (version 1) header, which QEMU's probe needs whole. */
const QCOW1_HEADER_BYTES = 48;

/** QEMU's warning when it opens a probed raw image writable (as `check -r` does). */
function rawProbeWarning(path: string): string[] {
  return [
    `WARNING: Image format was not specified for '${path}' and probing guessed raw.`,
    '         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.',
    "         Specify the 'raw' format explicitly to remove the restrictions.",
  ];
}

/**
 * The qcow2 magic with version 1 is QEMU's old qcow format, which has no check: its open-time
 * refusals (cluster_bits and l2_bits are single bytes at 32 and 33, crypt_method at 36), else
 * qemu-img's "does not support checks".
 */
function checkQcow1(head: Uint8Array, path: string, report: CheckReport): CheckReport {
  const clusterBits = head[32]!;
  const l2Bits = head[33]!;
  const crypt = u32(head, 36);
  const size = (BigInt(u32(head, 24)) << 32n) | BigInt(u32(head, 28));
  const shift = BigInt(clusterBits + l2Bits);
  let why: string | null = null;
  if (size <= 1n) why = 'Image size is too small (must be at least 2 bytes)';
  else if (clusterBits < 9 || clusterBits > 16) why = 'Cluster size must be between 512 and 64k';
  else if (l2Bits < 6 || l2Bits > 13) why = 'L2 table size must be between 512 and 64k';
  else if (crypt > 1) why = 'invalid encryption method in qcow header';
  // L1 entries for the size must fit in an int's worth of bytes.
  else if ((size + (1n << shift) - 1n) >> shift > BigInt(Math.floor(0x7fffffff / 8))) why = 'Image too large';
  else if (crypt === 1) why = "Parameter 'encrypt.key-secret' is required for cipher";
  if (why) {
    report.error = `Could not open '${path}': ${why}`;
    return report;
  }
  report.format = 'qcow';
  report.error = 'This image format does not support checks';
  report.exitCode = 63;
  return report;
}

/**
 * Repairs the refcounts of an image open read-write (what QEMU does on opening a dirty image):
 * a full `-r all` pass on `file`. Returns the pass's counters and messages; clears the dirty bit
 * when the image ends up consistent.
 */
export function repairRefcounts(target: BlockFile | { file: BlockFile; filename: string }): { counts: CheckCounts; messages: string[] } {
  const file = 'file' in target ? target.file : target;
  const filename = 'file' in target ? target.filename : target.path;
  const messages: string[] = [];
  const img = CheckImage.open(file, filename);
  const counts = new CheckPass(img, FIX_LEAKS | FIX_ERRORS, messages).run();
  return { counts, messages };
}

/**
 * QEMU 7.2's block drivers, by the names a backing format extension may give. A name outside
 * this list is refused before the backing file is looked at ("Unknown driver"); a known driver
 * qimg cannot read (vmdk, say) leaves the backing file to be checked for existence only.
 */
const QEMU_DRIVERS = new Set(
  ('blkdebug blklogwrites blkverify bochs cloop compress copy-before-write copy-on-read dmg file ftp ftps ' +
    'host_cdrom host_device http https iscsi iser luks nbd nfs null-aio null-co nvme parallels preallocate ' +
    'qcow qcow2 qed quorum raw rbd replication snapshot-access ssh throttle vdi vhdx vmdk vpc vvfat').split(' '),
);

/**
 * The protocol prefixes QEMU 7.2's qemu-img (Debian's build) knows in a file name; any other
 * PREFIX: is "Unknown protocol". What the known ones then do (connect, parse a URI) is not
 * emulated: qimg follows none of them.
 */
const QEMU_PROTOCOLS = new Set(
  ('file host_device host_cdrom nbd nbd+tcp nbd+unix http https ftp ftps ssh gluster gluster+tcp gluster+unix gluster+rdma ' +
    'iscsi iser rbd nfs null-co null-aio nvme blkdebug blkverify json fat').split(' '),
);

/** Linux's PATH_MAX: open() refuses a name of this many bytes or more (ENAMETOOLONG). */
const PATH_MAX = 4096;

/**
 * An image whose backing file is itself. QEMU opens the chain level by level without looking
 * for loops, joining the name to the previous level's path: a relative name grows it
 * ("a" -> "./a" -> "././a") until open() refuses the name as too long, one "Could not open
 * backing file: " per level in the message. A name that does not grow the path (an absolute
 * one) never fails there, and qemu-img 7.2 recurses until memory runs out; qimg says so.
 */
function selfBacking(path: string, backing: string): never {
  let p = resolveBackingPath(path, backing);
  for (let level = 1; ; level++) {
    if (Buffer.byteLength(p) >= PATH_MAX) {
      throw new QimgError('IO', `Could not open '${path}': ${'Could not open backing file: '.repeat(level)}Could not open '${p}': File name too long`);
    }
    const next = resolveBackingPath(p, backing);
    if (next === p) throw new QimgError('BACKING', `Could not open '${path}': backing file '${backing}' forms a loop (it is already in the chain)`);
    p = next;
  }
}

/**
 * QEMU's qcow (version 1) driver on a backing file named with format "qcow": its magic (the same
 * as qcow2's), its version (a qcow2 file gets a hint), then the header fields it bounds. What the
 * driver reads further (its L1 table, a backing file of its own) is not looked at.
 */
function qcowV1Opens(head: Uint8Array, fail: (code: QimgError['code'], why: string) => QimgError): void {
  if (!isQcow2(head)) throw fail('BAD_IMAGE', 'Image not in qcow format');
  const version = u32(head, 4);
  if (version !== 1) {
    const hint = version === 2 || version === 3 ? "\nTry the 'qcow2' driver instead." : '';
    throw fail('UNSUPPORTED', `qcow (v1) does not support qcow version ${version}${hint}`);
  }
  const size = u32(head, 24) * 2 ** 32 + u32(head, 28);
  if (size <= 1) throw fail('BAD_IMAGE', 'Image size is too small (must be at least 2 bytes)');
  const clusterBits = head[32]!;
  if (clusterBits < 9 || clusterBits > 16) throw fail('BAD_IMAGE', 'Cluster size must be between 512 and 64k');
  const l2Bits = head[33]!;
  if (l2Bits < 6 || l2Bits > 13) throw fail('BAD_IMAGE', 'L2 table size must be between 512 and 64k');
  const crypt = u32(head, 36);
  // AES (1) needs a secret qemu-img check is never given; any other method is unknown.
  if (crypt === 1) throw fail('UNSUPPORTED', "Parameter 'encrypt.key-secret' is required for cipher");
  if (crypt !== 0) throw fail('BAD_IMAGE', 'invalid encryption method in qcow header');
}

/**
 * What qemu-img check meets opening the backing file, in its order: the driver named by the
 * backing format, the file itself (the system's reason, e.g. 'File name too long'), and for a
 * qcow2 backing file its magic and version. Deeper faults of a damaged backing image are not
 * looked for: check reads nothing through the backing file.
 */
function checkBackingOpens(path: string, backing: string, stored: string | null, writable: boolean, held?: (fd: number) => boolean): void {
  const bp = backingChecks(path, backing, stored, writable);
  if (bp === null || !held) return;
  // The backing file's shared lock, taken once its driver has opened it: refused while another
  // process (a running VM) holds it for writing (observed for qcow2 backing files).
  let conflict = false;
  try {
    const fd = openSync(bp, 'r');
    try {
      conflict = held(fd);
    } finally {
      closeSync(fd);
    }
  } catch {
    return; // opened a moment ago: gone now, nothing to lock
  }
  if (conflict) {
    throw new QimgError('LOCKED', `Could not open '${path}': Could not open backing file: Failed to get shared "write" lock\nIs another process using the image [${bp}]?`, { path: bp });
  }
}

/**
 * checkBackingOpens' opening checks; the backing file to lock-check, or null. Only a backing file
 * opened as qcow2 is: qemu-img 7.2 was seen refusing one a writer holds, but not a raw one.
 */
function backingChecks(path: string, backing: string, stored: string | null, writable: boolean): string | null {
  // QEMU keeps the format name as a C string.
  const format = stored === null ? null : stored.split('\0')[0]!;
  const fail = (code: QimgError['code'], why: string, data?: Readonly<Record<string, unknown>>) =>
    new QimgError(code, `Could not open '${path}': Could not open backing file: ${why}`, { ...data });
  if (format && !QEMU_DRIVERS.has(format)) throw fail('UNSUPPORTED', `Unknown driver '${format}'`);
  // QEMU reads a name whose first ':' comes before any '/' as PROTOCOL:REST, and refuses a
  // protocol it does not know (at most 127 bytes of it in the message).
  const sep = backing.search(/[:/]/);
  if (sep >= 0 && backing[sep] === ':') {
    const protocol = backing.slice(0, sep);
    if (!QEMU_PROTOCOLS.has(protocol)) throw fail('UNSUPPORTED', `Unknown protocol '${Buffer.from(protocol).subarray(0, 127).toString()}'`);
  }
  const bp = resolveBackingPath(path, backing);
  let st;
  try {
    st = statSync(bp);
  } catch (err) {
    const e = ioError(err, bp, 'Could not open');
    throw fail(e.code, e.message, e.data);
  }
  // QEMU opens a character or block device with its host_device driver and reads it; qimg never
  // opens a device an image names (README: device nodes are never followed), so its header is not
  // looked at and the check goes on. Anything else that is not a regular file (a directory, a
  // FIFO, a socket) falls to QEMU's 'file' driver, which refuses it. (QEMU opens a FIFO before
  // refusing it, which blocks until a writer comes; qimg does not open it.)
  const device = st.isCharacterDevice() || st.isBlockDevice();
  if (!st.isFile() && !device) throw fail('BAD_IMAGE', `'file' driver requires '${bp}' to be a regular file`);
  // The image being checked holds a POSIX lock, which closing ANY descriptor of the same file
  // would drop: a backing file that is the image itself is not opened again.
  const self = statSync(path);
  if (st.isFile() && self.dev === st.dev && self.ino === st.ino) {
    // Opened as raw (or another format) it is read once and the check goes on, a repair too.
    if (format !== null && format !== 'qcow2') return null;
    // As qcow2 (named, or probed: it is this image), a repair's write lock on the image stops
    // the backing open at the first level (qemu-img 7.2's observed behaviour); a read-only
    // check meets the image naming itself again, and so on.
    if (writable) throw fail('LOCKED', `Failed to get shared "write" lock\nIs another process using the image [${bp}]?`);
    selfBacking(path, backing);
  }
  if ((format !== 'qcow2' && format !== 'qcow') || device) return null;
  // QEMU reads the header whole (48 bytes for qcow v1), a short file padded with zeros.
  const head = new Uint8Array(48);
  let n = 0;
  try {
    const fd = openSync(bp, 'r');
    try {
      n = readSync(fd, head, 0, head.length, 0);
    } finally {
      closeSync(fd);
    }
  } catch (err) {
    const e = ioError(err, bp, 'Could not open');
    throw fail(e.code, e.message, e.data);
  }
  if (format === 'qcow') {
    qcowV1Opens(head, fail);
    return null;
  }
  if (n < 8 || !isQcow2(head)) throw fail('BAD_IMAGE', 'Image is not in qcow2 format');
  const version = u32(head, 4);
  if (version < 2 || version > 3) throw fail('UNSUPPORTED', `Unsupported qcow2 version ${version}`);
  return bp;
}
