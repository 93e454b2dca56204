#!/usr/bin/env node
// Prints what the npm package @huggingface/gguf (a GGUF reader nobody here wrote) reads from a
// file, as one JSON object: metadata (arrays as their length and first elements) and tensors
// (name, shape, ggml type name). NODE_PATH must reach the package (tools/setup.sh installs it
// in <data>/node/node_modules).
'use strict';
const { gguf, GGMLQuantizationType } = require('@huggingface/gguf');
(async () => {
  const { metadata, tensorInfos } = await gguf(process.argv[2], { allowLocalFile: true });
  const meta = {};
  for (const [k, v] of Object.entries(metadata)) {
    if (Array.isArray(v)) meta[k] = { length: v.length, head: v.slice(0, 3).map(String), last: String(v[v.length - 1]) };
    else meta[k] = typeof v === 'bigint' ? Number(v) : v;
  }
  const tensors = tensorInfos.map((t) => ({
    name: t.name, shape: t.shape.map(Number), type: GGMLQuantizationType[t.dtype],
  }));
  process.stdout.write(JSON.stringify({ metadata: meta, tensors }) + '\n');
})().catch((e) => { console.error(`gguf_inspect: ${e.stack || e}`); process.exit(1); });
