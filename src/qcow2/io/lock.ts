// Image locking: the only code that knows how qimg and QEMU mark an image as in use.
//
// QEMU marks an open image with open-file-description (OFD) READ locks on single bytes:
// 100+i for each permission it uses, 200+i for each it refuses to share (i = 0 consistent
// read, 1 write, 2 write-unchanged, 3 resize, 4 graph-mod). It detects conflicts by asking
// whether a WRITE lock could be placed on those bytes.
//
// fs-ext can only lock the WHOLE file, with classic POSIX record locks (fcntl F_SETLK),
// which the kernel checks against OFD locks. So:
//   - 'write' takes a whole-file write lock: it fails while QEMU holds any byte, and while
//     we hold it QEMU cannot place its byte locks ("Failed to lock byte 100").
//   - 'read' takes a whole-file read lock. That does not conflict with QEMU's read locks,
//     so a QEMU writer is found by its lock on the write-permission byte (101): asked of the
//     kernel with F_GETLK (the native helper), or read from /proc/locks without it.
//     While we hold it, every QEMU open without -U/force-share fails, read-only ones too,
//     because QEMU's byte tests see our lock on every byte: a side effect of having no
//     byte-range locks, accepted so that no QEMU writer can start while we read.
//
// POSIX record locks belong to the PROCESS, per file, not to the fd:
//   - closing ANY fd of this process on the image drops the lock, even an fd opened
//     elsewhere for a quick read; keep one fd per image for as long as the lock is needed;
//   - a second lockImage() on the same file in the same process never conflicts with the
//     first, it converts it ('read' <-> 'write'), and releasing either releases both;
//   - locks are not inherited by child processes.
// Without the helper and without /proc/locks heldForWriting() cannot see QEMU and returns false.

import { createRequire } from 'node:module';
import { fstatSync, readFile, readFileSync } from 'node:fs';
import { QimgError, osReason } from '../errors.js';
import { conflictingLock } from './native.js';

export type LockMode = 'read' | 'write';

export interface ImageLock {
  readonly mode: LockMode;
  /** Drops the lock; safe to call twice, and a no-op once the fd has been closed. */
  release(): Promise<void>;
}

interface FsExt {
  // Only the callback form: fcntlSync passes an int where struct flock* is expected.
  fcntl(fd: number, cmd: 'setlk', type: number, cb: (err: NodeJS.ErrnoException | null) => void): void;
  constants: { F_RDLCK: number; F_WRLCK: number; F_UNLCK: number };
}

const fsExt = createRequire(import.meta.url)('fs-ext') as FsExt;

/** QEMU's byte for "this holder uses the write permission" (100 + 1). */
const QEMU_WRITE_PERM_BYTE = 101;

function setWholeFileLock(fd: number, type: number): Promise<void> {
  return new Promise((resolve, reject) => {
    fsExt.fcntl(fd, 'setlk', type, (err) => (err ? reject(err) : resolve()));
  });
}

/** The reason text qemu-img 7.2 prints; the caller prefixes "Could not open 'PATH': ". */
function lockedError(path: string, mode: LockMode): QimgError {
  const what = mode === 'read' ? 'Failed to get shared "write" lock' : 'Failed to get "write" lock';
  return new QimgError('LOCKED', `${what}\nIs another process using the image [${path}]?`, { path, mode });
}

function isConflict(err: unknown): boolean {
  const code = (err as NodeJS.ErrnoException | undefined)?.code;
  return code === 'EAGAIN' || code === 'EACCES';
}

/** Takes qimg's lock on an open fd; throws QimgError('LOCKED', ...) when another process conflicts. */
export async function lockImage(fd: number, path: string, mode: LockMode): Promise<ImageLock> {
  const type = mode === 'write' ? fsExt.constants.F_WRLCK : fsExt.constants.F_RDLCK;
  try {
    await setWholeFileLock(fd, type);
  } catch (err) {
    if (isConflict(err)) throw lockedError(path, mode);
    const e = err as NodeJS.ErrnoException;
    throw new QimgError('IO', `Could not lock '${path}': ${osReason(e)}`, { path, errno: e?.code });
  }
  const lock = makeLock(fd, mode);
  // Checked after locking, not before: a QEMU writer that starts after this point sees our
  // lock and refuses to open, one that started before is visible now. No window between.
  if (mode === 'read' && (await heldForWriting(fd))) {
    await lock.release();
    throw lockedError(path, mode);
  }
  return lock;
}

function makeLock(fd: number, mode: LockMode): ImageLock {
  const { dev, ino } = fstatSync(fd, { bigint: true });
  let released = false;
  return {
    mode,
    async release() {
      if (released) return;
      released = true;
      // If the fd was closed the lock is already gone, and the number may now name another
      // file whose locks an F_UNLCK would drop.
      try {
        const now = fstatSync(fd, { bigint: true });
        if (now.dev !== dev || now.ino !== ino) return;
      } catch {
        return;
      }
      await setWholeFileLock(fd, fsExt.constants.F_UNLCK);
    },
  };
}

/**
 * True when another process holds `path`'s fd for writing (QEMU write-permission byte or a POSIX
 * write lock). Asynchronous because the first read of /proc/locks in a process sleeps for an RCU
 * grace period (5-15 ms): on libuv's thread, while this one compiles the modules a command
 * imports meanwhile.
 */
export async function heldForWriting(fd: number): Promise<boolean> {
  const asked = heldPerKernel(fd);
  if (asked !== undefined) return asked;
  let table: string;
  try {
    // node:fs's callback form: node:fs/promises costs ~2 ms of module loading at start-up.
    table = await new Promise<string>((resolve, reject) => readFile('/proc/locks', 'utf8', (err, text) => (err ? reject(err) : resolve(text))));
  } catch {
    return false;
  }
  return heldIn(table, fd);
}

/** heldForWriting, synchronously (for a one-off probe where nothing else could run meanwhile). */
export function heldForWritingSync(fd: number): boolean {
  const asked = heldPerKernel(fd);
  if (asked !== undefined) return asked;
  let table: string;
  try {
    table = readFileSync('/proc/locks', 'utf8');
  } catch {
    return false;
  }
  return heldIn(table, fd);
}

/**
 * heldIn's answer from two F_GETLK questions to the kernel (the native helper), without reading
 * /proc/locks; undefined when the helper is absent or the answer is ambiguous. "Could a write lock
 * go on byte 101?" names QEMU's write-permission lock, or another process's write lock there; a
 * whole-file read lock in the way is another qimg reader, which may hide a QEMU lock behind it
 * (F_GETLK names one lock only): ambiguous. Then "could a read lock go on the whole file?" finds
 * a write lock anywhere. This process's own record locks never count, as in heldIn.
 */
function heldPerKernel(fd: number): boolean | undefined {
  const { F_RDLCK, F_WRLCK } = fsExt.constants;
  const atByte = conflictingLock(fd, F_WRLCK, QEMU_WRITE_PERM_BYTE, 1);
  if (atByte === undefined) return undefined;
  if (atByte !== null) {
    if (atByte.type === F_WRLCK) return true;
    return atByte.start === 0 && atByte.length === 0 ? undefined : true;
  }
  const anywhere = conflictingLock(fd, F_RDLCK, 0, 0);
  if (anywhere === undefined) return undefined;
  return anywhere !== null;
}

/** Both ways of answering heldForWriting, for tests that show they agree. */
export const heldForWritingVia = {
  kernel: heldPerKernel,
  procLocks: (fd: number): boolean => heldIn(readFileSync('/proc/locks', 'utf8'), fd),
};

function heldIn(table: string, fd: number): boolean {
  const { dev, ino } = fstatSync(fd, { bigint: true });
  // /proc/locks names the file as "MAJ:MIN:INODE", major and minor in hex, inode in decimal;
  // st_dev uses glibc's encoding of major/minor.
  const major = ((dev >> 8n) & 0xfffn) | ((dev >> 32n) & ~0xfffn);
  const minor = (dev & 0xffn) | ((dev >> 12n) & ~0xffn);
  const self = String(process.pid);
  for (const line of table.split('\n')) {
    // "1: OFDLCK ADVISORY  READ -1 fe:00:2146535 100 101"; "1: -> ..." lines are waiters.
    const f = line.trim().split(/\s+/);
    if (f.length < 8 || f[1] === '->') continue;
    const [, cls, , type, pid, file, startText, endText] = f as [string, string, string, string, string, string, string, string];
    if (cls !== 'POSIX' && cls !== 'OFDLCK') continue; // flock() never interacts with fcntl locks
    if (cls === 'POSIX' && pid === self) continue;
    const id = file.split(':');
    if (id.length !== 3) continue;
    if (BigInt('0x' + id[0]) !== major || BigInt('0x' + id[1]) !== minor || BigInt(id[2]!) !== ino) continue;
    if (type === 'WRITE') return true;
    if (type !== 'READ') continue;
    const start = Number(startText);
    const end = endText === 'EOF' ? Infinity : Number(endText);
    // A whole-file read lock is another qimg reader; a read lock on byte 101 that is not
    // whole-file is QEMU announcing it uses the write permission.
    const wholeFile = start === 0 && end === Infinity;
    if (!wholeFile && start <= QEMU_WRITE_PERM_BYTE && QEMU_WRITE_PERM_BYTE <= end) return true;
  }
  return false;
}
