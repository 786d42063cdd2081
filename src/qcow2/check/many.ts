// Checking several images concurrently on worker threads (at most os.availableParallelism()).

import { availableParallelism } from 'node:os';
import { Worker } from 'node:worker_threads';
import { NodeFile } from '../io/file.js';
import { lockImage } from '../io/lock.js';
import { check, type CheckOptions, type CheckReport } from './index.js';

/** Reports in argument order. One image is checked in this thread; more go to workers. */
export async function checkMany(paths: string[], opts: CheckOptions = {}, threads = availableParallelism()): Promise<CheckReport[]> {
  if (paths.length <= 1 || threads <= 1) {
    const out: CheckReport[] = [];
    for (const p of paths) out.push(await check(p, opts));
    return out;
  }
  const { progress: _ignored, ...rest } = opts;
  void _ignored;
  // The lock library is not usable inside workers: this thread takes every image's lock and
  // holds it while the workers read the files without locking.
  const plain: CheckOptions = { ...rest, forceShare: true };
  const results = new Array<CheckReport>(paths.length);
  const held: { file: NodeFile; lock: { release(): Promise<void> } | null }[] = [];
  const pending: number[] = [];
  for (let i = 0; i < paths.length; i++) {
    if (opts.forceShare) {
      pending.push(i);
      continue;
    }
    let file: NodeFile | null = null;
    try {
      file = NodeFile.open(paths[i]!, opts.repair !== undefined);
      const lock = file.fd !== null ? await lockImage(file.fd, paths[i]!, opts.repair !== undefined ? 'write' : 'read') : null;
      held.push({ file, lock });
      pending.push(i);
    } catch {
      file?.close();
      results[i] = await check(paths[i]!, opts); // reports the open or lock failure as qemu-img would
    }
  }
  const n = Math.min(threads, pending.length);
  let next = 0;
  const url = new URL('./worker.js', import.meta.url);
  await Promise.all(
    Array.from({ length: Math.max(n, 0) }, async () => {
      const w = new Worker(url);
      try {
        while (next < pending.length) {
          const id = pending[next++]!;
          results[id] = await new Promise<CheckReport>((resolve, reject) => {
            const onMsg = (m: { id: number; report?: CheckReport; error?: string }) => {
              w.off('error', reject);
              if (m.report) resolve(m.report);
              else reject(new Error(m.error));
            };
            w.once('message', onMsg);
            w.once('error', reject);
            w.postMessage({ id, path: paths[id], opts: plain });
          });
        }
      } finally {
        await w.terminate();
      }
    }),
  );
  for (const h of held) {
    if (h.lock) await h.lock.release();
    h.file.close();
  }
  return results;
}

/** Exit code of several checks: the worst, ordered 1 > 63 > 2 > 3 > 0. */
export function worstExitCode(codes: number[]): number {
  const rank = (c: number) => (c === 1 ? 5 : c === 63 ? 4 : c === 2 ? 3 : c === 3 ? 2 : c === 0 ? 0 : 5);
  let worst = 0;
  for (const c of codes) if (rank(c) > rank(worst)) worst = c;
  return worst;
}
