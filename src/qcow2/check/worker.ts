// Worker-thread entry for checking several images at once: checks one path per message.

import { parentPort } from 'node:worker_threads';
import { check, type CheckOptions } from './index.js';

parentPort?.on('message', (job: { id: number; path: string; opts: CheckOptions }) => {
  check(job.path, job.opts).then(
    (report) => parentPort!.postMessage({ id: job.id, report }),
    (err: unknown) => parentPort!.postMessage({ id: job.id, error: err instanceof Error ? err.message : String(err) }),
  );
});
