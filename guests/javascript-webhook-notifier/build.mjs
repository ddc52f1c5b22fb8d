// Builds dist/javascript-webhook-notifier.wasm from handler.js with the componentize() API of
// @bytecodealliance/componentize-js (version pinned in package.json and package-lock.json).
// Run through ./build.sh, which installs the pinned packages first.
//
// The `http` feature is kept, so `fetch` works (it imports wasi:http/outgoing-handler, which
// the host links and the manifest's [http] section grants); `fetch-event` would export an
// incoming HTTP handler, which the host does not serve, so it is left out.

import { mkdir, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

import { componentize } from '@bytecodealliance/componentize-js';

const here = dirname(fileURLToPath(import.meta.url));
const output = join(here, 'dist', 'javascript-webhook-notifier.wasm');

const { component } = await componentize({
  sourcePath: join(here, 'handler.js'),
  witPath: join(here, '..', '..', 'wit'),
  worldName: 'handler-only',
  disableFeatures: ['fetch-event'],
});

await mkdir(dirname(output), { recursive: true });
await writeFile(output, component);
console.log(`wrote ${output} (${component.byteLength} bytes)`);
