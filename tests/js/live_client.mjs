// One real client, live, against a running presence-core server, driven by JSON lines.
//
// Used by tests/test_server_clients.py.  Run with a global WebSocket (Node 20:
// `node --experimental-websocket`):
//
//   node --experimental-websocket live_client.mjs CLIENT BASE_URL
//
//   CLIENT    phoenix       phoenix.js Socket + Channel + Presence, at BASE_URL/socket (vsn 2)
//             realtime      @supabase/realtime-js RealtimeClient, at BASE_URL/realtime/v1, vsn
//                           2.0.0 (its broadcasts go out as binary frames)
//             realtime_v1   the same with vsn 1.0.0 (JSON objects)
//   BASE_URL  e.g. ws://127.0.0.1:4000
//
// The client sends a heartbeat every LIVE_CLIENT_HEARTBEAT_MS (default 500) so that it stays
// alive on a server run with a short --connection-ttl.
//
// stdin: one command per line; "id" (any JSON value) is echoed in the reply.
//
//   {"id": 1, "cmd": "join", "topic": "realtime:room", "key": "alice",
//    "broadcast_self": false, "broadcast_ack": false}
//   {"id": 2, "cmd": "track", "meta": {...}}
//   {"id": 3, "cmd": "untrack"}
//   {"id": 4, "cmd": "broadcast", "event": "ping", "payload": {...}}
//   {"id": 5, "cmd": "state"}
//   {"id": 6, "cmd": "leave"}
//   {"id": 7, "cmd": "exit"}
//
// ("broadcast_self" and "broadcast_ack" are the channel's broadcast config, sent with the join:
// whether this client gets its own broadcasts, and whether the server acknowledges them.)
// One channel at a time.
//
// stdout: one JSON object per line, each with a "type":
//
//   {"type": "started", "client": ..., "url": ...}        once, when the script is ready
//   {"type": "reply", "id": ..., "cmd": ..., "status": "ok" | "error" | "timeout" | ...,
//    "response": ..., "state": STATE (for "state")}        one per command
//   {"type": "sync", "state": STATE}                       after every presence sync
//   {"type": "broadcast", "event": ..., "payload": ...}   every broadcast received
//   {"type": "socket", "status": "open" | "close" | "error", ...}
//   {"type": "channel", "status": ...}                    channel errors / closes
//   {"type": "error", "where": ..., "error": ...}         anything that threw
//
//   STATE = {key: [meta, ...]}: the client's own presence state, metas without their refs
//   (phx_ref, phx_ref_prev, presence_ref).
//
// Commands run one after another; each is bounded (COMMAND_TIMEOUT_MS).  The script exits on
// "exit" or when stdin closes.

import { createInterface } from "node:readline"
import { Presence, Socket } from "phoenix"
import { RealtimeClient } from "@supabase/realtime-js"
import {
  COMMAND_TIMEOUT_MS,
  describe,
  emit,
  reply,
  stripRefs,
  subscribed,
  unsubscribed,
  withTimeout,
} from "./common.mjs"

const HEARTBEAT_MS = Number(process.env.LIVE_CLIENT_HEARTBEAT_MS ?? 500)

// -- phoenix.js ------------------------------------------------------------------------------

class PhoenixClient {
  constructor(base) {
    this.url = `${base}/socket`
    this.socket = new Socket(this.url, {
      heartbeatIntervalMs: HEARTBEAT_MS,
      timeout: COMMAND_TIMEOUT_MS,
      reconnectAfterMs: () => 500,
    })
    this.socket.onOpen(() => emit({ type: "socket", status: "open" }))
    this.socket.onClose((event) => {
      emit({ type: "socket", status: "close", code: event?.code ?? null })
    })
    this.socket.onError((error) => {
      emit({ type: "socket", status: "error", error: describe(error?.message ?? error) })
    })
    this.socket.connect()
    this.channel = null
  }

  async join({ topic, key, broadcast_self: self = false, broadcast_ack: ack = false }) {
    await this.leave()
    const config = { presence: { key: key ?? "", enabled: true }, broadcast: { self, ack } }
    const channel = this.socket.channel(topic, { config })
    this.channel = channel
    this.ack = ack
    this.presence = new Presence(channel)
    this.presence.onSync(() => emit({ type: "sync", state: this.state() }))
    channel.on("broadcast", (message) => {
      emit({ type: "broadcast", event: message?.event, payload: message?.payload })
    })
    channel.onError((reason) => emit({ type: "channel", status: "error", reason: reason ?? null }))
    channel.onClose(() => emit({ type: "channel", status: "close" }))
    return reply(channel.join(COMMAND_TIMEOUT_MS))
  }

  track(meta) {
    const body = { type: "presence", event: "track", payload: meta }
    return reply(this._joined().push("presence", body))
  }

  untrack() {
    return reply(this._joined().push("presence", { type: "presence", event: "untrack" }))
  }

  async broadcast(event, payload) {
    const push = this._joined().push("broadcast", { type: "broadcast", event, payload })
    // Without ack the server sends no reply: the push is done once written.
    return this.ack ? reply(push) : ["ok", null]
  }

  async leave() {
    if (this.channel === null) return ["ok", null]
    const channel = this.channel
    this.channel = null
    return reply(channel.leave(COMMAND_TIMEOUT_MS))
  }

  state() {
    const out = {}
    if (!this.presence) return out
    this.presence.list((key, { metas }) => {
      out[key] = metas.map(stripRefs)
    })
    return out
  }

  close() {
    this.socket.disconnect()
  }

  _joined() {
    if (this.channel === null) throw new Error("not joined")
    return this.channel
  }
}

// -- Supabase realtime-js --------------------------------------------------------------------

class SupabaseClient {
  constructor(base, vsn) {
    this.url = `${base}/realtime/v1`
    this.client = new RealtimeClient(this.url, {
      params: { apikey: "test" },
      vsn,
      heartbeatIntervalMs: HEARTBEAT_MS,
      timeout: COMMAND_TIMEOUT_MS,
      reconnectAfterMs: () => 500,
    })
    this.channel = null
  }

  async join({ topic, key, broadcast_self: self = false, broadcast_ack: ack = false }) {
    await this.leave()
    if (!topic.startsWith("realtime:")) {
      throw new Error(`topic must start with "realtime:": ${topic}`)
    }
    const channel = this.client.channel(topic.slice("realtime:".length), {
      config: { presence: { key: key ?? "", enabled: true }, broadcast: { self, ack } },
    })
    this.channel = channel
    channel.on("presence", { event: "sync" }, () => emit({ type: "sync", state: this.state() }))
    channel.on("broadcast", { event: "*" }, (message) =>
      emit({ type: "broadcast", event: message?.event, payload: message?.payload }),
    )
    return subscribed(channel, describe, (status, reason) => {
      if (status !== "SUBSCRIBED") emit({ type: "channel", status, error: reason })
    })
  }

  async track(meta) {
    return [await this._joined().track(meta), null]
  }

  async untrack() {
    return [await this._joined().untrack(), null]
  }

  async broadcast(event, payload) {
    return [await this._joined().send({ type: "broadcast", event, payload }), null]
  }

  async leave() {
    if (this.channel === null) return ["ok", null]
    const channel = this.channel
    this.channel = null
    return unsubscribed(channel)
  }

  state() {
    const out = {}
    if (!this.channel) return out
    for (const [key, presences] of Object.entries(this.channel.presenceState())) {
      out[key] = presences.map(stripRefs)
    }
    return out
  }

  close() {
    void this.client.disconnect()
  }

  _joined() {
    if (this.channel === null) throw new Error("not joined")
    return this.channel
  }
}

// -- driving ---------------------------------------------------------------------------------

async function run(client, command) {
  switch (command.cmd) {
    case "join":
      return client.join(command)
    case "track":
      return client.track(command.meta ?? {})
    case "untrack":
      return client.untrack()
    case "broadcast":
      return client.broadcast(command.event, command.payload ?? {})
    case "leave":
      return client.leave()
    case "state":
      return ["ok", null]
    default:
      throw new Error(`unknown command ${JSON.stringify(command.cmd)}`)
  }
}

function exit(client, code) {
  try {
    client?.close()
  } catch (error) {
    emit({ type: "error", where: "close", error: describe(error) })
  }
  // Closed sockets leave library timers behind: exit once stdout is written.
  process.stdout.write("", () => process.exit(code))
}

async function main() {
  const [name, base] = process.argv.slice(2)
  let client = null
  try {
    if (typeof WebSocket === "undefined") {
      throw new Error("no global WebSocket: run node with --experimental-websocket")
    }
    if (!base) throw new Error("usage: live_client.mjs phoenix|realtime|realtime_v1 ws://HOST:PORT")
    if (name === "phoenix") client = new PhoenixClient(base)
    else if (name === "realtime") client = new SupabaseClient(base, "2.0.0")
    else if (name === "realtime_v1") client = new SupabaseClient(base, "1.0.0")
    else throw new Error(`unknown client ${JSON.stringify(name)}`)
  } catch (error) {
    emit({ type: "error", where: "start", error: describe(error) })
    exit(client, 2)
    return
  }
  emit({ type: "started", client: name, url: client.url })

  const lines = createInterface({ input: process.stdin, crlfDelay: Infinity })
  for await (const line of lines) {
    if (line.trim() === "") continue
    let command = {}
    try {
      command = JSON.parse(line)
      if (command.cmd === "exit") break
      const [status, response] = await withTimeout(run(client, command), command.cmd)
      const out = { type: "reply", id: command.id ?? null, cmd: command.cmd, status }
      out.response = response ?? null
      if (command.cmd === "state") out.state = client.state()
      emit(out)
    } catch (error) {
      const out = { type: "reply", id: command.id ?? null, cmd: command.cmd ?? null }
      emit({ ...out, status: "error", error: describe(error) })
    }
  }
  exit(client, 0)
}

await main()
