// The official `centrifuge` SDK under Node, driven by tests/test_js_sdk.py.
//
//   node node_client.mjs --url ws://127.0.0.1:P/connection/websocket --token JWT \
//       [--channel news] [--count 3] [--timeout 20] [--format json|protobuf]
//
// Prints one JSON object per line on stdout: {"event": "connecting" | "connected" |
// "subscribing" | "subscribed" | "publication" | "disconnected" | "error" | "sub_error" |
// "done" | "timeout", ...}. Exits 0 after `count` publications on `channel`, 2 on timeout.
import WebSocket from 'ws';

const args = {channel: 'news', count: '1', timeout: '20', format: 'json'};
for (let i = 2; i < process.argv.length; i += 2) {
  const key = process.argv[i].replace(/^--/, '');
  args[key] = process.argv[i + 1];
}
if (!args.url || !args.token) {
  console.error('usage: node node_client.mjs --url URL --token JWT [--channel C] [--count N] [--timeout S] [--format json|protobuf]');
  process.exit(64);
}

const {Centrifuge} = args.format === 'protobuf'
  ? await import('centrifuge/build/protobuf')
  : await import('centrifuge');

const count = Number(args.count);
const emit = (event, fields = {}) => console.log(JSON.stringify({event, ...fields}));

// Protobuf publications carry raw bytes; the test publishes JSON through the HTTP API, so
// decode them back to the same JSON value for comparison.
const decode = (data) => {
  if (data instanceof Uint8Array) {
    const text = new TextDecoder().decode(data);
    try {
      return {data: JSON.parse(text), binary: true};
    } catch {
      return {data: text, binary: true};
    }
  }
  return {data, binary: false};
};

const client = new Centrifuge(args.url, {
  token: args.token,
  websocket: WebSocket,
  // keep a refused/dropped connection from retrying in a tight loop during the test
  minReconnectDelay: 500,
  maxReconnectDelay: 2000,
});

let finished = false;
const finish = (code, event, fields) => {
  if (finished) return;
  finished = true;
  emit(event, fields);
  client.disconnect();
  process.exitCode = code;
  // let the close frame go out, then leave even if something still holds the loop
  setTimeout(() => process.exit(code), 300).unref();
};

const timer = setTimeout(() => finish(2, 'timeout', {received: received.length}),
  Number(args.timeout) * 1000);
timer.unref?.();

client.on('connecting', (ctx) => emit('connecting', {code: ctx.code, reason: ctx.reason}));
client.on('connected', (ctx) => emit('connected', {client: ctx.client, transport: ctx.transport}));
client.on('disconnected', (ctx) => emit('disconnected', {code: ctx.code, reason: ctx.reason}));
client.on('error', (ctx) => emit('error', {type: ctx.type, message: String(ctx.error?.message ?? ctx.error)}));

const received = [];
const sub = client.newSubscription(args.channel);
sub.on('subscribing', (ctx) => emit('subscribing', {code: ctx.code, reason: ctx.reason}));
sub.on('subscribed', (ctx) => emit('subscribed', {channel: ctx.channel, recoverable: ctx.recoverable}));
sub.on('error', (ctx) => emit('sub_error', {type: ctx.type, message: String(ctx.error?.message ?? ctx.error)}));
sub.on('publication', (ctx) => {
  const {data, binary} = decode(ctx.data);
  received.push(data);
  emit('publication', {channel: ctx.channel, data, binary, offset: ctx.offset});
  if (received.length >= count) {
    finish(0, 'done', {received: received.length});
  }
});

sub.subscribe();
client.connect();
