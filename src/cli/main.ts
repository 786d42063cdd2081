// The qimg command line: dispatch to one command module, map errors to one stderr line and an exit code.

import { QimgError } from '../qcow2/errors.js';
import { writeStderr } from './output.js';

type CommandModule = { run(argv: string[]): Promise<number> };

/** Loaded on demand so a command pays only for what it uses. */
const COMMANDS: Record<string, () => Promise<CommandModule>> = {
  info: () => import('./commands/info.js'),
  snapshot: () => import('./commands/snapshot.js'),
  convert: () => import('./commands/convert.js'),
  create: () => import('./commands/create.js'),
  resize: () => import('./commands/resize.js'),
  check: () => import('./commands/check.js'),
  commit: () => import('./commands/commit.js'),
  rebase: () => import('./commands/rebase.js'),
  map: () => import('./commands/map.js'),
  compare: () => import('./commands/compare.js'),
  chain: () => import('./commands/chain.js'),
};

export async function main(argv: string[]): Promise<void> {
  process.exitCode = await dispatch(argv);
}

async function dispatch(argv: string[]): Promise<number> {
  const [cmd, ...rest] = argv;
  try {
    if (cmd === undefined || cmd === '--help' || cmd === '-h' || cmd === 'help' || cmd === '--version' || cmd === '-V') {
      return (await import('./help.js')).showGlobal(argv);
    }
    const load = COMMANDS[cmd];
    if (!load) {
      writeStderr(`qimg: Command not found: ${cmd}\nTry 'qimg --help' for more information\n`);
      return 1;
    }
    if (rest.includes('--help') || rest.includes('-h')) return (await import('./help.js')).showCommand(cmd);
    return await (await load()).run(rest);
  } catch (err) {
    return reportError(err);
  }
}

/** One clear line (qemu-img's two for lock conflicts), never a stack trace unless QIMG_DEBUG is set. */
export function reportError(err: unknown): number {
  if (process.env.QIMG_DEBUG) console.error(err);
  if (err instanceof QimgError) {
    writeStderr(`qimg: ${err.message}\n`);
    return 1;
  }
  const msg = err instanceof Error ? err.message : String(err);
  writeStderr(`qimg: internal error: ${msg.split('\n')[0]}\n`);
  return 1;
}
