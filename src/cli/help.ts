// --help and --version, rendered by yargs from one catalogue of the commands and their options.

import { readFileSync } from 'node:fs';
import yargs, { type Argv } from 'yargs';

interface Opt {
  flags: string;
  desc: string;
  type?: 'string' | 'boolean' | 'array';
  choices?: string[];
}

interface Cmd {
  usage: string;
  desc: string;
  options: Opt[];
  examples: Array<[string, string]>;
}

const READ: Opt[] = [
  { flags: 'f', desc: 'image format (qcow2 or raw); probed when omitted', type: 'string' },
  { flags: 'U', desc: 'force-share: open without locks, even while another process writes the image', type: 'boolean' },
  { flags: 'backing-root', desc: 'also follow backing files under DIR (repeatable; env QIMG_BACKING_ROOTS=dir1:dir2)', type: 'array' },
  { flags: 'allow-any-backing', desc: "follow backing files anywhere, as qemu-img does", type: 'boolean' },
  { flags: 'no-backing', desc: 'read the top layer alone; unallocated clusters read as zeros', type: 'boolean' },
];

export const CATALOGUE: Record<string, Cmd> = {
  info: {
    usage: 'info [--output=human|json] [--backing-chain] [-f FMT] [-U] FILE',
    desc: 'Describe an image as qemu-img info does',
    options: [...READ, { flags: 'output', desc: 'output format', choices: ['human', 'json'] }, { flags: 'backing-chain', desc: 'describe every image of the backing chain', type: 'boolean' }],
    examples: [['qimg info --output=json fixtures/demo.qcow2', 'JSON as qemu-img prints it']],
  },
  snapshot: {
    usage: 'snapshot -l [--output=human|json] [-U] FILE',
    desc: 'List the internal snapshots of a qcow2 image',
    options: [...READ, { flags: 'l', desc: 'list snapshots', type: 'boolean' }, { flags: 'output', desc: 'output format', choices: ['human', 'json'] }, { flags: 'q', desc: 'quiet', type: 'boolean' }],
    examples: [['qimg snapshot -l fixtures/demo.qcow2', 'the snapshot table']],
  },
  convert: {
    usage: 'convert [-f FMT] -O raw [-l SNAPSHOT] [-p] [-U] SRC DST',
    desc: 'Copy guest data of an image (or of one of its snapshots) into a sparse raw file',
    options: [
      ...READ,
      { flags: 'O', desc: 'output format', choices: ['raw'] },
      { flags: 'l', desc: 'snapshot.name=NAME, snapshot.id=ID, or an ID or name', type: 'string' },
      { flags: 'p', desc: 'show progress on a terminal', type: 'boolean' },
    ],
    examples: [['qimg convert -O raw -l snapshot.name=base fixtures/demo.qcow2 base.raw', 'export a snapshot']],
  },
};

export function version(): string {
  const pkg = JSON.parse(readFileSync(new URL('../../../package.json', import.meta.url), 'utf8')) as { version: string };
  return pkg.version;
}

function build(): Argv {
  let y = yargs([]).scriptName('qimg').usage('qimg <command> [options]').strict(false).version(version()).help('help').alias('help', 'h').wrap(100);
  for (const [name, c] of Object.entries(CATALOGUE)) {
    y = y.command(name, c.desc, (sub) => describeCommand(sub, c));
  }
  return y.epilogue('Exit codes: 0 success, 1 error (qimg: <message> on stderr). See README.md.');
}

function describeCommand(sub: Argv, c: Cmd): Argv {
  let s = sub.usage(`qimg ${c.usage}\n\n${c.desc}`);
  for (const o of c.options) s = s.option(o.flags, { describe: o.desc, type: o.type, choices: o.choices });
  for (const [cmd, what] of c.examples) s = s.example(cmd, what);
  return s;
}

export async function showGlobal(argv: string[]): Promise<number> {
  if (argv[0] === '--version' || argv[0] === '-V') {
    process.stdout.write(`qimg version ${version()}\n`);
    return 0;
  }
  process.stdout.write((await build().getHelp()) + '\n');
  return argv.length === 0 ? 1 : 0;
}

export async function showCommand(cmd: string): Promise<number> {
  const c = CATALOGUE[cmd]!;
  const y = describeCommand(yargs([]).scriptName('qimg').help(false).version(false).wrap(100), c);
  process.stdout.write((await y.getHelp()) + '\n');
  return 0;
}
