// Image locking against a live qemu-io (the oracle) and against a second qimg process.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, openSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { QimgError } from '../../src/qcow2/errors.js';
import { heldForWriting, heldForWritingVia, lockImage, type LockMode } from '../../src/qcow2/io/lock.js';
import { haveFallocate } from '../../src/qcow2/io/native.js';
import { mustQemuImg, qemuImg, qemuIo, tmpDir } from '../helpers.js';

const LOCK_MODULE = fileURLToPath(new URL('../../src/qcow2/io/lock.js', import.meta.url));
const WAIT_MS = 10_000;

function newImage(): string {
  const img = join(tmpDir('qimg-lock-'), 'a.qcow2');
  mustQemuImg(['create', '-q', '-f', 'qcow2', img, '1M']);
  return img;
}

/** /proc/locks lines for `img` (matched by inode; the temp dir is on one file system). */
function locksOn(img: string): string[] {
  const ino = String(statSync(img).ino);
  return readFileSync('/proc/locks', 'utf8')
    .split('\n')
    .filter((l) => l.trim().split(/\s+/)[5]?.split(':')[2] === ino);
}

async function until(what: string, ok: () => boolean): Promise<void> {
  const deadline = Date.now() + WAIT_MS;
  while (!ok()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

function exited(child: ChildProcess): Promise<void> {
  return new Promise((resolve) => {
    if (child.exitCode !== null || child.signalCode !== null) resolve();
    else child.once('exit', () => resolve());
  });
}

async function kill(child: ChildProcess | undefined): Promise<void> {
  if (!child || child.exitCode !== null || child.signalCode !== null) return;
  child.kill('SIGKILL');
  await exited(child);
}

/** A qemu-io that keeps `img` open (sleep is in ms) until killed, once its locks are visible. */
async function holdWithQemuIo(img: string, readOnly: boolean): Promise<ChildProcess> {
  const child = spawn('qemu-io', [...(readOnly ? ['-r'] : []), '-c', 'sleep 600000', img], { stdio: 'ignore' });
  try {
    // Read-write holds 100, 101, 103, 201, 203; read-only holds 100, 201, 203.
    await until('qemu-io locks', () => child.exitCode === null && locksOn(img).some((l) => / 201 201$/.test(l)));
  } catch (err) {
    await kill(child);
    throw err;
  }
  return child;
}

/** Another node process holding a qimg lock on `img` until killed. */
async function holdWithQimg(img: string, mode: LockMode): Promise<ChildProcess> {
  const script = `
    import { openSync } from 'node:fs';
    import { lockImage } from ${JSON.stringify(LOCK_MODULE)};
    const [img, mode] = process.argv.slice(1);
    const fd = openSync(img, mode === 'write' ? 'r+' : 'r');
    await lockImage(fd, img, mode);
    process.stdout.write('locked\\n');
    setInterval(() => {}, 1 << 30);
  `;
  const child = spawn(process.execPath, ['--input-type=module', '-e', script, img, mode], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  let out = '';
  child.stdout!.on('data', (d) => (out += d));
  try {
    await until('child qimg lock', () => {
      if (child.exitCode !== null) throw new Error('child qimg exited before locking');
      return out.includes('locked');
    });
  } catch (err) {
    await kill(child);
    throw err;
  }
  return child;
}

async function lockError(img: string, mode: LockMode): Promise<QimgError> {
  const fd = openSync(img, mode === 'write' ? 'r+' : 'r');
  try {
    await lockImage(fd, img, mode);
  } catch (err) {
    if (err instanceof QimgError) return err;
    throw err;
  } finally {
    closeSync(fd); // drops any lock this process took, see lock.ts
  }
  throw new Error(`lockImage(${mode}) succeeded but should have failed`);
}

async function lockAndRelease(img: string, mode: LockMode): Promise<void> {
  const fd = openSync(img, mode === 'write' ? 'r+' : 'r');
  try {
    const lock = await lockImage(fd, img, mode);
    assert.is(lock.mode, mode);
    await lock.release();
  } finally {
    closeSync(fd);
  }
}

const readMsg = (img: string) => `Failed to get shared "write" lock\nIs another process using the image [${img}]?`;
const writeMsg = (img: string) => `Failed to get "write" lock\nIs another process using the image [${img}]?`;

test('read-write qemu-io: both modes refused with qemu-img wording, both fine once it exits', async () => {
  const img = newImage();
  const qemu = await holdWithQemuIo(img, false);
  try {
    const fd = openSync(img, 'r');
    try {
      assert.ok(await heldForWriting(fd));
    } finally {
      closeSync(fd);
    }
    const r = await lockError(img, 'read');
    assert.is(r.code, 'LOCKED');
    assert.is(r.message, readMsg(img));
    const w = await lockError(img, 'write');
    assert.is(w.code, 'LOCKED');
    assert.is(w.message, writeMsg(img));
    // The oracle, against the same holder, says exactly the same after its prefix.
    assert.is(qemuImg(['info', img]).stderr, `qemu-img: Could not open '${img}': ${r.message}\n`);
    assert.is(qemuImg(['snapshot', '-c', 's1', img]).stderr, `qemu-img: Could not open '${img}': ${w.message}\n`);
  } finally {
    await kill(qemu);
  }
  await until('qemu-io locks gone', () => locksOn(img).length === 0);
  await lockAndRelease(img, 'read');
  await lockAndRelease(img, 'write');
});

test('read-only qemu-io: read allowed, write refused', async () => {
  const img = newImage();
  const qemu = await holdWithQemuIo(img, true);
  try {
    const fd = openSync(img, 'r');
    try {
      assert.not.ok(await heldForWriting(fd));
    } finally {
      closeSync(fd);
    }
    await lockAndRelease(img, 'read');
    const w = await lockError(img, 'write');
    assert.is(w.code, 'LOCKED');
    assert.is(w.message, writeMsg(img));
    assert.is(qemuImg(['snapshot', '-c', 's1', img]).stderr, `qemu-img: Could not open '${img}': ${w.message}\n`);
  } finally {
    await kill(qemu);
  }
});

test('qimg write lock keeps qemu-img out (but not -U) until released', async () => {
  const img = newImage();
  const fd = openSync(img, 'r+');
  try {
    const lock = await lockImage(fd, img, 'write');
    const held = qemuImg(['info', img]);
    assert.is(held.status, 1);
    assert.match(held.stderr, `qemu-img: Could not open '${img}': Failed to lock byte`);
    assert.is(qemuImg(['info', '-U', img]).status, 0);
    await lock.release();
    await lock.release(); // twice is harmless
    assert.is(qemuImg(['info', img]).status, 0);
    assert.is(qemuImg(['snapshot', '-c', 's1', img]).status, 0);
  } finally {
    closeSync(fd);
  }
});

test('qimg read lock keeps a qemu-io writer out until released', async () => {
  const img = newImage();
  const fd = openSync(img, 'r');
  try {
    const lock = await lockImage(fd, img, 'read');
    const held = qemuIo(['-c', 'read 0 512', img]);
    assert.is.not(held.status, 0);
    assert.match(held.stderr, `can't open device ${img}: Failed to get "consistent read" lock`);
    assert.match(held.stderr, `Is another process using the image [${img}]?`);
    await lock.release();
    const free = qemuIo(['-c', 'read 0 512', img]);
    assert.is(free.status, 0, free.stderr);
  } finally {
    closeSync(fd);
  }
});

test('closing any fd of this process on the image drops the lock (POSIX semantics)', async () => {
  const img = newImage();
  const fd = openSync(img, 'r+');
  try {
    const lock = await lockImage(fd, img, 'write');
    assert.is(qemuImg(['info', img]).status, 1);
    closeSync(openSync(img, 'r'));
    assert.is(qemuImg(['info', img]).status, 0);
    await lock.release();
  } finally {
    closeSync(fd);
  }
});

test('release after the fd is closed is a no-op', async () => {
  const img = newImage();
  const fd = openSync(img, 'r+');
  const lock = await lockImage(fd, img, 'write');
  closeSync(fd);
  await lock.release();
  assert.is(qemuImg(['info', img]).status, 0);
});

test('another qimg writer excludes readers and writers', async () => {
  const img = newImage();
  const other = await holdWithQimg(img, 'write');
  try {
    const fd = openSync(img, 'r');
    try {
      assert.ok(await heldForWriting(fd));
    } finally {
      closeSync(fd);
    }
    assert.is((await lockError(img, 'read')).message, readMsg(img));
    assert.is((await lockError(img, 'write')).message, writeMsg(img));
  } finally {
    await kill(other);
  }
  await until('child lock gone', () => locksOn(img).length === 0);
  await lockAndRelease(img, 'write');
});

test('another qimg reader allows readers, excludes writers', async () => {
  const img = newImage();
  const other = await holdWithQimg(img, 'read');
  try {
    const fd = openSync(img, 'r');
    try {
      assert.not.ok(await heldForWriting(fd));
    } finally {
      closeSync(fd);
    }
    await lockAndRelease(img, 'read');
    const w = await lockError(img, 'write');
    assert.is(w.code, 'LOCKED');
    assert.is(w.message, writeMsg(img));
  } finally {
    await kill(other);
  }
});

/** heldForWriting as the kernel (F_GETLK) and as /proc/locks answer it, from a fresh fd. */
function bothAnswers(img: string): { kernel: boolean | undefined; procLocks: boolean } {
  const fd = openSync(img, 'r');
  try {
    return { kernel: heldForWritingVia.kernel(fd), procLocks: heldForWritingVia.procLocks(fd) };
  } finally {
    closeSync(fd);
  }
}

test('F_GETLK (native helper) and /proc/locks agree on who holds an image for writing', async () => {
  const img = newImage();
  const native = haveFallocate();
  const expect = (what: string, held: boolean, kernel: boolean | 'undecided' = held) => {
    const got = bothAnswers(img);
    assert.is(got.procLocks, held, `${what}: /proc/locks`);
    if (native) assert.is(got.kernel, kernel === 'undecided' ? undefined : kernel, `${what}: F_GETLK`);
  };
  expect('nobody', false);
  let q = await holdWithQemuIo(img, false);
  expect('qemu-io read-write', true);
  await kill(q);
  q = await holdWithQemuIo(img, true);
  expect('qemu-io read-only', false);
  // A qimg reader's whole-file read lock hides what lies behind it from F_GETLK: undecided, and
  // heldForWriting falls back to /proc/locks.
  const reader = await holdWithQimg(img, 'read');
  try {
    expect('qemu-io read-only and a qimg reader', false, 'undecided');
    const fd = openSync(img, 'r');
    try {
      assert.not.ok(await heldForWriting(fd));
    } finally {
      closeSync(fd);
    }
  } finally {
    await kill(reader);
    await kill(q);
  }
  const writer = await holdWithQimg(img, 'write');
  try {
    expect('a qimg writer', true);
  } finally {
    await kill(writer);
  }
});

test.run();
