// A plain WebSocket relay on Node's `ws`: the anchor `bench/test_bench_server.py` compares our
// server with.  It speaks the Phoenix v2 subset `presence-core bench` uses and does no presence
// work: a track is relayed to the topic's members as one presence_diff, serialized once and
// sent to every member (the sender included), and the presence_state a join gets is empty.
//
//   node bench/relays/ws_relay.mjs --port 0 [--host 127.0.0.1]
//
// prints `listening <port>` on stdout once it accepts connections.  WebSockets at any path
// ending in /websocket; SIGTERM or SIGINT stops it.  `ws` comes from tests/js/node_modules
// (`npm ci --prefix tests/js`), the project's one Node workspace.

import { createServer } from "node:http";
import { createRequire } from "node:module";

const require = createRequire(new URL("../../tests/js/package.json", import.meta.url));
const { WebSocketServer } = require("ws");

function option(name, fallback) {
  const at = process.argv.indexOf(name);
  return at >= 0 && at + 1 < process.argv.length ? process.argv[at + 1] : fallback;
}

const host = option("--host", "127.0.0.1");
const port = Number(option("--port", "0"));

const topics = new Map(); // topic -> Set of sockets joined to it
let refs = 0; // phx_ref of each relayed meta: unique in this process

function reply(ws, joinRef, ref, topic, response = {}, status = "ok") {
  ws.send(JSON.stringify([joinRef, ref, topic, "phx_reply", { status, response }]));
}

function fanOut(topic, frame) {
  const members = topics.get(topic);
  if (members === undefined || members.size === 0) return;
  // One serialization and one buffer for every member: this is the relay's fan-out.
  const data = Buffer.from(JSON.stringify(frame));
  for (const member of members) {
    if (member.readyState === 1) member.send(data, { binary: false });
  }
}

function diff(topic, joins, leaves) {
  fanOut(topic, [null, null, topic, "presence_diff", { joins, leaves }]);
}

// Take a socket out of a topic, then tell the members left if it had tracked.
function leave(ws, topic) {
  const channel = ws.channels.get(topic);
  if (channel === undefined) return;
  ws.channels.delete(topic);
  const members = topics.get(topic);
  if (members !== undefined) {
    members.delete(ws);
    if (members.size === 0) topics.delete(topic);
  }
  if (channel.meta !== null) diff(topic, {}, { [channel.key]: { metas: [channel.meta] } });
}

function handle(ws, text) {
  let message;
  try {
    message = JSON.parse(text);
  } catch {
    return;
  }
  if (!Array.isArray(message) || message.length !== 5) return;
  const [joinRef, ref, topic, event, payload] = message;

  if (topic === "phoenix") {
    if (event === "heartbeat") reply(ws, null, ref, topic);
    return;
  }
  if (event === "phx_join") {
    if (ws.channels.has(topic)) leave(ws, topic); // a rejoin replaces the old membership
    const key = payload?.config?.presence?.key || `k${++refs}`;
    ws.channels.set(topic, { joinRef: ref, key, meta: null });
    let members = topics.get(topic);
    if (members === undefined) {
      members = new Set();
      topics.set(topic, members);
    }
    members.add(ws);
    reply(ws, ref, ref, topic, { postgres_changes: [] });
    ws.send(JSON.stringify([ref, null, topic, "presence_state", {}]));
    return;
  }
  const channel = ws.channels.get(topic);
  if (channel === undefined) {
    reply(ws, joinRef, ref, topic, { reason: "unmatched topic" }, "error");
    return;
  }
  if (event === "phx_leave") {
    reply(ws, joinRef, ref, topic);
    ws.send(JSON.stringify([joinRef, ref, topic, "phx_close", {}]));
    leave(ws, topic);
  } else if (event === "presence" && payload?.event === "track") {
    reply(ws, joinRef, ref, topic);
    const meta = { ...payload.payload, phx_ref: `r${++refs}` };
    channel.meta = meta;
    diff(topic, { [channel.key]: { metas: [meta] } }, {});
  } else if (event === "presence" && payload?.event === "untrack") {
    reply(ws, joinRef, ref, topic);
    const meta = channel.meta;
    channel.meta = null;
    if (meta !== null) diff(topic, {}, { [channel.key]: { metas: [meta] } });
  } else {
    reply(ws, joinRef, ref, topic); // access_token and the like: accepted, nothing to relay
  }
}

const server = createServer((request, response) => {
  response.writeHead(404).end();
});
const wss = new WebSocketServer({ noServer: true, perMessageDeflate: false });

server.on("upgrade", (request, socket, head) => {
  const path = new URL(request.url, "http://relay").pathname;
  if (!path.replace(/\/+$/, "").endsWith("/websocket")) {
    socket.end("HTTP/1.1 404 Not Found\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
    return;
  }
  wss.handleUpgrade(request, socket, head, (ws) => {
    ws.channels = new Map(); // topic -> { joinRef, key, meta }
    ws.on("message", (data, isBinary) => {
      if (!isBinary) handle(ws, data.toString());
    });
    ws.on("close", () => {
      for (const topic of [...ws.channels.keys()]) leave(ws, topic);
    });
    ws.on("error", () => {}); // a reset socket closes; "close" does the rest
  });
});

function stop() {
  for (const ws of wss.clients) ws.terminate();
  server.close();
  process.exit(0);
}
process.on("SIGTERM", stop);
process.on("SIGINT", stop);

// The same accept backlog as our server (Node's default is 511).
server.listen({ port, host, backlog: 4096 }, () => {
  process.stdout.write(`listening ${server.address().port}\n`);
});
