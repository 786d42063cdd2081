// Bench entry point: `node dist/bench/run.js [startup|l2|all|convert|snapshot] [options passed through]`.
//
//   startup  whole-command start-up vs bare Node and qemu-img (bench/startup.ts; --runs N)
//   l2       benchmark.js suite for L2 classification and refcount get/set (bench/l2-scan.ts; --quick)
//   all      both, start-up first (the default)
//   convert  qimg vs qemu-img convert on a generated 1 GiB image (bench/convert.ts; --runs N, --only, --cpu-prof)
//   snapshot qimg vs qemu-img snapshot -c/-a/-d on a 1 TiB image (bench/snapshot-1t.ts; --runs N, --only, --cpu-prof)
//   check-1t   qimg vs qemu-img check on a 1 TiB image, 0 and 16 snapshots (bench/check-1t.ts; --runs N, --dir)
//   check-many qimg vs qemu-img check with 65,536 snapshots (bench/check-many.ts; --runs N, --count N, --dir)
//   chains   qimg vs qemu-img commit and rebase on a 1 GiB chain (bench/chains.ts; --runs N, --root, --vs)
//   zero-skip  benchmark.js: the checker's skip over zero refcount counters (bench/zero-skip.ts; --quick, --mib N)
//   read-align benchmark.js: reads into plain vs page-aligned buffers (bench/read-align.ts; --quick, --mib N)
//
// convert, snapshot and chains take minutes and write GiBs under /tmp, so `all` leaves them out.

import { spawnSync } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chainsMain } from './chains.js';
import { convertMain } from './convert.js';
import { l2Main } from './l2-scan.js';
import { readAlignMain } from './read-align.js';
import { zeroSkipMain } from './zero-skip.js';
import { snapshotMain } from './snapshot-1t.js';
import { startupMain } from './startup.js';

const USAGE =
  'usage: node dist/bench/run.js [startup|l2|all] [--runs N] [--warmup N] [--root DIR] [--quick] [--json]\n' +
  '       node dist/bench/run.js convert|snapshot [--runs N] [--root DIR] [--only KEYS] [--cpu-prof] [--json]\n' +
  '       node dist/bench/run.js check-1t|check-many [--runs N] [--dir DIR] [--count N]\n' +
  '       node dist/bench/run.js chains [--runs N] [--root DIR] [--vs DIR]\n' +
  '       node dist/bench/run.js read-align [--quick] [--mib N]\n' +
  '       node dist/bench/run.js zero-skip [--quick] [--mib N]\n';

function main(argv: string[]): number {
  const first = argv[0];
  const which = first === undefined || first.startsWith('-') ? 'all' : first;
  const rest = which === first ? argv.slice(1) : argv;
  if (which === 'help' || rest.includes('--help') || rest.includes('-h')) {
    process.stdout.write(USAGE);
    return 0;
  }
  // Options belong to one bench or the other; with `all`, hand each only its own.
  const startupOpts = pick(rest, ['--runs', '--warmup', '--root'], ['--json']);
  const l2Opts = pick(rest, [], ['--quick', '--json']);
  switch (which) {
    case 'startup':
      startupMain(rest);
      return 0;
    case 'l2':
      l2Main(rest);
      return 0;
    case 'convert':
      convertMain(rest);
      return 0;
    case 'snapshot':
      snapshotMain(rest);
      return 0;
    case 'check-1t':
    case 'check-many': {
      // Stand-alone scripts: run as a child with the remaining options.
      const script = join(dirname(fileURLToPath(import.meta.url)), `${which}.js`);
      return spawnSync(process.execPath, [script, ...rest], { stdio: 'inherit' }).status ?? 1;
    }
    case 'chains':
      chainsMain(rest);
      return 0;
    case 'zero-skip':
      zeroSkipMain(rest);
      return 0;
    case 'read-align':
      readAlignMain(rest);
      return 0;
    case 'all':
      startupMain(startupOpts);
      process.stdout.write('\n');
      l2Main(l2Opts);
      return 0;
    default:
      process.stderr.write(`bench: unknown benchmark '${which}'\n${USAGE}`);
      return 2;
  }
}

/** The options in `argv` named in `withValue` (with their value) or `bare`. */
function pick(argv: string[], withValue: string[], bare: string[]): string[] {
  const out: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    const key = a.includes('=') ? a.slice(0, a.indexOf('=')) : a;
    if (withValue.includes(key)) {
      out.push(a);
      if (!a.includes('=') && i + 1 < argv.length) out.push(argv[++i]!);
    } else if (bare.includes(a)) {
      out.push(a);
    }
  }
  return out;
}

try {
  process.exitCode = main(process.argv.slice(2));
} catch (err) {
  process.stderr.write(`bench: ${err instanceof Error ? err.message : String(err)}\n`);
  process.exitCode = 1;
}
