// How the Node runtime is tuned for a copying command (`convert`; commit and rebase already beat
// qemu-img without it): V8's optimising compiler held back at first, libuv's pool sized to the CPUs.
// A CLI concern only: the library never changes the flags or environment of the process it runs
// in. Both are process-wide, and safe to set here: the CLI runs one command per process.

import { availableParallelism } from 'node:os';
import { setFlagsFromString } from 'node:v8';

/** How long convert holds TurboFan back: a 1 GiB convert's copy takes ~0.2 s. */
export const HOLD_BACK_MS = 300;

let held = false;

/**
 * Holds TurboFan back for the next `ms` milliseconds (once per process).
 *
 * Why: on a 2-vCPU machine a 1 GiB `convert` spends ~0.2 s of CPU copying in the kernel on
 * libuv's threads, and TurboFan compiled the copy loop's few hot functions (placement, planning)
 * on another thread for 60-85 ms of CPU meanwhile: the copying waited for a CPU. Held back, the
 * copy took ~40-50 ms less; the loop runs a few hundred times per GiB, so Sparkplug's baseline
 * code is fast enough for it. Only for a while: a loop over millions of table entries (a large
 * preallocated image's mapping) runs 4x slower unoptimised, so TurboFan comes back after `ms`
 * (convert's long synchronous walks yield to the event loop now and then, so the timer fires).
 * The flag is set after the bundle loaded with its code cache: V8 checks a cache against the
 * flags when it loads one, not later.
 */
export function holdBackOptimizer(ms: number): void {
  if (held) return;
  held = true;
  setFlagsFromString('--no-turbofan');
  // unref: a command that is done before the timer does not wait for it.
  setTimeout(() => setFlagsFromString('--turbofan'), ms).unref();
}

/**
 * libuv's thread pool (which runs the async reads and writes) gets one thread per CPU, 2 at
 * least and 4 (libuv's default) at most, unless UV_THREADPOOL_SIZE is set already. Must run
 * before the first async file operation: libuv reads the variable when it starts the pool.
 *
 * Why: on 2 CPUs, four threads copying at once (three chunks read ahead and the writes) took
 * turns on two CPUs and spun on the output's inode lock; two threads made a 1 GiB
 * qcow2 -> qcow2 copy ~70 ms (30%) faster and raw -> qcow2 ~20 ms. Not for `convert -c`: its
 * deflate jobs run on the same pool and want the threads.
 */
export function sizeThreadPool(): void {
  if (process.env.UV_THREADPOOL_SIZE !== undefined) return;
  process.env.UV_THREADPOOL_SIZE = String(Math.min(4, Math.max(2, availableParallelism())));
}
