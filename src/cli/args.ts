// A small getopt_long-style parser with qemu-img's syntax (`-f FMT`, `--output=json`, options
// after file names, `--` ends options).
//
// Why not yargs here: loading yargs costs about as much as Node's own start-up, and `info` /
// `snapshot -l` must start within 1.5x of bare Node. yargs is loaded only for --help and
// --version (src/cli/help.ts), where start-up does not matter.

import { QimgError } from '../qcow2/errors.js';

export interface OptionSpec {
  /** Canonical key in the result. */
  key: string;
  short?: string;
  long?: string[];
  /** Takes an argument (`-f qcow2`, `--output=json`). */
  value?: boolean;
  /** May be given several times; values are collected in order. */
  repeat?: boolean;
}

export interface Parsed {
  opts: Map<string, string[]>;
  positionals: string[];
}

export function parseArgs(command: string, argv: string[], specs: OptionSpec[]): Parsed {
  const opts = new Map<string, string[]>();
  const positionals: string[] = [];
  const put = (spec: OptionSpec, v: string) => {
    const prev = opts.get(spec.key);
    if (prev && spec.repeat) prev.push(v);
    else opts.set(spec.key, [v]);
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    if (a === '--') {
      positionals.push(...argv.slice(i + 1));
      break;
    }
    if (a.startsWith('--')) {
      const eq = a.indexOf('=');
      const name = a.slice(2, eq < 0 ? undefined : eq);
      const spec = specs.find((s) => s.long?.includes(name));
      if (!spec) throw usage(command, `unrecognized option '${a}'`);
      if (spec.value) {
        let v: string | undefined = eq < 0 ? undefined : a.slice(eq + 1);
        if (v === undefined) {
          if (i + 1 >= argv.length) throw usage(command, `missing argument for option '${a}'`);
          v = argv[++i]!;
        }
        put(spec, v);
      } else {
        if (eq >= 0) throw usage(command, `unrecognized option '${a}'`);
        put(spec, '');
      }
      continue;
    }
    if (a.startsWith('-') && a.length > 1) {
      // Clustered short options: -qU, -fqcow2.
      for (let j = 1; j < a.length; j++) {
        const c = a[j]!;
        const spec = specs.find((s) => s.short === c);
        if (!spec) throw usage(command, `unrecognized option '${a}'`);
        if (spec.value) {
          let v = a.slice(j + 1);
          if (v === '') {
            if (i + 1 >= argv.length) throw usage(command, `missing argument for option '${a}'`);
            v = argv[++i]!;
          }
          put(spec, v);
          break;
        }
        put(spec, '');
      }
      continue;
    }
    positionals.push(a);
  }
  return { opts, positionals };
}

export function usage(command: string, message: string): QimgError {
  return new QimgError('USAGE', `${message}\nTry 'qimg ${command} --help' for more information`);
}

export function flag(p: Parsed, key: string): boolean {
  return p.opts.has(key);
}

export function last(p: Parsed, key: string): string | undefined {
  const v = p.opts.get(key);
  return v ? v[v.length - 1] : undefined;
}

export function all(p: Parsed, key: string): string[] {
  return p.opts.get(key) ?? [];
}

/** `--output=human|json`. */
export function outputFormat(command: string, p: Parsed): 'human' | 'json' {
  const v = last(p, 'output') ?? 'human';
  if (v !== 'human' && v !== 'json') throw new QimgError('USAGE', `--output must be used with human or json as argument.`);
  void command;
  return v;
}

/** -f FMT (or `key`), refused as qemu-img refuses it when opening `file`: naming the file. */
export function imageFormat(p: Parsed, file: string, key = 'format'): 'qcow2' | 'raw' | undefined {
  const f = last(p, key);
  if (f === undefined) return undefined;
  if (f !== 'qcow2' && f !== 'raw') throw new QimgError('UNSUPPORTED', `Could not open '${file}': Unknown driver '${f}'`, { path: file });
  return f;
}

/** Exactly one file name (most commands). */
export function oneFile(command: string, p: Parsed): string {
  if (p.positionals.length === 0) throw usage(command, 'Expecting one image file name');
  if (p.positionals.length > 1) throw usage(command, `Expecting one image file name`);
  return p.positionals[0]!;
}

/** Options every reading command shares. */
export const COMMON_READ_OPTIONS: OptionSpec[] = [
  { key: 'format', short: 'f', long: ['format'], value: true },
  { key: 'force-share', short: 'U', long: ['force-share'] },
  { key: 'backing-root', long: ['backing-root'], value: true, repeat: true },
  { key: 'allow-any-backing', long: ['allow-any-backing'] },
  { key: 'no-backing', long: ['no-backing'] },
];

/**
 * The backing-file policy from --no-backing / --allow-any-backing / --backing-root DIR and the
 * QIMG_BACKING_ROOTS environment variable (colon-separated), for scripts.
 */
export function backingPolicy(p: Parsed): { follow: 'any' | 'within' | 'none'; roots: string[] } {
  if (flag(p, 'no-backing')) return { follow: 'none', roots: [] };
  if (flag(p, 'allow-any-backing')) return { follow: 'any', roots: [] };
  const env = (process.env.QIMG_BACKING_ROOTS ?? '').split(':').filter((d) => d !== '');
  return { follow: 'within', roots: [...all(p, 'backing-root'), ...env] };
}
