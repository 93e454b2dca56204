#!/usr/bin/env node
// Writes tests/data/testdata/gpt2_reference_tokens.json: GPT-2 token ids of a fixed set of
// texts, computed by a reference implementation -- the JavaScript encoder of the npm package
// gpt-3-encoder (its Encoder.js, a port of GPT-2's encoder.py) -- never by qtrain's code.
//
//   node tools/reference/gpt2_tokenizer_fixture.js DIR > tests/data/testdata/gpt2_reference_tokens.json
//
// DIR is the unpacked package (tools/setup.sh puts it in data/raw/gpt-3-encoder). Texts are
// stored as hex bytes so that ill-formed UTF-8 survives; such bytes are first decoded the way
// GPT-2's encoder reads text, as UTF-8 with U+FFFD replacing ill-formed parts (TextDecoder and
// Python's errors='replace' both follow the WHATWG rule), then encoded.
// U+0085 and U+FEFF are left out on purpose: JavaScript's \s disagrees with Unicode's
// White_Space there (Python's regex, tiktoken and qtrain follow White_Space).
'use strict';
const path = require('path');
const dir = process.argv[2];
if (!dir) {
  console.error('usage: gpt2_tokenizer_fixture.js GPT_3_ENCODER_DIR');
  process.exit(2);
}
const pkg = require(path.resolve(dir, 'package.json'));
const { encode, decode } = require(path.resolve(dir, 'Encoder.js'));

const texts = [
  ['ascii', 'Hello world'],
  ['punctuation', 'Hello, world! How\'s it going?'],
  ['contractions', "I'm sure you'll see they've done it, she's said we'd go, they're here. Don't! DON'T 's 't 're 've 'm 'll 'd 'x"],
  ['contraction_edges', "'sa 'tea rock 'n' roll ''s !'s isn't 'S O'Neill’s curly’re"],
  ['whitespace_runs', 'a  b   c\n\nd\t\te \n  f   \n'],
  ['leading_trailing', '   leading and trailing   '],
  ['only_newlines', '\n\n\n'],
  ['single_space', ' '],
  ['empty', ''],
  ['crlf', 'x\r\n\r\ny\r\n'],
  ['unicode_spaces', '\u00a0nbsp \u3000ideographic\u2003em\u2009thin \u00a0\u00a0x \u2028line\u2029para'],
  ['space_before_newline', 'end of line \nnext line  \n\n  indented'],
  ['tabs_code', 'def f(x):\n    return x**2  # square\n\tif x:\n\t\tpass\n'],
  ['numbers', '1234567890 3.14159 1,000,000 2024-05-20 0x1F 1e-5 -42 +7'],
  ['unicode_numbers', '½ ² ³ Ⅻ ٣٤٥ ①② 10¹⁰ ४२'],
  ['letters_digits', 'abc123def 123abc x2 2x A1B2C3'],
  ['latin', 'Café naïve résumé São Paulo Zürich Ærøskøbing façade Œuvre'],
  ['cyrillic', 'Привет, мир! Съешь же ещё этих мягких французских булок.'],
  ['cjk', 'こんにちは世界。你好，世界！한국어 텍스트'],
  ['rtl', 'مرحبا بالعالم שלום עולם'],
  ['greek', 'Ελληνικά: αβγ ΔΕΖ'],
  ['combining', 'e\u0301 a\u0308 n\u0303o Z\u0351\u0352algo'],
  ['emoji', '😀 👍🏽 👨‍👩‍👧‍👦 🇺🇸 ❤️ 🤖 hi😀there 😀😀😀'],
  ['symbols', '<|endoftext|> is plain text here; !!! ??? ... --- === $$$ @#%^&*() «» “quotes” — – …'],
  ['urls', 'email@example.com https://example.com/path?q=1&r=2#frag'],
  ['repeats', 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa ' + ' '.repeat(40) + 'x' + '-'.repeat(33)],
  ['byte_level_chars', 'ĠĠ Ċ ĉ ÿ Ā ¡¬®'],
  ['brown_like', 'The Fulton County Grand Jury said Friday an investigation of Atlanta\'s recent primary election produced `` no evidence \'\' that any irregularities took place .'],
];
const rawBytes = [
  ['invalid_ff_fe', [0xff, 0xfe, 0x20, 0x61, 0x62, 0x63]],
  ['invalid_truncated', [0x63, 0x61, 0x66, 0xc3]],
  ['invalid_surrogate', [0xed, 0xa0, 0x80, 0x20, 0x73]],
  ['invalid_overlong', [0xc0, 0xaf, 0x20, 0xe0, 0x80, 0xaf]],
  ['invalid_beyond_max', [0xf4, 0x90, 0x80, 0x80, 0x21]],
  ['invalid_lone_continuation', [0x61, 0x80, 0x62, 0xbf, 0xbf, 0x63]],
  ['invalid_truncated_4byte', [0xf0, 0x9f, 0x98, 0x20, 0xf0, 0x9f, 0x98, 0x80]],
];

const cases = [];
for (const [name, text] of texts) {
  const bytes = Buffer.from(text, 'utf8');
  cases.push({ name, hex: bytes.toString('hex'), ids: encode(text) });
}
const utf8 = new TextDecoder('utf-8');  // replacement mode (fatal: false)
for (const [name, arr] of rawBytes) {
  const bytes = Buffer.from(arr);
  const text = utf8.decode(bytes);
  cases.push({ name, hex: bytes.toString('hex'), ids: encode(text),
               decoded_hex: Buffer.from(decode(encode(text)), 'utf8').toString('hex') });
}
const header = {
  what: 'GPT-2 BPE token ids of fixed texts, from a reference implementation (not qtrain)',
  reference: `npm ${pkg.name}@${pkg.version} Encoder.js encode() under node ${process.version}`,
  command: 'node tools/reference/gpt2_tokenizer_fixture.js data/raw/gpt-3-encoder > tests/data/testdata/gpt2_reference_tokens.json',
  input: 'hex: the text as bytes; ill-formed UTF-8 is decoded with U+FFFD replacement (TextDecoder) before encoding; decoded_hex: decode(encode(text)) of those',
  left_out: 'U+0085 and U+FEFF, where JavaScript \\s differs from Unicode White_Space',
};
// One case per line keeps diffs of a regenerated fixture readable.
process.stdout.write('{\n"header": ' + JSON.stringify(header, null, 1) + ',\n"cases": [\n' +
                     cases.map((c) => JSON.stringify(c)).join(',\n') + '\n]}\n');
