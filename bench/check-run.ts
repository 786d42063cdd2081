// Runs `qimg check ARGS` through the command module (until main.ts registers `check`):
//   node dist/bench/check-run.js [check options] FILE...
import { run } from '../src/cli/commands/check.js';

run(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (err: unknown) => {
    process.stderr.write(`qimg: ${err instanceof Error ? err.message : String(err)}\n`);
    process.exit(1);
  },
);
