// Builds dist/javascript-payload-validator.wasm from handler.js with the componentize() API of
// @bytecodealliance/componentize-js (version pinned in package.json and package-lock.json).
// Run through ./build.sh, which installs the pinned packages first.
//
// Only the engine features this handler needs are kept: `http` and `fetch-event` would import
// wasi:http, which the eventbroker host does not link.

import { mkdir, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

import { componentize } from '@bytecodealliance/componentize-js';

const here = dirname(fileURLToPath(import.meta.url));
const output = join(here, 'dist', 'javascript-payload-validator.wasm');

const { component } = await componentize({
  sourcePath: join(here, 'handler.js'),
  witPath: join(here, '..', '..', 'wit'),
  worldName: 'event-handler',
  disableFeatures: ['http', 'fetch-event'],
});

await mkdir(dirname(output), { recursive: true });
await writeFile(output, component);
console.log(`wrote ${output} (${component.byteLength} bytes)`);
