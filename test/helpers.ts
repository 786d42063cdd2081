// Shared test plumbing: temp dirs, running qemu-img/qemu-io (the oracle) and the qimg CLI.
import { spawn, spawnSync, type ChildProcess, type SpawnSyncReturns } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

/** Repository root (tests run from dist/test/...). */
export const REPO = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');
export const FIXTURES = join(REPO, 'fixtures');
export const QIMG_BIN = join(REPO, 'bin', 'qimg.js');

export interface RunResult {
  status: number;
  stdout: string;
  stderr: string;
}

function result(r: SpawnSyncReturns<string>): RunResult {
  if (r.error) throw r.error;
  return { status: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

const baseEnv = { ...process.env, LC_ALL: 'C', TZ: process.env.TZ ?? 'UTC' };

export function run(cmd: string, args: string[], env: Record<string, string> = {}, cwd?: string): RunResult {
  return result(spawnSync(cmd, args, { encoding: 'utf8', env: { ...baseEnv, ...env }, cwd, maxBuffer: 1 << 28 }));
}

/** QEMU's refusal when another process (e.g. a qimg reader in a parallel test) holds the image. */
const LOCK_REFUSAL = /Failed to (get (shared )?"[a-z -]+" lock|lock byte)/;

/**
 * Runs qemu-img/qemu-io, retrying briefly when the image is locked: tests in parallel processes
 * read the same fixtures, and a qimg reader's whole-file read lock makes a QEMU open fail
 * meanwhile. A test that expects a lock refusal still sees it (after the retries).
 */
function runQemu(cmd: string, args: string[], env: Record<string, string>, cwd?: string): RunResult {
  let r = run(cmd, args, env, cwd);
  for (let i = 0; i < 3 && r.status !== 0 && LOCK_REFUSAL.test(r.stderr); i++) {
    Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 100);
    r = run(cmd, args, env, cwd);
  }
  return r;
}

export function qemuImg(args: string[], env: Record<string, string> = {}, cwd?: string): RunResult {
  return runQemu('qemu-img', args, env, cwd);
}

export function qemuIo(args: string[], env: Record<string, string> = {}): RunResult {
  return runQemu('qemu-io', args, env);
}

/** Runs the qimg CLI as a user would: the bin as an executable, through its shebang. */
export function qimg(args: string[], env: Record<string, string> = {}, cwd?: string): RunResult {
  return run(QIMG_BIN, args, env, cwd);
}

/** qemu-img, failing the test with its stderr when it fails. */
export function mustQemuImg(args: string[], env: Record<string, string> = {}, cwd?: string): string {
  const r = qemuImg(args, env, cwd);
  if (r.status !== 0) throw new Error(`qemu-img ${args.join(' ')} failed: ${r.stderr}`);
  return r.stdout;
}

export function mustQemuIo(args: string[]): string {
  const r = qemuIo(args);
  if (r.status !== 0 || /error|failed/i.test(r.stderr + r.stdout)) {
    throw new Error(`qemu-io ${args.join(' ')} failed: ${r.stderr}${r.stdout}`);
  }
  return r.stdout;
}

const dirs: string[] = [];
export function tmpDir(prefix = 'qimg-test-'): string {
  const d = mkdtempSync(join(tmpdir(), prefix));
  dirs.push(d);
  return d;
}
process.on('exit', () => {
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

/**
 * Runs `fn` while a live qemu-io holds `img` (read-write, or read-only with `readOnly`): waits
 * until its locks show in /proc/locks, and kills it afterwards whatever happens.
 */
export async function withQemuIo<T>(img: string, fn: () => T | Promise<T>, readOnly = false): Promise<T> {
  const child: ChildProcess = spawn('qemu-io', [...(readOnly ? ['-r'] : []), '-c', 'sleep 60000', img], { stdio: 'ignore' });
  try {
    const ino = statSync(img).ino;
    const deadline = Date.now() + 10000;
    while (!readFileSync('/proc/locks', 'utf8').includes(`:${ino} `)) {
      if (Date.now() > deadline) throw new Error('qemu-io never locked the image');
      await new Promise((r) => setTimeout(r, 50));
    }
    return await fn();
  } finally {
    child.kill('SIGKILL');
    await new Promise((r) => child.once('exit', r));
  }
}
