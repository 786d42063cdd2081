// `qimg commit [-f FMT] [-t CACHE] [-b BASE] [-d] [-p] [-q] FILE`

import { commit } from '../../qcow2/engine/commit.js';
import { CACHE_MODES } from '../../qcow2/engine/convert.js';
import { QimgError } from '../../qcow2/errors.js';
import { backingPolicy, COMMON_READ_OPTIONS, flag, imageFormat, last, oneFile, parseArgs } from '../args.js';
import { writeStdout } from '../output.js';
import { percentReporter } from '../progress.js';

export async function run(argv: string[]): Promise<number> {
  const p = parseArgs('commit', argv, [
    ...COMMON_READ_OPTIONS.filter((o) => o.key !== 'force-share'),
    { key: 'base', short: 'b', value: true },
    { key: 'drop', short: 'd' },
    { key: 'progress', short: 'p' },
    { key: 'quiet', short: 'q' },
    // The target's cache mode: how qemu-img does its I/O, not what it writes; checked as qemu-img
    // checks it (qimg's writes are always flushed at their ordering points).
    { key: 'cache', short: 't', value: true },
  ]);
  const file = oneFile('commit', p);
  const cache = last(p, 'cache');
  if (cache !== undefined && !CACHE_MODES.has(cache)) throw new QimgError('USAGE', `Invalid cache option: ${cache}`);
  const quiet = flag(p, 'quiet');
  const showProgress = flag(p, 'progress') && !quiet;
  await commit(file, {
    format: imageFormat(p, file),
    base: last(p, 'base'),
    drop: flag(p, 'drop'),
    backing: backingPolicy(p),
    progress: percentReporter(showProgress),
  });
  if (showProgress) writeStdout('\n');
  if (!quiet) writeStdout('Image committed.\n');
  return 0;
}
